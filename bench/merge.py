"""Merging benchmark: patchctl merge against mergekit on the same inputs.

    python bench/merge.py               # full size: synthetic Llama, 468.2M params, bf16, 2 shards
    python bench/merge.py --layers 2    # quick run (99M params)
    python bench/merge.py --rounds 2    # every timed step twice, interleaved
    python bench/merge.py --methods ta --no-raw --no-shard-variant   # task arithmetic against mergekit only

Inputs (built or reused under ``bench/_work/`` by ``bench/_synth.py``): a base
and three fine-tunes of it (``dense``, ``sparse`` and ``lowrank``), merged with
weights 0.5 / 0.3 / 0.2, by task arithmetic and by TIES (density 0.2).

mergekit runs from its own virtualenv (default ``bench/_work/venv-mergekit``;
``--setup`` creates it: ``python3 -m venv``, then ``pip install torch==2.13.0``
first, so that pip does not pull a CUDA build, then ``pip install
mergekit==0.1.5``), with ``HF_HUB_OFFLINE=1``, absolute paths in its YAML
and ``--no-copy-tokenizer`` (the synthetic model has no tokenizer).

What a user does to get a merged model, each step its own process, with its
wall time and its own peak RSS (``ru_maxrss`` from ``os.wait4``):

- ``push`` x3 (once, a one-time cost): ``patchctl push FT ft-KIND:v1 --base BASE``
  into a fresh registry;
- per round, interleaved: mergekit TA; ``patchctl merge ... --apply OUT --base
  BASE`` (merged patch stored and the full model written, as mergekit writes
  it); ``patchctl merge`` alone (the patch only); the same three for TIES;
  a raw copy (read the four input models' bytes, write one model's bytes,
  fsync); mergekit TA with ``--out-shard-size 200M`` (unless
  ``--no-shard-variant``).

Every patchctl merge runs on its own clone of the pushed registry (blobs and
manifests hard-linked, the rest copied; not timed), so no merge finds the
blobs of an earlier one already stored. In round 1 both tools' merged models
are compared on a sample of tensors (relative L2 differences against each
other and against an fp32 reference: base + the patchctl method run in fp32 on
exact fp32 deltas), then deleted.

This process never imports torch or holds large buffers: on Linux a child's
``ru_maxrss`` starts from its parent's high-water mark (fork + exec), so a fat
parent would inflate every number. The page cache is not dropped (inputs are
warm). Exit status 0 when every goal passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream import du, run, tail  # noqa: E402 - bench/ is not a package; the same child-process measurement
from stream import machine as stream_machine  # noqa: E402

MiB = 1 << 20
KINDS = ("dense", "sparse", "lowrank")
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.2
GOALS = {"task_arithmetic": (0.5, 1.0), "ties": (0.25, None)}  # (wall ratio, peak RSS ratio) to mergekit

RAW = r"""
import os, sys
*srcs, dst = sys.argv[1:]
os.makedirs(dst)
buf = bytearray(8 << 20)
mv = memoryview(buf)
for i, src in enumerate(srcs):  # read every input model; write the first one's bytes
    for name in sorted(os.listdir(src)):
        if not name.endswith(".safetensors"):
            continue
        fo = open(os.path.join(dst, name), "wb") if i == 0 else None
        with open(os.path.join(src, name), "rb") as fi:
            while n := fi.readinto(buf):
                if fo:
                    fo.write(mv[:n])
        if fo:
            fo.flush()
            os.fsync(fo.fileno())
            fo.close()
"""

COMPARE = r"""
import json, math, os, sys
import torch
from safetensors import safe_open
from patchctl.patches.merge import merge_tensor, top_k_mask

method, density, weights, base, fts, a_dir, b_dir, names = json.loads(sys.argv[1])

def opener(folder):
    where = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                for k in sf.keys():
                    where[k] = os.path.join(folder, f)
    def get(name):
        with safe_open(where[name], "pt") as sf:
            return sf.get_tensor(name)
    return get

gb, ga, gp = opener(base), opener(a_dir), opener(b_dir)
gf = [opener(f) for f in fts]
params = {"density": density} if method == "ties" else {}
sq = {"ab": 0.0, "a": 0.0, "b": 0.0, "upd": 0.0, "w": 0.0}
kept = [0] * len(fts)
total = 0
print(f"{'tensor':<48}{'numel':>10}{'mk-pc/|upd|':>13}{'mk-pc/|W|':>11}{'mk-ref/|upd|':>14}{'pc-ref/|upd|':>14}")
for name in names:
    b16 = gb(name)
    b = b16.float()
    deltas = [g(name).float() - b for g in gf]
    merged = merge_tensor(method, deltas, weights, generator_seed=0, name=name, params=params)
    ref = (b + merged).to(b16.dtype).float()  # the fp32 merge, rounded once to the output dtype
    if method == "ties":
        for i, d in enumerate(deltas):
            kept[i] += int((top_k_mask(d, int(density * d.numel())) & (d != 0)).sum())
        total += b.numel()
    a, p = ga(name).float(), gp(name).float()
    vals = {"ab": float((a - p).square().sum()), "a": float((a - ref).square().sum()),
            "b": float((p - ref).square().sum()), "upd": float(merged.square().sum()), "w": float(ref.square().sum())}
    for k, v in vals.items():
        sq[k] += v
    r = lambda k, d: math.sqrt(vals[k] / vals[d]) if vals[d] else float("nan")
    print(f"{name:<48}{b.numel():>10}{r('ab','upd'):>13.2e}{r('ab','w'):>11.2e}{r('a','upd'):>14.2e}{r('b','upd'):>14.2e}")
    del b, deltas, merged, ref, a, p
r = lambda k, d: math.sqrt(sq[k] / sq[d])
print(f"{'all ' + str(len(names)) + ' tensors':<58}{r('ab','upd'):>13.2e}{r('ab','w'):>11.2e}{r('a','upd'):>14.2e}{r('b','upd'):>14.2e}")
print("|upd| = norm of the fp32 merged update; ref = round(base + fp32 merge) to bf16, the best a bf16 output can do")
if method == "ties":
    print("patchctl's trim kept " + ", ".join(f"{k / total:.1%}" for k in kept) +
          f" of the entries of the {len(fts)} inputs (nonzero after trim; density {density:g} keeps exactly "
          f"{density:.0%} per tensor, ties by lowest index, fewer where a tensor has fewer non-zeros)")
print("RELL2", json.dumps({"mk_pc_upd": r("ab", "upd"), "mk_pc_w": r("ab", "w"), "mk_ref_upd": r("a", "upd"),
                           "pc_ref_upd": r("b", "upd")}))
"""


def machine(mk_py: Path) -> str:
    """stream.py's machine line (CPUs, RAM, this venv's versions) plus the mergekit venv's versions."""
    mk = subprocess.run([str(mk_py), "-c", "from importlib.metadata import version as v; "
                         "print(v('mergekit'), v('torch'), v('transformers'))"],
                        capture_output=True, text=True).stdout.split() or ["?"] * 3
    return f"{stream_machine()}\nmergekit venv: mergekit {mk[0]}, torch {mk[1]}, transformers {mk[2]}"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def clone_registry(src: Path, dst: Path) -> None:
    """Blobs and manifests (immutable, content-addressed) hard-linked; index, refs, records copied."""
    def copy(s: str, d: str) -> None:
        rel = Path(s).relative_to(src).parts[0]
        if rel in ("objects", "manifests"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)


def mergekit_yaml(method: str, base: Path, fts: list[Path]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft, w in zip(fts, WEIGHTS, strict=True):
        prm = f"{{weight: {w}, density: {DENSITY}}}" if method == "ties" else f"{{weight: {w}}}"
        lines += [f"  - model: {ft}", f"    parameters: {prm}"]
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def setup_mergekit(venv: Path) -> None:
    print(f"creating {venv} (torch 2.13.0 CPU first, then mergekit 0.1.5)")
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "mergekit==0.1.5"], check=True)


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def sample_names(layers: int) -> list[str]:
    mid, last = layers // 2, layers - 1
    return ["model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            f"model.layers.{mid}.self_attn.o_proj.weight",
            f"model.layers.{mid}.mlp.gate_proj.weight",
            f"model.layers.{last}.self_attn.k_proj.weight",
            f"model.layers.{last}.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Wall time and peak RSS of patchctl merge vs mergekit.")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24 = 468.2M params; 2 for a quick run)")
    ap.add_argument("--work", type=Path, default=HERE / "_work", help="scratch folder (default bench/_work)")
    ap.add_argument("--mergekit-venv", type=Path, default=None, help="default WORK/venv-mergekit")
    ap.add_argument("--setup", action="store_true", help="create the mergekit venv if it is missing")
    ap.add_argument("--rounds", type=int, default=1, help="times each timed step runs, interleaved (default 1)")
    ap.add_argument("--methods", default="ta,ties", help="comma-separated methods to time: ta, ties (default both)")
    ap.add_argument("--no-shard-variant", action="store_true", help="skip mergekit TA with --out-shard-size 200M")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw read + write of the same bytes")
    ap.add_argument("--keep", action="store_true", help="keep the pushed registry")
    args = ap.parse_args(argv)
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"ta", "ties"}:
        ap.error(f"--methods: choose from ta, ties (got {args.methods!r})")

    py = sys.executable
    exe = Path(py).parent / "patchctl"
    patchctl = [str(exe)] if exe.is_file() else [py, "-m", "patchctl"]
    work = args.work.resolve()
    venv = (args.mergekit_venv or work / "venv-mergekit").resolve()
    mk_yaml, mk_py = venv / "bin" / "mergekit-yaml", venv / "bin" / "python"
    if not mk_yaml.is_file():
        if not args.setup:
            print(f"{mk_yaml} is missing: run with --setup (or: python3 -m venv {venv}; "
                  f"{venv}/bin/pip install torch==2.13.0; {venv}/bin/pip install mergekit==0.1.5)")
            return 2
        setup_mergekit(venv)

    tag = f"llama-l{args.layers}"
    base = work / f"{tag}-base"
    fts = [work / f"{tag}-ft-{k}" for k in KINDS]
    run_dir = work / f"merge-{tag}"
    logs, pushed = run_dir / "logs", run_dir / "registry-pushed"

    print(machine(mk_py))
    print(f"command: {' '.join([Path(py).name, *sys.argv])}")
    print(f"load average at start: {loadavg()} (shared VM: other jobs run; compare within this run)")
    t_start = time.perf_counter()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    logs.mkdir(parents=True)

    synth = str(HERE / "_synth.py")
    prep = [([py, synth, "base", str(base), "--layers", str(args.layers)], "synth-base")]
    prep += [([py, synth, "finetune", str(base), str(ft), "--kind", k], f"synth-{k}") for k, ft in zip(KINDS, fts, strict=True)]
    for cmd, name in prep:
        wall, rss, rc = run(cmd, logs / f"{name}.log")
        print(f"  {(logs / f'{name}.log').read_text().strip()}")
        if rc:
            print(f"{name} failed (exit {rc}):\n{tail(logs / f'{name}.log')}")
            return 2
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    cfgs = {}
    for method in ("task_arithmetic", "ties"):
        cfgs[method] = run_dir / f"mergekit-{method}.yml"
        cfgs[method].write_text(mergekit_yaml(method, base, fts))
    wstr = ",".join(f"{w:g}" for w in WEIGHTS)
    refs = [f"ft-{k}:v1" for k in KINDS]

    # one-time import
    print("\npush (one-time import of the three fine-tunes into a fresh registry):")
    push_rows = []
    for k, ft, ref in zip(KINDS, fts, refs, strict=True):
        log = logs / f"push-{k}.log"
        wall, rss, rc = run([*patchctl, "push", str(ft), ref, "--base", str(base), "--registry", str(pushed)], log)
        push_rows.append((f"push {k}", wall, rss, rc))
        print(f"  push {k:<8} {wall:6.1f} s  {rss:6.0f} MiB  exit {rc}")
        if rc:
            print(tail(log))
            return 2
    print(f"  registry after the pushes: {du(pushed) / 1e6:.0f} MB")

    results: dict[str, list[tuple[float, float, int]]] = {}
    rel: dict[str, dict[str, float]] = {}
    order: list[str] = []
    ok = True

    def step(label: str, cmd: list[str], out: Path | None, reg: Path | None, rnd: int) -> bool:
        if reg is not None:
            clone_registry(pushed, reg)
        log = logs / f"r{rnd}-{label.replace(' ', '_').replace('/', '-')}.log"
        wall, rss, rc = run(cmd, log)
        if label not in results:
            order.append(label)
        results.setdefault(label, []).append((wall, rss, rc))
        print(f"  r{rnd} {label:<34} {wall:7.1f} s {rss:7.0f} MiB  exit {rc}  load {loadavg()}")
        if rc:
            print(tail(log))
        if reg is not None:
            shutil.rmtree(reg, ignore_errors=True)
        return rc == 0

    def compare(method: str, a: Path, b: Path) -> None:
        spec = [method, DENSITY, list(WEIGHTS), str(base), [str(f) for f in fts], str(a), str(b),
                sample_names(args.layers)]
        log = logs / f"compare-{method}.log"
        wall, rss, rc = run([py, "-c", COMPARE, json.dumps(spec)], log)
        text = log.read_text(errors="replace")
        print(f"\n  compare {method} (mergekit vs patchctl merged models; ref = fp32 merge; {wall:.0f} s):")
        print("\n".join("    " + ln for ln in text.splitlines() if not ln.startswith("RELL2")))
        for ln in text.splitlines():
            if ln.startswith("RELL2 "):
                rel[method] = json.loads(ln[6:])
        if rc:
            print(f"  compare failed (exit {rc})")
        print()

    for rnd in range(1, args.rounds + 1):
        print(f"\nround {rnd}:")
        for method, short in (("task_arithmetic", "TA"), ("ties", "TIES")):
            if short.lower() not in methods:
                continue
            extra = ["--method", "ties", "--density", f"{DENSITY:g}"] if method == "ties" else []
            mk_out, pc_out = run_dir / f"out-mk-{short}", run_dir / f"out-pc-{short}"
            reg = run_dir / "registry"
            step(f"mergekit {short}", [str(mk_yaml), str(cfgs[method]), str(mk_out), "--no-copy-tokenizer"],
                 mk_out, None, rnd)
            merge = [*patchctl, "merge", *refs, "--weights", wstr, *extra, "--as", "m:v1", "--no-validate",
                     "--registry", str(reg)]
            step(f"patchctl {short} merge --apply", [*merge, "--apply", str(pc_out), "--base", str(base)],
                 pc_out, reg, rnd)
            if rnd == 1 and mk_out.exists() and pc_out.exists():
                compare(method, mk_out, pc_out)
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(pc_out, ignore_errors=True)
            step(f"patchctl {short} merge (patch only)", merge, None, reg, rnd)
        if not args.no_raw:
            copy = run_dir / "raw-copy"
            step("raw read 4 models + write 1", [py, "-c", RAW, str(base), *map(str, fts), str(copy)], copy, None, rnd)
            shutil.rmtree(copy, ignore_errors=True)
        if not args.no_shard_variant and "ta" in methods:
            mk_out = run_dir / "out-mk-TA-200M"
            step("mergekit TA --out-shard-size 200M",
                 [str(mk_yaml), str(cfgs["task_arithmetic"]), str(mk_out), "--no-copy-tokenizer",
                  "--out-shard-size", "200M"], mk_out, None, rnd)
            shutil.rmtree(mk_out, ignore_errors=True)

    # table
    def med(label: str, i: int) -> float:
        return statistics.median(r[i] for r in results[label])

    def ratio(label: str, ref: str, i: int) -> float:
        """Median over rounds of the per-round ratio (interleaved pairs)."""
        return statistics.median(a[i] / b[i] for a, b in zip(results[label], results[ref], strict=True))

    try:
        n_params = f"{json.loads((base / '_synth.json').read_text())['num_params'] / 1e6:.1f}M"
    except (OSError, ValueError, KeyError):
        n_params = "?"
    print(f"\nmodel: {tag} ({n_params} params), {model_bytes / 1e6:.0f} MB of bf16 tensors per model, "
          f"2 shards; 3 patches, weights {wstr}; TIES density {DENSITY:g}; {args.rounds} round(s), "
          f"median shown; page cache warm")
    hdr = (f"{'step':<36}{'wall s':>8}{'peak RSS MiB':>14}{'x mk wall':>11}{'x mk RSS':>10}{'x raw':>7}"
           f"  {'goal':<22}")
    print(hdr)
    print("-" * len(hdr))
    raw = "raw read 4 models + write 1"
    for label in order:
        mkref = "mergekit TIES" if "TIES" in label else "mergekit TA"
        wall, rss = med(label, 0), med(label, 1)
        rw = ratio(label, mkref, 0) if label != mkref and not label.startswith("raw") else None
        rr = ratio(label, mkref, 1) if rw is not None else None
        xr = ratio(label, raw, 0) if label != raw and raw in results else None
        goal = ""
        if label.endswith("merge --apply"):
            method = "ties" if "TIES" in label else "task_arithmetic"
            gw, gr = GOALS[method]
            passed = rw <= gw and (gr is None or rr <= gr) and all(r[2] == 0 for r in results[label])
            goal = f"wall <= {gw}x" + (f", RSS <= {gr}x" if gr else "") + f": {'PASS' if passed else 'FAIL'}"
            ok &= passed
        bad = [r[2] for r in results[label] if r[2]]
        if bad:
            goal += f" exit {bad[0]}"
            ok = False
        walls = "/".join(f"{r[0]:.1f}" for r in results[label]) if args.rounds > 1 else ""
        print(f"{label:<36}{wall:>8.1f}{rss:>14.0f}{_x(rw):>11}{_x(rr):>10}{_x(xr):>7}  {goal} {walls}")
    for name, wall, rss, _rc in push_rows:
        print(f"{name + ' (one-time)':<36}{wall:>8.1f}{rss:>14.0f}{'-':>11}{'-':>10}{'-':>7}")
    print("x mk = per-round ratio to mergekit's default-shard run of the same method (median); "
          "x raw = to the raw copy")
    for method, r in rel.items():
        print(f"rel. L2, {method}: mergekit vs patchctl {r['mk_pc_upd']:.2e} of the update norm "
              f"({r['mk_pc_w']:.2e} of the weights); vs the fp32 merge rounded to bf16: mergekit {r['mk_ref_upd']:.2e}, "
              f"patchctl {r['pc_ref_upd']:.2e} of the update")
    print(f"load average at end: {loadavg()}; total {time.perf_counter() - t_start:.0f} s; "
          f"this process's peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"logs: {logs}")
    if not args.keep:
        shutil.rmtree(pushed, ignore_errors=True)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
