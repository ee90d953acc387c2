"""The registry folder: write-once blobs and manifests, ref logs, locks.

```
config.json                    {"format": "patchctl-registry", "version": 1}
objects/sha256/ab/cdef...      tensor blobs (raw bytes or an encoding), write-once
manifests/sha256/ab/cdef...    manifests (canonical JSON), write-once
refs/<name>/@<tag>             the ref's log: one JSON line per move; the last line wins
records/<hex>.jsonl            attached eval suites and validation records (records.py)
bases.json                     fingerprint -> local base folder (this machine only)
index.sqlite                   the metadata index (a cache; rebuilt from the above)
tmp/                           in-flight writes; safe to delete when nothing runs
locks/                         flock files
```

Writes go to ``tmp/``, are fsynced, then renamed into place; readers verify
the sha256 of what they read. Writers hold the registry lock shared; ``gc``
holds it exclusive, so it never deletes an object a running push still needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchctl.errors import DigestMismatch, LogDamaged, NotFound, RegistryError
from patchctl.registry.store import logfile
from patchctl.registry.store.names import (
    DIGEST_RE,
    TAG_RE,
    Ref,
    check_digest,
    check_name,
    check_tag,
)

FORMAT = "patchctl-registry"
VERSION = 1
CHUNK = 1 << 20


def default_home() -> Path:
    env = os.environ.get("PATCHCTL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".patchctl"


@dataclass(frozen=True)
class RefEntry:
    seq: int
    old: str | None
    new: str | None
    time: str
    message: str
    user: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "old": self.old, "new": self.new, "time": self.time,
                "message": self.message, "user": self.user}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_pause_seen: dict[str, int] = {}


def pause_point(where: str) -> None:
    """A test hook, inert unless ``PATCHCTL_TEST_PAUSE_AT`` is set (tests/test_crash.py, bench/reliability.py).

    With ``PATCHCTL_TEST_PAUSE_AT=<where>:<n>`` the n-th time this process
    reaches ``where`` — ``write`` (a blob or manifest half-written in ``tmp/``),
    ``ref`` (objects stored, a ref about to move) or ``moved`` (a ref's log line
    appended, the locks released, the index not yet updated) — it writes its pid
    to ``$PATCHCTL_TEST_PAUSE_FILE`` and waits until that file is deleted (or
    ``$PATCHCTL_TEST_PAUSE_SECONDS``, default 120, pass), so that a crash test
    can SIGKILL it exactly there, or a race test let another writer through.
    """
    spec = os.environ.get("PATCHCTL_TEST_PAUSE_AT")
    if not spec or spec.partition(":")[0] != where:
        return
    _pause_seen[where] = seen = _pause_seen.get(where, 0) + 1
    if seen == int(spec.partition(":")[2] or 1):
        flag = Path(os.environ["PATCHCTL_TEST_PAUSE_FILE"])
        flag.write_text(f"{os.getpid()}\n")
        end = time.monotonic() + float(os.environ.get("PATCHCTL_TEST_PAUSE_SECONDS", "120"))
        while flag.exists() and time.monotonic() < end:
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        pass
    return True


class DirectFile:
    """Writes a file around the page cache (``O_DIRECT``) where its filesystem allows it, else as usual.

    For bytes that are not read back soon (a merge's output): the kernel then
    does not copy every byte into freshly allocated page-cache pages, which
    cost more CPU than the rest of the write. Data whose address is congruent
    to its file offset modulo :attr:`ALIGN` goes out straight from the
    caller's memory, in whole blocks; other bytes (and the partial blocks at
    either end) gather in a page-aligned staging buffer first. :meth:`flush`
    writes the zero-padded last block and truncates the file to the bytes
    written. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some
    network filesystems), writes are plain ``os.write`` calls. ``fd`` is
    owned: :meth:`close` (or :meth:`abort`) closes it. Durability is the
    caller's: fsync the fd before :meth:`close` as for any file.
    """

    ALIGN = 4096  # a multiple of every device's logical block size
    CHUNK = 8 << 20
    _free: list[Any] = []  # staging buffers of finished files, reused (a fresh one faults every page in again)
    _lock = threading.Lock()

    def __init__(self, fd: int):
        import fcntl

        self.fd = fd
        self.size = 0
        self.fill = 0
        self.arr: Any = None  # the staging buffer (a numpy view: its copies release the GIL)
        self.direct = False
        if hasattr(os, "O_DIRECT"):
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError:
                pass  # no direct I/O here: plain writes
            else:
                self.direct = True
                self.arr = self._staging()

    @classmethod
    def _staging(cls) -> Any:
        import mmap

        import numpy as np

        with cls._lock:
            if cls._free:
                return cls._free.pop()
        return np.frombuffer(mmap.mmap(-1, cls.CHUNK), np.uint8)  # anonymous: page-aligned

    def write(self, data: bytes | bytearray | memoryview) -> None:
        import numpy as np

        mv = memoryview(data).cast("B")
        if self.arr is None:
            self.size += len(mv)
            while mv:
                mv = mv[os.write(self.fd, mv):]
            return
        src = np.frombuffer(mv, np.uint8) if len(mv) else np.empty(0, np.uint8)
        head = -self.size % self.ALIGN  # bytes up to the next block boundary of the file
        body = (len(src) - head) // self.ALIGN * self.ALIGN
        if body >= len(self.arr) // 4 and (src.ctypes.data - self.size) % self.ALIGN == 0:
            self._stage(src[:head])  # completes the staged block
            if self.fill:
                self._out(self.fill)
            self._direct(src[head : head + body])
            self.size += body
            self._stage(src[head + body :])
        else:
            self._stage(src)

    def _stage(self, src: Any) -> None:
        """Copy ``src`` behind the staged bytes, writing whole staging buffers out as they fill."""
        cap, pos = len(self.arr), 0
        self.size += len(src)
        while pos < len(src):
            n = min(len(src) - pos, cap - self.fill)
            self.arr[self.fill : self.fill + n] = src[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == cap:
                self._out(cap)

    def _direct(self, view: Any) -> None:
        """Write ``view`` (aligned address, whole blocks, at a block boundary of the file)."""
        pos, n = 0, len(view)
        while pos < n:
            got = os.write(self.fd, view[pos:])
            if got % self.ALIGN and pos + got < n:  # not seen in practice: the rest would be misaligned
                raise OSError(f"short direct write of {got} bytes")
            pos += got

    def _out(self, n: int) -> None:
        """Write the first ``n`` bytes (a multiple of ALIGN) of the staging buffer."""
        self._direct(self.arr[:n])
        self.fill = 0

    def flush(self) -> None:
        """Write out what is buffered: the last thing written (a partial block goes out zero-padded, then cut off)."""
        if self.fill:
            pad = -self.fill % self.ALIGN
            self.arr[self.fill : self.fill + pad] = 0
            self._out(self.fill + pad)
            os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.arr is not None:
            with self._lock:
                self._free.append(self.arr)
            self.arr = None

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0


@contextlib.contextmanager
def direct_file(path: str | os.PathLike[str]) -> Iterator[DirectFile]:
    """A new file at ``path`` written through :class:`DirectFile`, closed (or, on an error, abandoned) at the end."""
    f = DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    try:
        yield f
        f.close()
    finally:
        f.abort()  # after close: nothing left to do


class BlobWriter:
    """Hashes bytes while writing them to ``tmp/``; :meth:`commit` renames into place.

    ``direct``: write around the page cache (:class:`DirectFile`), for blobs
    that are not read back soon (a merge's output).
    """

    def __init__(self, store: Store, kind: str = "objects", direct: bool = False, digest: str | None = None):
        self.store = store
        self.kind = kind
        self.known = digest  # the caller hashed these very bytes already (put_blob): not hashed twice
        # named by the pid and locked while written: Store.clean_orphans() deletes it if this process is killed
        fd, name = tempfile.mkstemp(dir=store.root / "tmp", prefix=f"blob-{os.getpid()}-")
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.path = Path(name)
        self.f: Any = DirectFile(fd) if direct else os.fdopen(fd, "wb")
        self.h = None if digest else hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.h is not None:
            self.h.update(data)
        self.f.write(data)
        self.size += len(data)
        pause_point("write")

    def commit(self, expected: str | None = None) -> str:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        digest = self.known or "sha256:" + self.h.hexdigest()  # type: ignore[union-attr]
        if expected is not None and digest != expected:
            self.path.unlink(missing_ok=True)
            raise DigestMismatch(f"content hashes to {digest}, expected {expected}")
        dest = self.store._path(self.kind, digest)
        if dest.exists():
            self.path.unlink(missing_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, dest)
            _fsync_dir(dest.parent)
        return digest

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            (self.f.abort if isinstance(self.f, DirectFile) else self.f.close)()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or not self.f.closed:
            self.abort()


class Store:
    """The files of one registry. Create with :meth:`open`."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, create: bool = True) -> Store:
        path = Path(root).expanduser() if root is not None else default_home()
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                conf = json.loads(cfg.read_text())
            except ValueError:
                raise RegistryError(f"{cfg} is not valid JSON; is {path} a patchctl registry?") from None
            if not isinstance(conf, dict) or conf.get("format") != FORMAT:
                raise RegistryError(f"{path} is not a patchctl registry (config.json has no format {FORMAT!r})")
            if conf.get("version") != VERSION:
                raise RegistryError(
                    f"{path} has registry format version {conf.get('version')!r}; this patchctl reads "
                    f"version {VERSION} — upgrade patchctl"
                )
        else:
            if not create:
                raise NotFound(f"no registry at {path}; run `patchctl init --registry {path}`")
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RegistryError(f"{path} exists and is not a patchctl registry (no config.json)")
            path.mkdir(parents=True, exist_ok=True)
            for sub in ("objects", "manifests", "refs", "tmp", "locks"):
                (path / sub).mkdir(exist_ok=True)
            tmp = path / "tmp" / "config.json"
            tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
            os.replace(tmp, cfg)
        for sub in ("objects/sha256", "manifests/sha256", "refs", "records", "tmp", "locks"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        store = cls(path)
        store.clean_orphans()
        return store

    # -- locks ---------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        with open(self.root / "locks" / name, "a+b") as f:
            fcntl.flock(f.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by every command that adds objects."""
        return self._flock("registry.lock", fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by gc: no writer runs meanwhile."""
        return self._flock("registry.lock", fcntl.LOCK_EX)

    # -- objects -------------------------------------------------------------
    def _path(self, kind: str, digest: str) -> Path:
        check_digest(digest)
        hexd = digest[7:]
        return self.no_links(self.root / kind / "sha256" / hexd[:2] / hexd[2:])

    def no_links(self, p: Path) -> Path:
        """``p`` (inside the registry) when no folder on the way to it is a symlink; else RegistryError.

        The store never follows links: a link planted in the registry folder
        must not make ``serve`` send a file from elsewhere nor ``gc`` delete one.
        """
        cur = self.root
        for part in p.relative_to(self.root).parts[:-1]:
            cur = cur / part
            if cur.is_symlink():
                raise RegistryError(f"{self.relative(cur)} is a symlink; the store never follows links "
                                    "(`patchctl fsck` lists them)")
        return p

    def symlinks(self) -> list[tuple[str, str]]:
        """``(kind, path)`` of every symlink under objects/, manifests/, refs/ and records/ (fsck reports them)."""
        out = []
        for kind in ("objects", "manifests", "refs", "records"):
            for dirpath, dirnames, filenames in os.walk(self.root / kind):  # does not descend into links
                for n in dirnames + filenames:
                    q = Path(dirpath) / n
                    if q.is_symlink():
                        out.append((kind, self.relative(q)))
        return sorted(out)

    def blob_path(self, digest: str) -> Path:
        return self._path("objects", digest)

    def manifest_path(self, digest: str) -> Path:
        return self._path("manifests", digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def has_manifest(self, digest: str) -> bool:
        return self._path("manifests", digest).is_file()

    def blob_writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_blob(self, data: bytes | bytearray | memoryview, direct: bool = False) -> str:
        """Store ``data`` (``direct``: around the page cache, for large blobs not read back soon)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(digest):
            return digest
        with BlobWriter(self, direct=direct, digest=digest) as w:  # the bytes just hashed, written from the same memory
            w.write(data)
            return w.commit(digest)

    def read_blob(self, digest: str) -> bytearray:
        return self._read("objects", digest)

    def read_blob_pooled(self, digest: str) -> Any:
        """The verified bytes in a buffer of :data:`patchctl.patches.host.POOL` (a numpy array; give it back
        with ``POOL.give`` when done): no zero-fill, no fresh pages to fault in."""
        from patchctl.patches.host import POOL

        return self._read("objects", digest, POOL.take, POOL.give)

    def _read(self, kind: str, digest: str, alloc: Any = bytearray, free: Any = None) -> Any:
        """The verified bytes (a bytearray: tensors can wrap it without a copy; or what ``alloc(size)`` gave,
        handed to ``free`` when they do not verify)."""
        p = self._path(kind, digest)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"{kind[:-1]} {digest} is not in the registry") from None
        except OSError as e:  # ELOOP: a symlink
            raise RegistryError(f"{kind[:-1]} {digest} is not a regular file in the registry ({e.strerror}); "
                                "run `patchctl fsck`") from None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RegistryError(f"{kind[:-1]} {digest} is not a regular file; run `patchctl fsck`")
            data = alloc(os.fstat(f.fileno()).st_size)
            view, got = memoryview(data), 0
            while got < len(view) and (n := f.readinto(view[got:])):
                got += n
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            if free is not None:
                free(data)
            raise DigestMismatch(f"{kind[:-1]} {digest} is corrupt: its bytes hash to something else (run `patchctl fsck`)")
        return data

    def put_manifest(self, data: bytes, blob_digests: list[str]) -> str:
        missing = [d for d in blob_digests if not self.has_blob(d)]
        if missing:
            raise NotFound(f"manifest references {len(missing)} missing blob(s), e.g. {missing[0]}")
        with BlobWriter(self, "manifests") as w:
            w.write(data)
            return w.commit()

    def read_manifest_bytes(self, digest: str) -> bytes:
        return bytes(self._read("manifests", digest))

    def iter_digests(self, kind: str) -> Iterator[str]:
        base = self.root / kind / "sha256"
        if not base.is_dir():
            return
        for d in sorted(base.iterdir()):
            if d.is_symlink() or not d.is_dir():  # never into a linked folder (fsck names links)
                continue
            for f in sorted(d.iterdir()):
                digest = f"sha256:{d.name}{f.name}"
                if DIGEST_RE.fullmatch(digest) and not f.is_symlink():
                    yield digest

    def remove(self, kind: str, digest: str) -> int:
        p = self._path(kind, digest)
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    # -- refs ------------------------------------------------------------------
    def ref_path(self, ref: Ref) -> Path:
        check_name(ref.name)
        check_tag(ref.tag)
        return self.no_links(self.root / "refs" / ref.name / f"@{ref.tag}")

    def ref_log(self, ref: Ref) -> list[RefEntry]:
        """Every move of ``ref``, oldest first; :class:`LogDamaged` when a line is not what was written."""
        p = self.ref_path(ref)
        where = self.relative(p)
        out = []
        for no, e in enumerate(logfile.read(p, where), 1):
            try:
                out.append(RefEntry(int(e["seq"]), e["old"], e["new"], str(e["time"]), str(e["message"]), str(e["user"])))
            except (ValueError, KeyError, TypeError):
                raise LogDamaged(where, no, "not a ref log entry") from None
        return out

    def relative(self, p: Path) -> str:
        """``p`` as a path inside the registry (for messages)."""
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def ref_target(self, ref: Ref) -> str | None:
        log = self.ref_log(ref)
        return log[-1].new if log else None

    def move_ref(self, ref: Ref, new: str | None, message: str = "") -> RefEntry | None:
        """Point ``ref`` at ``new`` (None deletes it), appending to its log."""
        return self.move_refs([ref], new, message)[0]

    def move_refs(self, refs: list[Ref], new: str | None, message: str = "") -> list[RefEntry | None]:
        """Point each of ``refs`` at ``new`` (None deletes), under one hold of the log lock: a concurrent
        move of the same refs comes wholly before or after, so a tag and its ``latest`` never end at two
        different pushes. Per ref its new log entry (None: it was there already)."""
        paths = [self.ref_path(r) for r in refs]
        out: list[RefEntry | None] = []
        # shared registry lock: gc cannot delete the manifest between this check and the append
        with self.writing(), self._flock("refs.lock", fcntl.LOCK_EX):
            if new is not None and not self.has_manifest(new):
                raise NotFound(f"manifest {new} is not in the registry")
            for ref, p in zip(refs, paths, strict=True):
                log = self.ref_log(ref)
                old = log[-1].new if log else None
                if old == new:
                    out.append(None)
                    continue
                entry = RefEntry(
                    seq=(log[-1].seq + 1) if log else 1,
                    old=old,
                    new=new,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z",
                    message=message,
                    user=_user(),
                )
                pause_point("ref")
                logfile.append(p, entry.to_json(), self.relative(p))
                out.append(entry)
        if any(out):
            pause_point("moved")  # the locks released, the caller's index update still to come
        return out

    def append_entry(self, p: Path, entry: dict[str, Any]) -> None:
        """Append ``entry`` to a self-checking log in the registry (:mod:`.logfile`), serialized with ref moves."""
        with self._flock("refs.lock", fcntl.LOCK_EX):
            logfile.append(p, entry, self.relative(p))

    def logs_locked(self) -> contextlib.AbstractContextManager[None]:
        """Held while a log is rewritten (repair): no append runs meanwhile."""
        return self._flock("refs.lock", fcntl.LOCK_EX)

    def iter_refs(self) -> Iterator[Ref]:
        base = self.root / "refs"
        for p in sorted(base.rglob("@*")):
            if not p.is_file():
                continue
            name = p.parent.relative_to(base).as_posix()
            tag = p.name[1:]
            if TAG_RE.fullmatch(tag):
                try:
                    yield Ref(check_name(name), tag)
                except Exception:  # noqa: BLE001 - a stray file is not a ref
                    continue

    def clean_orphans(self) -> int:
        """Delete the ``tmp/blob-<pid>-*`` files of killed writers (on every open); the count deleted.

        A writer holds its file's lock until it commits or aborts, and is alive:
        a file that is unlocked *and* whose pid is gone was left by a SIGKILL.
        """
        n = 0
        for p in (self.root / "tmp").glob("blob-*"):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _alive(int(p.name.split("-")[1])):
                    p.unlink()
                    n += 1
            except (OSError, ValueError, IndexError):
                continue
            finally:
                os.close(fd)
        return n

    def clean_tmp(self, older_than: float = 3600.0) -> int:
        n = 0
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if now - p.lstat().st_mtime > older_than:
                    if p.is_dir() and not p.is_symlink():
                        import shutil

                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    n += 1
        return n


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return str(os.getuid())
