"""What one pull may cost the puller: caps on what a peer says, a deadline, a minimum rate.

A remote is not trusted (docs/design.md, "Threat model"): every size and count
it sends is checked against :class:`PullLimits` *before* memory or disk is
spent on it, and the pull as a whole runs under a :class:`Watch`:

- the manifest is read at most :attr:`PullLimits.max_manifest_bytes` bytes
  (4 MiB: about 25,000 tensors; a patchctl manifest is ~150 bytes a tensor);
- at most :attr:`~PullLimits.max_blobs` blobs (100,000), each declared at most
  :attr:`~PullLimits.max_blob_bytes` (64 GiB: the largest single tensor of a
  405B model is ~4 GiB);
- the bytes still to fetch must fit in the free space of the registry's
  ``tmp/`` with :attr:`~PullLimits.reserve_bytes` to spare, checked before the
  first blob is requested;
- the whole pull (manifest and blobs, not the local commit) must finish within
  :attr:`~PullLimits.deadline` seconds (6 h), and it must receive at least
  :attr:`~PullLimits.min_rate` bytes a second (1 KiB/s), measured over each
  :attr:`~PullLimits.rate_window` (60 s): a peer that drips a byte every two
  seconds, or sends nothing, is dropped within about a window.

The :class:`Watch` is a helper thread: when the deadline passes or a window is
too slow it records the error and calls the source's ``abort()``, which shuts
the sockets down, so a download blocked in ``recv`` (or in reading headers)
returns at once; the download loops call :meth:`Watch.check` between chunks.
``patchctl pull`` raises every cap with a flag.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from patchctl.errors import InvalidArgument, LimitExceeded, StorageError, TransferTimeout
from patchctl.registry.store.manifest import MAX_MANIFEST_BYTES

MiB = 1 << 20
GiB = 1 << 30


#: errno values of a write that the disk refused; translated to :class:`StorageError`.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
_FIX = {
    errno.ENOSPC: "free some space (`patchctl gc`) or pull into another registry",
    errno.EDQUOT: "the disk quota is used up: free some space (`patchctl gc`)",
    errno.EFBIG: "the file system (or `ulimit -f`) does not allow a file this large",
    errno.EACCES: "check the registry folder's permissions",
    errno.EPERM: "check the registry folder's permissions",
    errno.EROFS: "the registry is on a read-only file system",
}


def storage_error(e: OSError, what: str) -> StorageError:
    """A one-line :class:`StorageError` for a refused write (``e.errno`` in :data:`DISK_ERRNOS`)."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return StorageError(f"cannot write {what}: {e.strerror} ({name}); {_FIX.get(e.errno or 0, 'check the disk')}; "
                        "nothing was stored")


@dataclass(frozen=True)
class PullLimits:
    """The caps of one pull (module docstring); built once at the edge, checked by :meth:`check`."""

    max_manifest_bytes: int = 4 * MiB
    max_blobs: int = 100_000
    max_blob_bytes: int = 64 * GiB
    deadline: float = 6 * 3600.0
    min_rate: float = 1024.0
    rate_window: float = 60.0
    reserve_bytes: int = 64 * MiB

    def check(self) -> PullLimits:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InvalidArgument(msg)

        need(0 < self.max_manifest_bytes <= MAX_MANIFEST_BYTES,
             f"max manifest bytes must be 1 to {MAX_MANIFEST_BYTES} (the manifest format's cap), "
             f"got {self.max_manifest_bytes}")
        need(self.max_blobs > 0, f"max blobs must be positive, got {self.max_blobs}")
        need(self.max_blob_bytes > 0, f"max blob bytes must be positive, got {self.max_blob_bytes}")
        for name in ("deadline", "rate_window"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                 f"{name.replace('_', ' ')} must be a positive number of seconds, got {v!r}")
        need(math.isfinite(self.min_rate) and self.min_rate >= 0,
             f"min rate must be a non-negative number of bytes a second, got {self.min_rate!r}")
        need(self.reserve_bytes >= 0, f"reserve bytes must be >= 0, got {self.reserve_bytes}")
        return self


def shutdown(conns: list[Any]) -> None:
    """Shut down the sockets of ``conns`` (``http.client`` connections) so that reads blocked on them
    return: how a source's ``abort()`` lets the :class:`Watch` stop a pull."""
    import socket

    for c in conns:
        sock = getattr(c, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Watch:
    """Enforces a pull's deadline and minimum rate from a helper thread (module docstring).

    ``received()`` returns the bytes received so far (any monotone count);
    ``abort()`` makes blocked reads return. Use as a context manager; the
    transfer calls :meth:`check` between chunks, and :meth:`fail` to stop the
    other downloads after one failed.
    """

    TICK = 0.2

    def __init__(self, limits: PullLimits, label: str, received: Callable[[], int],
                 abort: Callable[[], Any] | None = None):
        self.limits, self.label = limits, label
        self.received, self.abort = received, abort
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="patchctl-pull-watch")
        self.t0 = time.monotonic()
        self._paused = 0
        self._resumed = False

    def __enter__(self) -> Watch:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop watching (the download is over; the local commit is not timed)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is received meanwhile (the local commit): the rate is not measured, the deadline waits."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._resumed = True

    def check(self) -> None:
        """Raise the error that stopped the pull, if any."""
        if self.error is not None:
            raise self.error

    def fail(self, err: BaseException) -> None:
        """Stop the pull with ``err`` (the first error wins) and make blocked reads return."""
        with self._lock:
            if self.error is not None:
                return
            self.error = err
        if self.abort is not None:
            self.abort()

    def _run(self) -> None:
        lim = self.limits
        mark_t, mark_b = self.t0, self.received()
        while not self._stop.wait(self.TICK):
            now = time.monotonic()
            if self._paused or self._resumed:
                self._resumed = False
                mark_t, mark_b = now, self.received()
                continue
            if now - self.t0 > lim.deadline:
                self.fail(TransferTimeout(
                    f"pull from {self.label} did not finish within its {lim.deadline:g} s deadline; "
                    "nothing was stored (raise it with --timeout)"))
                return
            if now - mark_t >= lim.rate_window:
                got = self.received()
                rate = (got - mark_b) / (now - mark_t)
                if rate < lim.min_rate:
                    self.fail(TransferTimeout(
                        f"{self.label} sent {got - mark_b} bytes in {now - mark_t:.0f} s "
                        f"({rate:.1f} B/s), under the minimum of {lim.min_rate:g} B/s; nothing was stored "
                        "(lower it with --min-rate)"))
                    return
                mark_t, mark_b = now, got


__all__ = ["DISK_ERRNOS", "LimitExceeded", "PullLimits", "StorageError", "TransferTimeout", "Watch", "shutdown", "storage_error"]
