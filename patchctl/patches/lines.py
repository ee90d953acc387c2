"""LiNeS: layer-increasing scaling of a (merged) task vector.

Wang et al. 2024, "LiNeS: Post-training layer scaling prevents forgetting and
enhances model merging", https://arxiv.org/abs/2410.17146.

After any merge method, the delta of a tensor in block ``ℓ`` (0-based) of a
model with ``L`` blocks is multiplied by::

    λ(ℓ) = α + β · ℓ / (L - 1)

(the paper writes ``(ℓ - 1)/(L - 1)`` with 1-based ``ℓ``; same values). Tensors
outside the blocks (embeddings, final norm, head) get ``α``. A model with one
block (``L = 1``) scales that block by ``α + β``: it is the last block.

Block index: the first match of the anchored regex :data:`BLOCK_RE` over
dot-separated name components, ``(^|\\.)(layers|h|blocks|layer)\\.(\\d+)\\.`` —
never a substring test (the authors' code tests ``f".{i}." in name``, which
takes ``experts.1.`` for block 1). ``L`` is :func:`num_blocks` over the whole
model's tensor names.

α and β:

* single patch: α chosen by the user, β = 1 − α (:func:`single_patch_beta`),
  so the last block keeps its full update.
* multi-task merge: β chosen by the user, and by default
  ``α = (‖Σᵢ τᵢ‖₁ / ‖τ_merged‖₁) / T`` over the whole model
  (:func:`default_alpha`), the formula of the authors' code
  (``alpha = norm_summed_tvs / norm_mtv / num_tasks``). The sum is the plain
  sum of the T raw task vectors (merge weights are not used). For task
  arithmetic with λ = 1 and equal weights τ_merged = Σᵢ τᵢ and α = 1/T: the
  shallow layers get the plain average of the task vectors. Since α rescales
  τ_merged, a λ ≠ 1 in the merge cancels out of α·τ_merged but not out of
  β·τ_merged; the paper applies LiNeS *instead of* λ, so merge with λ = 1.

Streaming: accumulate :func:`l1_norms` tensor by tensor in a first pass, then
call :func:`default_alpha`, then :func:`lines_scale` per tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from patchctl.errors import InvalidArgument, ShapeMismatch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "BLOCK_RE",
    "apply_lines",
    "block_index",
    "default_alpha",
    "l1_norms",
    "lines_scale",
    "num_blocks",
    "single_patch_beta",
]

BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block index of tensor ``name`` (first match of :data:`BLOCK_RE`), or None."""
    m = BLOCK_RE.search(name)
    return None if m is None else int(m.group(1))


def num_blocks(names: Iterable[str]) -> int:
    """L: the largest block index over ``names`` plus one; 0 when no name is in a block."""
    indices = [i for i in (block_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def _finite(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value!r}")
    return float(value)


def lines_scale(name: str, num_blocks: int, alpha: float, beta: float) -> float:
    """λ for tensor ``name``: ``alpha + beta · ℓ/(L-1)`` inside block ℓ, ``alpha`` outside."""
    alpha, beta = _finite(alpha, "alpha"), _finite(beta, "beta")
    idx = block_index(name)
    if idx is None:
        return alpha
    if idx >= num_blocks:
        raise InvalidArgument(
            f"tensor {name!r} is in block {idx} but the model has num_blocks={num_blocks}; "
            "compute num_blocks over all of the model's tensor names"
        )
    if num_blocks == 1:
        return alpha + beta
    return alpha + beta * idx / (num_blocks - 1)


def single_patch_beta(alpha: float) -> float:
    """β for single-patch LiNeS editing: ``1 - alpha`` (the last block keeps its update)."""
    return 1.0 - _finite(alpha, "alpha")


def l1_norms(deltas: Sequence[Tensor], merged: Tensor) -> tuple[float, float]:
    """One tensor's share of the two L1 norms: ``(‖Σᵢ τᵢ‖₁, ‖τ_merged‖₁)``.

    Sum these over all tensors of the model (they add up, unlike L2 norms) and
    pass the totals to :func:`default_alpha`. ``Σᵢ τᵢ`` in float32 (input
    order), the magnitudes summed in float64, returned as Python floats
    (accumulate those in float64). On the CPU with the C kernels built, by
    :func:`patchctl.patches.host_merge.l1_sums` (no temporary tensors; the
    same sums at any thread count, and the ones the torch-free merge uses);
    else by torch, whose float64 sum may differ in the last bits.
    """
    import torch

    from patchctl.patches import native
    from patchctl.patches.apply import NATIVE_CODES
    from patchctl.patches.host_merge import l1_sums

    if len(deltas) == 0:
        raise InvalidArgument("l1_norms needs at least one task vector")
    for i, d in enumerate(deltas):
        if d.shape != merged.shape:
            raise ShapeMismatch(
                f"task vector {i} has shape {tuple(d.shape)} but the merged one has "
                f"{tuple(merged.shape)}"
            )
    if (native.lib is not None and merged.dtype == torch.float32 and merged.device.type == "cpu"
            and merged.is_contiguous() and all(d.device.type == "cpu" and d.dtype in NATIVE_CODES
                                               and d.is_contiguous() for d in deltas)):
        return l1_sums([d.data_ptr() for d in deltas], [NATIVE_CODES[d.dtype] for d in deltas],
                       merged.data_ptr(), merged.numel())
    acc = torch.zeros(merged.shape, dtype=torch.float32, device=merged.device)
    for d in deltas:
        acc.add_(d.to(device=merged.device, dtype=torch.float32))
    merged_l1 = merged.to(torch.float32).abs().sum(dtype=torch.float64)
    return float(acc.abs().sum(dtype=torch.float64)), float(merged_l1)


def default_alpha(sum_l1: float, merged_l1: float, num_tasks: int) -> float:
    """Multi-task α: ``(sum_l1 / merged_l1) / num_tasks`` (totals of :func:`l1_norms`)."""
    sum_l1, merged_l1 = _finite(sum_l1, "sum_l1"), _finite(merged_l1, "merged_l1")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise InvalidArgument(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
    if merged_l1 <= 0:
        raise InvalidArgument(
            f"the merged task vector has L1 norm {merged_l1!r}; LiNeS' default alpha needs it > 0"
        )
    return sum_l1 / merged_l1 / num_tasks


def apply_lines(merged: Tensor, name: str, num_blocks: int, alpha: float, beta: float) -> Tensor:
    """``merged`` (as float32) times :func:`lines_scale` of ``name``."""
    import torch

    return merged.to(torch.float32) * lines_scale(name, num_blocks, alpha, beta)
