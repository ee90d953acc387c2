"""Default against searched coefficients on the real MiniLM tasks (issue: search).

    python bench/search.py                      # everything (~15-25 min on 2 CPUs)
    python bench/search.py --only compress      # or merge, port

The patches are the demo's cached full fine-tunes of all-MiniLM-L6-v2
(``tasks.cached``: A = WordNet supersense, B = fortune topic; trained on first
use), their eval suites hold the tasks' whole validation and test splits, and
the base has the demo's control suite (verbs). Everything runs through the
Python API on a fresh registry under ``bench/_work/search``; evaluation on the
CPU, 1 thread (patchctl's default).

Selection reads only the ``validation`` split; every number in the tables is
on ``test``:

1. compression (ternary, ComPEFT): κ = 1 (ComPEFT's default) against
   ``compress --search`` (κ over ``kappa_grid(d)``), gain kept =
   (base + τ̂ − base) / (base + τ − base), per task;
2. merges of A + B: mean normalized accuracy (merged / fine-tune alone, averaged
   over the two tasks) of the default setting, of every value of the issue's
   grid, and of ``merge --search``; the searched value is within 1 point of the
   best grid value when ``best − searched ≤ 0.01``;
3. port to the int8 and the drift version 2 (``scripts/make_minilm_v2.py``):
   gain recovered at λ = 1 against ``port --search``.

"evals" is the number of candidates the search scored (each one evaluation
pass per suite on the validation split).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".demo" / "cache"
WORK = ROOT / "bench" / "_work" / "search"
TASKS = ("wordnet", "fortunes")


def setup(reg, tasks, base):
    from patchctl.demo.__main__ import write_suite

    WORK.mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        data, labels, prompts = write_suite(WORK, t)
        import json

        reg.eval_push(data, f"evals/{t}:v1", task="classification", base=base,
                      labels=json.loads(labels.read_text()), prompts=json.loads(prompts.read_text()), max_len=48)
        ft = tasks.cached("full", t, CACHE, steps=120)
        reg.push(ft, f"{t}:v1", base=base, evals=[f"evals/{t}:v1"])
    data, labels, prompts = write_suite(WORK, "verbs")
    import json

    reg.eval_push(data, "evals/control:v1", task="classification", base=base, labels=json.loads(labels.read_text()),
                  prompts=json.loads(prompts.read_text()), max_len=48, control=True)


def gains(v):
    return [r["gain_kept"] for r in v["rows"]]


def compress_table(reg, densities, budget):
    print("\n1. compression, ternary (gain kept on test; κ chosen on validation)", flush=True)
    print(f"{'d':>5} {'task':9} {'κ=1 (default)':>14} {'κ searched':>11} {'gain kept':>10} {'evals':>5}  curve (κ: validation gain)")
    out = []
    for d in densities:
        for t in TASKS:
            default = reg.compress(f"{t}:v1", f"{t}:d{d}-k1", density=d, kappa=1.0, move_latest=False)
            from patchctl.registry.ops.validation import validate_derived

            g_def = gains(validate_derived(reg, default.source, default.digest, [reg.resolve(f"evals/{t}:v1")]))[0]
            res = reg.compress(f"{t}:v1", f"{t}:d{d}-searched", density=d, search=True, budget=budget,
                               move_latest=False)
            sr = res.recipe["search"]
            g = gains(res.validation)[0]
            curve = " ".join(f"{p['value']:g}:{p['objective']:.2f}" for p in sr["curve"])
            print(f"{d:5g} {t:9} {g_def:14.1%} {sr['chosen']['kappa']:11g} {g:10.1%} {sr['evaluations']:5d}  {curve}",
                  flush=True)
            out.append((d, t, g_def, sr["chosen"]["kappa"], g, sr["evaluations"]))
    return out


def mean_norm(v):
    t = [r["normalized"] for r in v["rows"] if r["role"] == "target"]
    return sum(t) / len(t)


def merge_table(reg, budget):
    print("\n2. merges of A + B (mean normalized accuracy on test; searched on validation)", flush=True)
    ins = ["wordnet:v1", "fortunes:v1"]
    cases = [
        ("task arithmetic", "lambda", {"method": "task_arithmetic"}, {"lambda": 1.0}, (0.3, 0.5, 0.7, 1.0),
         lambda x: {"params": {"lambda": x}}),
        ("TIES d=0.2", "lambda", {"method": "ties"}, {"lambda": 1.0, "density": 0.2}, (0.5, 1.0, 1.5),
         lambda x: {"params": {"lambda": x, "density": 0.2}}),
        ("LiNeS on TA, α=0.5", "lines_beta", {"method": "task_arithmetic", "lines": 0.5}, {"beta": 0.5},
         (0.25, 0.5, 1.0, 1.5, 2.0), lambda x: {"lines_beta": x}),
    ]
    out = []
    for i, (label, coef, spec, default, grid, setting) in enumerate(cases):
        kw = dict(spec)
        dflt = reg.merge(ins, f"m{i}:default", gate=0.0, **kw,
                         **({"params": default} if coef == "lambda" else {"lines_beta": default["beta"]}))
        grid_scores = {}
        for x in grid:
            r = reg.merge(ins, None, gate=0.0, **{**kw, **setting(x)})
            grid_scores[x] = mean_norm(r.validation)
        searched = reg.merge(ins, f"m{i}:searched", gate=0.0, search=True, budget=budget, **kw,
                             **({"params": {"density": 0.2}} if spec["method"] == "ties" else {}))
        sr = searched.recipe["search"]
        best_x = max(grid_scores, key=lambda x: grid_scores[x])
        s = mean_norm(searched.validation)
        chosen = sr["chosen"]["lines_beta"] if coef == "lines_beta" else sr["chosen"]["params"]
        grid_txt = " / ".join(f"{grid_scores[x]:.3f}" for x in grid)
        ok = grid_scores[best_x] - s <= 0.01
        print(f"{label:20} default {mean_norm(dflt.validation):.3f} | grid {coef} {'/'.join(f'{x:g}' for x in grid)}: "
              f"{grid_txt} (best {grid_scores[best_x]:.3f}) | searched {chosen} → {s:.3f} "
              f"({sr['evaluations']} evals) {'within 1 pt' if ok else 'MORE THAN 1 PT BELOW'}", flush=True)
        out.append((label, mean_norm(dflt.validation), grid_scores, best_x, chosen, s, sr["evaluations"], ok))
    return out


def port_table(reg, base, budget):
    print("\n3. port to version 2 (gain recovered on test; λ searched on validation)", flush=True)
    spec = importlib.util.spec_from_file_location("make_minilm_v2", ROOT / "scripts" / "make_minilm_v2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for vname, v2 in (("int8", mod.int8_dir(CACHE)), ("drift", mod.drift_dir(CACHE))):
        for t in TASKS:
            d = reg.port(f"{t}:v1", v2, from_base=base, as_ref=f"{t}:on-{vname}", gate=0.0)
            s = reg.port(f"{t}:v1", v2, from_base=base, as_ref=f"{t}:on-{vname}-searched", gate=0.0, search=True,
                         budget=budget)
            sr = s.search
            r_d, r_s = d.validation["rows"][0]["recovered"], s.validation["rows"][0]["recovered"]
            print(f"{vname:6} {t:9} λ=1: {r_d:.1%}   searched λ={sr['chosen']['lambda']:g}: {r_s:.1%} "
                  f"({sr['evaluations']} evals)", flush=True)
            out.append((vname, t, r_d, sr["chosen"]["lambda"], r_s, sr["evaluations"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("compress", "merge", "port"), action="append")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--budget", type=int, default=6, help="compress/port search budget")
    ap.add_argument("--merge-budget", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from patchctl import Registry
    from patchctl.demo import tasks

    only = set(args.only or ("compress", "merge", "port"))
    shutil.rmtree(WORK, ignore_errors=True)
    base = tasks.base_model_dir()
    t0 = time.perf_counter()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with Registry(WORK / "registry") as reg:
        setup(reg, tasks, base)
        if "compress" in only:
            compress_table(reg, [float(x) for x in args.densities.split(",")], args.budget)
        if "merge" in only:
            merge_table(reg, args.merge_budget)
        if "port" in only:
            port_table(reg, base, args.budget)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
