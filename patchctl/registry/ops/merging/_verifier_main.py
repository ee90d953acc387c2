"""The merge's blob verifier, a program of its own: ``python -I -S _verifier_main.py``.

Reads ``DIGEST SIZE PATH`` lines on stdin, hashes each file through a
mapping and answers ``ok``, or ``missing|size|corrupt DIGEST`` for the first
bad one (and stops there). It needs only the standard library — it must not
import patchctl — so it starts in milliseconds (``-I -S``), and its hashing
takes no turns at the merging process's GIL. Started by
:class:`patchctl.registry.ops.merging.verify._Verifier`, by path.
"""

import hashlib
import mmap
import os
import sys


def main() -> None:
    for line in sys.stdin:
        digest, size, path = line.rstrip("\n").split(" ", 2)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            print("missing", digest, flush=True)
            return
        try:
            n = os.fstat(fd).st_size
            if n != int(size):
                print("size", digest, flush=True)
                return
            h = hashlib.sha256()
            if n:
                with mmap.mmap(fd, n, access=mmap.ACCESS_READ) as m:
                    h.update(m)
        finally:
            os.close(fd)
        if "sha256:" + h.hexdigest() != digest:
            print("corrupt", digest, flush=True)
            return
    print("ok", flush=True)


if __name__ == "__main__":
    main()
