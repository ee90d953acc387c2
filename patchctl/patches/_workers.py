"""How many threads the streaming passes (push's diff, apply's sum) use, and the pool they share.

``PATCHCTL_THREADS`` when set (a positive integer), else the cores this
process may run on (its CPU affinity, which ``taskset`` and container limits
narrow; ``os.cpu_count()`` where there is no affinity call). The work handed
to the pool is torch kernels on disjoint slices, which release the GIL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


_cap: int | None = None  # set by :func:`capped`


class capped:  # noqa: N801 - used as a context manager
    """Inside the block, :func:`workers` gives at most ``n``: for a pass whose stages already run on
    threads of their own (the merge stream: reader, arithmetic, blob writers, model writer), where
    splitting each kernel call as well only oversubscribes the cores. Process-wide; restored on exit."""

    def __init__(self, n: int):
        self.n = max(1, n)

    def __enter__(self) -> None:
        global _cap
        self.saved, _cap = _cap, self.n

    def __exit__(self, *_: object) -> None:
        global _cap
        _cap = self.saved


def workers() -> int:
    """Threads for a streaming pass: ``$PATCHCTL_THREADS``, else the usable cores (at most the cap of
    :class:`capped`)."""
    n = _configured()
    return min(n, _cap) if _cap is not None else n


def _configured() -> int:
    env = os.environ.get("PATCHCTL_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``size`` threads.

    It only grows: a larger size replaces it with a larger pool, and the old one is never shut down
    (another thread may be submitting to it at that moment: the streams call :func:`run_ranges` from
    several threads at once, each with its own number of parts); once unreferenced it is collected
    and its idle threads exit.
    """
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="patchctl-work"), size
        return _pool


def split(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``parts`` ranges at multiples of ``align``."""
    cuts = [0] + [min(n, (i * n // parts) // align * align) for i in range(1, parts)] + [n]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def run_ranges(fn: Callable[[int, int], Any], n: int, align: int, min_per_thread: int) -> Sequence[Any]:
    """``fn(lo, hi)`` over ``[0, n)`` cut into one range per worker (fewer below ``min_per_thread`` each)."""
    parts = max(1, min(workers(), n // max(1, min_per_thread)))
    ranges = split(n, parts, align)
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    futs = [pool(parts).submit(fn, lo, hi) for lo, hi in ranges[1:]]
    first = fn(*ranges[0])  # this thread takes a share too
    return [first, *(f.result() for f in futs)]


def prefetched(fn: Callable[[Any], Any], items: Sequence[Any], ahead: int = 1) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` for each item, ``fn`` of the next ``ahead`` items running on threads meanwhile.

    For reads and hashes (which release the GIL) that overlap with the caller's
    work on the current item; ``ahead`` results are held in advance, no more.
    """
    if not items:
        return
    with ThreadPoolExecutor(ahead, thread_name_prefix="patchctl-read") as ex:
        futs = [ex.submit(fn, it) for it in items[:ahead]]
        try:
            for i, item in enumerate(items):
                cur = futs.pop(0).result()
                if i + ahead < len(items):
                    futs.append(ex.submit(fn, items[i + ahead]))
                yield item, cur
                del cur
        finally:
            for f in futs:
                f.cancel()


class Behind:
    """Calls ``fn(*args)`` in submission order on one thread, at most ``depth`` waiting or running.

    For writes (which release the GIL) that overlap with the caller's next
    computation. A failed call raises in the caller at its next :meth:`__call__`
    or at :meth:`wait`, and the calls queued after it are skipped; leaving the
    ``with`` block waits for (or, on an error, cancels) what is queued.
    """

    def __init__(self, fn: Callable[..., Any], depth: int = 2):
        self.fn, self.depth = fn, max(1, depth)
        self.ex = ThreadPoolExecutor(1, thread_name_prefix="patchctl-write")
        self.pending: list[Any] = []
        self.failed = False

    def _run(self, *args: Any) -> None:
        if self.failed:  # a call after a failed one is skipped: its file is abandoned anyway
            return
        try:
            self.fn(*args)
        except BaseException:
            self.failed = True
            raise

    def __call__(self, *args: Any) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self.ex.submit(self._run, *args))

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            for f in self.pending:
                f.cancel()
            self.ex.shutdown(wait=True)
