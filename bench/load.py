"""Load benchmark: ``patchctl.load`` of a base + 4 patches merged on the fly vs the base alone.

    python bench/load.py               # real all-MiniLM-L6-v2, 3 interleaved rounds
    python bench/load.py --rounds 1

Prepares (in a child process) a fresh registry under ``bench/_work/load/``
with 4 patches of the real all-MiniLM-L6-v2 (22.7M params, fp32): two peft
LoRA adapters (r=16 on query/key/value/dense of every layer, random A and B:
same cost as trained ones) and two diffs pushed from fine-tune folders (one
dense: every float tensor perturbed, embeddings included; one touching the
attention blocks only). Then it runs, each in its own process and
interleaved for ``--rounds`` rounds:

- ``import floor``: ``import torch, transformers, patchctl`` only;
- ``base alone``: ``AutoModel.from_pretrained(BASE)``;
- ``base + 4 patches``: ``patchctl.load(BASE, [4 refs], method="task_arithmetic")``.

Each child reports its own in-process time for the load call; this process
reads the child's wall time and its own peak RSS from ``os.wait4`` (the
child's ``ru_maxrss``, not the running maximum of ``RUSAGE_CHILDREN``). This
process imports neither torch nor transformers, so it does not inflate the
children's figures. Medians over the rounds are printed, with the ratios
patched / base. Goal: wall ratio ≤ 1.5. Exit status 0 when the goal is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream import machine  # noqa: E402 - bench/ is not a package

REFS = ["lora-a:v1", "lora-b:v1", "diff-dense:v1", "diff-attn:v1"]

PREPARE = r"""
import json, shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from peft import LoraConfig, get_peft_model
from transformers import AutoModel
import patchctl
from patchctl.demo import tasks

work = Path(sys.argv[1])
base = tasks.base_model_dir()
reg = patchctl.Registry(work / "registry")
torch.manual_seed(0)
for i, ref in enumerate(["lora-a:v1", "lora-b:v1"]):
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    pm = get_peft_model(AutoModel.from_pretrained(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.05)
    pm.save_pretrained(work / ref.split(":")[0])
    reg.push(work / ref.split(":")[0], ref, base=base)
sd = load_file(base / "model.safetensors")
g = torch.Generator().manual_seed(1)
for ref, keep in (("diff-dense:v1", lambda k: True), ("diff-attn:v1", lambda k: ".attention." in k)):
    ft = {k: (v + 0.001 * torch.randn(v.shape, generator=g) if v.is_floating_point() and keep(k) else v) for k, v in sd.items()}
    out = work / ref.split(":")[0]
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(ft, out / "model.safetensors", metadata={"format": "pt"})
    reg.push(out, ref, base=base)
print(json.dumps({"base": str(base), "patches": {r["name"] + ":" + r["tag"]: r["tensors"] for r in reg.ls() if r["tag"] == "v1"},
                  "registry_mb": round(sum(p.stat().st_size for p in (work / "registry").rglob("*") if p.is_file()) / 1e6, 1)}))
"""

FLOOR = r"""
import torch, transformers, patchctl
from transformers import AutoModel
print("{}")
"""

BASE_ALONE = r"""
import json, sys, time
import torch, transformers, patchctl
from transformers import AutoModel
t0 = time.perf_counter()
model = AutoModel.from_pretrained(sys.argv[1])
print(json.dumps({"load_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}))
"""

PATCHED = r"""
import json, sys, time
import torch, transformers, patchctl
from transformers import AutoModel
t0 = time.perf_counter()
model = patchctl.load(sys.argv[1], sys.argv[3].split(","), method="task_arithmetic", registry=sys.argv[2], device="cpu")
print(json.dumps({"load_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}))
"""


def run(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd``; (wall seconds, peak RSS MiB of that process, exit code, stdout+stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_maxrss / 1024, rc, out  # ru_maxrss is in KiB on Linux


def last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Wall time and peak RSS of patchctl.load (base + 4 patches) vs the base alone.")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "load", help="scratch folder (removed first)")
    ap.add_argument("--goal", type=float, default=1.5, help="wall ratio goal (patched / base alone)")
    args = ap.parse_args(argv)
    py = sys.executable
    print(machine())
    print(f"command: {' '.join([Path(py).name, *sys.argv])}")
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    wall, rss, rc, out = run([py, "-c", PREPARE, str(work)])
    if rc:
        print(f"prepare failed (exit {rc}):\n{out[-3000:]}")
        return 2
    prep = last_json(out)
    base = prep["base"]
    print(f"base: {base}")
    print(f"patches (tensors): {prep['patches']}; registry {prep['registry_mb']} MB; prepared in {wall:.0f} s")

    steps = {
        "import floor": [py, "-c", FLOOR],
        "base alone": [py, "-c", BASE_ALONE, base],
        "base + 4 patches": [py, "-c", PATCHED, base, str(work / "registry"), ",".join(REFS)],
    }
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, cmd in steps.items():
            wall, rss, rc, out = run(cmd)
            if rc:
                print(f"{name} failed (exit {rc}):\n{out[-3000:]}")
                return 2
            results[name].append((wall, rss, float(last_json(out).get("load_s", float("nan")))))

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    print(f"\n{args.rounds} interleaved round(s), medians; 'load s' is the load call alone, inside the process")
    hdr = f"{'step':<18}{'wall s':>8}{'load s':>8}{'peak RSS MiB':>14}"
    print(hdr)
    print("-" * len(hdr))
    for name in steps:
        load_s = "-" if name == "import floor" else f"{med(name, 2):.2f}"
        print(f"{name:<18}{med(name, 0):>8.2f}{load_s:>8}{med(name, 1):>14.0f}")
    b, p = "base alone", "base + 4 patches"
    wall_ratio = med(p, 0) / med(b, 0)
    print(f"\nratios (base + 4 patches / base alone): wall {wall_ratio:.2f}x, load call {med(p, 2) / med(b, 2):.2f}x, "
          f"peak RSS {med(p, 1) / med(b, 1):.2f}x; goal wall <= {args.goal:g}x")
    print("every round (wall s, peak RSS MiB, load s): " + "; ".join(
        f"{k}: " + ", ".join(f"({w:.2f}, {r:.0f}, {s:.2f})" for w, r, s in v) for k, v in results.items()))
    shutil.rmtree(work, ignore_errors=True)
    ok = wall_ratio <= args.goal
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
