"""Synthetic Llama checkpoints for the benchmarks: a base and fine-tunes of it.

Everything is deterministic: each tensor is drawn from its own
``torch.Generator`` seeded from ``(seed, role, tensor name)``, so the bytes do
not depend on shard layout or generation order. Folders are written shard by
shard (peak memory is about one shard), into a temporary sibling that is
renamed into place once complete; a ``_synth.json`` marker records the
parameters, and a complete folder with the same parameters is reused.

Layout (HF ``LlamaForCausalLM``, untied ``lm_head``)::

    model.embed_tokens.weight                      [vocab, hidden]
    model.layers.{i}.input_layernorm.weight        [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                              [hidden]
    lm_head.weight                                 [vocab, hidden]

The default size (hidden 1024, 24 layers, intermediate 4096, vocab 32000,
16 heads) has 468.2M parameters: 936 MB in bf16. Linear and embedding weights
are N(0, 0.02); RMSNorm weights are 1 + N(0, 0.02).

Fine-tunes (``make_finetune``), each a pure function of the base and a seed;
the perturbation is computed in fp32 and rounded to the base dtype, and its
size is ``rel`` times the tensor's RMS:

- ``dense``: Gaussian noise on every element of every tensor (``rel`` 0.01,
  about one bf16 ulp at the weights' scale, so most elements change);
- ``sparse``: Gaussian noise on a random ``density`` (10 %) of the elements of
  every tensor (``rel`` 0.05, so nearly every chosen element changes);
- ``lowrank``: ``B @ A`` of rank ``rank`` (16) on attention q/k/v/o, and
  ``mlp_density`` (5 %) sparse noise on the MLP; embeddings, norms and
  ``lm_head`` are left equal to the base (``rel`` 0.05).

Command line (used by ``bench/stream.py`` to keep its own process small)::

    python bench/_synth.py base DIR [--layers N] [--seed S]
    python bench/_synth.py finetune BASE_DIR OUT_DIR --kind dense|sparse|lowrank [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

MARKER = "_synth.json"
INDEX_NAME = "model.safetensors.index.json"
VERSION = 1
KINDS = ("dense", "sparse", "lowrank")
DEFAULT_REL = {"dense": 0.01, "sparse": 0.05, "lowrank": 0.05}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- layout


def llama_spec(
    layers: int = 24,
    hidden: int = 1024,
    intermediate: int = 4096,
    vocab: int = 32000,
    heads: int = 16,
    kv_heads: int | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor, in HF order (embeddings, layers, norm, head)."""
    kv = kv_heads or heads
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    kv_dim = hidden // heads * kv
    spec: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    spec += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return spec


def num_params(**size: int) -> int:
    return sum(math.prod(s) for _, s in llama_spec(**size))


def shard_plan(spec: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[str]]:
    """Split ``spec`` (in order) into ``shards`` runs of about equal size."""
    total = sum(math.prod(s) for _, s in spec)
    plan: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name, shape in spec:
        n = math.prod(shape)
        k = min(shards - 1, (done + n // 2) * shards // total)  # by the tensor's midpoint
        plan[k].append(name)
        done += n
    return [p for p in plan if p]


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- helpers


def _generator(seed: int, role: str, name: str) -> Any:
    import torch

    h = hashlib.sha256(f"patchctl-bench-synth\0{seed}\0{role}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def _dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``_synth.json`` of a complete folder (all listed files present, right sizes), else None."""
    folder = Path(folder)
    try:
        info = json.loads((folder / MARKER).read_text())
        for fname, size in info["files"].items():
            if (folder / fname).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return info


def _reuse(out: Path, params: dict[str, Any]) -> bool:
    """True if ``out`` is complete and made with ``params``; clears a stale folder of ours."""
    if not out.exists():
        return False
    info = read_marker(out)
    if info is not None and info.get("params") == params:
        return True
    if (out / MARKER).exists() or info is not None:
        shutil.rmtree(out)  # ours (it has our marker), but stale or damaged
        return False
    raise FileExistsError(f"{out} exists and was not made by bench/_synth.py; remove it or pick another path")


class _Staged:
    """Write into ``.NAME.tmp-PID`` next to ``out``; rename onto ``out`` on success."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.out)
        elif self.tmp.exists():
            shutil.rmtree(self.tmp)


def _write_config(folder: Path, size: dict[str, Any], dtype: str) -> None:
    kw = dict(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"] or size["heads"], tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    try:
        from transformers import LlamaConfig
    except ImportError:  # hand-written equivalent
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
               "rms_norm_eps": 1e-6, "torch_dtype": dtype, **kw}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return
    LlamaConfig(architectures=["LlamaForCausalLM"], dtype=dtype, **kw).save_pretrained(folder)


def _finish(tmp: Path, plan: list[list[str]] | None, sizes: dict[str, int], params: dict[str, Any],
            extra: dict[str, Any]) -> None:
    """Write the index (from ``plan``, unless None) and, last, the marker."""
    n = len(plan or ())
    if plan and n > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: shard_name(i, n) for i, names in enumerate(plan) for name in names},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != MARKER}
    (tmp / MARKER).write_text(json.dumps({"version": VERSION, "params": params, "files": files, **extra},
                                         indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- base


def make_base(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    layers: int = 24,
    hidden: int = 1024,
    intermediate: int = 4096,
    vocab: int = 32000,
    heads: int = 16,
    kv_heads: int | None = None,
    shards: int = 2,
    std: float = 0.02,
    dtype: str = "bfloat16",
) -> Path:
    """Write (or reuse) a synthetic Llama checkpoint in HF layout at ``out_dir``."""
    out = Path(out_dir)
    size = dict(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab, heads=heads,
                kv_heads=kv_heads)
    params = {"role": "base", "seed": seed, **size, "shards": shards, "std": std, "dtype": dtype}
    if _reuse(out, params):
        return out
    import torch
    from safetensors.torch import save_file

    spec = llama_spec(**size)
    shapes = dict(spec)
    plan = shard_plan(spec, shards)
    td = _dtype(dtype)
    sizes: dict[str, int] = {}
    with _Staged(out) as tmp:
        _write_config(tmp, size, dtype)
        for i, names in enumerate(plan):
            tensors = {}
            for name in names:
                g = _generator(seed, "base", name)
                t = torch.randn(shapes[name], generator=g, dtype=torch.float32)
                t *= std
                if name.endswith("norm.weight"):
                    t += 1.0
                tensors[name] = t.to(td)
                del t
            fname = shard_name(i, len(plan))
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            sizes[fname] = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        _finish(tmp, plan, sizes, params, {"num_params": num_params(**size)})
    return out


# --------------------------------------------------------------------------- fine-tunes


def _perturb(name: str, w: Any, kind: str, seed: int, rel: float, density: float, rank: int,
             mlp_density: float) -> tuple[Any, str]:
    """The fine-tuned tensor and what was done to it."""
    import torch

    g = _generator(seed, kind, name)
    w32 = w.to(torch.float32)
    scale = rel * float(w32.square().mean().sqrt())
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    if kind == "dense":
        delta = torch.randn(w.shape, generator=g, dtype=torch.float32)
        how = "dense"
    elif kind == "sparse" or (kind == "lowrank" and module in MLP):
        d = density if kind == "sparse" else mlp_density
        delta = torch.randn(w.shape, generator=g, dtype=torch.float32)
        delta *= torch.rand(w.shape, generator=g, dtype=torch.float32) < d
        how = f"sparse {d:g}"
    elif kind == "lowrank" and module in ATTN and w.dim() == 2:
        a = torch.randn((rank, w.shape[1]), generator=g, dtype=torch.float32) / math.sqrt(rank)
        b = torch.randn((w.shape[0], rank), generator=g, dtype=torch.float32)
        delta = b @ a
        how = f"rank {rank}"
    else:
        return w, "unchanged"
    delta *= scale
    delta += w32
    return delta.to(w.dtype), how


def make_finetune(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    kind: str = "dense",
    seed: int = 1,
    rel: float | None = None,
    density: float = 0.10,
    rank: int = 16,
    mlp_density: float = 0.05,
) -> Path:
    """Write (or reuse) a fine-tune of the base at ``base_dir``: same layout, shards and config."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    base, out = Path(base_dir), Path(out_dir)
    binfo = read_marker(base)
    if binfo is None:
        raise FileNotFoundError(f"{base} is not a complete base made by make_base()")
    rel = DEFAULT_REL[kind] if rel is None else rel
    params = {"role": "finetune", "kind": kind, "seed": seed, "rel": rel, "base": binfo["params"]}
    if kind == "sparse":
        params["density"] = density
    if kind == "lowrank":
        params.update(rank=rank, mlp_density=mlp_density)
    if _reuse(out, params):
        return out
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard_files = sorted(f for f in binfo["files"] if f.endswith(".safetensors"))
    sizes: dict[str, int] = {}
    changed = total = 0
    with _Staged(out) as tmp:
        for f in binfo["files"]:
            if not f.endswith(".safetensors") and f != MARKER:
                shutil.copy2(base / f, tmp / f)  # config.json, index
        for fname in shard_files:
            tensors = {}
            with safe_open(str(base / fname), framework="pt") as sf:
                names = sorted(sf.keys())
                for name in names:
                    w = sf.get_tensor(name)
                    t, _ = _perturb(name, w, kind, seed, rel, density, rank, mlp_density)
                    iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
                    changed += int((t.view(iv) != w.view(iv)).sum())
                    total += w.numel()
                    tensors[name] = t
                    del w, t
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            sizes[fname] = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        # config.json and the index were copied from the base verbatim (same weight map)
        _finish(tmp, None, sizes, params, {"changed_fraction": changed / total, "num_params": total})
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="write a base checkpoint")
    b.add_argument("dir", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--layers", type=int, default=24)
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--intermediate", type=int, default=4096)
    b.add_argument("--vocab", type=int, default=32000)
    b.add_argument("--heads", type=int, default=16)
    b.add_argument("--shards", type=int, default=2)
    f = sub.add_parser("finetune", help="write a fine-tune of a base")
    f.add_argument("base", type=Path)
    f.add_argument("dir", type=Path)
    f.add_argument("--kind", choices=KINDS, default="dense")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--rel", type=float, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def stamp() -> int | None:
        return (args.dir / MARKER).stat().st_mtime_ns if read_marker(args.dir) else None

    before = stamp()
    if args.cmd == "base":
        make_base(args.dir, seed=args.seed, layers=args.layers, hidden=args.hidden,
                  intermediate=args.intermediate, vocab=args.vocab, heads=args.heads, shards=args.shards)
    else:
        make_finetune(args.base, args.dir, kind=args.kind, seed=args.seed, rel=args.rel)
    info = read_marker(args.dir) or {}
    what = "reused" if before is not None and stamp() == before else "wrote"
    extra = f", {info['changed_fraction']:.1%} of elements changed" if "changed_fraction" in info else ""
    print(f"{what} {args.dir} ({info.get('num_params', 0) / 1e6:.1f}M params, "
          f"{sum(info.get('files', {}).values()) / 1e6:.0f} MB{extra}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
