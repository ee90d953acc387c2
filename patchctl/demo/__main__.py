"""The patchctl demo: real small models, the default registry, the real CLI.

Run it with ``bash scripts/demo.sh`` (README command 1). It trains (once; cached
in ``.demo/cache``) two LoRA adapters and two full fine-tunes of
all-MiniLM-L6-v2 on two real tasks (WordNet supersenses, fortune topics), then
drives the ``patchctl`` CLI against the default registry (``$PATCHCTL_HOME``,
else ``~/.patchctl``): push, ls, show, log, export, apply, merge (validated),
serve + pull, compress — and checks that what comes back out scores the same
as what went in. ``--full`` adds the long tour: porting to the base's next
release and the coefficient searches (``--search``). Every step prints a
progress line with the time so far; the scratch folder is removed and the
candidates a search left behind are collected (``patchctl gc``) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from patchctl.demo import tasks

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "patchctl"]


def sh(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one patchctl command the way a user would, echoing it."""
    argv = [str(a) for a in args]
    print(f"\n$ patchctl {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    p = subprocess.run([*RUN, *argv], text=True, capture_output=True, env={**os.environ, "COLUMNS": "120"})
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    if check and p.returncode != 0:
        raise SystemExit(f"demo: `patchctl {argv[0]}` failed with exit code {p.returncode}")
    return p


def write_suite(work: Path, task_name: str) -> tuple[Path, Path, Path]:
    """The task's validation and test splits as a suite JSONL, with its labels and prompts."""
    task = tasks.load_task(task_name)
    data = work / f"{task_name}-suite.jsonl"
    with open(data, "w") as f:
        for split in ("validation", "test"):
            texts, labels = task.split(split)
            for t, y in zip(texts, labels, strict=True):
                f.write(json.dumps({"text": t, "label": task.label_names[y], "split": split}) + "\n")
    (work / f"{task_name}-labels.json").write_text(json.dumps(list(task.label_names)))
    (work / f"{task_name}-prompts.json").write_text(json.dumps(list(task.prompts)))
    return data, work / f"{task_name}-labels.json", work / f"{task_name}-prompts.json"


def serve_and_pull(work: Path, base: Path) -> None:
    """`patchctl serve` on loopback; a fresh registry pulls minilm/merged:ta over HTTP and applies it."""
    from patchctl.server.process import serving

    with serving(None) as (url, _):  # the default registry, as the user's
        print(f"\n$ patchctl serve --port {url.rsplit(':', 1)[1]} &", flush=True)
        second = work / "second-registry"
        sh("remote", "add", "team", url, "--registry", second)
        sh("pull", "team/minilm/merged:ta", "--registry", second)
        sh("pull", "team/minilm/merged:ta", "--registry", second, "--json")  # again: nothing to transfer
        sh("apply", "minilm/merged:ta", work / "merged-ta-applied", "--base", base, "--registry", second)


def port_demo(work: Path, base: Path, cache: Path, tok: object) -> None:
    """Make v2 (the dequantized int8 ONNX release; scripts/make_minilm_v2.py), port, apply, score."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_minilm_v2", ROOT / "scripts" / "make_minilm_v2.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    v2 = mod.int8_dir(cache)
    sh("port", "minilm/wordnet-full:v1", "--to", v2, "--from", base, "--to-name",
       "sentence-transformers/all-MiniLM-L6-v2@int8", "--as", "minilm/wordnet-full:v1-int8")
    sh("apply", "minilm/wordnet-full:v1-int8", work / "wordnet-on-v2", "--base", v2)
    task = tasks.load_task("wordnet")
    rows = [("v1 base", base), ("v1 + patch", work / "wordnet-full-applied"), ("v2 (int8) base", v2),
            ("v2 + ported patch", work / "wordnet-on-v2")]
    accs = {label: tasks.accuracy(tasks.load_model(p), tok, task, "test") for label, p in rows}
    for label, acc in accs.items():
        print(f"  {label:22s} wordnet test accuracy {acc:.3f}")
    gain = (accs["v2 + ported patch"] - accs["v2 (int8) base"]) / (accs["v1 + patch"] - accs["v1 base"])
    print(f"  gain recovered on v2: {gain:.1%}")


_T0 = time.perf_counter()
_STEPS = {"n": 0, "of": 0}


def banner(text: str) -> None:
    """A step's heading, with a progress line: step k of n and the time so far."""
    _STEPS["n"] += 1
    spent = time.perf_counter() - _T0
    progress = f"[step {_STEPS['n']}/{_STEPS['of']} · {int(spent // 60)}:{int(spent % 60):02d} so far]"
    print(f"\n{'=' * 78}\n{text}\n{progress}\n{'=' * 78}", flush=True)


def compress_step(number: int, full: bool) -> None:
    """Compress the full fine-tunes (ComPEFT ternary, d = 0.1, κ = 4) and score them next to the originals
    (the WordNet one; both with ``--full``)."""
    banner(f"{number}. Compress the full fine-tune{'s' if full else ''}: ComPEFT ternary, density 0.1, "
           "alpha = 4 x std; validate")
    rows = []
    for task in ("wordnet", "fortunes") if full else ("wordnet",):
        src, ref = f"minilm/{task}-full:v1", f"minilm/{task}-full:v1-d0.1"
        sh("compress", src, "--density", "0.1", "--kappa", "4", "--as", ref, "--no-latest", "-m", f"ComPEFT d=0.1 of {task}")
        sh("eval", "attach", ref, f"minilm/evals-{task}:v1")  # compress attaches its source's suites already
        for r in (src, ref):
            score = json.loads(sh("validate", r, "--json").stdout)[0]["metrics"]["score"]
            info = json.loads(subprocess.run([*RUN, "show", r, "--json"], capture_output=True, text=True, check=True).stdout)
            rows.append((task, r, info["kind"], info["stored_bytes"], score))
    sh("show", "minilm/wordnet-full:v1-d0.1")
    print(f"\n{'patch':32s} {'kind':7s} {'stored':>10s} {'smaller':>8s} {'accuracy':>9s} {'vs orig.':>8s}   (own task, test)")
    for task, r, kind, size, score in rows:
        orig = next(x for x in rows if x[0] == task)
        print(f"{r:32s} {kind:7s} {size / 2**20:6.1f} MiB {orig[3] / size:7.1f}x {score:9.3f} {score / orig[4]:8.1%}")


def search_step() -> None:
    """compress --search and merge --search: chosen on validation, test scores beside the defaults."""
    banner("8. Choose the scales on validation data (--search); test scores beside the defaults")
    src = "minilm/wordnet-full:v1"
    sh("compress", src, "--density", "0.1", "--kappa", "1", "--as", "minilm/wordnet-full:v1-d0.1-k1", "--no-latest",
       "-m", "ComPEFT's default kappa = 1")
    sh("compress", src, "--density", "0.1", "--search", "--as", "minilm/wordnet-full:v1-d0.1-searched", "--no-latest")
    score = {r: json.loads(sh("validate", r, "--json").stdout)[0]["metrics"]["score"]
             for r in (src, "minilm/wordnet-full:v1-d0.1-k1", "minilm/wordnet-full:v1-d0.1-searched")}
    searched = json.loads(subprocess.run([*RUN, "show", "minilm/wordnet-full:v1-d0.1-searched", "--json"],
                                         capture_output=True, text=True, check=True).stdout)
    print(f"\n{'wordnet, d = 0.1':34s} {'kappa':>6s} {'test acc.':>9s}")
    print(f"{'original full fine-tune':34s} {'-':>6s} {score[src]:9.3f}")
    print(f"{'ComPEFT default':34s} {1.0:6g} {score['minilm/wordnet-full:v1-d0.1-k1']:9.3f}")
    print(f"{'searched on validation':34s} {searched['lineage']['recipe']['kappa']:6g} "
          f"{score['minilm/wordnet-full:v1-d0.1-searched']:9.3f}")

    print("\n--- merge --search: lambda chosen on the validation split (the default merge is minilm/merged:ta)")
    sh("merge", "minilm/wordnet-full:v1", "minilm/fortunes-full:v1", "--search", "--budget", "4",
       "--as", "minilm/merged:ta-searched", check=False)
    for ref in ("minilm/merged:ta", "minilm/merged:ta-searched"):
        info = json.loads(subprocess.run([*RUN, "show", ref, "--json"], capture_output=True, text=True,
                                         check=True).stdout)
        v = [x for x in info["validations"] if x.get("type") == "merge-validation"][-1]
        t = [r["normalized"] for r in v["rows"] if r["role"] == "target"]
        print(f"  {ref:28s} lambda {info['lineage']['recipe']['params'].get('lambda', 1.0):g}: mean normalized test accuracy "
              f"{sum(t) / len(t):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m patchctl.demo", description=__doc__)
    ap.add_argument("--cache", type=Path, default=ROOT / ".demo" / "cache", help="where trained models are kept")
    ap.add_argument("--steps", type=int, default=96, help="training steps per fine-tune (96: the demo stays under 8 minutes on 2 cores)")
    ap.add_argument("--full", action="store_true", help="the long tour too: port to the base's next release, "
                    "and the --search runs (about 10 more minutes on 2 cores)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (exported and applied models)")
    args = ap.parse_args(argv)
    # transformers' own deprecation notices are not the demo's to show a newcomer
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    _STEPS["of"] = 8 if args.full else 6

    base = tasks.base_model_dir()
    names = {"wordnet": "wordnet", "fortunes": "fortunes"}
    banner("1. Train (or reuse) real fine-tunes of all-MiniLM-L6-v2")
    trained: dict[tuple[str, str], Path] = {}
    for kind in ("full", "lora"):
        for task in names:
            t0 = time.perf_counter()
            trained[kind, task] = tasks.cached(kind, task, args.cache, steps=args.steps)
            print(f"  {kind:4s} {task:9s} -> {trained[kind, task]}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="patchctl-demo-"))
    banner("2. Push eval suites and the patches into the default registry")
    home = os.environ.get("PATCHCTL_HOME") or str(Path.home() / ".patchctl")
    print(f"registry: {home}")
    base_name = "sentence-transformers/all-MiniLM-L6-v2"
    for task in names:
        data, labels, prompts = write_suite(work, task)
        sh("eval", "push", data, f"minilm/evals-{task}:v1", "--task", "classification", "--base", base,
           "--labels", labels, "--prompts", prompts, "--max-len", "48")
        sh("push", trained["full", task], f"minilm/{task}-full:v1", "--base", base, "--base-name", base_name,
           "-m", f"full fine-tune on {task}", "--meta", f"task={task}", "--eval", f"minilm/evals-{task}:v1")
        sh("push", trained["lora", task], f"minilm/{task}-lora:v1", "--base", base, "--base-name", base_name,
           "-m", f"LoRA r=8 on {task}", "--meta", f"task={task}", "--eval", f"minilm/evals-{task}:v1")
    data, labels, prompts = write_suite(work, "verbs")  # general ability the merges must keep
    sh("eval", "push", data, "minilm/evals-control:v1", "--task", "classification", "--base", base,
       "--labels", labels, "--prompts", prompts, "--max-len", "48", "--control")
    sh("ls")
    sh("show", "minilm/wordnet-lora:v1")
    sh("log", "minilm/wordnet-full:v1")

    banner("3. Export and apply, and check that what comes out scores the same")
    sh("export", "minilm/wordnet-lora:v1", work / "wordnet-lora-peft")
    sh("apply", "minilm/wordnet-full:v1", work / "wordnet-full-applied", "--base", base)
    sh("apply", "minilm/fortunes-lora:v1", work / "fortunes-lora-applied", "--base", base)

    tok = tasks.load_tokenizer()
    # each model on the task it was trained for (the base on both): what went in, and what came back out
    rows = [
        ("base all-MiniLM-L6-v2", base, ("wordnet", "fortunes")),
        ("full fine-tune wordnet (trained)", trained["full", "wordnet"], ("wordnet",)),
        ("  … pushed, applied from registry", work / "wordnet-full-applied", ("wordnet",)),
        ("LoRA wordnet (trained)", trained["lora", "wordnet"], ("wordnet",)),
        ("  … pushed, exported as PEFT", work / "wordnet-lora-peft", ("wordnet",)),
        ("LoRA fortunes (trained)", trained["lora", "fortunes"], ("fortunes",)),
        ("  … pushed, applied from registry", work / "fortunes-lora-applied", ("fortunes",)),
    ]
    print(f"\n{'model':38s} {'wordnet':>8s} {'fortunes':>9s}   (test accuracy)")
    for label, path, on in rows:
        model = tasks.load_model(path)
        accs = [tasks.accuracy(model, tok, tasks.load_task(t), "test") if t in on else None for t in names]
        shown = [f"{a:.3f}" if a is not None else "" for a in accs]
        print(f"{label:38s} {shown[0]:>8s} {shown[1]:>9s}", flush=True)
    if args.keep:
        print(f"\nexported and applied models are in {work}")

    banner("4. Merge the two full fine-tunes; every merge is validated on both tasks")
    merges = [
        ("task arithmetic", ["--method", "task_arithmetic"], "minilm/merged:ta"),
        ("TIES (density 0.2, lambda 1.5)", ["--method", "ties", "--density", "0.2", "--lambda", "1.5"], "minilm/merged:ties"),
    ]
    if args.full:
        merges.append(("TIES + LiNeS (auto alpha, beta 1)", ["--method", "ties", "--density", "0.2", "--lambda", "1.5",
                                                             "--lines", "auto", "--lines-beta", "1.0"],
                       "minilm/merged:ties-lines"))
    results = []
    for label, flags, ref in merges:
        print(f"\n--- {label}")
        sh("merge", "minilm/wordnet-full:v1", "minilm/fortunes-full:v1", *flags, "--as", ref, check=False)
        info = json.loads(subprocess.run([*RUN, "show", ref, "--json"], capture_output=True, text=True, check=True).stdout)
        results.append((label, ref, {"validation": info["validations"][-1]}))
    print("\n--- a deliberately bad merge (lambda = 5): it fails its gate and moves no tag")
    p = sh("merge", "minilm/wordnet-full:v1", "minilm/fortunes-full:v1", "--lambda", "5", "--as", "minilm/merged:bad",
           check=False)
    print(f"(exit code {p.returncode})")
    sh("log", merges[-1][2])

    print(f"\n{'merge':38s} {'wordnet':>8s} {'fortunes':>9s} {'control':>8s} {'mean norm.':>10s} verdict"
          "   (test accuracy)")
    for label, _ref, doc in results:
        v = doc["validation"]
        first, second = v["constituents"]
        by = {r["constituent"]: r for r in v["rows"]}
        targets = [r for r in v["rows"] if r["role"] == "target"]
        ctrl = next((r["merged"] for r in v["rows"] if r["role"] == "control"), float("nan"))
        norm = sum(r["normalized"] for r in targets) / len(targets)
        print(f"{label:38s} {by[first]['merged']:8.3f} {by[second]['merged']:9.3f} {ctrl:8.3f} {norm:10.3f} "
              f"{v['verdict']}")

    banner("5. Serve the registry, pull the merged patch into a second registry, apply it there")
    serve_and_pull(work, base)

    if args.full:
        banner("6. Port the WordNet fine-tune to the int8 release of the base (version 2)")
        port_demo(work, base, args.cache, tok)
    compress_step(6 if not args.full else 7, args.full)
    if args.full:
        search_step()
    spent = time.perf_counter() - _T0
    print(f"\n{'=' * 78}\ndone in {int(spent // 60)}:{int(spent % 60):02d}: the registry keeps what was pushed, "
          f"merged and compressed\n{'=' * 78}", flush=True)
    sh("gc")  # the failed merge and any search candidates: unreferenced, collected now
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nregistry: {home}   (patchctl ls --registry {home}; "
          f"{'' if args.full else 'python -m patchctl.demo --full for ports and --search; '}"
          f"the base model: {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
