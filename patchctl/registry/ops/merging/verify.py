"""The input blobs of a streaming merge: mapped, not copied, and hashed beside the merge.

The streaming engine (:mod:`.stream`) reads each raw input blob through a
private mapping of its file (:func:`_map_blob`), which does not check its
digest. Every such blob is hashed by a :class:`_Verifier` started before
torch is imported; nothing is committed before all of them have matched,
and a mismatch found on the way stops the merge early. The hashing runs in
a small standard-library program of its own (:mod:`._verifier_main`, run by
path with ``python -I -S``), or, where that cannot start, in a thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import DigestMismatch, InvalidPatch, NotFound, PatchctlError
from patchctl.registry.formats.safetensors import ITEMSIZE
from patchctl.registry.store.manifest import Manifest, TensorEntry

if TYPE_CHECKING:
    from patchctl.registry.store.repository import Repository

# the verifier's own process: "DIGEST SIZE PATH" lines in, "ok" or "missing|size|corrupt DIGEST" out
VERIFIER_MAIN = Path(__file__).with_name("_verifier_main.py")


def _map(fd: int, start: int, nbytes: int) -> tuple[Any, int]:
    """A private (copy-on-write) mapping of ``nbytes`` from ``start`` of a file, and the offset of ``start`` in it.

    Reading a tensor through the page cache's own pages saves the copy a
    ``read()`` into a buffer makes; writes to the mapping (there are none)
    would stay private.
    """
    import mmap

    off = start - start % mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fd, start + nbytes - off, access=mmap.ACCESS_COPY, offset=off), start - off


def _blob_error(problem: str, entry: TensorEntry) -> PatchctlError:
    """The error for an input blob that is ``missing``, of the wrong ``size`` or ``corrupt``."""

    if problem == "missing":
        return NotFound(f"object {entry.digest} is not in the registry")
    if problem == "size":
        return InvalidPatch(f"blob {entry.digest} does not have the {entry.size} bytes its manifest says")
    return DigestMismatch(f"object {entry.digest} is corrupt: its bytes hash to something else (run `patchctl fsck`)")


def _nbytes(entry: TensorEntry) -> int:

    return math.prod(entry.shape) * ITEMSIZE[entry.dtype]


def _map_blob(store: Any, entry: TensorEntry) -> Any:
    """A raw blob's bytes, mapped (``b""`` for an empty one); its size checked against its shape."""
    try:
        fd = os.open(store.blob_path(entry.digest), os.O_RDONLY)
    except FileNotFoundError:
        raise _blob_error("missing", entry) from None
    try:
        size = os.fstat(fd).st_size
        if size != _nbytes(entry):
            raise _blob_error("size", entry)
        return _map(fd, 0, size)[0] if size else b""
    finally:
        os.close(fd)


class _Verifier:
    """Hashes the raw blobs of a merge's inputs beside the merge, started before anything else.

    Started before torch is imported, it checks the inputs while the import
    (single-threaded) runs, then beside the merge. The hashing runs in a
    small process of its own (:data:`VERIFIER_MAIN`): in a thread it took
    turns at the GIL with the merge's thousands of short torch calls, which
    cost both sides about a second here. Where that process cannot start, a
    thread does the same. Each blob is mapped, hashed and unmapped; the
    process hashes two at a time where the C kernels have SHA-NI. The merge uses the same files through mappings of its own and
    commits nothing before :meth:`wait` has returned; :meth:`check` raises a
    mismatch found so far, so a corrupt input stops the merge early.
    """

    def __init__(self, store: Any, entries: Sequence[TensorEntry], process: bool = True):
        import threading

        self.store = store
        self.entries = list({e.digest: e for e in entries}.values())
        self.digests = {e.digest for e in self.entries}
        self.error: BaseException | None = None
        self._proc: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(process,), name="patchctl-merge-verify", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, store: Any, manifests: Sequence[Manifest]) -> _Verifier:
        """A verifier for the raw blobs of the diff and sparse patches among ``manifests``."""
        return cls(store, [e for m in manifests if m.kind != "lora" for e in m.tensors.values() if e.encoding == "raw"])

    @classmethod
    def start(cls, reg: Repository, inputs: Sequence[str]) -> _Verifier | None:
        """:meth:`of` the ``inputs``; None where one does not resolve (the plan then says why)."""
        try:
            return cls.of(reg.store, [reg.manifest(reg.resolve(ref)) for ref in inputs])
        except (PatchctlError, TypeError):
            return None

    def _run(self, process: bool) -> None:
        try:
            if self.entries and not (process and self._in_process()):
                self._in_thread()
        except BaseException as exc:  # noqa: BLE001 - raised in the merging thread by check()/wait()
            self.error = exc

    def _in_process(self) -> bool:
        """Check every blob in the verifier process; False where it could not run (then the thread does it)."""
        import subprocess
        import sys

        paths = [str(self.store.blob_path(e.digest)) for e in self.entries]
        if not sys.executable or any("\n" in p for p in paths):
            return False  # no interpreter to start, or a path the line format cannot carry
        lines = "".join(f"{e.digest} {_nbytes(e)} {p}\n" for e, p in zip(self.entries, paths, strict=True))
        try:
            from patchctl.patches import native
            from patchctl.patches._workers import workers

            threads = str(max(1, workers() // 2))  # half the streaming threads: the merge needs the rest
            kernels = [native.lib._name] if native.lib is not None else []  # its SHA-NI hashes two files at once
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", str(VERIFIER_MAIN), threads, *kernels],
                                          stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if self._stop.is_set():  # cancelled while it started
                self._proc.kill()
            out, _ = self._proc.communicate(lines)
        except (OSError, ValueError):
            return False
        if self._stop.is_set():
            return True
        problem, _, digest = out.strip().partition(" ")
        if problem == "ok" and self._proc.returncode == 0:
            return True
        entry = next((e for e in self.entries if e.digest == digest), None)
        if problem in ("missing", "size", "corrupt") and entry is not None:
            raise _blob_error(problem, entry)
        return False  # the process failed some other way (or its file is missing): check in this process instead

    def _in_thread(self) -> None:
        import hashlib

        for e in self.entries:
            if self._stop.is_set():
                return
            data = _map_blob(self.store, e)
            try:
                if "sha256:" + hashlib.sha256(data).hexdigest() != e.digest:  # releases the GIL as it hashes
                    raise _blob_error("corrupt", e)
            finally:
                if data:
                    data.close()

    def check(self) -> None:
        """Raise the failure found so far, if any."""
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Wait until every blob is checked; raise the failure, if any."""
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join()
