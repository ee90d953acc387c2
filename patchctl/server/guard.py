"""The server's outer guard: one pure ASGI middleware run before any routing.

In order, for every HTTP request:

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

import hmac
import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

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
