"""The read-only HTTP server over a registry (``patchctl serve``), on Starlette.

OCI-distribution-style reads (a pulling client needs nothing else):

```
GET       /v2/                                   {} — API version check
GET       /v2/_catalog[?n=&last=]                {"repositories": [names]}
GET|HEAD  /v2/<name>/manifests/<tag|digest>      manifest bytes, Docker-Content-Digest
GET|HEAD  /v2/<name>/blobs/<digest>              blob bytes, Range (206/416), immutable
GET       /v2/<name>/tags/list[?n=&last=]        {"name", "tags"}
GET       /api/health                            {"status": "ok", ...} (open without a token)
GET       /api/patches                           every NAME:TAG with kind, base, size
GET       /api/patches/<name>/<tag>              manifest, metadata, history, lineage tree
```

Design choices:

- *Names* may contain ``/`` (``team/math``): routes use a ``path`` converter,
  and every name, tag and digest is checked against the patterns of
  :mod:`patchctl.registry.store.names` before any file path is built from it. The
  :class:`~patchctl.server.guard.Guard` in front rejects encoded dots and
  slashes and dot segments, so a decoded path routes as it was sent.
- *Blob scope*: a blob is served by its digest under any valid name. OCI scopes blobs to a repository so that a registry can
  hold repositories with different readers; this server has one reader set
  (whoever has the token, if any) for the whole registry, and blobs are
  content-addressed and shared between names on disk, so a per-name check
  would cost a manifest scan per request and protect nothing.
- Blob bodies stream from disk in 1 MiB chunks (Starlette's ``FileResponse``,
  which also does ``Range`` and ``If-Range``); a blob of up to 1 MiB asked
  without ``Range`` is read whole by the handler and sent in one piece (no
  worker-thread trips to read and close it). They are not re-hashed on the
  way out — the client hashes everything it receives (invariant 5). Verified
  manifests are cached in memory by digest (bounded; they are immutable).
- A blob is opened component by component from the registry folder with
  ``O_NOFOLLOW`` (``objects``, ``sha256``, the shard folder, the file) and
  served from that descriptor only if it is a regular file: a symlink planted
  anywhere on the way answers 404 (and one log line), never a file from
  elsewhere, and nothing can be swapped between the check and the read.
- Handlers that touch the disk (manifests, blobs, ``_catalog``, ``tags/list``,
  ``/api/``) are plain functions, which Starlette runs in a worker thread
  (:data:`~patchctl.server.guard.THREADS` of them): a slow disk or a large
  answer never stalls the event loop and the other requests on it.
- ``_catalog`` and ``tags/list`` are answered from the SQLite index, never by
  reading every ref log: ``tags/list`` is one paginated query; the catalog's
  sorted names are kept while the index files' stat is unchanged (1 s at
  most). A manifest by tag reads that one ref log (re-read only when its stat
  changes), so it is never stale.
- Connections: header and send timeouts, and a cap below the descriptor limit
  that closes the longest-idle connection to make room (see
  :mod:`patchctl.server.guard`); :func:`serve` builds them from
  :class:`~patchctl.server.guard.Limits` (``PATCHCTL_SERVE_*`` variables).
- Errors: a :class:`~patchctl.errors.PatchctlError` becomes an HTTP status at
  one boundary (:data:`STATUS`, :func:`_patchctl_error`), with an OCI body
  ``{"errors": [{"code", "message"}]}``; so do unmatched routes (404) and
  anything unexpected (500, with no internals in the message).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import socket
import stat as stat_mod
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from patchctl.errors import (
    DigestMismatch,
    InvalidArgument,
    InvalidPatch,
    InvalidReference,
    NotFound,
    PatchctlError,
    RegistryError,
)
from patchctl.registry.remote.protocol import (
    API_VERSION_HEADER,
    BLOB_MEDIA_TYPE,
    BLOB_ROUTE,
    CATALOG_ROUTE,
    MANIFEST_MEDIA_TYPE,
    MANIFEST_ROUTE,
    TAGS_ROUTE,
    V2_ROUTE,
    read_token_file,
)
from patchctl.registry.store.folder import Store
from patchctl.registry.store.names import DIGEST_RE, TAG_RE, Ref, check_name
from patchctl.server import pages
from patchctl.server.cookie import TokenCookie
from patchctl.server.guard import (
    BACKLOG,
    Guard,
    Limits,
    Server,
    error_body,
    protocol,
    raise_descriptor_limit,
)
from patchctl.server.oci import OciArtifacts

IMMUTABLE = "public, max-age=31536000, immutable"
_log = logging.getLogger("uvicorn.error")  # uvicorn's configured logger: one line each, on stderr

#: PatchctlError subclass → HTTP status; the first match along the MRO wins, else 500.
STATUS: dict[type[PatchctlError], int] = {
    NotFound: 404,
    InvalidReference: 400,
    InvalidArgument: 400,
    InvalidPatch: 500,  # a stored manifest that does not parse: the registry is damaged
    DigestMismatch: 500,  # a stored object whose bytes do not match its name: run fsck
    RegistryError: 500,
}


class ApiError(Exception):
    """An HTTP error with an OCI code (``MANIFEST_UNKNOWN``, ``RANGE_INVALID``...)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(code, message), status, headers, media_type="application/json")


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # registered for ApiError only
        return await _internal_error(request, exc)
    return _error(exc.status, exc.code, exc.message, exc.headers)


async def _patchctl_error(request: Request, exc: Exception) -> Response:
    status = next((STATUS[c] for c in type(exc).__mro__ if c in STATUS), 500)
    code = getattr(exc, "code", "UNKNOWN")
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _error(status, code, message)


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await _internal_error(request, exc)
    code = {404: "NOT_FOUND", 405: "UNSUPPORTED"}.get(exc.status_code, "UNKNOWN")
    message = "no such endpoint; see GET /v2/ and /api/patches" if exc.status_code == 404 else exc.detail
    return _error(exc.status_code, code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error(500, "UNKNOWN", "internal server error (see the server log)")


class _Blob(FileResponse):
    """A blob streamed from a file already opened (and checked) by :meth:`_Reader.open_blob`.

    ``data``: the whole blob, read by the handler (a small one, a plain GET):
    sent as it is, with the same headers, without the two worker-thread trips
    (read, close) that streaming the file costs — most blobs of a patch are
    small, so these trips were most of a pull's per-request cost.
    """

    chunk_size = 1 << 20
    SMALL = 1 << 20  # blobs up to this size are read whole by the handler (no Range asked)

    def __init__(self, file: IO[bytes], path: str, data: bytes | None = None, **kw: Any):
        self._file, self._data = file, data
        super().__init__(path, **kw)

    @contextlib.asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:  # never reopens the path
        f = anyio.wrap_file(self._file)
        try:
            yield f
        finally:
            with anyio.CancelScope(shield=True):
                await f.aclose()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            if self._data is not None:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": self._data, "more_body": False})
                return
            await super().__call__(scope, receive, send)
        finally:
            self._file.close()  # HEAD, 304 paths and errors never open it


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str).encode()


def _etag_matches(request: Request, etag: str) -> bool:
    inm = request.headers.get("if-none-match")
    return inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")])


def _check_range(value: str, size: int) -> None:
    """Raise 400/416 (as JSON) for a Range header that ``FileResponse`` would refuse."""
    from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

    try:
        FileResponse._parse_range_header(value, size)
    except MalformedRangeHeader as e:
        raise ApiError(400, "RANGE_INVALID", f"malformed Range header {value[:100]!r}: {e.content}") from None
    except RangeNotSatisfiable:
        raise ApiError(416, "RANGE_INVALID", f"Range {value[:100]!r} is outside the blob's {size} bytes",
                       {"Content-Range": f"bytes */{size}"}) from None


def _page(fetch: Callable[[str | None, int | None], list[str]], request: Request,
          url: str) -> tuple[list[str], dict[str, str]]:
    """OCI pagination: ``n`` (at most this many) and ``last`` (after this one), a ``Link`` to the next page.

    ``fetch(last, limit)`` answers the sorted items after ``last``, at most ``limit`` (None: all).
    """
    last = request.query_params.get("last")
    n_raw = request.query_params.get("n")
    n = None
    if n_raw is not None:
        if not n_raw.isdigit() or len(n_raw) > 9:
            raise ApiError(400, "PAGINATION_NUMBER_INVALID", f"n must be a non-negative integer, got {n_raw[:20]!r}")
        n = int(n_raw)
    items = fetch(last, None if n is None else n + 1)  # one more than asked: is there a next page?
    headers: dict[str, str] = {}
    if n is not None and len(items) > n:
        items = items[:n]
        if items:
            headers["Link"] = f'<{url}?n={n}&last={items[-1]}>; rel="next"'
    return items, headers


class _Reader:
    """Read access to one registry folder for the request handlers."""

    MANIFEST_CACHE_BYTES = 32 << 20

    def __init__(self, store: Store):
        self.store = store
        self._manifests: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._refs: dict[Any, tuple[tuple[int, int, int], str | None]] = {}
        self._root_fd = os.open(store.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # held while serving
        weakref.finalize(self, os.close, self._root_fd)
        self._names: tuple[list[Any], float, list[str]] | None = None  # (index files' stat, when, names)

    def registry(self) -> Any:
        """A :class:`Registry` (SQLite index) for this thread; opened on first use."""
        reg = getattr(self._local, "reg", None)
        if reg is None:
            from patchctl.registry.registry import Registry

            reg = self._local.reg = Registry(self.store.root, create=False)
        return reg

    def manifest(self, digest: str) -> bytes:
        with self._lock:
            data = self._manifests.get(digest)
            if data is not None:
                self._manifests.move_to_end(digest)
                return data
        data = self.store.read_manifest_bytes(digest)  # verifies the sha256
        if len(data) <= self.MANIFEST_CACHE_BYTES // 8:
            with self._lock:
                if digest not in self._manifests:
                    self._manifests[digest] = data
                    self._cached += len(data)
                    while self._cached > self.MANIFEST_CACHE_BYTES:
                        self._cached -= len(self._manifests.popitem(last=False)[1])
        return data

    def ref_target(self, ref: Ref) -> str | None:
        """The manifest a ref points at, re-read only when its log file's stat changes."""
        path = self.store.ref_path(ref)  # checks the name and tag first
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._refs.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        target = self.store.ref_target(ref)
        if len(self._refs) > 65536:
            self._refs.clear()
        self._refs[path] = (key, target)
        return target

    def tags(self, name: str, after: str | None = None, limit: int | None = None) -> list[str]:
        """``name``'s tags from the index (sorted, after ``after``, at most ``limit``)."""
        return list(self.registry().index.tags_page(name, after, limit))

    NAMES_TTL = 1.0  # seconds; also re-read at once when the index files change

    def names(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Names with a tag, from the index (sorted, after ``after``, at most ``limit``).

        The whole sorted list is kept while the index files' stat is unchanged (and
        :attr:`NAMES_TTL` at most, for file systems with coarse timestamps): many
        concurrent catalog requests then cost one query, not one each.
        """
        sig = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(self.store.root / f"index.sqlite{suffix}")
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                sig.append(None)
        now = time.monotonic()
        hit = self._names
        if hit is None or hit[0] != sig or now - hit[1] > self.NAMES_TTL:
            hit = self._names = (sig, now, self.registry().index.names_page())
        names = hit[2]
        start = 0 if after is None else bisect.bisect_right(names, after)
        return names[start:] if limit is None else names[start:start + limit]

    def open_blob(self, digest: str) -> tuple[IO[bytes], os.stat_result] | None:
        """The blob's file and its stat; None when it is not here.

        Every component below the registry folder is opened with ``O_NOFOLLOW``
        (relative to the previous one), so a symlink anywhere on the way is never
        followed; anything but a regular file is refused (logged, and None).
        """
        hexd = digest[7:]
        shown = f"objects/sha256/{hexd[:2]}/{hexd[2:]}"
        fd = self._root_fd
        try:
            for part in ("objects", "sha256", hexd[:2]):
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                if fd != self._root_fd:
                    os.close(fd)
                fd = nxt
            blob = os.open(hexd[2:], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise ApiError(503, "UNAVAILABLE", "the server is out of file descriptors: retry in a moment",
                               {"Retry-After": "1"}) from None
            # ELOOP (a symlink), ENOTDIR (a link or file where a folder should be), EACCES...
            _log.warning("refused to serve %s: %s is not a regular file inside the registry (%s); "
                         "run `patchctl fsck`", digest, shown, e.strerror)
            return None
        finally:
            if fd != self._root_fd:
                os.close(fd)
        st = os.fstat(blob)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(blob)
            _log.warning("refused to serve %s: %s is not a regular file; run `patchctl fsck`", digest, shown)
            return None
        os.set_blocking(blob, True)
        return open(blob, "rb", buffering=0), st  # noqa: SIM115 - closed by the response (_Blob)


class _Handlers:
    def __init__(self, reader: _Reader):
        self.r = reader

    @staticmethod
    def _name(request: Request) -> str:
        return check_name(request.path_params["name"])

    async def v2(self, request: Request) -> Response:
        return _Json({}, headers=API_VERSION_HEADER)

    # The handlers below touch the disk or the index: plain functions, run in a worker thread.
    def catalog(self, request: Request) -> Response:
        names, headers = _page(self.r.names, request, "/v2/_catalog")
        return _Json({"repositories": names}, headers=headers)

    def tags_list(self, request: Request) -> Response:
        name = self._name(request)
        if not self.r.tags(name, limit=1):
            raise ApiError(404, "NAME_UNKNOWN", f"no patch named {name!r} on this server")
        tags, headers = _page(lambda last, limit: self.r.tags(name, last, limit), request, f"/v2/{name}/tags/list")
        return _Json({"name": name, "tags": tags}, headers=headers)

    def manifest(self, request: Request) -> Response:
        name = self._name(request)
        reference = request.path_params["reference"]
        if DIGEST_RE.fullmatch(reference):
            digest, cache = reference, IMMUTABLE
            if not self.r.store.has_manifest(digest):
                raise ApiError(404, "MANIFEST_UNKNOWN", f"no manifest {digest} on this server")
        elif TAG_RE.fullmatch(reference):
            target = self.r.ref_target(Ref(name, reference))
            if target is None:
                raise ApiError(404, "MANIFEST_UNKNOWN", f"no patch named {name}:{reference} on this server")
            digest, cache = target, "no-cache"
        else:
            raise ApiError(400, "TAG_INVALID", f"{reference[:140]!r} is neither a tag nor a sha256 digest")
        etag = f'"{digest}"'
        headers = {"Docker-Content-Digest": digest, "ETag": etag, "Cache-Control": cache}
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        data = self.r.manifest(digest)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return Response(None, headers=headers, media_type=MANIFEST_MEDIA_TYPE)
        return Response(data, headers=headers, media_type=MANIFEST_MEDIA_TYPE)

    def blob(self, request: Request) -> Response:
        self._name(request)
        digest = request.path_params["digest"]
        if not DIGEST_RE.fullmatch(digest):
            raise ApiError(400, "DIGEST_INVALID", f"{digest[:140]!r} is not sha256: followed by 64 lowercase hex digits")
        opened = self.r.open_blob(digest)
        if opened is None:
            raise ApiError(404, "BLOB_UNKNOWN", f"no blob {digest} on this server")
        file, st = opened
        try:
            etag = f'"{digest}"'
            headers = {"Docker-Content-Digest": digest, "ETag": etag, "Cache-Control": IMMUTABLE}
            if _etag_matches(request, etag):
                file.close()
                return Response(status_code=304, headers=headers)
            rng = request.headers.get("range")
            if rng is not None:
                _check_range(rng, st.st_size)
            data = None
            if rng is None and request.method == "GET" and st.st_size <= _Blob.SMALL:
                data = file.read(st.st_size + 1)  # in this worker thread already
                if len(data) == st.st_size:
                    file.close()
                else:  # changed under us: streamed as FileResponse does
                    file.seek(0)
                    data = None
            path = os.fspath(self.r.store.root / "objects" / "sha256" / digest[7:9] / digest[9:])
            return _Blob(file, path, data, headers=headers, media_type=BLOB_MEDIA_TYPE, stat_result=st)
        except BaseException:
            file.close()
            raise

    async def health(self, request: Request) -> Response:
        return _Json({"status": "ok", "registry": "patchctl", "format_version": 1})

    def patches(self, request: Request) -> Response:
        return _Json({"patches": self.r.registry().ls()})

    def patch(self, request: Request) -> Response:
        name = self._name(request)
        tag = request.path_params["tag"]
        if not TAG_RE.fullmatch(tag):
            raise ApiError(400, "TAG_INVALID", f"invalid tag {tag[:140]!r}")
        reg = self.r.registry()
        ref = f"{name}:{tag}"
        doc = reg.show(ref)
        log = reg.log(ref)
        doc["ref"] = ref
        doc["history"] = log["history"]
        doc["lineage_tree"] = log["lineage"]
        return _Json(doc)


def create_app(registry: str | os.PathLike[str] | None = None, token: str | None = None) -> ASGIApp:
    """The ASGI app serving the registry at ``registry`` read-only; ``token`` enables bearer auth."""
    store = Store.open(registry, create=False)
    h = _Handlers(_Reader(store))
    routes = [
        Route(V2_ROUTE, h.v2),
        Route(CATALOG_ROUTE, h.catalog),
        Route(MANIFEST_ROUTE, h.manifest),
        Route(BLOB_ROUTE, h.blob),
        Route(TAGS_ROUTE, h.tags_list),
        Route("/api/health", h.health),
        Route("/api/patches", h.patches),
        Route("/api/patches/{name:path}/{tag}", h.patch),
        *pages.routes(h.r.registry),  # the registry browser: HTML pages and /api/pages/ twins
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            PatchctlError: _patchctl_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    oci_layer = OciArtifacts(app, store, tags_of=lambda digest: h.r.registry().index.tags_of(digest))
    return TokenCookie(Guard(oci_layer, token), token)  # a browser sends the token once as ?token=  # a browser sends the token once as ?token=


def bind(host: str = "127.0.0.1", port: int = 8080) -> socket.socket:
    """A socket bound to ``host:port`` (0 picks a free port), checked before anything is printed.

    A port out of range or one that is busy is an :class:`InvalidArgument` with a one-line message.
    """
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range: use 1-65535 (0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the proto says TCP;
    # without it, Nagle + delayed ACKs hold small responses for ~40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; pick another --port (0 picks a free one)" if e.errno == errno.EADDRINUSE else ""
        raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def serve(registry: str | os.PathLike[str] | None = None, host: str = "127.0.0.1", port: int = 8080,
          token: str | None = None, log_level: str = "warning", access_log: bool = False,
          sock: socket.socket | None = None, limits: Limits | None = None) -> None:
    """Run the server with uvicorn until interrupted (on ``sock`` if given, else on a new :func:`bind`).

    ``limits`` (default: :meth:`Limits.from_env`) sets the header, keep-alive and send timeouts and the
    connection cap; the soft descriptor limit is raised towards what the cap needs (up to the hard one)
    and the cap lowered to what the descriptors allow.
    """
    import uvicorn

    limits = limits if limits is not None else Limits.from_env()
    app = create_app(registry, token)
    sock = sock if sock is not None else bind(host, port)
    cap = limits.cap(raise_descriptor_limit(limits))
    # ws="none": a read-only HTTP server speaks no websocket, whatever websocket library is installed.
    # http=: uvicorn's h11 protocol with the header/send timeouts and the cap (patchctl.server.guard);
    # uvicorn's own limit_concurrency stays off: it counts idle sockets and answers 503 to real requests.
    # h11 refuses a request line + headers over 16 KiB (its default) with 400.
    config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], log_level=log_level, access_log=access_log,
                            server_header=False, proxy_headers=False, ws="none", http=protocol(limits, cap),
                            timeout_keep_alive=max(1, round(limits.keep_alive)), backlog=BACKLOG,
                            h11_max_incomplete_event_size=16 * 1024)
    Server(config).run(sockets=[sock])


__all__ = ["MANIFEST_MEDIA_TYPE", "STATUS", "Limits", "bind", "create_app", "read_token_file", "serve"]
