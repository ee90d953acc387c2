"""Remotes: other registries to pull patches from and publish them to.

A remote is named by a URL:

- ``http://host:port[/prefix]`` or ``https://…`` — a ``patchctl serve``
  (read-only: pull only); an optional bearer token is read from a file;
- a registry folder: ``/path``, ``./path`` or ``file:///path`` — pull and push;
- ``hf://org/repo[@revision]`` — a Hugging Face Hub model repo: pull a
  patchctl-layout or a PEFT adapter repo, push (see "The Hub" below).

Configured remotes live in ``remotes.json`` in the registry folder
(``{"version": 1, "remotes": {NAME: {"url", "token_file"}}}``), written to
``tmp/`` and renamed into place under ``locks/remotes.lock``; ``config.json``
stays minimal. Remote names match :data:`REMOTE_NAME_RE`.

A transfer (pull, or publish to a folder) keeps the registry's invariants:

1. the manifest is fetched first; its digest is the sha256 of its bytes (and
   equals what the server announced in ``Docker-Content-Digest``), and it
   must parse (:func:`patchctl.registry.store.manifest.parse`);
2. blobs already present are skipped; the others download in parallel (a
   small thread pool) into ``tmp/pull-<hex>.part``, named by the digest so a
   re-run finds them: an interrupted download resumes with
   ``Range: bytes=<size>-`` after re-hashing the bytes it has, and a
   transport error mid-blob is retried the same way;
3. every byte is hashed while streaming (on a helper thread, so receiving,
   hashing and writing overlap; writeback is started every 16 MiB so the
   final fsync is short) and a download that does not hash to its digest (or
   outgrows the size the manifest gives) is deleted; nothing becomes visible
   unless *every* blob verified — verified ones wait in ``tmp/``, and a
   re-run re-hashes them instead of fetching them again;
4. then, in order: blobs are renamed into ``objects/``, the manifest is
   stored (:meth:`Store.put_manifest`), the index updated, the ref moved.

The whole transfer holds the registry's writer lock (shared), so ``gc``
cannot delete a blob between steps 2 and 4.

The Hub
-------
A push to ``hf://org/repo`` makes one commit (``HfApi.create_commit``) with
the *patchctl layout* — the same objects as a registry folder, so a pull gets
the same digest back — and, for a LoRA patch, a PEFT layout at the root that
PEFT and transformers load as is (written by the exporter, bit-identical):

```
patchctl/refs/<name>/@<tag>          the manifest digest and a newline
patchctl/manifests/sha256/<hex>      the manifest bytes
patchctl/blobs/sha256/<hex>          the blobs
adapter_config.json                  (lora) the last pushed LoRA patch, as PEFT files
adapter_model.safetensors
```

A pull goes through ``huggingface_hub.snapshot_download`` — so the Hub cache,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave as everywhere else — pinned to one
commit: the ref file first, then the manifest (its sha256 checked against the
ref), then only the missing blobs; they enter the registry through the same
verified transfer as any other pull. A repo with no patchctl layout but an
``adapter_config.json`` is imported as a PEFT adapter (``Registry.push``),
with ``{"source": "hf://org/repo", "revision": <commit>}`` in the manifest
metadata. For a patchctl-layout pull the manifest stays byte-identical (so
its digest does), and the commit is recorded in the ref log message and the
summary instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from patchctl.errors import (
    DigestMismatch,
    InvalidArgument,
    InvalidReference,
    NotFound,
    PatchctlError,
    RemoteError,
)
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.folder import CHUNK, Store
from patchctl.registry.store.names import Ref, parse_ref

if TYPE_CHECKING:
    from patchctl.registry.registry import Registry

Progress = Callable[[int, int], None] | None
ReadInto = Callable[[memoryview], int]

REMOTES_FILE = "remotes.json"
REMOTES_VERSION = 1
REMOTE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MANIFEST_MEDIA_TYPE = "application/vnd.patchctl.manifest.v1+json"
DEFAULT_WORKERS = 4
RETRIES = 3  # attempts per blob on a transport error; each resumes where the last stopped



# -- configuration -------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    """A remote: a ``name`` (empty for a URL given inline), its ``url`` and optional ``token_file``."""

    name: str
    url: str
    token_file: str | None = None

    @property
    def kind(self) -> str:
        """``http``, ``folder`` or ``hf``."""
        return parse_url(self.url)[0]

    @property
    def label(self) -> str:
        return self.name or self.url

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "kind": self.kind, "token_file": self.token_file}


def parse_url(url: str) -> tuple[str, str]:
    """``(kind, normalized url)`` for a remote URL; raises :class:`InvalidArgument` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument("empty remote URL: use http(s)://HOST:PORT, a registry folder, or hf://ORG/REPO")
    url = url.strip()
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
            raise InvalidArgument(f"invalid HTTP remote {url!r}: expected http(s)://HOST[:PORT][/PREFIX], no credentials")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise InvalidArgument(f"invalid port in remote URL {url!r}") from None
        return "http", url.rstrip("/")
    if url.startswith("hf://"):
        repo, _, rev = url[5:].partition("@")
        if not HF_REPO_RE.fullmatch(repo) or ".." in repo or (rev and not re.fullmatch(r"[\w.\-/]{1,200}", rev)):
            raise InvalidArgument(f"invalid Hub remote {url!r}: expected hf://ORG/REPO[@REVISION]")
        return "hf", url
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument(f"file remote {url!r} names a host; use file:///ABSOLUTE/PATH")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidArgument(f"file remote {url!r} must be absolute: file:///ABSOLUTE/PATH")
        return "folder", Path(path).as_uri()
    if "://" in url:
        raise InvalidArgument(f"unknown remote scheme in {url!r}: use http(s)://, file:// or hf://")
    return "folder", Path(url).expanduser().resolve().as_uri()


def folder_path(url: str) -> Path:
    return Path(unquote(urlsplit(parse_url(url)[1]).path))


def _remotes_path(store: Store) -> Path:
    return store.root / REMOTES_FILE


def load_remotes(store: Store) -> dict[str, Remote]:
    p = _remotes_path(store)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise InvalidArgument(f"{p} is not valid JSON; fix or remove it") from None
    if not isinstance(doc, dict) or doc.get("version") != REMOTES_VERSION or not isinstance(doc.get("remotes"), dict):
        raise InvalidArgument(f"{p}: expected {{\"version\": {REMOTES_VERSION}, \"remotes\": {{...}}}}")
    out = {}
    for name, r in doc["remotes"].items():
        if not isinstance(r, dict) or not isinstance(r.get("url"), str):
            raise InvalidArgument(f"{p}: remote {name!r} has no url")
        out[name] = Remote(name, r["url"], r.get("token_file"))
    return out


def _save_remotes(store: Store, remotes: dict[str, Remote]) -> None:
    doc = {"version": REMOTES_VERSION,
           "remotes": {n: {"url": r.url, "token_file": r.token_file} for n, r in sorted(remotes.items())}}
    tmp = store.root / "tmp" / f"{REMOTES_FILE}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _remotes_path(store))


@contextlib.contextmanager
def _remotes_lock(store: Store) -> Iterator[None]:
    with open(store.root / "locks" / "remotes.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def add_remote(store: Store, name: str, url: str, token_file: str | os.PathLike[str] | None = None) -> Remote:
    if not REMOTE_NAME_RE.fullmatch(name or ""):
        raise InvalidArgument(f"invalid remote name {name!r}: lowercase letters, digits, _ and -, at most 64")
    _, norm = parse_url(url)
    tf = str(Path(token_file).expanduser().resolve()) if token_file is not None else None
    with _remotes_lock(store):
        remotes = load_remotes(store)
        if name in remotes:
            raise InvalidArgument(f"remote {name!r} already exists ({remotes[name].url}); `patchctl remote rm {name}` first")
        remotes[name] = Remote(name, norm, tf)
        _save_remotes(store, remotes)
    return remotes[name]


def remove_remote(store: Store, name: str) -> Remote:
    with _remotes_lock(store):
        remotes = load_remotes(store)
        if name not in remotes:
            raise NotFound(f"no remote named {name!r}; `patchctl remote ls` lists them")
        gone = remotes.pop(name)
        _save_remotes(store, remotes)
    return gone


def resolve_remote(store: Store, spec: str) -> Remote:
    """A configured remote by name, or an inline URL or folder path."""
    remotes = load_remotes(store)
    if spec in remotes:
        return remotes[spec]
    if REMOTE_NAME_RE.fullmatch(spec) and not Path(spec).exists():
        raise NotFound(f"no remote named {spec!r}; `patchctl remote add {spec} URL` or give a URL")
    return Remote("", parse_url(spec)[1])


def split_pull_ref(store: Store, ref: str, from_: str | None) -> tuple[Remote, Ref]:
    """``REMOTE/NAME[:TAG]`` → the remote and the ref.

    With ``from_`` (a remote name or URL) the whole string is ``NAME[:TAG]``. Otherwise a
    first component that names a configured remote is the remote; failing that, the only
    configured remote, if there is just one.
    """
    if from_ is not None:
        return resolve_remote(store, from_), parse_ref(ref)
    head, sep, rest = ref.partition("/")
    remotes = load_remotes(store)
    if sep and head in remotes:
        return remotes[head], parse_ref(rest)
    if len(remotes) == 1:  # the only remote needs no prefix
        return next(iter(remotes.values())), parse_ref(ref)
    raise InvalidReference(
        f"{ref!r} names no configured remote: write REMOTE/NAME:TAG "
        f"(remotes: {', '.join(sorted(remotes)) or 'none; `patchctl remote add`'}) or pass --from REMOTE"
    )


def read_token(remote: Remote) -> str | None:
    if remote.token_file is None:
        return None
    try:
        token = Path(remote.token_file).read_text().strip()
    except OSError as e:
        raise NotFound(f"remote {remote.label}: cannot read token file {remote.token_file!r}: {e.strerror}") from None
    if not token:
        raise InvalidArgument(f"remote {remote.label}: token file {remote.token_file!r} is empty")
    return token


# -- sources -------------------------------------------------------------------
class Source(Protocol):
    """Where a transfer reads from: a manifest by ref, blobs by digest from an offset."""

    label: str

    def manifest(self, ref: Ref) -> bytes: ...

    def blob(self, name: str, digest: str, offset: int) -> contextlib.AbstractContextManager[tuple[int, ReadInto]]:
        """``(start, readinto)`` for a blob of patch ``name``: ``start`` is ``offset`` when the source
        resumed there, else 0; ``readinto(buffer)`` fills the buffer and returns the count, 0 at the end."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def _open_at(path: Path, offset: int, missing: str) -> Iterator[tuple[int, ReadInto]]:
    """A local file as a blob source: from ``offset`` when it is inside the file, else from 0."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFound(missing) from None
    with f:
        start = offset if 0 < offset <= os.fstat(f.fileno()).st_size else 0
        f.seek(start)
        yield start, f.readinto


class FolderSource:
    """Another registry folder on this machine (its reads verify manifests; blobs are hashed by the transfer)."""

    def __init__(self, store: Store, label: str):
        self.store = store
        self.label = label

    def manifest(self, ref: Ref) -> bytes:
        digest = self.store.ref_target(ref)
        if digest is None:
            raise NotFound(f"no patch named {ref} in {self.label}")
        return self.store.read_manifest_bytes(digest)

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        with _open_at(self.store.blob_path(digest), offset, f"blob {digest} is missing in {self.label}") as got:
            yield got

    def close(self) -> None:
        pass


class HttpSource:
    """A ``patchctl serve`` (or a server with the same OCI-style reads) over HTTP(S).

    Uses :mod:`http.client` with one keep-alive connection per download thread:
    a blob body is read with ``readinto`` into one reused 1 MiB buffer, so the
    per-byte work in Python is a hash update and a file write, nothing else.
    """

    BUFFER = CHUNK

    def __init__(self, url: str, token: str | None, label: str, timeout: float = 60.0):
        parts = urlsplit(url)
        self.url, self.label, self.timeout = url, label, timeout
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

    def _path(self, name: str, kind: str, ref: str) -> str:
        return f"{self.prefix}/v2/{quote(name, safe='/')}/{kind}/{quote(ref, safe=':')}"

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

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _get(self, path: str, headers: dict[str, str], what: str) -> Any:
        """Send a GET and return the response (status checked); one retry on a stale keep-alive connection."""
        import http.client

        for attempt in (0, 1):
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
        self._drop()
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

        what = f"patch {ref}"
        resp = self._get(self._path(ref.name, "manifests", ref.tag), {"Accept": MANIFEST_MEDIA_TYPE}, what)
        length = resp.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > manifest_mod.MAX_MANIFEST_BYTES):
            self._drop()
            raise DigestMismatch(f"{self.label} sent a manifest for {ref} larger than the 64 MiB cap")
        try:
            data = resp.read(manifest_mod.MAX_MANIFEST_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise RemoteError(f"cannot get {what} from {self.label}: {type(e).__name__}: {e}") from None
        if len(data) > manifest_mod.MAX_MANIFEST_BYTES:
            self._drop()
            raise DigestMismatch(f"{self.label} sent a manifest for {ref} larger than the 64 MiB cap")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        announced = resp.getheader("Docker-Content-Digest")
        if announced is not None and announced != digest:
            raise DigestMismatch(f"{self.label} announced manifest {announced} for {ref} but sent bytes "
                                 f"that hash to {digest}")
        return data

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        import http.client

        what = f"blob {digest}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        if offset > 0:
            with self._lock:
                self.range_requests += 1
        resp = self._get(self._path(name, "blobs", digest), headers, what)
        start = 0
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range") or "")
            if m is None or int(m.group(1)) != offset:
                self._drop()
                raise RemoteError(f"{self.label} answered Range bytes={offset}- with "
                                  f"{resp.getheader('Content-Range')!r}")
            start = offset

        def readinto(buf: memoryview) -> int:
            try:
                return int(resp.readinto(buf))
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                raise _Interrupted(f"{type(e).__name__}: {e}") from None

        try:
            yield start, readinto
        finally:
            if not resp.isclosed():  # not read to the end (an error): the connection is unusable
                self._drop()

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()


class _Interrupted(Exception):
    """A transport error in the middle of a blob body (retried with Range)."""


def open_source(remote: Remote) -> Source:
    kind, url = parse_url(remote.url)
    if kind == "http":
        return HttpSource(url, read_token(remote), remote.label)
    if kind == "folder":
        path = folder_path(url)
        return FolderSource(Store.open(path, create=False), str(path))
    raise InvalidArgument(f"{remote.label}: hf:// remotes are read through the local Hub cache, not a Source")


# -- the transfer ----------------------------------------------------------------
class _Counter:
    """Byte counts shared by the download threads; drives the progress callback."""

    def __init__(self, total: int, progress: Progress):
        self.total, self.progress = total, progress
        self.transferred = self.resumed = 0
        self.lock = threading.Lock()

    def add(self, transferred: int = 0, resumed: int = 0) -> None:
        with self.lock:
            self.transferred += transferred
            self.resumed += resumed
            done = self.transferred + self.resumed
        if self.progress is not None:
            self.progress(done, self.total)


def part_path(store: Store, digest: str) -> Path:
    """Where a download of ``digest`` is kept until it verifies (so a re-run resumes it)."""
    return store.root / "tmp" / f"pull-{store.blob_path(digest).parent.name}{store.blob_path(digest).name}.part"


class _Sink:
    """Hashes and writes a download's chunks on a helper thread while the next chunk is received.

    Buffers come from a small pool (:meth:`buffer`), go to the helper with
    :meth:`put`, and come back to the pool once hashed and written; hashing and
    file writes release the GIL, so receiving, hashing and writing overlap.
    Small downloads (under ``THREADED``) skip the thread and do it inline.
    """

    BUFFERS = 4
    THREADED = 4 * CHUNK
    KICK = 16 * CHUNK  # start writeback of every 16 MiB written, so the final fsync has little left

    def __init__(self, f: Any, h: Any, threaded: bool):
        self.f, self.h = f, h
        self.written = self.kicked = f.tell()
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.BUFFERS if threaded else 1):
            self.free.put(bytearray(CHUNK))
        self.work: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def buffer(self) -> bytearray:
        return self.free.get()

    def put(self, buf: bytearray, n: int) -> None:
        if self.thread is None:
            self._consume(buf, n)
        else:
            self.work.put((buf, n))

    def _consume(self, buf: bytearray, n: int) -> None:
        view = memoryview(buf)[:n]
        try:
            if self.error is None:
                self.f.write(view)
                self.h.update(view)
                self.written += n
                if self.written - self.kicked >= self.KICK and hasattr(os, "posix_fadvise"):
                    # Linux starts asynchronous writeback of the range (and later drops it from
                    # the page cache): the disk works while the network does
                    self.f.flush()
                    os.posix_fadvise(self.f.fileno(), self.kicked, self.written - self.kicked,
                                     os.POSIX_FADV_DONTNEED)
                    self.kicked = self.written
        except BaseException as e:  # noqa: BLE001 - re-raised by drain()
            self.error = e
        finally:
            view.release()
            self.free.put(buf)

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            self._consume(*item)
            self.work.task_done()
        self.work.task_done()

    def drain(self) -> None:
        """Wait until every chunk put so far is hashed and written; re-raise a write error."""
        if self.thread is not None:
            self.work.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.thread is not None:
            self.work.put(None)
            self.thread.join()
            self.thread = None


def _download(src: Source, store: Store, name: str, digest: str, size: int, counter: _Counter) -> Path | None:
    """Fetch ``digest`` into its part file, resuming and verifying; the verified path, or None if present."""
    part = part_path(store, digest)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # another pull of the same blob waits here
        if store.has_blob(digest):
            part.unlink(missing_ok=True)
            return None
        h = hashlib.sha256()
        have = os.fstat(f.fileno()).st_size
        if have > size:
            f.truncate(0)
            have = 0
        for chunk in iter(lambda: f.read(CHUNK), b""):  # hash the prefix we already hold
            h.update(chunk)
        if have:
            counter.add(resumed=have)
        pos = have
        sink = _Sink(f, h, threaded=size - have >= _Sink.THREADED)
        try:
            for attempt in range(RETRIES):
                if pos == size:
                    break
                try:
                    with src.blob(name, digest, pos) as (start, readinto):
                        if start != pos:  # the source restarted from 0: drop what we held
                            sink.drain()
                            counter.add(resumed=-pos)
                            f.seek(0)
                            f.truncate(0)
                            sink.h = h = hashlib.sha256()
                            sink.written = sink.kicked = 0
                            pos = 0
                        while True:
                            buf = sink.buffer()
                            try:
                                n = readinto(memoryview(buf))
                            except BaseException:
                                sink.free.put(buf)
                                raise
                            if n == 0:
                                sink.free.put(buf)
                                break
                            if pos + n > size:
                                sink.free.put(buf)
                                raise DigestMismatch(f"{src.label} sent more than the {size} bytes of blob {digest}")
                            sink.put(buf, n)
                            pos += n
                            counter.add(transferred=n)
                except _Interrupted as e:
                    sink.drain()
                    if attempt == RETRIES - 1:
                        raise RemoteError(f"blob {digest} from {src.label}: {e} ({RETRIES} attempts; "
                                          "run the pull again to resume)") from None
            sink.drain()
        finally:
            sink.close()
        f.flush()
        os.fsync(f.fileno())
        got = "sha256:" + h.hexdigest()
        if pos != size or got != digest:
            part.unlink(missing_ok=True)
            raise DigestMismatch(f"blob from {src.label} is corrupt: {pos} bytes hashing to {got}, "
                                 f"expected {size} bytes hashing to {digest}; nothing was stored")
    return part


def _commit_blob(store: Store, part: Path, digest: str) -> None:
    dest = store.blob_path(digest)
    if dest.exists():
        part.unlink(missing_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(part, dest)
    except FileNotFoundError:  # a concurrent pull committed it first
        if not dest.exists():
            raise
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def transfer(src: Source, dst: Registry, ref: Ref, dst_ref: Ref | None = None, *, progress: Progress = None,
             workers: int = DEFAULT_WORKERS, message: str = "", manifest_bytes: bytes | None = None) -> dict[str, Any]:
    """Copy the patch ``ref`` names from ``src`` into ``dst`` (see the module docstring); a summary."""
    t0 = time.monotonic()
    dst_ref = dst_ref or ref
    data = manifest_bytes if manifest_bytes is not None else src.manifest(ref)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    m = manifest_mod.parse(data)
    sizes: dict[str, int] = {}
    for t in m.tensors.values():
        for d, s in t.blobs():
            sizes[d] = s
    store = dst.store
    with store.writing():
        missing = sorted(d for d in sizes if not store.has_blob(d))
        fetched = set(missing)
        counter = _Counter(sum(sizes[d] for d in missing), progress)
        parts: dict[str, Path] = {}
        if missing:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing))),
                                    thread_name_prefix="patchctl-pull") as pool:
                futs = {pool.submit(_download, src, store, ref.name, d, sizes[d], counter): d for d in missing}
                done, pending = wait(futs, return_when=FIRST_EXCEPTION)
                for f in pending:
                    f.cancel()
                errors = [f.exception() for f in done if f.exception() is not None]
                if errors:
                    wait(pending)
                    raise errors[0]  # type: ignore[misc]
                for f, d in futs.items():
                    p = f.result()
                    if p is not None:
                        parts[d] = p
        dst.index.db  # noqa: B018 - import sqlite-utils before the files change (see Registry.commit)
        for d in sorted(parts):  # 1. blobs (each verified; none was visible before all verified)
            _commit_blob(store, parts[d], d)
        with dst.index_pending():
            stored = store.put_manifest(data, m.blob_digests())  # 2. the manifest
            if stored != digest:
                raise DigestMismatch(f"manifest {ref} stored as {stored}, expected {digest}")
            dst.index.add_manifest(digest, m)
            entry = store.move_ref(dst_ref, digest, message or f"pull {src.label} {ref}")  # 3. the ref
            if entry is not None:
                dst.index.record_ref(dst_ref, entry)
            else:
                dst._resync_ref(dst_ref)
    return {
        "ref": str(dst_ref),
        "source_ref": str(ref),
        "remote": src.label,
        "digest": digest,
        "moved": entry is not None,
        "blobs": len(sizes),
        "blobs_fetched": len(missing),
        "blobs_skipped": len(sizes) - len(missing),
        "bytes_transferred": counter.transferred,
        "bytes_resumed": counter.resumed,
        "bytes_skipped": sum(s for d, s in sizes.items() if d not in fetched),
        "manifest_bytes": len(data),
        "range_requests": getattr(src, "range_requests", 0),
        "seconds": round(time.monotonic() - t0, 3),
    }


def pull(reg: Registry, ref: str, from_: str | None = None, *, progress: Progress = None,
         workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Pull ``REMOTE/NAME[:TAG]`` (or ``NAME[:TAG]`` from ``from_``) into ``reg`` under ``NAME:TAG``."""
    remote, r = split_pull_ref(reg.store, ref, from_)
    if remote.kind == "hf":
        return hub_pull(reg, remote, r, progress=progress, workers=workers)
    src = open_source(remote)
    try:
        return transfer(src, reg, r, progress=progress, workers=workers, message=f"pull {remote.label} {r}")
    finally:
        src.close()


def publish(reg: Registry, ref: str, remote_spec: str, *, progress: Progress = None,
            workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Publish the local ``NAME[:TAG]`` to a folder or ``hf://`` remote under the same name and tag."""
    from patchctl.registry.registry import Registry

    r = parse_ref(ref)
    remote = resolve_remote(reg.store, remote_spec)
    if remote.kind == "http":
        raise InvalidArgument(f"{remote.label} is an HTTP remote, and `patchctl serve` is read-only: "
                              "publish to a registry folder or an hf:// remote")
    if reg.store.ref_target(r) is None:
        raise NotFound(f"no patch named {r}; `patchctl ls` lists them")
    if remote.kind == "hf":
        return hub_push(reg, r, remote)
    src = FolderSource(reg.store, str(reg.path))
    with Registry(folder_path(remote.url)) as dst:
        out = transfer(src, dst, r, progress=progress, workers=workers, message=f"publish from {reg.path}")
    out["remote"] = remote.label
    return out


# -- the Hugging Face Hub --------------------------------------------------------
HUB_REFS = "patchctl/refs"
HUB_MANIFESTS = "patchctl/manifests/sha256"
HUB_BLOBS = "patchctl/blobs/sha256"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def hub_repo(remote: Remote) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of an ``hf://`` remote."""
    repo, _, rev = parse_url(remote.url)[1][5:].partition("@")
    return repo, rev or None


def _hub_error(e: Exception, where: str) -> PatchctlError:
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError)):
        return NotFound(f"{where} is not in the local Hugging Face cache and the Hub cannot be reached "
                        "(HF_HUB_OFFLINE set, or no network)")
    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return NotFound(f"{where}: {str(e).splitlines()[0]}")
    return RemoteError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - translated to PatchctlError here, the one place
        raise _hub_error(e, f"hf://{repo}{'@' + revision if revision else ''}") from None


class SnapshotSource:
    """Blobs from a downloaded Hub snapshot in the patchctl layout (hashed by the transfer)."""

    def __init__(self, folder: Path, label: str):
        self.folder = folder
        self.label = label

    def manifest(self, ref: Ref) -> bytes:  # hub_pull reads and checks the manifest itself
        raise InvalidArgument("SnapshotSource has no manifests: hub_pull passes them to transfer()")

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        with _open_at(self.folder / HUB_BLOBS / digest[7:], offset, f"blob {digest} is missing in {self.label}") as got:
            yield got


def hub_pull(reg: Registry, remote: Remote, r: Ref, *, progress: Progress = None,
             workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Pull ``r`` from an ``hf://`` remote: the patchctl layout if the repo has it, else a PEFT adapter."""
    from patchctl.registry.store.names import check_digest

    repo, rev = hub_repo(remote)
    ref_file = f"{HUB_REFS}/{r.name}/@{r.tag}"
    snap = _snapshot(repo, rev, [ref_file, *PEFT_FILES])
    commit = snap.name if re.fullmatch(r"[0-9a-f]{40}", snap.name) else (rev or "main")
    pinned = f"hf://{repo}@{commit}"
    if (snap / ref_file).is_file():
        digest = check_digest((snap / ref_file).read_text().strip())
        snap = _snapshot(repo, commit, [f"{HUB_MANIFESTS}/{digest[7:]}"])
        mpath = snap / HUB_MANIFESTS / digest[7:]
        if not mpath.is_file():
            raise NotFound(f"{pinned}: {ref_file} names {digest}, but the manifest is not in the repo")
        if mpath.stat().st_size > manifest_mod.MAX_MANIFEST_BYTES:
            raise DigestMismatch(f"{pinned}: manifest {digest} is larger than the 64 MiB cap")
        data = mpath.read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatch(f"{pinned}: manifest {digest} does not hash to its name")
        m = manifest_mod.parse(data)
        missing = [d for d in m.blob_digests() if not reg.store.has_blob(d)]
        if missing:
            snap = _snapshot(repo, commit, [f"{HUB_BLOBS}/{d[7:]}" for d in missing])
        out = transfer(SnapshotSource(snap, pinned), reg, r, progress=progress, workers=workers,
                       message=f"pull {pinned} {r}", manifest_bytes=data)
        out.update(remote=remote.label, revision=commit, layout="patchctl")
        return out
    if (snap / "adapter_config.json").is_file():
        t0 = time.monotonic()
        digest = reg.push(snap, str(r), message=f"pull {pinned}", move_latest=False,
                          metadata={"source": f"hf://{repo}", "revision": commit})
        return {"ref": str(r), "source_ref": pinned, "remote": remote.label, "digest": digest, "layout": "peft",
                "revision": commit, "seconds": round(time.monotonic() - t0, 3)}
    raise NotFound(f"{pinned} has neither {ref_file} (a patchctl push) nor adapter_config.json (a PEFT adapter)")


def _verified_path(store: Store, digest: str) -> str:
    """The blob's path, after checking that its bytes still hash to its name (streamed)."""
    path = store.blob_path(digest)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is missing (run `patchctl fsck`)") from None
    if "sha256:" + h.hexdigest() != digest:
        raise DigestMismatch(f"blob {digest} is corrupt (run `patchctl fsck`); not pushing it")
    return str(path)


def hub_push(reg: Registry, r: Ref, remote: Remote) -> dict[str, Any]:
    """One Hub commit with the patch in the patchctl layout (plus PEFT files for LoRA)."""
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    repo, rev = hub_repo(remote)
    digest = reg.resolve(str(r))
    data = reg.store.read_manifest_bytes(digest)
    m = manifest_mod.parse(data)
    ops = [CommitOperationAdd(f"{HUB_BLOBS}/{d[7:]}", _verified_path(reg.store, d)) for d in m.blob_digests()]
    ops.append(CommitOperationAdd(f"{HUB_MANIFESTS}/{digest[7:]}", data))
    ops.append(CommitOperationAdd(f"{HUB_REFS}/{r.name}/@{r.tag}", (digest + "\n").encode()))
    with tempfile.TemporaryDirectory(dir=reg.path / "tmp", prefix="hub-push-") as td:
        if m.kind == "lora":
            peft = reg.export(digest, Path(td) / "peft", "peft")
            ops += [CommitOperationAdd(f, str(peft / f)) for f in PEFT_FILES]
        try:
            info = HfApi().create_commit(repo, ops, commit_message=f"patchctl push {r} ({digest})", revision=rev)
        except Exception as e:  # noqa: BLE001 - translated here, the one place
            raise _hub_error(e, f"hf://{repo}") from None
    return {"ref": str(r), "remote": remote.label, "digest": digest, "commit": getattr(info, "oid", None),
            "files": [op.path_in_repo for op in ops], "blobs": len(m.blob_digests()), "peft": m.kind == "lora"}


# -- repair ----------------------------------------------------------------------------
def repair(reg: Registry, remote_spec: str, blobs: list[str], manifests: list[str],
           sizes: dict[str, int], progress: Progress = None) -> dict[str, list[str]]:
    """Replace corrupt objects with verified copies from a registry-folder or HTTP remote.

    Each corrupt file is first moved aside into ``tmp/`` (never deleted); the good
    copy is hashed while it is fetched and renamed into place only when it matches
    its digest. An object the remote lacks (or sends wrong) is put back as it was
    and reported in ``failed``.
    """
    from patchctl.registry.store.folder import BlobWriter

    store = reg.store
    src = open_source(resolve_remote(store, remote_spec))
    counter = _Counter(sum(sizes.get(d, 0) for d in blobs), progress)
    repaired: list[str] = []
    failed: list[str] = []
    try:
        for kind, digest in [("objects", d) for d in blobs] + [("manifests", d) for d in manifests]:
            path = store._path(kind, digest)
            # a name of its own: an earlier bad copy of the same object is never overwritten
            aside = store.root / "tmp" / f"corrupt-{kind}-{digest[7:]}-{os.getpid()}-{time.time_ns()}"
            present = path.exists()  # a missing object has nothing to move aside
            if present:
                os.replace(path, aside)
            try:
                if kind == "objects":
                    if digest not in sizes:
                        raise NotFound(f"no manifest gives the size of blob {digest}")
                    part = _download(src, store, "repair", digest, sizes[digest], counter)
                    if part is not None:
                        _commit_blob(store, part, digest)
                else:
                    data = (src.store.read_manifest_bytes(digest) if isinstance(src, FolderSource)
                            else src.manifest(Ref("repair", digest)))
                    with BlobWriter(store, "manifests") as w:
                        w.write(data)
                        w.commit(expected=digest)
                repaired.append(digest)
            except BaseException as e:  # put our copy back, whatever stopped the fetch
                if present and not path.exists():
                    os.replace(aside, path)
                if not isinstance(e, PatchctlError):
                    raise
                failed.append(digest)
    finally:
        src.close()
    return {"repaired": repaired, "failed": failed}
