"""The merge's input verifier: blobs hashed two at a time on SHA-NI against hashlib one at a time (issue #21).

    nice .venv/bin/python bench/verifier.py --registry bench/_work/floor-llama-l24/pushed \\
        ft-dense:v1 ft-sparse:v1 ft-lowrank:v1

Runs the verifier program (``registry/ops/merging/_verifier_main.py``) on the
raw blobs of the given patches, exactly as a merge of them starts it: with
the C kernels' path (``pc_sha256_files``: pairs of like size, the two SHA-256
chains interleaved) and without it (hashlib, one file at a time: the program
before the kernels had it), alternately, ``--rounds`` times at each thread
count; the files are read once first so both hash from the page cache. Prints
the fastest wall and CPU seconds of each and their ratio; both must answer
``ok``. Then ``fsck``'s hashing of the same files (``registry/store/hashing.py``,
``sha256_files``: pairs read a chunk at a time, on threads) against the loop
it replaced (1 MiB reads into hashlib, one file after another); both must
give the blobs' names. (``floor.py``: the whole merge.)
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from patchctl.patches import native  # noqa: E402
from patchctl.registry.ops.merging.verify import VERIFIER_MAIN, _nbytes, _Verifier  # noqa: E402
from patchctl.registry.store import hashing  # noqa: E402
from patchctl.registry.store.repository import Repository  # noqa: E402


def run(lines: str, threads: int, kernels: bool) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    extra = [native.lib._name] if kernels else []
    r = subprocess.run([sys.executable, "-I", "-S", str(VERIFIER_MAIN), str(threads), *extra], input=lines,
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, r.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", required=True, help="a registry folder holding the patches")
    ap.add_argument("refs", nargs="+", help="the patches a merge would take")
    ap.add_argument("--threads", default="1,2", help="comma-separated verifier thread counts")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if native.lib is None:
        print("patchctl._kernels is not built (or PATCHCTL_NATIVE=0): nothing to compare")
        return 1
    reg = Repository(args.registry, create=False)
    entries = _Verifier.of(reg.store, [reg.manifest(reg.resolve(r)) for r in args.refs])
    entries.wait()  # the in-process check of the same blobs: also reads them into the page cache

    lines = "".join(f"{e.digest} {_nbytes(e)} {reg.store.blob_path(e.digest)}\n" for e in entries.entries)
    total = sum(_nbytes(e) for e in entries.entries)
    print(f"{len(entries.entries)} blobs, {total / 1e9:.2f} GB; best of {args.rounds}, alternating")
    print(f"{'threads':>7}  {'hashlib wall s (CPU)':>21}  {'pairs wall s (CPU)':>19}  {'wall ratio':>10}  {'GB/s pairs':>10}")
    ok = True
    for th in (int(x) for x in args.threads.split(",")):
        best = {False: (9e9, 9e9), True: (9e9, 9e9)}
        for _ in range(args.rounds):
            for k in (False, True):
                wall, cpu, said = run(lines, th, k)
                ok &= said == "ok"
                best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
        (hw, hc), (pw, pc) = best[False], best[True]
        print(f"{th:>7}  {hw:>11.2f} ({hc:>5.2f})    {pw:>9.2f} ({pc:>5.2f})   {hw / pw:>9.2f}x  {total / pw / 1e9:>10.2f}")
    paths = [reg.store.blob_path(e.digest) for e in entries.entries]
    names = [e.digest for e in entries.entries]

    def old_loop() -> list[str]:
        out = []
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out.append("sha256:" + h.hexdigest())
        return out

    print(f"\nfsck's hashing{'':>4}{'old loop wall s (CPU)':>24}  {'sha256_files wall s (CPU)':>26}  {'wall ratio':>10}")
    for th in (int(x) for x in args.threads.split(",")):
        b_old, b_new = (9e9, 9e9), (9e9, 9e9)
        for _ in range(args.rounds):
            for which in (0, 1):
                c0, t0 = time.process_time(), time.perf_counter()
                got = old_loop() if which == 0 else hashing.sha256_files(paths, threads=th)
                w, c = time.perf_counter() - t0, time.process_time() - c0
                ok &= got == names
                if which == 0:
                    b_old = (min(b_old[0], w), min(b_old[1], c))
                else:
                    b_new = (min(b_new[0], w), min(b_new[1], c))
        print(f"threads {th:<10}{b_old[0]:>14.2f} ({b_old[1]:>5.2f})      {b_new[0]:>15.2f} ({b_new[1]:>5.2f})"
              f"   {b_old[0] / b_new[0]:>9.2f}x")
    print("RESULT:", "PASS" if ok else "FAIL (a verifier did not answer ok, or a digest differs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
