"""The server's guards: one per connection, one per request, before any routing.

**Per connection** (:func:`protocol`, a subclass of uvicorn's ``H11Protocol``;
uvicorn has a keep-alive timeout but no header timeout and no connection cap,
and its ``limit_concurrency`` counts idle sockets yet acts only once a request's
headers are parsed, so 1,100 idle sockets would make every real request a 503):

1. *Header timeout*: the request line and headers must be complete within
   :attr:`Limits.header_timeout` seconds of connecting, and of the end of the
   previous response on a kept-alive connection (plus the keep-alive time), or
   the connection is closed. A timer per connection, cancelled when a request
   starts; a client sending one byte every few seconds (slowloris), or never
   finishing a body that nobody reads, is dropped after a bounded time.
2. *Send timeout*: a response whose client reads nothing for
   :attr:`Limits.send_timeout` seconds (the transport's buffer stays full) is
   aborted.
3. *Connection cap*: at most :meth:`Limits.cap` connections, below the process's
   descriptor limit (each connection may hold its socket and one open blob, the
   accept loop takes up to :data:`BACKLOG` sockets at once, the threads their
   SQLite files). A connection over the cap closes the connection that has
   waited longest for a request (an idle one, as nginx reuses keep-alive
   connections), so idle sockets can never lock real requests out; when every
   connection is in the middle of a request (or has one waiting unread in its
   socket) the new one is refused at once with ``503`` and ``Connection: close``.
4. Client misbehaviour never logs a traceback: timeouts and evictions are
   silent, refusals one rate-limited line, and the event loop's handler turns
   ``accept()`` running out of descriptors into one line (:class:`Server`).

**Per request** (:class:`Guard`, a pure ASGI middleware), in order:

1. a method other than GET or HEAD answers ``405`` (the server is read-only);
2. a raw path with an encoded dot, slash, backslash or NUL (``%2e``, ``%2f``,
   ``%5c``, ``%00``), a literal backslash, or a ``.``/``..`` segment answers
   ``400`` — names, tags and digests never need them, and rejecting them here
   means a decoded path can never route differently from what was sent;
3. when a token is set, a request without ``Authorization: Bearer <token>``
   answers ``401`` with ``WWW-Authenticate: Bearer``; the token is compared in
   constant time. ``/api/health`` is open, so probes need no secret.

Errors are OCI-style JSON: ``{"errors": [{"code", "message"}]}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import re
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import anyio.to_thread
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from patchctl.errors import InvalidArgument

READ_METHODS = ("GET", "HEAD")
OPEN_PATHS = frozenset({"/api/health"})
_BAD_RAW = re.compile(rb"%(2e|2f|5c|00)|\\|(^|/)\.\.?(/|$)", re.IGNORECASE)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}, sort_keys=True).encode()


async def send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                     head: bool = False) -> None:
    body = error_body(code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


class Guard:
    """Method, path and token checks in front of ``app`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str | None = None):
        self.app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        head = method == "HEAD"
        if method not in READ_METHODS:
            await send_error(send, 405, "UNSUPPORTED", f"{method} is not allowed: this server is read-only",
                             {"Allow": "GET, HEAD"})
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if _BAD_RAW.search(raw):
            await send_error(send, 400, "NAME_INVALID", "the path has a dot segment or an encoded "
                             "'.', '/', '\\' or NUL; names, tags and digests never need them", head=head)
            return
        if self._token is not None and scope["path"] not in OPEN_PATHS and not _authorized(scope, self._token):
            await send_error(send, 401, "UNAUTHORIZED", "a bearer token is required: send "
                             "'Authorization: Bearer <token>'", {"WWW-Authenticate": 'Bearer realm="patchctl"'},
                             head=head)
            return
        await self.app(scope, receive, send)



def _authorized(scope: Scope, token: bytes) -> bool:
    for k, v in scope["headers"]:
        if k == b"authorization":
            scheme, _, cred = v.partition(b" ")
            # compare_digest: the time taken does not depend on where the bytes differ
            return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), token)
    return False


# ------------------------------------------------------------------------------------ per connection

#: Worker threads for the sync handlers (anyio's default, set explicitly: the descriptor budget counts them).
THREADS = 40
#: The listen backlog; asyncio accepts up to this many sockets in one go before any protocol runs.
BACKLOG = 128
_FIXED_FDS = 64  # stdio, the listener, epoll, log files, the registry's lock and config files...
_FDS_PER_THREAD = 3  # a thread's SQLite connection: the database, its -wal and -shm files
_MIN_CAP = 8
_log = logging.getLogger("uvicorn.error")


@dataclasses.dataclass(frozen=True)
class Limits:
    """How long a client may take and how many may connect; built once by ``serve()``."""

    header_timeout: float = 10.0  #: seconds to send a request line and headers
    keep_alive: float = 5.0  #: seconds a kept-alive connection may stay idle (uvicorn's ``timeout_keep_alive``)
    send_timeout: float = 60.0  #: seconds a response may wait for the client to read
    max_connections: int = 1024  #: at most this many connections; fewer when descriptors are short

    ENV: ClassVar[dict[str, str]] = {
        "header_timeout": "PATCHCTL_SERVE_HEADER_TIMEOUT",
        "keep_alive": "PATCHCTL_SERVE_KEEP_ALIVE",
        "send_timeout": "PATCHCTL_SERVE_SEND_TIMEOUT",
        "max_connections": "PATCHCTL_SERVE_MAX_CONNECTIONS",
    }

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v > 0 or v == float("inf"):
                raise InvalidArgument(f"{f.name.replace('_', ' ')} must be a positive number, got {v!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """The defaults, with any ``PATCHCTL_SERVE_*`` variable of :attr:`ENV` set in ``environ``."""
        kw: dict[str, Any] = {}
        for field, var in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                kw[field] = int(raw) if field == "max_connections" else float(raw)
            except ValueError:
                raise InvalidArgument(f"{var}={raw[:40]!r} is not a number") from None
        return cls(**kw)

    @staticmethod
    def descriptors_needed(connections: int) -> int:
        """Descriptors for ``connections`` connections: a socket and an open blob each, plus the fixed costs."""
        return 2 * connections + BACKLOG + THREADS * _FDS_PER_THREAD + _FIXED_FDS

    def cap(self, nofile: int) -> int:
        """The connection cap under a descriptor limit of ``nofile`` (the budget never below 8)."""
        budget = (nofile - BACKLOG - THREADS * _FDS_PER_THREAD - _FIXED_FDS) // 2
        return min(self.max_connections, max(_MIN_CAP, budget))


def raise_descriptor_limit(limits: Limits) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards what ``limits`` needs (never past the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.descriptors_needed(limits.max_connections)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


_REFUSED_BODY = error_body("UNAVAILABLE", "too many connections: retry in a moment")
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(_REFUSED_BODY)).encode() + b"\r\nretry-after: 1\r\n"
            b"connection: close\r\n\r\n" + _REFUSED_BODY)


class _Warn:
    """One log line per ``every`` seconds at most, with the count of what it stands for."""

    def __init__(self, every: float = 10.0):
        self.every, self.last, self.count = every, -1e9, 0

    def __call__(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            _log.warning("%s (%d since the last such line)", message, self.count)
            self.last, self.count = now, 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header timeout, send timeout and connection cap (module docstring).

    Made per server by :func:`protocol`, which sets the class attributes.
    """

    limits: ClassVar[Limits]
    max_connections: ClassVar[int]
    live: ClassVar[set[GuardedH11Protocol]]  # connections not yet closed by us or the client
    waiting: ClassVar[OrderedDict[GuardedH11Protocol, None]]  # waiting for a request, longest first
    refused: ClassVar[_Warn]

    _deadline: asyncio.TimerHandle | None = None
    _stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets it only when the listener was made with proto IPPROTO_TCP
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.live) >= self.max_connections and not self._evict_one():
            self.refused(f"connection cap of {self.max_connections} reached with every connection busy: "
                         "refusing new connections with 503")
            self.transport.write(_REFUSED)
            self.transport.close()
            return
        self.live.add(self)
        self._wait_for_request(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not None and not self.cycle.response_complete:
            self._stop_waiting()  # a request's headers are complete: the handler runs

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():  # armed first: super() may start a pipelined request at once
            self._wait_for_request(self.limits.keep_alive + self.limits.header_timeout)
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.send_timeout, self._drop, True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    # -- the bookkeeping ---------------------------------------------------------------
    def _wait_for_request(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._drop, False)
        self.waiting[self] = None
        self.waiting.move_to_end(self)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.waiting.pop(self, None)

    def _forget(self) -> None:
        self._stop_waiting()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.live.discard(self)

    def _drop(self, abort: bool = False) -> None:
        """Close this connection (a timeout, or room for a new one): no response, no log line."""
        self._forget()
        if not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request; False when every one is busy.

        A waiting connection whose request has arrived but not been read yet (bytes in its socket: in a
        burst of accepts, every new connection's ``connection_made`` runs before the others' reads) is busy,
        not idle: closing it would reset a real request.
        """
        for other in self.waiting:
            if not other._request_pending():
                other._drop()
                return True
        return False

    def _request_pending(self) -> bool:
        """Whether bytes from the client wait unread in this connection's socket (a peek; never blocks)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        peek = socket.socket(fileno=sock.fileno())  # the same descriptor: detached below, never closed here
        try:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing to read (EAGAIN), or a broken connection: idle for our purpose
            return False
        finally:
            peek.detach()


def protocol(limits: Limits, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class for one server (its own connection set and cap)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "limits": limits, "max_connections": max_connections, "live": set(), "waiting": OrderedDict(),
        "refused": _Warn(),
    })


class Server(uvicorn.Server):
    """uvicorn's server with :data:`THREADS` worker threads and no traceback when ``accept()`` runs out
    of descriptors (asyncio retries a second later; one rate-limited line says so)."""

    _accept_failed = _Warn()

    async def startup(self, sockets: Any = None) -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        loop = asyncio.get_running_loop()
        default = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
                self._accept_failed(f"cannot accept a connection: {exc.strerror or exc}; retrying")
            elif default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        await super().startup(sockets)
