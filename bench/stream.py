"""Streaming benchmark: push and apply a full fine-tune under a peak-RSS budget.

    python bench/stream.py               # full size: synthetic Llama, 468.2M params, bf16 (936 MB)
    python bench/stream.py --layers 2    # quick run (99M params)

Builds (or reuses) a base and a dense fine-tune under ``bench/_work/`` with
``bench/_synth.py``, then runs each step as its own process and reads that
process's peak RSS from ``os.wait4`` (its own ``ru_maxrss``, not the running
maximum over all children that ``RUSAGE_CHILDREN`` gives):

- ``import floor``: ``python -c "import torch, patchctl"``;
- ``raw copy``: read the fine-tune's files in 8 MiB chunks and write them
  (then fsync) — the I/O baseline for the ``x copy`` column;
- ``push``: ``patchctl push FT bench:v1 --base BASE --registry <fresh dir>``;
- ``apply``: ``patchctl apply bench:v1 OUT --base BASE --registry ...``;
- ``verify``: OUT equals the fine-tune bit for bit, one tensor at a time.

This process never imports torch or holds large buffers: on Linux a child's
``ru_maxrss`` starts from its parent's high-water mark (fork/vfork + exec), so
a fat parent would inflate every number. Each step runs once; the page cache
is not dropped (the inputs are usually cached from generation or a prior run).
Exit status 0 when verify passes and push and apply stay under the budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

COPY = r"""
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
buf = bytearray(8 << 20)
mv = memoryview(buf)
for name in sorted(os.listdir(src)):
    if name.startswith("."):
        continue
    with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dst, name), "wb") as fo:
        while n := fi.readinto(buf):
            fo.write(mv[:n])
        fo.flush()
        os.fsync(fo.fileno())
"""

VERIFY = r"""
import json, os, struct, sys

def tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for k, v in header.items():
            b, e = v["data_offsets"]
            out[k] = (path, v["dtype"], v["shape"], 8 + n + b, e - b)
    return out

ft_dir, out_dir = sys.argv[1], sys.argv[2]
a, b = tensors(ft_dir), tensors(out_dir)
bad = sorted(set(a) ^ set(b))
nbytes = 0
for k in sorted(set(a) & set(b)):
    pa, da, sa, oa, na = a[k]
    pb, db, sb, ob, nb = b[k]
    if (da, sa, na) != (db, sb, nb):
        bad.append(k)
        continue
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        if os.pread(fa.fileno(), na, oa) != os.pread(fb.fileno(), nb, ob):
            bad.append(k)
    nbytes += na
for meta in ("config.json", "model.safetensors.index.json"):
    pa, pb = os.path.join(ft_dir, meta), os.path.join(out_dir, meta)
    if os.path.exists(pa) and (not os.path.exists(pb) or json.load(open(pa)) != json.load(open(pb))):
        bad.append(meta)
print(f"{len(a)} tensors, {nbytes / 1e6:.0f} MB compared; {len(bad)} differ {bad[:5]}")
sys.exit(1 if bad else 0)
"""


def machine() -> str:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def ver(p: str) -> str:
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return "?"

    return (f"machine: {usable} cpus usable (nproc), {os.cpu_count()} online, {cpu}; "
            f"RAM {mem / 2**30:.1f} GiB; Linux {platform.release()}\n"
            f"python {platform.python_version()}, torch {ver('torch')}, safetensors {ver('safetensors')}, "
            f"patchctl {ver('patchctl')}")


def run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``cmd``; (wall seconds, peak RSS MiB of that process, exit code)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_maxrss / 1024, rc  # ru_maxrss is in KiB on Linux


def tail(log: Path, n: int = 15) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join("    " + ln for ln in lines[-n:])


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Peak RSS and wall time of patchctl push/apply on a full fine-tune.")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24 = 468.2M params; 2 for a quick run)")
    ap.add_argument("--work", type=Path, default=HERE / "_work", help="scratch folder (default bench/_work)")
    ap.add_argument("--budget-gib", type=float, default=1.5, help="peak RSS goal for push and apply")
    ap.add_argument("--keep", action="store_true", help="keep the registry and the applied model")
    args = ap.parse_args(argv)

    py = sys.executable
    exe = Path(py).parent / "patchctl"
    patchctl = [str(exe)] if exe.is_file() else [py, "-m", "patchctl"]
    work = args.work.resolve()
    tag = f"llama-l{args.layers}"
    base, ft = work / f"{tag}-base", work / f"{tag}-ft-dense"
    run_dir = work / f"stream-{tag}"
    reg, out, copy = run_dir / "registry", run_dir / "applied", run_dir / "copy"
    logs = run_dir / "logs"
    budget = args.budget_gib * 1024

    print(machine())
    print(f"command: {' '.join([Path(py).name, *sys.argv])}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    logs.mkdir(parents=True)
    synth = str(HERE / "_synth.py")
    for cmd, name in (([py, synth, "base", str(base), "--layers", str(args.layers)], "synth-base"),
                      ([py, synth, "finetune", str(base), str(ft), "--kind", "dense"], "synth-ft")):
        wall, rss, rc = run(cmd, logs / f"{name}.log")
        print(f"  {(logs / f'{name}.log').read_text().strip()}  [peak RSS {rss:.0f} MiB]")
        if rc:
            print(f"{name} failed (exit {rc}):\n{tail(logs / f'{name}.log')}")
            return 2
    model_bytes = sum(p.stat().st_size for p in ft.glob("*.safetensors"))

    steps = [
        ("import floor", [py, "-c", "import torch, patchctl"]),
        ("raw copy", [py, "-c", COPY, str(ft), str(copy)]),
        ("push", [*patchctl, "push", str(ft), "bench:v1", "--base", str(base), "--registry", str(reg)]),
        ("apply", [*patchctl, "apply", "bench:v1", str(out), "--base", str(base), "--registry", str(reg)]),
        ("verify", [py, "-c", VERIFY, str(ft), str(out)]),
    ]
    rows = []
    copy_wall = None
    ok = True
    for name, cmd in steps:
        log = logs / f"{name.replace(' ', '-')}.log"
        wall, rss, rc = run(cmd, log)
        if name == "raw copy":
            copy_wall = wall
            shutil.rmtree(copy, ignore_errors=True)  # only its timing is needed
        goal = "-"
        if name in ("push", "apply"):
            goal = "PASS" if rss <= budget and rc == 0 else "FAIL"
            ok &= goal == "PASS"
        note = log.read_text(errors="replace").strip().splitlines()[-1:] if name == "verify" else []
        if name == "push" and rc == 0:
            note = [f"registry {du(reg) / 1e6:.0f} MB"]
        rows.append((name, wall, rss, rc, goal, note[0] if note else ""))
        if rc:
            ok = False
            print(f"{name} failed (exit {rc}):\n{tail(log)}")
            if name in ("push", "apply"):
                break

    print(f"\nmodel: {tag}, {model_bytes / 1e6:.0f} MB of bf16 tensors in "
          f"{len(list(ft.glob('*.safetensors')))} shards; goal: peak RSS <= {args.budget_gib:g} GiB "
          f"({budget:.0f} MiB); each step run once, page cache warm")
    hdr = f"{'step':<13}{'wall s':>8}{'peak RSS MiB':>14}{'MB/s':>8}{'x copy':>8}  {'goal':<5} note"
    print(hdr)
    print("-" * len(hdr))
    for name, wall, rss, rc, goal, note in rows:
        mbs = f"{model_bytes / 1e6 / wall:.0f}" if name != "import floor" else "-"
        ratio = f"{wall / copy_wall:.1f}" if copy_wall and name not in ("import floor", "raw copy") else "-"
        if rc:
            note = f"exit {rc} {note}"
        print(f"{name:<13}{wall:>8.1f}{rss:>14.0f}{mbs:>8}{ratio:>8}  {goal:<5} {note}")
    print(f"MB/s = fine-tune tensor bytes / wall; x copy = wall / raw copy wall; "
          f"this process's own peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(a child's figure can include up to that much of it)")
    print(f"logs: {logs}")
    if not args.keep:
        for p in (reg, out):
            shutil.rmtree(p, ignore_errors=True)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
