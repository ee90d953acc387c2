"""The verified, resumable transfer of one patch from a :class:`~patchctl.registry.remote.sources.Source`.

A transfer (pull, or publish to a folder) keeps the registry's invariants:

1. the manifest is fetched first; its digest is the sha256 of its bytes (and
   equals what the server announced in ``Docker-Content-Digest``), and it
   must parse (:func:`patchctl.registry.store.manifest.parse`);
2. blobs already present are skipped; the others download in parallel (a
   small thread pool) into ``tmp/pull-<hex>.part``, named by the digest so a
   re-run finds them: an interrupted download resumes with
   ``Range: bytes=<size>-`` after re-hashing the bytes it has, and a
   transport error mid-blob is retried the same way;
3. every byte is received straight into a page-aligned buffer and hashed
   while streaming (on a helper thread, so receiving, hashing and writing
   overlap); blobs of 1 MiB or more are written around the page cache
   (``O_DIRECT`` where the file system allows it), the others plainly; a
   download that does not hash to its digest (or outgrows the size the
   manifest gives) is deleted; nothing becomes visible unless *every* blob
   verified — verified ones wait in ``tmp/`` until then;
4. once every download finished, every part is fsynced (several at a time:
   one fsync per part as it finished made the other downloads' file
   creations wait for journal commits); then, in order: blobs are renamed
   into ``objects/`` (and their folders fsynced), the manifest is stored
   (:meth:`Store.put_manifest`), the index updated, the ref moved.

The renames, manifest and ref of step 4 alone hold the registry's writer
lock (shared): a slow peer never makes ``gc`` wait. Downloads hold ``locks/pull.lock`` (shared) instead, so
``gc`` (:func:`clean_parts`) leaves their part files alone; and since a blob
skipped as present may have been collected meanwhile, step 4 re-checks under
the lock and fetches such blobs again (at most three rounds).

What a peer says is capped before memory or disk is spent on it, and the
transfer runs under a deadline and a minimum rate
(:mod:`~patchctl.registry.remote.limits`). Any failure deletes the part files
the transfer used (a killed pull's are deleted by ``gc``, :func:`clean_parts`),
and a write the disk refuses (ENOSPC, EFBIG, EACCES…) is one line,
:class:`~patchctl.registry.remote.limits.StorageError`.

:func:`repair` (``patchctl fsck --repair``) fetches single objects the same
verified way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from patchctl.errors import DigestMismatch, PatchctlError, RemoteError
from patchctl.registry.ops.importing import check_lora_numbers
from patchctl.registry.remote.limits import (
    DISK_ERRNOS,
    LimitExceeded,
    PullLimits,
    StorageError,
    Watch,
    storage_error,
)
from patchctl.registry.remote.sources import Interrupted, Source
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.folder import CHUNK, Store
from patchctl.registry.store.names import Ref, check_digest
from patchctl.registry.store.repository import Progress, Repository

DEFAULT_WORKERS = 4
PULL_LOCK = "pull.lock"  # held shared by every running pull (clean_parts)
RETRIES = 3  # attempts per blob on a transport error; each resumes where the last stopped
ALIGN = 4096  # O_DIRECT: whole blocks, from page-aligned memory, at block offsets of the file
BUFFER = CHUNK  # one receive buffer (a multiple of ALIGN)
DIRECT_MIN = CHUNK  # blobs of at least this many bytes are written around the page cache, as push does


class Counter:
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
    return store.root / "tmp" / f"pull-{check_digest(digest)[7:]}.part"


class _Buffers:
    """Page-aligned receive buffers (anonymous mappings: what ``O_DIRECT`` writes need), reused.

    Reuse spares each download the page faults of fresh memory; at most :attr:`KEEP` are kept.
    """

    KEEP = 32
    _free: list[memoryview] = []
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> memoryview:
        with cls._lock:
            if cls._free:
                return cls._free.pop()
        return memoryview(mmap.mmap(-1, BUFFER))

    @classmethod
    def put(cls, bufs: Iterable[memoryview]) -> None:
        with cls._lock:
            for b in bufs:
                if len(cls._free) < cls.KEEP:
                    cls._free.append(b)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is now on (False where refused)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return on


class _Sink:
    """Hashes and writes a download's buffers on a helper thread while the next one is received.

    Buffers (page-aligned, :class:`_Buffers`) come from :meth:`buffer`, go to the
    helper with :meth:`put` once full (or at the end of the blob) and come back
    once hashed and written at their offset of the part file; hashing and
    writing release the GIL, so receiving, hashing and writing overlap. Small
    downloads (under ``THREADED``) skip the thread and do it inline.

    ``direct``: the part is written around the page cache (``O_DIRECT``), as
    push writes large blobs: no copy of every byte into fresh page-cache
    pages (which cost more CPU than the hash) and a short final fsync. Whole
    blocks go out from the aligned buffers; the last one is zero-padded and
    cut back with ``ftruncate``. A file system that refuses it (``EINVAL``) or
    a short write off a block boundary (a file size limit) turns the rest into
    plain writes, whose writeback is started every 16 MiB.
    """

    BUFFERS = 4
    THREADED = 4 * BUFFER
    KICK = 16 * CHUNK  # plain writes: start writeback of every 16 MiB written, so the final fsync has little left

    def __init__(self, fd: int, h: Any, threaded: bool, direct: bool, start: int = 0):
        self.fd, self.h = fd, h
        self.direct = direct and _set_direct(fd, True)
        self.kicked = start
        self.owned = [_Buffers.get() for _ in range(self.BUFFERS if threaded else 1)]
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for b in self.owned:
            self.free.put(b)
        self.work: queue.Queue[tuple[memoryview, int, int, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def buffer(self) -> memoryview:
        return self.free.get()

    def put(self, buf: memoryview, n: int, offset: int, hashed: int = 0) -> None:
        """Hash ``buf[hashed:n]`` and write ``buf[:n]`` at ``offset`` of the part (block-aligned when direct)."""
        if self.thread is None:
            self._consume(buf, n, offset, hashed)
        else:
            self.work.put((buf, n, offset, hashed))

    def restart(self) -> None:
        """The source restarted the blob from 0 (everything put so far is drained)."""
        self.kicked = 0

    def _consume(self, buf: memoryview, n: int, offset: int, hashed: int) -> None:
        try:
            if self.error is None:
                self.h.update(buf[hashed:n])
                self._write(buf, n, offset)
        except BaseException as e:  # noqa: BLE001 - re-raised by drain()
            self.error = e
        finally:
            self.free.put(buf)

    def _plain(self) -> None:
        _set_direct(self.fd, False)
        self.direct = False

    def _write(self, buf: memoryview, n: int, offset: int) -> None:
        want = n + (-n % ALIGN if self.direct else 0)
        if want > n:  # the blob's last block, zero-padded (cut back below)
            buf[n:want] = bytes(want - n)
        pos = 0
        while pos < want:
            try:
                pos += os.pwrite(self.fd, buf[pos:want], offset + pos)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._plain()  # no O_DIRECT on this file system after all
                want = n
                continue
            if self.direct and pos < want and pos % ALIGN:  # short, off a block boundary (RLIMIT_FSIZE...)
                self._plain()
                want = n
        if pos > n:
            os.ftruncate(self.fd, offset + n)
        end = offset + n
        if not self.direct and end - self.kicked >= self.KICK and hasattr(os, "posix_fadvise"):
            # Linux starts asynchronous writeback of the range (and later drops it from
            # the page cache): the disk works while the network does
            os.posix_fadvise(self.fd, self.kicked, end - self.kicked, os.POSIX_FADV_DONTNEED)
            self.kicked = end

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            self._consume(*item)
            self.work.task_done()
        self.work.task_done()

    def drain(self) -> None:
        """Wait until every buffer put so far is hashed and written; re-raise a write error."""
        if self.thread is not None:
            self.work.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.thread is not None:
            self.work.put(None)
            self.thread.join()
            self.thread = None
        _Buffers.put(self.owned)
        self.owned = []


def _open_part(part: Path) -> Any:
    """The part file, open and locked (``flock``): a concurrent pull of the same blob waits here.

    A part deleted while we waited (a failed pull cleans its parts) is opened anew.
    """
    while True:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        f = open(fd, "r+b")  # noqa: SIM115 - the caller closes it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(part, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return f
        except FileNotFoundError:
            pass
        except BaseException:
            f.close()
            raise
        f.close()


def download(src: Source, store: Store, name: str, digest: str, size: int, counter: Counter,
              watch: Watch | None = None, sync: bool = True) -> Path | None:
    """Fetch ``digest`` into its part file, resuming and verifying; the verified path, or None if present.

    ``sync=False`` leaves the fsync of the part to the caller (:func:`_sync_parts`), before its rename.
    """
    check = watch.check if watch is not None else (lambda: None)
    part = part_path(store, digest)
    with _open_part(part) as f:
        if store.has_blob(digest):
            part.unlink(missing_ok=True)
            return None
        fd = f.fileno()
        h = hashlib.sha256()
        have = os.fstat(fd).st_size
        if have > size:
            os.ftruncate(fd, 0)
            have = 0
        for chunk in iter(lambda: f.read(CHUNK), b""):  # hash the prefix we already hold
            h.update(chunk)
        if have:
            counter.add(resumed=have)
        # the buffer being filled holds the part's bytes [at, at + fill), the first `hashed` of them hashed
        # already: a resumed part's last partial block is written again, with the first new bytes
        at = have - have % ALIGN
        tail = os.pread(fd, have - at, at)
        pos = have
        sink = _Sink(fd, h, threaded=size - have >= _Sink.THREADED, direct=size >= DIRECT_MIN, start=at)
        try:
            buf = sink.buffer()
            buf[: len(tail)] = tail
            fill = hashed = len(tail)
            for attempt in range(RETRIES):
                check()
                if pos == size:
                    break
                try:
                    with src.blob(name, digest, pos) as (start, readinto):
                        if start != pos:  # the source restarted from 0: drop what we held
                            sink.drain()
                            counter.add(resumed=-pos)
                            os.ftruncate(fd, 0)
                            sink.h = h = hashlib.sha256()
                            sink.restart()
                            pos = at = fill = hashed = 0
                        while True:
                            check()
                            n = readinto(buf[fill:])
                            if n == 0:
                                break
                            if pos + n > size:
                                raise DigestMismatch(f"{src.label} sent more than the {size} bytes of blob {digest}")
                            fill += n
                            pos += n
                            counter.add(transferred=n)
                            if fill == len(buf):
                                sink.put(buf, fill, at, hashed)
                                at, fill, hashed = at + fill, 0, 0
                                buf = sink.buffer()
                except Interrupted as e:  # what arrived stays in the buffer: the retry resumes at `pos`
                    check()  # an abort by the watch shows as its own error, not as a transport error
                    sink.drain()
                    if attempt == RETRIES - 1:
                        raise RemoteError(f"blob {digest} from {src.label}: {e} ({RETRIES} attempts; "
                                          "nothing was stored)") from None
            if fill > hashed:
                sink.put(buf, fill, at, hashed)
            sink.drain()
        finally:
            sink.close()
        if sync:
            os.fsync(fd)
        got = "sha256:" + h.hexdigest()
        if pos != size or got != digest:
            part.unlink(missing_ok=True)
            raise DigestMismatch(f"blob from {src.label} is corrupt: {pos} bytes hashing to {got}, "
                                 f"expected {size} bytes hashing to {digest}; nothing was stored")
    return part


def commit_blob(store: Store, part: Path, digest: str) -> Path | None:
    """Rename a verified part into ``objects/``; the folder to fsync (None when the blob was there)."""
    dest = store.blob_path(digest)
    if dest.exists():
        part.unlink(missing_ok=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(part, dest)
    except FileNotFoundError:  # a concurrent pull committed it first
        if not dest.exists():
            raise
    return dest.parent


def _sync_parts(parts: Iterable[Path], workers: int) -> None:
    """fsync every part file, several at a time: the file system commits them together.

    A pull writes every part first and syncs them all here, before any is renamed
    into ``objects/``: an fsync per part as each one finished made every file
    creation of the other downloads wait for a journal commit (most blobs of a
    patch are a few KB: the creations, not the bytes, set the pace).
    """
    def one(p: Path) -> None:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # a concurrent pull of the same blob synced and committed it first
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    paths = list(parts)
    if len(paths) <= 1:
        for p in paths:
            one(p)
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths))), thread_name_prefix="patchctl-sync") as pool:
        for _ in pool.map(one, paths):
            pass


def _fsync_dirs(dirs: set[Path]) -> None:
    for d in sorted(dirs):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_parts(store: Store, digests: Iterable[str]) -> int:
    """Delete the part files of ``digests`` that no running pull holds (a non-blocking ``flock``)."""
    n = 0
    for d in digests:
        part = part_path(store, d)
        try:
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or a symlink planted there: not ours to follow
            if part.is_symlink():
                part.unlink(missing_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a concurrent pull is writing it
            continue
        try:
            part.unlink(missing_ok=True)
            n += 1
        finally:
            os.close(fd)
    return n


@contextlib.contextmanager
def _pulling(store: Store) -> Iterator[None]:
    """Held (shared) for a whole pull, so :func:`clean_parts` leaves its part files alone."""
    with open(store.root / "locks" / PULL_LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clean_parts(store: Store) -> int:
    """Delete every ``tmp/pull-*.part`` when no pull is running (for ``gc``); the count deleted.

    A killed pull leaves its part files behind; a running one holds
    ``locks/pull.lock`` shared, so while it runs nothing is deleted (0).
    """
    with open(store.root / "locks" / PULL_LOCK, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0
        try:
            digests = []
            for p in (store.root / "tmp").glob("pull-*.part"):
                hexd = p.name[len("pull-"):-len(".part")]
                if len(hexd) == 64 and all(c in "0123456789abcdef" for c in hexd):
                    digests.append("sha256:" + hexd)
            return _remove_parts(store, digests)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(data: bytes, where: str, limits: PullLimits) -> tuple[manifest_mod.Manifest, dict[str, int]]:
    """Parse a peer's manifest under ``limits``: the manifest and ``{blob digest: declared size}``."""
    if len(data) > limits.max_manifest_bytes:
        raise LimitExceeded(f"{where}: the manifest is {len(data)} bytes, over the cap of "
                            f"{limits.max_manifest_bytes} (raise it with --max-manifest-bytes)")
    if data.count(b'"digest"') > limits.max_blobs + 1:  # counted before parsing: no 420k-entry dict
        raise LimitExceeded(f"{where}: the manifest names more than {limits.max_blobs} blobs "
                            "(raise the cap with --max-blobs)")
    m = manifest_mod.parse(data)
    if m.kind == "lora":  # the numbers export and merge compute with (lora_alpha 1e300 exports infinities)
        check_lora_numbers(m.params, f"{where}: the manifest's params", need_r=False)
    sizes: dict[str, int] = {}
    for d, s in m.blobs():  # tensors, pins and side files
        if s > limits.max_blob_bytes:
            raise LimitExceeded(f"{where}: blob {d} is declared {s} bytes, over the cap of "
                                f"{limits.max_blob_bytes} (raise it with --max-blob-bytes)")
        sizes[d] = s
        if len(sizes) > limits.max_blobs:
            raise LimitExceeded(f"{where}: the manifest names more than {limits.max_blobs} blobs "
                                "(raise the cap with --max-blobs)")
    return m, sizes


def check_space(store: Store, sizes: dict[str, int], limits: PullLimits, where: str) -> None:
    """Refuse, before anything is fetched, blobs that would not fit in ``tmp/`` (keeping the reserve)."""
    need = 0
    for d, s in sizes.items():
        try:
            have = os.stat(part_path(store, d), follow_symlinks=False).st_size
        except OSError:
            have = 0
        need += s - have if 0 <= have <= s else s
    tmp = store.root / "tmp"
    free = shutil.disk_usage(tmp).free
    if need + limits.reserve_bytes > free:
        raise StorageError(f"{where} needs {need} bytes in {tmp} but {free} are free (and "
                           f"{limits.reserve_bytes} are kept spare): free some space (`patchctl gc`); "
                           "nothing was fetched")


def _fetch(src: Source, store: Store, name: str, missing: list[str], sizes: dict[str, int],
           counter: Counter, watch: Watch, workers: int) -> dict[str, Path]:
    """Download ``missing`` in parallel; the verified part files. The first error stops the others."""
    parts: dict[str, Path] = {}
    if not missing:
        return parts
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing))),
                            thread_name_prefix="patchctl-pull") as pool:
        futs = {pool.submit(download, src, store, name, d, sizes[d], counter, watch, False): d for d in missing}
        try:
            done, pending = wait(futs, return_when=FIRST_EXCEPTION)
        except BaseException as e:  # Ctrl-C: stop the downloads, or leaving the pool waits for them
            watch.fail(e)
            raise
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            watch.fail(errors[0])  # the others stop at their next chunk (blocked reads are aborted)
            for f in pending:
                f.cancel()
            wait(pending)
            raise watch.error  # type: ignore[misc]
        for f, d in futs.items():
            p = f.result()
            if p is not None:
                parts[d] = p
    return parts


def transfer(src: Source, dst: Repository, ref: Ref, dst_ref: Ref | None = None, *, progress: Progress = None,
             workers: int = DEFAULT_WORKERS, message: str = "", manifest_bytes: bytes | None = None,
             limits: PullLimits | None = None) -> dict[str, Any]:
    """Copy the patch ``ref`` names from ``src`` into ``dst`` (see the module docstring); a summary.

    ``limits`` caps what the source may make this cost (:mod:`~patchctl.registry.remote.limits`).
    On any failure the part files this transfer used are deleted and nothing is stored.
    """
    limits = (limits or PullLimits()).check()
    t0 = time.monotonic()
    dst_ref = dst_ref or ref
    store = dst.store
    counter = Counter(0, progress)
    tried: set[str] = set()  # the blobs whose part files this transfer used

    def received() -> int:
        return counter.transferred + counter.resumed + int(getattr(src, "manifest_received", 0))

    watch = Watch(limits, src.label, received, getattr(src, "abort", None))
    try:
        with _pulling(store), watch:
            if manifest_bytes is not None:
                data = manifest_bytes
            else:
                try:
                    data = src.manifest(ref)
                except PatchctlError:
                    watch.check()  # a deadline that cut the read short
                    raise
                watch.check()  # what an aborted read returned is not the manifest
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            m, sizes = read_manifest(data, f"{src.label} {ref}", limits)
            missing = sorted(d for d in sizes if not store.has_blob(d))
            fetched = set(missing)
            parts: dict[str, Path] = {}
            for _round in range(3):
                check_space(store, {d: sizes[d] for d in missing}, limits, f"pulling {ref} from {src.label}")
                counter.total += sum(sizes[d] for d in missing)
                tried.update(missing)
                new = _fetch(src, store, ref.name, missing, sizes, counter, watch, workers)
                with watch.paused():  # the disk's time, not the peer's
                    _sync_parts(new.values(), workers)  # before anything is renamed into objects/
                parts.update(new)
                watch.check()
                with watch.paused(), store.writing():  # the registry lock only for the commit
                    # no lock was held while downloading: a gc may have deleted a blob we skipped as present
                    gone = sorted(d for d in sizes if not store.has_blob(d) and not (d in parts and parts[d].is_file()))
                    if not gone:
                        entry = _commit(dst, store, parts, data, m, digest, ref, dst_ref,
                                        message or f"pull {src.label} {ref}")
                        break
                missing = gone
                fetched.update(gone)
            else:
                raise RemoteError(f"blobs of {ref} kept disappearing while it was pulled (is a `gc` running?); "
                                  "run the pull again")
    except BaseException as e:
        _remove_parts(store, tried)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise storage_error(e, f"{ref} into {store.root}") from None
        raise
    return {
        "ref": str(dst_ref),
        "source_ref": str(ref),
        "remote": src.label,
        "digest": digest,
        "moved": entry is not None,
        "blobs": len(sizes),
        "blobs_fetched": len(fetched),
        "blobs_skipped": len(sizes) - len(fetched),
        "bytes_transferred": counter.transferred,
        "bytes_resumed": counter.resumed,
        "bytes_skipped": sum(s for d, s in sizes.items() if d not in fetched),
        "manifest_bytes": len(data),
        "range_requests": getattr(src, "range_requests", 0),
        "seconds": round(time.monotonic() - t0, 3),
    }


def _commit(dst: Repository, store: Store, parts: dict[str, Path], data: bytes, m: manifest_mod.Manifest,
            digest: str, ref: Ref, dst_ref: Ref, message: str) -> Any:
    """Steps 4 of the module docstring, under the registry's writer lock: blobs, manifest, index, ref."""
    dst.index.db  # noqa: B018 - import sqlite-utils before the files change (see Registry.commit)
    dirs = {p for d in sorted(parts) if (p := commit_blob(store, parts[d], d)) is not None}  # 1. blobs
    _fsync_dirs(dirs)
    with dst.index_pending():
        stored = store.put_manifest(data, m.blob_digests())  # 2. the manifest
        if stored != digest:
            raise DigestMismatch(f"manifest {ref} stored as {stored}, expected {digest}")
        dst.index.add_manifest(digest, m)
        entry = store.move_ref(dst_ref, digest, message)  # 3. the ref
        if entry is not None:
            dst.index.record_ref(dst_ref, entry)
        else:
            dst.resync_ref(dst_ref)
    return entry
