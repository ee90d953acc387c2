"""Patch diagnostics on real and large patches (issue 18).

    python bench/diagnostics.py                          # everything: intruders, localize, cost at 468.2M params
    python bench/diagnostics.py --only intruders         # (a) LoRA r = 8 vs full fine-tune, intruder dimensions
    python bench/diagnostics.py --only intruders --extra-steps 480   # (a) plus 4× longer trainings
    python bench/diagnostics.py --only localize          # (b) skill localization of the full fine-tunes
    python bench/diagnostics.py --only cost --layers 2   # (c) cost on a synthetic bf16 diff, quick size (99M params)

(a) and (b) use the demo's cached patches of all-MiniLM-L6-v2
(``tasks.cached(KIND, TASK, .demo/cache, steps=120)``, trained on first use:
full fine-tunes and LoRA r = 8 on query/value, task A = WordNet supersense,
task B = fortune topic), pushed into a fresh registry under
``bench/_work/inspect``. (a) runs ``Registry.inspect`` at k = 10, ε = 0.5
and counts intruder dimensions on the 12 query/value matrices both patches
change (and on all of the full fine-tune's matrices); the counts at the
other ε are the number of top vectors whose recorded max |cos| is below ε,
which is what ``inspect --eps`` counts. It also prints the interference
(``inspect A B``) of the two tasks' patches. (b) attaches suites
holding each task's whole validation and test splits and runs
``Registry.localize``. Evaluation and math on the CPU.

(c) builds (or reuses) the synthetic Llama base and dense bf16 fine-tune of
``bench/_synth.py`` under ``bench/_work``, pushes the fine-tune as a diff, and
runs each step in its own process, reading its peak RSS from ``os.wait4``
(as ``bench/stream.py``): ``read`` = decode every tensor of the stored patch
once (``PatchView.tensor``), ``inspect`` = ``patchctl inspect`` (reads the
patch and the base once, SVDs per matrix), ``inspect again`` = the cached
record.

(Not ``bench/inspect.py``: ``python bench/X.py`` puts ``bench/`` first on
``sys.path``, and a file there named like the standard library's ``inspect``
would be imported by torch in every bench script.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CACHE = Path(ROOT) / ".demo" / "cache"
WORK = Path(HERE) / "_work"
TASKS = ("wordnet", "fortunes")
EPS = (0.5, 0.7, 0.9)

READ = r"""
import sys, time
from patchctl import Registry
t0 = time.perf_counter()
with Registry(sys.argv[1]) as reg:
    view = reg.view(sys.argv[2])
    n = 0
    for key in sorted(view.m.tensors):
        n += view.tensor(key).numel()
print(f"read {n} entries in {time.perf_counter() - t0:.1f} s")
"""


def _registry(name: str):  # noqa: ANN202
    from patchctl import Registry

    path = WORK / "inspect" / name
    shutil.rmtree(path, ignore_errors=True)
    return Registry(path)


def _qv(name: str) -> bool:
    return name.endswith(("attention.self.query.weight", "attention.self.value.weight"))


def intruders_table(threads: int, extra_steps: int | None, extra_tasks: tuple[str, ...] = TASKS) -> None:
    import torch

    from patchctl.demo import tasks

    torch.set_num_threads(threads)
    base = tasks.base_model_dir()
    reg = _registry("intruders")
    runs = [(kind, t, 120) for t in TASKS for kind in ("lora", "full")]
    if extra_steps:
        runs += [(kind, t, extra_steps) for t in extra_tasks for kind in ("lora", "full")]
    refs = {}
    for kind, t, steps in runs:
        refs[kind, t, steps] = f"{t}-{kind}:s{steps}"
        reg.push(tasks.cached(kind, t, CACHE, steps=steps), refs[kind, t, steps], base=base)
    # one inspect per patch (k = 10, ε = 0.5); the counts at other ε are #(max|cos| < ε) of the same vectors
    print("\n### Intruder dimensions, k = 10 (all-MiniLM-L6-v2; LoRA r = 8 on query/value)\n")
    print("Counts over the 12 query/value matrices (both kinds change them); full FT also over all its matrices.\n")
    print("| task | patch | steps | " + " | ".join(f"intruders ε={e:g}" for e in EPS)
          + " | lowest max\\|cos\\| | mean max\\|cos\\| | all matrices ε=0.5 / 0.9 | ‖Δ‖/‖W‖ q/v "
          "| median eff. rank ΔW q/v | inspect s |")
    print("|---|---|---:|" + "---:|" * len(EPS) + "---:|---:|---:|---:|---:|---:|")
    for kind, t, steps in runs:
        t0 = time.perf_counter()
        doc = reg.inspect(refs[kind, t, steps], k=10, eps=0.5, device="cpu")
        secs = time.perf_counter() - t0
        qv = {n: r for n, r in doc["tensors"].items() if _qv(n)}
        cos = [c for r in qv.values() for c in r["intruders"]["max_cos"]]
        counts = [sum(c < e for c in cos) for e in EPS]
        rel = (sum(r["norm"] ** 2 for r in qv.values())
               / sum((r["norm"] / r["rel_norm"]) ** 2 for r in qv.values() if r["rel_norm"])) ** 0.5
        ranks = sorted(r["effective_rank"] for r in qv.values())
        every = [c for r in doc["tensors"].values() if "intruders" in r for c in r["intruders"]["max_cos"]]
        allm = (f"{sum(c < 0.5 for c in every)} / {sum(c < 0.9 for c in every)} of {doc['summary']['matrices']}"
                if kind == "full" else "-")
        print(f"| {t} | {kind} | {steps} | " + " | ".join(map(str, counts)) + f" | {min(cos):.3f} | "
              f"{sum(cos) / len(cos):.4f} | {allm} | {rel:.4f} | {ranks[len(ranks) // 2]:.1f} | {secs:.1f} |",
              flush=True)
    print("\n### Interference between the two tasks' patches (top-20 % supports)\n")
    print("| pair | cosine | sign conflict | Jaccard |")
    print("|---|---:|---:|---:|")
    for kind in ("full", "lora"):
        d = reg.interference([refs[kind, TASKS[0], 120], refs[kind, TASKS[1], 120]], density=0.2, device="cpu")
        p = d["pairs"][0]
        print(f"| {p['a']} × {p['b']} | {p['cosine']:.4f} | {p['sign_conflict']:.3f} | {p['jaccard']:.3f} |")
    reg.close()


def localize_table(threads: int) -> None:
    import torch

    from patchctl.demo import tasks
    from patchctl.demo.__main__ import write_suite

    torch.set_num_threads(threads)
    base = tasks.base_model_dir()
    reg = _registry("localize")
    suite_dir = WORK / "inspect" / "suites"
    suite_dir.mkdir(parents=True, exist_ok=True)
    docs = {}
    for t in TASKS:
        data, labels, prompts = write_suite(suite_dir, t)
        reg.eval_push(data, f"evals/{t}:v1", task="classification", base=base,
                      labels=json.loads(labels.read_text()), prompts=json.loads(prompts.read_text()), max_len=48)
        reg.push(tasks.cached("full", t, CACHE, steps=120), f"{t}:v1", base=base, evals=[f"evals/{t}:v1"])
        t0 = time.perf_counter()
        docs[t] = reg.localize(f"{t}:v1", device="cpu")
        print(f"{t}: localize {time.perf_counter() - t0:.0f} s; base {docs[t]['base_scores']}, "
              f"fine-tune {docs[t]['patch_scores']}", flush=True)
    print("\n### Skill localization: gain kept by the top-d entries of the full fine-tune (validation / test)\n")
    print("| density | " + " | ".join(TASKS) + " |")
    print("|---:|" + "---:|" * len(TASKS))
    for i, p in enumerate(docs[TASKS[0]]["curve"]):
        cells = []
        for t in TASKS:
            q = docs[t]["curve"][i]
            v, s = q["validation"]["mean_gain_kept"], q["test"]["mean_gain_kept"]
            cells.append(f"{v:.1%} / {s:.1%}" if v is not None and s is not None else "-")
        print(f"| {p['density']:g} | " + " | ".join(cells) + " |")
    for t in TASKS:
        c = docs[t]["chosen"]
        print(f"\n{t}: smallest density keeping ≥ 95 % of the gain on validation: "
              + ("none" if c is None else f"{c['density']:g} (validation {c['validation_gain_kept']:.1%}, "
                                          f"test {c['test_gain_kept']:.1%})"), end="")
    print()
    reg.close()


def _run(cmd: list[str], log: Path) -> tuple[float, float, int, float]:
    """Run ``cmd``; (wall s, peak RSS MiB of that process, exit code, its CPU s: user + system)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    return wall, ru.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime


def cost_table(layers: int) -> int:
    py = sys.executable
    synth = os.path.join(HERE, "_synth.py")
    tag = f"llama-l{layers}"
    base, ft = WORK / f"{tag}-base", WORK / f"{tag}-ft-dense"
    run_dir = WORK / "inspect" / f"cost-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    reg = run_dir / "registry"
    for cmd, name in (([py, synth, "base", str(base), "--layers", str(layers)], "synth-base"),
                      ([py, synth, "finetune", str(base), str(ft), "--kind", "dense"], "synth-ft")):
        wall, rss, rc, _ = _run(cmd, logs / f"{name}.log")
        if rc:
            print(f"{name} failed:\n{(logs / f'{name}.log').read_text()[-2000:]}")
            return 2
    cli = [py, "-m", "patchctl"]
    steps = [
        ("import floor", [py, "-c", "import torch, patchctl"]),
        ("push (diff)", [*cli, "push", str(ft), "bench:v1", "--base", str(base), "--registry", str(reg)]),
        ("read", [py, "-c", READ, str(reg), "bench:v1"]),
        ("inspect", [*cli, "inspect", "bench:v1", "--json", "--device", "cpu", "--registry", str(reg)]),
        ("inspect again", [*cli, "inspect", "bench:v1", "--json", "--device", "cpu", "--registry", str(reg)]),
    ]
    rows = []
    for name, cmd in steps:
        log = logs / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.log"
        wall, rss, rc, cpu = _run(cmd, log)
        rows.append((name, wall, rss, rc, cpu))
        if rc:
            print(f"{name} failed (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
            return 1
    doc = json.loads((logs / "inspect.log").read_text())
    again = json.loads((logs / "inspect-again.log").read_text())
    read_wall, read_cpu = rows[2][1], rows[2][4]
    nbytes = sum(p.stat().st_size for p in ft.glob("*.safetensors"))
    s = doc["summary"]
    print(f"\n### Cost of inspect: synthetic Llama {tag}, {s['numel'] / 1e6:.1f}M params, dense bf16 diff "
          f"({nbytes / 1e6:.0f} MB), {os.cpu_count()} cpus, torch threads default\n")
    print("| step | wall s | CPU s | peak RSS MiB | × read (wall) | × read (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, rss, _, cpu in rows:
        skip = name in ("import floor", "push (diff)")
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {rss:.0f} | {'-' if skip else f'{wall / read_wall:.1f}'} | "
              f"{'-' if skip else f'{cpu / read_cpu:.1f}'} |")
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} (1 min, at the end)")
    print(f"\nSVD: {doc['svd']} (matrices); inspect's own compute {doc['wall_s']:.1f} s; second inspect cached: "
          f"{again['cached']}; intruders {s['intruders']} in {s['matrices']} matrices; ‖Δ‖/‖W‖ {s['rel_norm']}")
    shutil.rmtree(reg, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("intruders", "localize", "cost"), action="append")
    ap.add_argument("--layers", type=int, default=24, help="cost: decoder layers (24 = 468.2M params; 2 = 99M)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for (a) and (b)")
    ap.add_argument("--extra-steps", type=int, default=None,
                    help="intruders: also LoRA and full fine-tunes trained this many steps (trained on first use)")
    ap.add_argument("--extra-tasks", default=",".join(TASKS), help="intruders: the tasks of --extra-steps")
    args = ap.parse_args()
    only = args.only or ["intruders", "localize", "cost"]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    t0 = time.perf_counter()
    rc = 0
    if "intruders" in only:
        intruders_table(args.threads, args.extra_steps, tuple(args.extra_tasks.split(",")))
    if "localize" in only:
        localize_table(args.threads)
    if "cost" in only:
        rc = cost_table(args.layers)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
