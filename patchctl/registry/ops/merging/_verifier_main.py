"""The merge's blob verifier, a program of its own: ``python -I -S _verifier_main.py [THREADS [KERNELS]]``.

Reads ``DIGEST SIZE PATH`` lines on stdin, hashes each file and answers
``ok``, or ``missing|size|corrupt DIGEST`` for the first bad one in input
order. ``THREADS``: how many threads hash side by side (default 1; the
hashing releases the GIL). ``KERNELS``: the path of patchctl's C kernels,
whose ``pc_sha256_files`` hashes two files at once (positioned reads into
a small buffer), their SHA-NI chains interleaved (~1.5x hashlib's speed for one file at a time here:
bench/kernels.py); the files go in pairs of like size, largest first. Where
it is not given or returns non-zero (no SHA-NI), hashlib hashes each file
through a mapping. It needs only the standard library — it must not import
patchctl — so it starts in milliseconds (``-I -S``), and its hashing takes
no turns at the merging process's GIL. Started by
:class:`patchctl.registry.ops.merging.verify._Verifier`, by path.
"""

import ctypes
import hashlib
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def _sha256(fd: int, n: int) -> str:
    h = hashlib.sha256()
    if n:
        with mmap.mmap(fd, n, access=mmap.ACCESS_READ) as m:
            h.update(m)  # releases the GIL: threads hash side by side
    return h.hexdigest()


def check(lines: list[str], kernels: object = None) -> list[str | None]:
    """For each ``DIGEST SIZE PATH`` line: None when its blob is whole, else ``missing|size|corrupt DIGEST``."""
    out: list[str | None] = [None] * len(lines)
    opened: list[tuple[int, int, str, int]] = []  # (line, fd, hex digest, size) of the files to hash
    try:
        for i, line in enumerate(lines):
            digest, size, path = line.rstrip("\n").split(" ", 2)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                out[i] = f"missing {digest}"
                continue
            opened.append((i, fd, digest, int(size)))
            if os.fstat(fd).st_size != int(size):
                out[i] = f"size {digest}"
        todo = [o for o in opened if out[o[0]] is None]
        got: list[str] = []
        if kernels is not None and len(todo) == 2:
            buf = ctypes.create_string_buffer(64)
            (_, fd, _, n), (_, fd2, _, m) = todo
            if kernels.pc_sha256_files(fd, n, fd2, m, buf, 0) == 0:  # type: ignore[attr-defined]
                got = [buf.raw[:32].hex(), buf.raw[32:].hex()]
        if not got:
            got = [_sha256(fd, n) for _, fd, _, n in todo]
        for (i, _, digest, _), hexd in zip(todo, got, strict=True):
            if "sha256:" + hexd != digest:
                out[i] = f"corrupt {digest}"
    finally:
        for _, fd, _, _ in opened:
            os.close(fd)
    return out


def _kernels(path: str) -> object:
    """The C kernels' hashing of two files, or None where they cannot load."""
    try:
        lib = ctypes.CDLL(path)
        f = lib.pc_sha256_files
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    f.restype = ctypes.c_int
    return lib


def main() -> None:
    lines = sys.stdin.readlines()
    threads = max(1, int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    kernels = _kernels(sys.argv[2]) if len(sys.argv) > 2 else None

    def size(i: int) -> int:
        try:
            return int(lines[i].split(" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    order = sorted(range(len(lines)), key=size, reverse=True)
    jobs = [order[k:k + 2] for k in range(0, len(order), 2)] if kernels else [[i] for i in range(len(lines))]
    verdicts: list[str | None] = [None] * len(lines)
    first = [len(lines)]  # the lowest line found bad so far: later lines need no check
    lock = threading.Lock()

    def one(job: list[int]) -> None:
        job = [i for i in job if i < first[0]]
        for i, bad in zip(job, check([lines[i] for i in job], kernels), strict=True):
            if bad:
                with lock:
                    verdicts[i] = bad
                    first[0] = min(first[0], i)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, jobs))
    print(verdicts[first[0]] if first[0] < len(lines) else "ok", flush=True)


if __name__ == "__main__":
    main()
