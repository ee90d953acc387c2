"""The merge's blob verifier, a program of its own: ``python -I -S _verifier_main.py``.

Reads ``DIGEST SIZE PATH`` lines on stdin, hashes each file through a
mapping and answers ``ok``, or ``missing|size|corrupt DIGEST`` for the first
bad one in input order (and stops there). ``argv[1]``: how many threads hash
files side by side (default 1; sha256 releases the GIL). It needs only the standard library — it must not
import patchctl — so it starts in milliseconds (``-I -S``), and its hashing
takes no turns at the merging process's GIL. Started by
:class:`patchctl.registry.ops.merging.verify._Verifier`, by path.
"""

import hashlib
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def check(line: str) -> str | None:
    """None when the blob of a ``DIGEST SIZE PATH`` line is whole, else ``missing|size|corrupt DIGEST``."""
    digest, size, path = line.rstrip("\n").split(" ", 2)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return f"missing {digest}"
    try:
        n = os.fstat(fd).st_size
        if n != int(size):
            return f"size {digest}"
        h = hashlib.sha256()
        if n:
            with mmap.mmap(fd, n, access=mmap.ACCESS_READ) as m:
                h.update(m)  # releases the GIL: threads hash side by side
    finally:
        os.close(fd)
    return None if "sha256:" + h.hexdigest() == digest else f"corrupt {digest}"


def main() -> None:
    stop = threading.Event()

    def one(line: str) -> str | None:
        return None if stop.is_set() else check(line)

    with ThreadPoolExecutor(max(1, int(sys.argv[1]) if len(sys.argv) > 1 else 1)) as ex:
        for bad in ex.map(one, sys.stdin.readlines()):  # in input order: the first bad line is the one named
            if bad:
                stop.set()  # the others still queued return at once
                print(bad, flush=True)
                return
    print("ok", flush=True)


if __name__ == "__main__":
    main()
