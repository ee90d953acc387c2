"""LoRA outputs of a merge: the inputs' factors concatenated (``cat``) or the merged ΔW re-factored (``svd``).

A merge stores a ``diff`` patch by default (:mod:`.stream`), or a PEFT-format
``lora`` patch:

- ``as_lora="cat"``: exact rank concatenation (:func:`cat_lora`) — only when
  every input is LoRA and the method is linear in its inputs
  (``task_arithmetic``, ``linear``). Module rank = sum of the inputs' ranks.
- ``as_lora="svd"``, ``rank=r``: the merged ΔW re-factored by
  :func:`svd_lora`. Only 2-D ``*.weight`` targets can be LoRA modules; other
  targets (biases, norms) are left out, listed under ``dropped`` and counted
  with relative error 1. The per-tensor and overall relative Frobenius
  errors (``sqrt(Σ tail²) / sqrt(Σ ‖ΔW‖²)`` over all targets) are recorded in
  the manifest's ``metadata["svd"]`` and returned. A 2-D target is an
  embedding (``lora_embedding_A/B``) when a LoRA input has it as one, else
  when its module name matches :data:`EMBEDDING_RE`.

LoRA outputs use scaling 1: ``lora_alpha = r``, and modules whose rank is
not ``r`` get ``rank_pattern``/``alpha_pattern`` entries (escaped full module
names). ``fan_in_fan_out`` is that of the LoRA inputs (they must agree).
They are made target by target (:func:`lora_tensors`); with ``--apply`` the
stored patch is applied after it is committed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from patchctl.patches.finite import require_finite
from patchctl.registry.ops.merging.plan import _Plan
from patchctl.registry.ops.merging.stream import Progress, _deltas, _merged, _tick
from patchctl.registry.store.manifest import TensorEntry
from patchctl.registry.store.views import PEFT_PREFIX

if TYPE_CHECKING:
    import torch

    from patchctl.registry.store.repository import Repository

EMBEDDING_RE = re.compile(r"(?:^|\.)(?:[^.]*embed[^.]*|wte|wpe|shared)$", re.IGNORECASE)


def _is_embedding(p: _Plan, target: str) -> bool:
    for i in p.inputs:
        c = i.changes.get(target)
        if c is not None and i.lora:
            return i.lora[c.sources[0]].embedding
    return EMBEDDING_RE.search(target.removesuffix(".weight")) is not None


def _lora_keys(module: str, embedding: bool) -> tuple[str, str]:
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def _cat_factors(p: _Plan, target: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank concatenation of the inputs' factors for ``target`` (× the LiNeS scale)."""
    from patchctl.patches.lora import cat_lora, lora_scaling, pattern_value

    lam = float(p.per_tensor[target].get("lam", 1.0))
    norm = math.fsum(p.weights) if p.method == "linear" else 1.0
    factors = []
    for i, w in zip(p.inputs, p.weights, strict=True):
        c = i.changes.get(target)
        if c is None:
            continue
        mod = i.lora[c.sources[0]]
        a, b = i.view.tensor(mod.a, p.device), i.view.tensor(mod.b, p.device)
        r = int(a.shape[0])
        prm = i.view.m.params  # the scaling exactly as PatchView.value computes it
        alpha = pattern_value(mod.module, prm.get("alpha_pattern") or {}, prm.get("lora_alpha", r))
        s = lora_scaling(r, float(alpha), bool(prm.get("use_rslora", False)))
        factors.append((a, b, s, w / norm * lam * scale))
    return cat_lora(factors)


def _peft_params(p: _Plan, ranks: dict[str, int], base_name: str) -> dict[str, Any]:
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else (p.rank or 1)
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": r,  # scaling 1; per-module alpha = rank below
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "base_model_name_or_path": base_name,
        "fan_in_fan_out": p.fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


@dataclass
class LoraOutput:
    """The tensors of a LoRA output, and (svd) what the re-factoring lost."""

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank
    errors: dict[str, float] = field(default_factory=dict)  # svd: target -> relative error
    dropped: list[str] = field(default_factory=list)  # svd: targets that cannot be LoRA modules
    rel_error: float | None = None  # svd: overall relative Frobenius error

    def svd_metadata(self, rank: int | None) -> dict[str, Any]:
        return {"rank": rank, "rel_error": self.rel_error, "tensor_rel_errors": self.errors, "dropped": self.dropped}


def lora_tensors(p: _Plan, reg: Repository, alpha: float | None, beta: float,
                 progress: Progress, done: list[int], total: int) -> LoraOutput:
    """Store the LoRA factors of every target (``p.as_lora`` is ``cat`` or ``svd``), target by target."""
    import torch

    from patchctl.patches.lines import lines_scale
    from patchctl.patches.lora import svd_lora

    out_dtype = getattr(torch, p.dtype)
    out = LoraOutput()
    tensors, ranks, errors, dropped = out.tensors, out.ranks, out.errors, out.dropped
    tail_sq = total_sq = 0.0
    for t in p.targets:
        scale = lines_scale(t, p.num_blocks, alpha, beta) if alpha is not None else 1.0
        module = t.removesuffix(".weight")
        if p.as_lora == "cat":
            a, b = _cat_factors(p, t, scale)
            ka, kb = _lora_keys(module, _is_embedding(p, t))
            tensors[ka] = reg.put_tensor(require_finite(a.to(out_dtype).cpu().contiguous(), ka, "the merge"))
            tensors[kb] = reg.put_tensor(require_finite(b.to(out_dtype).cpu().contiguous(), kb, "the merge"))
            ranks[module] = int(a.shape[0])
            del a, b
            _tick(p, t, progress, done, total)
            continue
        deltas = _deltas(p, t)
        merged = _merged(p, t, deltas)
        del deltas
        if alpha is not None:
            merged = merged * scale
        if p.as_lora == "svd":
            sq = float(merged.square().sum(dtype=torch.float64))
            total_sq += sq
            if merged.dim() != 2 or not t.endswith(".weight"):
                dropped.append(t)
                errors[t] = 1.0 if sq > 0 else 0.0
                tail_sq += sq
            else:
                emb = _is_embedding(p, t)
                mat = merged.T if (emb or p.fan_in_fan_out) else merged
                a, b, err = svd_lora(mat, int(p.rank or 0), seed=p.seed)
                errors[t] = err
                tail_sq += err * err * sq
                ka, kb = _lora_keys(module, emb)
                tensors[ka] = reg.put_tensor(require_finite(a.to(out_dtype).cpu().contiguous(), ka, "the merge"))
                tensors[kb] = reg.put_tensor(require_finite(b.to(out_dtype).cpu().contiguous(), kb, "the merge"))
                ranks[module] = int(p.rank or 0)
        del merged
        _tick(p, t, progress, done, total)
    if p.as_lora == "svd":
        out.rel_error = math.sqrt(tail_sq / total_sq) if total_sq > 0 else 0.0
    return out
