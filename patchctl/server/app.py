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
  which also does ``Range`` and ``If-Range``); they are not re-hashed on the
  way out — the client hashes everything it receives (invariant 5). Verified
  manifests are cached in memory by digest (bounded; they are immutable).
- Errors: a :class:`~patchctl.errors.PatchctlError` becomes an HTTP status at
  one boundary (:data:`STATUS`, :func:`_patchctl_error`), with an OCI body
  ``{"errors": [{"code", "message"}]}``; so do unmatched routes (404) and
  anything unexpected (500, with no internals in the message).
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
import threading
from collections import OrderedDict
from typing import Any

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
from patchctl.registry.store.folder import Store
from patchctl.registry.store.names import DIGEST_RE, TAG_RE, Ref, check_name
from patchctl.server.guard import Guard, error_body

MANIFEST_MEDIA_TYPE = "application/vnd.patchctl.manifest.v1+json"
BLOB_MEDIA_TYPE = "application/octet-stream"
IMMUTABLE = "public, max-age=31536000, immutable"
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}

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
    chunk_size = 1 << 20


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


def _page(items: list[str], request: Request, url: str) -> tuple[list[str], dict[str, str]]:
    """OCI pagination: ``n`` (at most this many) and ``last`` (after this one), a ``Link`` to the next page."""
    last = request.query_params.get("last")
    if last is not None:
        items = [x for x in items if x > last]
    n_raw = request.query_params.get("n")
    headers: dict[str, str] = {}
    if n_raw is not None:
        if not n_raw.isdigit() or len(n_raw) > 9:
            raise ApiError(400, "PAGINATION_NUMBER_INVALID", f"n must be a non-negative integer, got {n_raw[:20]!r}")
        n = int(n_raw)
        if len(items) > n:
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
        path = self.store._ref_path(ref)  # checks the name and tag first
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

    def tags(self, name: str) -> list[str]:
        return sorted(r.tag for r in self.store.iter_refs()
                      if r.name == name and self.store.ref_target(r) is not None)

    def names(self) -> list[str]:
        return sorted({r.name for r in self.store.iter_refs() if self.store.ref_target(r) is not None})


class _Handlers:
    def __init__(self, reader: _Reader):
        self.r = reader

    @staticmethod
    def _name(request: Request) -> str:
        return check_name(request.path_params["name"])

    async def v2(self, request: Request) -> Response:
        return _Json({}, headers=API_VERSION_HEADER)

    async def catalog(self, request: Request) -> Response:
        names, headers = _page(self.r.names(), request, "/v2/_catalog")
        return _Json({"repositories": names}, headers=headers)

    async def tags_list(self, request: Request) -> Response:
        name = self._name(request)
        tags = self.r.tags(name)
        if not tags:
            raise ApiError(404, "NAME_UNKNOWN", f"no patch named {name!r} on this server")
        tags, headers = _page(tags, request, f"/v2/{name}/tags/list")
        return _Json({"name": name, "tags": tags}, headers=headers)

    async def manifest(self, request: Request) -> Response:
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

    async def blob(self, request: Request) -> Response:
        self._name(request)
        digest = request.path_params["digest"]
        if not DIGEST_RE.fullmatch(digest):
            raise ApiError(400, "DIGEST_INVALID", f"{digest[:140]!r} is not sha256: followed by 64 lowercase hex digits")
        path = self.r.store.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ApiError(404, "BLOB_UNKNOWN", f"no blob {digest} on this server") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise ApiError(404, "BLOB_UNKNOWN", f"no blob {digest} on this server")
        etag = f'"{digest}"'
        headers = {"Docker-Content-Digest": digest, "ETag": etag, "Cache-Control": IMMUTABLE}
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        rng = request.headers.get("range")
        if rng is not None:
            _check_range(rng, st.st_size)
        return _Blob(path, headers=headers, media_type=BLOB_MEDIA_TYPE, stat_result=st)

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
        Route("/v2/", h.v2),
        Route("/v2/_catalog", h.catalog),
        Route("/v2/{name:path}/manifests/{reference}", h.manifest),
        Route("/v2/{name:path}/blobs/{digest}", h.blob),
        Route("/v2/{name:path}/tags/list", h.tags_list),
        Route("/api/health", h.health),
        Route("/api/patches", h.patches),
        Route("/api/patches/{name:path}/{tag}", h.patch),
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
    return Guard(app, token)


def serve(registry: str | os.PathLike[str] | None = None, host: str = "127.0.0.1", port: int = 8080,
          token: str | None = None, log_level: str = "warning", access_log: bool = False) -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    app = create_app(registry, token)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                server_header=False, proxy_headers=False)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace stripped); refuses an empty one."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise NotFound(f"cannot read token file {os.fspath(path)!r}: {e.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise InvalidArgument(f"token file {os.fspath(path)!r} must hold one token with no spaces")
    return token


__all__ = ["MANIFEST_MEDIA_TYPE", "STATUS", "create_app", "read_token_file", "serve"]
