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
3. every byte is hashed while streaming (on a helper thread, so receiving,
   hashing and writing overlap; writeback is started every 16 MiB so the
   final fsync is short) and a download that does not hash to its digest (or
   outgrows the size the manifest gives) is deleted; nothing becomes visible
   unless *every* blob verified — verified ones wait in ``tmp/`` until then;
4. then, in order: blobs are renamed into ``objects/``, the manifest is
   stored (:meth:`Store.put_manifest`), the index updated, the ref moved.

Step 4 alone holds the registry's writer lock (shared): a slow peer never
makes ``gc`` wait. Downloads hold ``locks/pull.lock`` (shared) instead, so
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
import fcntl
import hashlib
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
from patchctl.registry.store.names import Ref
from patchctl.registry.store.repository import Progress, Repository

DEFAULT_WORKERS = 4
PULL_LOCK = "pull.lock"  # held shared by every running pull (clean_parts)
RETRIES = 3  # attempts per blob on a transport error; each resumes where the last stopped


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
              watch: Watch | None = None) -> Path | None:
    """Fetch ``digest`` into its part file, resuming and verifying; the verified path, or None if present."""
    check = watch.check if watch is not None else (lambda: None)
    part = part_path(store, digest)
    with _open_part(part) as f:
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
                check()
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
                            check()
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
                except Interrupted as e:
                    check()  # an abort by the watch shows as its own error, not as a transport error
                    sink.drain()
                    if attempt == RETRIES - 1:
                        raise RemoteError(f"blob {digest} from {src.label}: {e} ({RETRIES} attempts; "
                                          "nothing was stored)") from None
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
        futs = {pool.submit(download, src, store, name, d, sizes[d], counter, watch): d for d in missing}
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
                parts.update(_fetch(src, store, ref.name, missing, sizes, counter, watch, workers))
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
