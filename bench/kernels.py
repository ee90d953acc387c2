"""The C kernels against the torch path they replace, and fresh buffers against pooled ones (issue #21).

    nice .venv/bin/python bench/kernels.py            # 50M bf16 entries, 3 inputs; best of 3
    nice .venv/bin/python bench/kernels.py --n 10000000

Each row: nanoseconds per element of the kernel path and of the torch path
(``native.lib`` switched off), both on the same inputs, best of ``--repeat``,
with their ratio; every pair is checked to give the same bits. The last row
times filling a fresh buffer (its pages fault in) against a reused one
(``host.BufferPool``), per 100 MB. Threads: ``PATCHCTL_THREADS`` (default: the
usable cores); torch runs one intra-op thread, as in the streaming passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from patchctl.patches import apply, host, host_merge, merge, native  # noqa: E402


def best(fn, repeat: int) -> tuple[float, object]:
    out, t = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def both(fn, repeat: int) -> tuple[float, float, bool]:
    """(kernel s, torch s, same bits) of ``fn()`` with the C kernels on and off."""
    lib = native.lib
    tk, a = best(fn, repeat)
    native.lib = None
    try:
        tt, b = best(fn, repeat)
    finally:
        native.lib = lib
    as_bytes = (lambda x: bytes(x.buf)) if isinstance(a, host.HostTensor) else \
        (lambda x: x.contiguous().view(torch.uint8).numpy().tobytes())
    return tk, tt, as_bytes(a) == as_bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000_000, help="entries per tensor")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if native.lib is None:
        print("patchctl._kernels is not built (or PATCHCTL_NATIVE=0): nothing to compare")
        return 1
    torch.set_num_threads(1)
    n, r = args.n, args.repeat
    g = torch.Generator().manual_seed(0)
    ds = [(torch.randn(n, generator=g) * 0.01).to(torch.bfloat16) for _ in range(3)]
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    tops = [merge._top(d, int(0.2 * n)) for d in ds]
    floor = float(torch.tensor(0.2, dtype=torch.float32))
    ft = (base.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)

    def ties_step():
        fused = merge._fused_ties(ds, [0.5, 0.3, 0.2], tops, floor, 1.0, ds[0].shape, out)
        if fused is not None:
            return fused

        def step(parts, acc, lo):
            merge._trim(parts, tops, lo)
            merge._weigh(parts, [0.5, 0.3, 0.2])
            merge._disjoint_mean_into(acc, parts, [0.5, 0.3, 0.2], sc)

        sc = merge._Scratch(merge._CHUNK, torch.device("cpu"), [0.5, 0.3, 0.2])
        return merge._elementwise(ds, ds[0].shape, out, step)

    def ht(t: torch.Tensor) -> host.HostTensor:
        return host.HostTensor(bytearray(t.view(torch.uint8).numpy().tobytes()), "bfloat16", tuple(t.shape))

    a_h, b_h = ht(ft), ht(base)
    rows = [
        ("task arithmetic, 3 bf16 inputs -> bf16",
         lambda: merge.task_arithmetic(ds, [0.5, 0.3, 0.2], generator_seed=0, name="t", out=out)),
        ("TIES step (trim, elect, mean), 3 bf16 -> bf16", ties_step),
        ("combine: bf16 base + bf16 delta", lambda: apply.combine(base, ds[0], out=out)),
        ("DARE-TIES (masks + drop, elect, mean) 3 bf16", lambda: merge.dare_ties(
            ds, [0.5, 0.3, 0.2], generator_seed=0, name="t", density=0.2, out=out)),
    ]
    print(f"{n:,} entries; PATCHCTL_THREADS workers, torch 1 intra-op thread; best of {r}")
    print(f"{'operation':<48}{'kernel ns/el':>14}{'torch ns/el':>13}{'torch/kernel':>14}  same bits")
    ok = True
    for name, fn in rows:
        tk, tt, same = both(fn, r)
        ok &= same
        print(f"{name:<48}{tk / n * 1e9:>14.2f}{tt / n * 1e9:>13.2f}{tt / tk:>13.1f}x  {same}")
    # DARE's drop masks alone: pc_dare_drops (one bit an entry) against torch.rand(n) >= density
    seeds = [merge.dare_seed(0, "t", i) for i in range(3)]
    tk, masks = best(lambda: host_merge.Drops(n, 0.2, seeds), r)
    tt, want = best(lambda: merge._dare_drops(ds, 0.2, 0, "t"), r)
    same = all(np.array_equal(np.unpackbits(m, bitorder="little")[:n].astype(bool), w.numpy())
               for m, w in zip(masks.masks, want, strict=True))
    masks.release()
    ok &= same
    print(f"{'DARE drop masks, 3 inputs (per entry of one)':<48}{tk / n * 1e9:>14.2f}{tt / n * 1e9:>13.2f}"
          f"{tt / tk:>13.1f}x  {same}")
    # push's diff: host kernel (in place over a copy of the fine-tune) vs the torch path
    tk = min(best(lambda: host.diff_with_pins(host.HostTensor(a_h.buf.copy(), "bfloat16", (n,)), b_h, "bfloat16"),
                  1)[0] for _ in range(r))
    tt, (d, idx, _) = best(lambda: apply.diff_with_pins(ft, base, torch.bfloat16), r)
    hd, hidx, _ = host.diff_with_pins(host.HostTensor(a_h.buf.copy(), "bfloat16", (n,)), b_h, "bfloat16")
    same = bytes(hd.buf) == d.view(torch.uint8).numpy().tobytes() and np.array_equal(hidx, idx.numpy())
    ok &= same
    print(f"{'push diff + pins, bf16 (kernel time has a copy)':<48}{tk / n * 1e9:>14.2f}{tt / n * 1e9:>13.2f}"
          f"{tt / tk:>13.1f}x  {same}")
    # sha256 of two buffers (the merge's verifier hands its blobs over in pairs): SHA-NI interleaved vs hashlib
    import ctypes
    import hashlib

    bufs = [a_h.buf, b_h.buf]
    out = ctypes.create_string_buffer(64)
    if native.lib.pc_sha256_pair(b"", 0, None, 0, out) == 0:
        tk, _ = best(lambda: native.lib.pc_sha256_pair(native.ptr(bufs[0]), bufs[0].nbytes, native.ptr(bufs[1]),
                                                       bufs[1].nbytes, out), r)
        th, want = best(lambda: b"".join(hashlib.sha256(b).digest() for b in bufs), r)
        same = out.raw == want
        ok &= same
        gb = (bufs[0].nbytes + bufs[1].nbytes) / 1e9
        print(f"{'sha256 of 2 buffers (GB/s; torch col: hashlib)':<48}{gb / tk:>14.2f}{gb / th:>13.2f}"
              f"{th / tk:>13.1f}x  {same}")
    else:
        print("sha256 pair: this CPU has no SHA-NI (the verifier uses hashlib)")
    size = 100 << 20
    pool = host.BufferPool()
    pool.give(pool.take(size))

    def fill(buf: np.ndarray, back: bool = False) -> None:
        buf[:] = 1
        if back:
            pool.give(buf)

    fresh = min(best(lambda: fill(np.empty(size, dtype=np.uint8)), 1)[0] for _ in range(r))
    reused = min(best(lambda: fill(pool.take(size), back=True), 1)[0] for _ in range(r))
    print(f"\nfill 100 MB: fresh buffer {fresh:.3f} s, pooled buffer {reused:.3f} s ({fresh / reused:.1f}x)")
    print("RESULT:", "PASS" if ok else "FAIL (bits differ)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
