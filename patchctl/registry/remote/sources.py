"""Sources: where a transfer reads a manifest and blobs from (a registry folder, a ``patchctl serve``).

A :class:`Source` hands out the manifest bytes of a ref and each blob as a
``readinto`` from an offset; it neither hashes nor stores anything — the
transfer (:mod:`patchctl.registry.remote.transfer`) hashes every byte it is
given. :func:`open_source` opens the source of a configured remote; ``hf://``
remotes are read through the local Hub cache instead
(:class:`patchctl.registry.remote.hub.SnapshotSource`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from patchctl.errors import DigestMismatch, InvalidArgument, InvalidReference, NotFound, RemoteError
from patchctl.registry.remote.config import Remote, folder_path, parse_url, read_token
from patchctl.registry.remote.limits import LimitExceeded, PullLimits, shutdown
from patchctl.registry.remote.protocol import (
    BLOBS,
    DIGEST_HEADER,
    MANIFEST_MEDIA_TYPE,
    MANIFESTS,
    v2_path,
)
from patchctl.registry.store.folder import CHUNK, Store
from patchctl.registry.store.manifest import MAX_MANIFEST_BYTES
from patchctl.registry.store.names import Ref

ReadInto = Callable[[memoryview], int]


class Source(Protocol):
    """Where a transfer reads from: a manifest by ref, blobs by digest from an offset."""

    label: str

    def manifest(self, ref: Ref) -> bytes:
        """The manifest bytes of ``ref``; a source refuses one over its cap (:class:`LimitExceeded`) unread."""
        ...

    def blob(self, name: str, digest: str, offset: int) -> contextlib.AbstractContextManager[tuple[int, ReadInto]]:
        """``(start, readinto)`` for a blob of patch ``name``: ``start`` is ``offset`` when the source
        resumed there, else 0; ``readinto(buffer)`` fills the buffer and returns the count, 0 at the end."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def open_at(path: Path, offset: int, missing: str) -> Iterator[tuple[int, ReadInto]]:
    """A local file as a blob source: from ``offset`` when it is inside the file, else from 0."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFound(missing) from None
    except OSError as e:
        raise RemoteError(f"cannot read {path}: {e.strerror}") from None
    with f:
        start = offset if 0 < offset <= os.fstat(f.fileno()).st_size else 0
        f.seek(start)
        yield start, f.readinto


class FolderSource:
    """Another registry folder on this machine (its reads verify manifests; blobs are hashed by the transfer)."""

    def __init__(self, store: Store, label: str, max_manifest_bytes: int = MAX_MANIFEST_BYTES):
        self.store = store
        self.label = label
        self.max_manifest_bytes = max_manifest_bytes

    def manifest(self, ref: Ref) -> bytes:
        max_bytes = self.max_manifest_bytes
        digest = self.store.ref_target(ref)
        if digest is None:
            raise NotFound(f"no patch named {ref} in {self.label}")
        with contextlib.suppress(FileNotFoundError):  # read_manifest_bytes says NotFound
            size = self.store.manifest_path(digest).stat().st_size
            if size > max_bytes:
                raise LimitExceeded(f"{self.label}: the manifest of {ref} is {size} bytes, over the cap of "
                                    f"{max_bytes} (raise it with --max-manifest-bytes)")
        return self.store.read_manifest_bytes(digest)

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        with open_at(self.store.blob_path(digest), offset, f"blob {digest} is missing in {self.label}") as got:
            yield got

    def close(self) -> None:
        pass


class HttpSource:
    """A ``patchctl serve`` (or a server with the same OCI-style reads) over HTTP(S).

    Uses :mod:`http.client` with one keep-alive connection per download thread:
    a blob body is received straight into the transfer's buffer
    (:func:`_readinto1`: what has arrived, for at most :attr:`SLICE` seconds a
    call, so a slow peer's progress is seen), so the per-byte work in Python is
    a hash update and a file write.
    :meth:`abort` shuts every connection down: a read blocked on a silent or
    dripping peer returns at once (the transfer's watch calls it).
    """

    SLICE = 0.25

    BUFFER = CHUNK

    def __init__(self, url: str, token: str | None, label: str, timeout: float = 60.0,
                 max_manifest_bytes: int = MAX_MANIFEST_BYTES):
        parts = urlsplit(url)
        self.url, self.label, self.timeout = url, label, timeout
        self.max_manifest_bytes = max_manifest_bytes
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.headers = {"User-Agent": "patchctl", "Accept-Encoding": "identity"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self.range_requests = 0
        self.manifest_received = 0  # body bytes of manifests read so far (the watch's rate)
        self.aborted = False

    def _path(self, name: str, kind: str, ref: str) -> str:
        return v2_path(self.prefix, name, kind, ref)

    def _connection(self) -> Any:
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.https:
                import ssl

                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop(self, resp: Any = None) -> None:
        """Close this thread's connection (and ``resp``, whose buffered reader holds its socket)."""
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _get(self, path: str, headers: dict[str, str], what: str) -> Any:
        """Send a GET and return the response (status checked); one retry on a stale keep-alive connection."""
        import http.client

        for attempt in (0, 1):
            if self.aborted:
                raise RemoteError(f"cannot get {what} from {self.label}: the transfer was stopped")
            reused = getattr(self._local, "conn", None) is not None
            conn = self._connection()
            try:
                conn.request("GET", path, headers={**self.headers, **headers})
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                if attempt == 0 and reused:
                    continue  # the server closed an idle connection: once more on a new one
                raise RemoteError(f"cannot get {what} from {self.label}: {type(e).__name__}: {e}") from None
        if resp.status not in (200, 206):
            self._fail(resp, what)
        return resp

    def _fail(self, resp: Any, what: str) -> None:
        try:
            err = json.loads(resp.read(65536))["errors"][0]
            msg = f"{err['code']}: {err['message']}"
        except Exception:  # noqa: BLE001 - not an OCI error body
            msg = f"HTTP {resp.status}"
        self._drop(resp)
        if resp.status == 401:
            raise RemoteError(f"{self.label} refused {what} (401 unauthorized): set a token with "
                              "`patchctl remote add NAME URL --token-file FILE`")
        if resp.status == 404:
            raise NotFound(f"{what} is not on {self.label} ({msg})")
        if resp.status == 400:
            raise InvalidReference(f"{self.label} refused {what}: {msg}")
        raise RemoteError(f"{self.label} answered {resp.status} for {what} ({msg})")

    def manifest(self, ref: Ref) -> bytes:
        import http.client

        what, max_bytes = f"patch {ref}", self.max_manifest_bytes
        resp = self._get(self._path(ref.name, MANIFESTS, ref.tag), {"Accept": MANIFEST_MEDIA_TYPE}, what)
        too_big = LimitExceeded(f"{self.label} sent a manifest for {ref} larger than the cap of {max_bytes} "
                                "bytes (raise it with --max-manifest-bytes); nothing was fetched")
        length = resp.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            self._drop(resp)
            raise too_big
        data = bytearray()
        try:
            while len(data) <= max_bytes:
                chunk = resp.read1(min(CHUNK, max_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
                self.manifest_received += len(chunk)
                if resp.length == 0:
                    resp.read()  # closes the response: the connection is reused
                    break
        except (OSError, http.client.HTTPException) as e:
            self._drop(resp)
            raise RemoteError(f"cannot get {what} from {self.label}: {type(e).__name__}: {e}") from None
        if len(data) > max_bytes:
            self._drop(resp)
            raise too_big
        if resp.length:  # the connection closed before the Content-Length was sent
            self._drop(resp)
            raise RemoteError(f"cannot get {what} from {self.label}: the connection closed "
                              f"{resp.length} bytes short")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        announced = resp.getheader(DIGEST_HEADER)
        if announced is not None and announced != digest:
            raise DigestMismatch(f"{self.label} announced manifest {announced} for {ref} but sent bytes "
                                 f"that hash to {digest}")
        return bytes(data)

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        import http.client

        what = f"blob {digest}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        if offset > 0:
            with self._lock:
                self.range_requests += 1
        resp = self._get(self._path(name, BLOBS, digest), headers, what)
        start = 0
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range") or "")
            if m is None or int(m.group(1)) != offset:
                self._drop(resp)
                raise RemoteError(f"{self.label} answered Range bytes={offset}- with "
                                  f"{resp.getheader('Content-Range')!r}")
            start = offset

        def readinto(buf: memoryview) -> int:
            got, until = 0, time.monotonic() + self.SLICE
            while got < len(buf):
                try:
                    n = _readinto1(resp, buf[got:])
                except (OSError, http.client.HTTPException) as e:
                    if got:  # hand over what arrived; the next call fails again
                        return got
                    self._drop(resp)
                    raise Interrupted(f"{type(e).__name__}: {e}") from None
                if not n:
                    if resp.length:  # Content-Length not reached: the peer hung up
                        if got:
                            return got
                        self._drop(resp)
                        raise Interrupted(f"the connection closed {resp.length} bytes short")
                    break
                got += n
                if resp.length == 0:
                    resp.read()  # closes the response: the connection is reused for the next blob
                    break
                if time.monotonic() >= until:
                    break
            return got

        try:
            yield start, readinto
        finally:
            if not resp.isclosed():  # not read to the end (an error): the connection is unusable
                self._drop(resp)

    def abort(self) -> None:
        """Make every blocked read return (and every later request fail): the transfer is stopped."""
        self.aborted = True
        with self._lock:
            conns = list(self._conns)
        shutdown(conns)

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()


def _readinto1(resp: Any, buf: memoryview) -> int:
    """``resp.read1`` into ``buf``: what has arrived (at most one ``recv``), up to the Content-Length.

    A body with a Content-Length is received straight into ``buf`` through the
    response's buffered socket reader (``readinto1``), never as a fresh
    ``bytes`` copied again; a chunked one goes through ``read1``.
    """
    fp = resp.fp
    if resp.chunked or fp is None or not hasattr(fp, "readinto1"):
        chunk = resp.read1(len(buf))
        buf[: len(chunk)] = chunk
        return len(chunk)
    if resp.length is not None:
        buf = buf[: resp.length]
    n = fp.readinto1(buf) if len(buf) else 0
    if resp.length is not None:
        resp.length -= n
    return n


class Interrupted(Exception):
    """A transport error in the middle of a blob body (retried with Range)."""


def open_source(remote: Remote, limits: PullLimits | None = None) -> Source:
    """The source of an HTTP or folder remote, reading under ``limits`` (the manifest cap; an HTTP
    connect or silent read times out after ``min(60 s, limits.rate_window)``)."""
    limits = limits or PullLimits()
    kind, url = parse_url(remote.url)
    if kind == "http":
        return HttpSource(url, read_token(remote), remote.label, timeout=min(60.0, limits.rate_window),
                          max_manifest_bytes=limits.max_manifest_bytes)
    if kind == "folder":
        path = folder_path(url)
        return FolderSource(Store.open(path, create=False), str(path), limits.max_manifest_bytes)
    raise InvalidArgument(f"{remote.label}: hf:// remotes are read through the local Hub cache, not a Source")

