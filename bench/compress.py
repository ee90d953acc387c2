"""Benchmark of patchctl.patches.compress + codec: size against the entropy bound, speed.

    python bench/compress.py                    # 50M-entry Gaussian fp16 vector (a few minutes)
    python bench/compress.py --n 5000000 --reps 2   # quick run
    python bench/compress.py --real diff.safetensors  # also bits/param of a real task vector
    python bench/compress.py --skip-gaussian --steps --threads 1 --densities 0.2  # each step, C vs numpy

Prints three tables for a Gaussian "patch" tau of --n fp16 entries:

1. size: ternary (ComPEFT global top-k, alpha = std) bits/param against the
   bound H(d) + d, and the relative L2 error of the reconstruction;
2. speed, --reps repetitions per density, interleaved: in each, first the
   baseline "np.abs + np.argpartition top-k on the fp16 array", then
   compress = ``encode(sparsify(tau))`` timed as one call, then
   decompress = ``to_dense(decode(data))`` timed as one call. Every
   repetition starts from scratch: the previous repetition's outputs are
   freed first, and decompress decodes the encoded bytes again and builds a
   new dense tensor (so its time includes the first touch of the fresh
   output memory: page faults and the kernel's zeroing). Throughput is MB/s
   of fp16 input for compress and of dense fp16 output for decompress. The
   table gives the fastest repetition of each (and of the baseline); "x argpart"
   is baseline time / compress time of those; the median columns show the
   spread. The split (select/encode, decode/dense seconds) is that of the
   fastest repetition. The library uses torch.get_num_threads() threads
   (--threads), the baseline one;
3. zstd -19 (python zstandard, level 19) of the dense fp16 bytes of the
   reconstruction tau-hat and of the raw tau, on the first --zstd-n entries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchctl.patches import native  # noqa: E402
from patchctl.patches.codec import decode, encode, to_dense  # noqa: E402
from patchctl.patches.compress import entropy_bound_bits, relative_l2_error, sparsify  # noqa: E402

MB = 1e6


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def position_coding(data: bytes) -> str:
    return {0: "none", 1: f"rice k={data[10]}", 2: "zstd", 3: "all"}[data[9]]


def argpartition_topk(x16: np.ndarray, k: int) -> np.ndarray:
    a = np.abs(x16)
    return np.argpartition(a, len(a) - k)[len(a) - k :]


def select(stream, d: float):
    ((_, sp),) = list(sparsify(stream, d))
    return sp


def gaussian(args) -> None:
    n = args.n
    g = torch.Generator().manual_seed(args.seed)
    tau = torch.randn(n, generator=g).to(torch.float16)
    x16 = tau.numpy()
    nbytes = 2 * n
    stream = lambda: iter([("tau", tau)])  # noqa: E731
    print(f"Gaussian tau: {n:,} fp16 entries ({nbytes / MB:.0f} MB), seed {args.seed}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    print("kernels: " + ("C (patchctl._kernels)" if native.available() else "numpy (PATCHCTL_NATIVE=0 or not built)"))

    size_rows, speed_rows, zstd_rows = [], [], []
    zn = min(n, args.zstd_n)
    zc = zstandard.ZstdCompressor(level=19)
    raw_zstd_bits = None
    if not args.no_zstd19:
        raw_zstd_bits = len(zc.compress(x16[:zn].tobytes())) * 8 / zn

    for d in args.densities:
        k = min(n, int(n * d) + 1)  # ComPEFT keeps int(n*d) + 1 entries (plus ties)
        base, comp, decomp = [], [], []
        data = dense = None
        for rep in range(args.reps):
            data = dense = None  # free the previous repetition's outputs first
            t, _ = timed(argpartition_topk, x16, k)
            base.append(t)
            t0 = time.perf_counter()
            sp = select(stream, d)
            t1 = time.perf_counter()
            data = encode(sp)
            t2 = time.perf_counter()
            comp.append((t2 - t0, t1 - t0, t2 - t1))
            if rep == 0:
                bits = len(data) * 8 / n
                err = relative_l2_error(tau, sp)
                nnz = sp.nnz
            del sp
            t0 = time.perf_counter()
            back = decode(data)
            t1 = time.perf_counter()
            dense = to_dense(back)
            t2 = time.perf_counter()
            decomp.append((t2 - t0, t1 - t0, t2 - t1))
            del back
        if not torch.equal(dense, to_dense(select(stream, d))):
            raise SystemExit(f"decode(encode(x)) differs from x at d = {d}")
        bound = entropy_bound_bits(d)
        size_rows.append((d, nnz / n, bound, bits, bits / bound, position_coding(data), err))
        t_base = min(base)
        c_best, d_best = min(comp), min(decomp)
        speed_rows.append(
            (d, nbytes / t_base / MB, nbytes / c_best[0] / MB, t_base / c_best[0],
             nbytes / statistics.median(c[0] for c in comp) / MB, c_best[1], c_best[2],
             nbytes / d_best[0] / MB, nbytes / statistics.median(x[0] for x in decomp) / MB,
             d_best[1], d_best[2])
        )
        if not args.no_zstd19:
            hat = dense.reshape(-1)[:zn].numpy().tobytes()
            zstd_rows.append((d, bits, len(zc.compress(hat)) * 8 / zn, raw_zstd_bits))
        del data, dense

    print("\n1. size, ternary mode (global top-k, alpha = std), bits per parameter")
    print(f"{'d':>6} {'kept':>8} {'H(d)+d':>8} {'bits':>8} {'ratio':>7} {'positions':>11} {'rel L2 err':>10}")
    for d, kept, bound, bits, ratio, pos, err in size_rows:
        print(f"{d:>6.2f} {kept:>8.5f} {bound:>8.4f} {bits:>8.4f} {ratio:>7.4f} {pos:>11} {err:>10.4f}")

    print(f"\n2. speed, {args.reps} repetitions (MB/s of fp16 input for compress, of dense fp16 output for decompress)")
    print(
        f"{'d':>6} {'argpart':>8} {'compress':>9} {'x argpart':>9} {'median':>7} {'select s':>8} {'encode s':>8} "
        f"{'decompress':>10} {'median':>7} {'decode s':>8} {'dense s':>8}"
    )
    for d, base, comp, ratio, comp_med, tsel, tenc, decomp, decomp_med, tdec, tdense in speed_rows:
        print(
            f"{d:>6.2f} {base:>8.0f} {comp:>9.0f} {ratio:>9.2f} {comp_med:>7.0f} {tsel:>8.3f} {tenc:>8.3f} "
            f"{decomp:>10.0f} {decomp_med:>7.0f} {tdec:>8.3f} {tdense:>8.3f}"
        )
    print("   argpart = np.abs + np.argpartition on the fp16 array (fastest repetition);")
    print("   compress = encode(sparsify()), fastest repetition; median = median repetition;")
    print("   decompress = to_dense(decode(bytes), device='cpu'), a fresh decode and a fresh output each repetition")

    if zstd_rows:
        print(f"\n3. against zstd -19 of dense fp16 (first {zn:,} entries), bits per parameter")
        print(f"{'d':>6} {'ternary':>8} {'zstd19(tau-hat)':>16} {'x':>6} {'zstd19(tau)':>12} {'x':>7}")
        for d, bits, hat, raw in zstd_rows:
            print(f"{d:>6.2f} {bits:>8.4f} {hat:>16.4f} {hat / bits:>6.2f} {raw:>12.4f} {raw / bits:>7.1f}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


def real(args) -> None:
    from safetensors import safe_open

    path = args.real
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
        meta = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names]

    def stream():
        with safe_open(path, framework="pt") as f:
            for k in names:
                t = f.get_tensor(k)
                if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    t = t.to(torch.float32)
                yield k, t

    n = sum(int(np.prod(s)) for _, s, _ in meta)
    print(f"\nreal patch {path}: {len(names)} tensors, {n:,} parameters")
    print(f"{'d':>6} {'mode':>8} {'H(d)+d':>8} {'bits':>8} {'ratio':>7} {'rel L2 err':>10} {'seconds':>8}")
    for d in args.densities:
        for mode in ("ternary", "values"):
            t0 = time.perf_counter()
            total_bytes = 0
            err2 = norm2 = 0.0
            with safe_open(path, framework="pt") as f:
                for name, sp in sparsify(stream, d, mode=mode):
                    total_bytes += len(encode(sp))
                    ref = f.get_tensor(name).double()
                    err2 += float(((ref - to_dense(sp).double()) ** 2).sum())
                    norm2 += float((ref**2).sum())
            dt = time.perf_counter() - t0
            bits = total_bytes * 8 / n
            bound = entropy_bound_bits(d)
            err = f"{(err2 / norm2) ** 0.5:.4f}" if norm2 else "-"
            print(f"{d:>6.2f} {mode:>8} {bound:>8.4f} {bits:>8.4f} {bits / bound:>7.3f} {err:>10} {dt:>8.2f}")
    print("   bits include headers; 'values' stores fp16 values (16 bits each) on top of the positions")


def steps(args) -> None:
    """sparsify, encode and decode timed alone (best of --reps), C kernels against the numpy path."""
    n = args.n
    tau = torch.randn(n, generator=torch.Generator().manual_seed(args.seed)).to(torch.float16)
    stream = lambda: iter([("tau", tau)])  # noqa: E731
    lib = native.lib
    print(f"\nsteps, {n:,} fp16 entries, torch threads {torch.get_num_threads()}, best of {args.reps} (ms)")
    print(f"{'d':>6} {'path':>6} {'sparsify':>9} {'encode':>8} {'decode':>8}")
    for d in args.densities:
        for name, kernels in (("C", lib), ("numpy", None)):
            if name == "C" and lib is None:
                continue
            native.lib = kernels
            try:
                t_sp, sp = min((timed(select, stream, d) for _ in range(args.reps)), key=lambda r: r[0])
                t_en, data = min((timed(encode, sp) for _ in range(args.reps)), key=lambda r: r[0])
                t_de = min(timed(decode, data)[0] for _ in range(args.reps))
            finally:
                native.lib = lib
            print(f"{d:>6.2f} {name:>6} {1e3 * t_sp:>9.1f} {1e3 * t_en:>8.1f} {1e3 * t_de:>8.1f}")
            del sp, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000_000, help="entries of the Gaussian vector")
    p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.05, 0.1, 0.2])
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--zstd-n", type=int, default=10_000_000, help="entries fed to zstd -19")
    p.add_argument("--no-zstd19", action="store_true", help="skip table 3")
    p.add_argument("--real", type=str, default=None, help="a safetensors diff (task vector) file")
    p.add_argument("--skip-gaussian", action="store_true")
    p.add_argument("--steps", action="store_true", help="also time sparsify/encode/decode alone, C against numpy")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_gaussian:
        gaussian(args)
    if args.steps:
        steps(args)
    if args.real:
        real(args)


if __name__ == "__main__":
    main()
