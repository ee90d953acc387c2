"""Patch diagnostics: pure math on tensors (no registry, no I/O).

What the papers measure about a weight update ``ΔW`` (definitions, formulas and
references in ``docs/design.md``, section *Diagnostics*):

``norms(delta, base) -> TensorNorms``
    ``‖Δ‖_F``, ``‖W_base‖_F`` and the non-zero count, in float64.
``spectrum(delta, k, svd) -> dict``
    The singular values of a 2-D ``ΔW``: ``stable_rank = ‖ΔW‖_F² / σ_max²``
    (Rudelson & Vershynin 2007), ``effective_rank = exp(H(p))`` with
    ``pᵢ = σᵢ / Σⱼ σⱼ`` (Roy & Vetterli 2007), and the top ``k`` singular
    values. ``svd="exact"``: ``torch.linalg.svdvals`` in float64;
    ``"lowrank"`` (large matrices): the eigenvalues of the float64 Gram matrix
    of the smaller side, ``σᵢ = √λᵢ`` (the whole spectrum without vectors);
    ``"auto"``: exact when ``min(shape) <= EXACT_MAX_DIM``.
``intruders(base, new, k, eps, svd, seed) -> dict``
    Intruder dimensions (Shuttleworth et al. 2024, *LoRA vs Full Fine-tuning:
    an Illusion of Equivalence*): among the top ``k`` singular vectors ``yⱼ``
    of ``W_base + ΔW``, those with ``maxᵢ |cos(yⱼ, xᵢ)| < ε`` over every
    singular vector ``xᵢ`` of ``W_base``. The vectors compared are those of
    the smaller side (left for ``out ≤ in``, else right), where the base's
    singular vectors are a complete basis. Exact: full SVDs in float64.
    Low-rank (large matrices): the top ``k`` of the new matrix by seeded
    ``torch.svd_lowrank`` (float32, ``niter = 6``, 30 extra columns), the
    base's complete basis as the eigenvectors (float64 ``eigh``) of its Gram
    matrix on the smaller side (the product in float32).
``pair_counts(a, b, density) -> dict`` and ``pair_summary(counts) -> dict``
    Interference of two task vectors, summable over tensors: cosine
    similarity (Ilharco et al. 2023, task arithmetic), TIES sign-conflict
    fraction and the Jaccard overlap of the top-``d`` supports (Yadav et al.
    2023, TIES-merging). The top-``d`` support of a tensor with ``n`` entries
    is the ``⌈d·n⌉`` entries of largest ``|x|`` (``torch.topk``), non-zero
    entries only. With supports ``S_a``, ``S_b``::

        sign_conflict = |{i ∈ S_a ∩ S_b : sign(aᵢ) ≠ sign(bᵢ)}| / |S_a ∩ S_b|
        jaccard       = |S_a ∩ S_b| / |S_a ∪ S_b|

    both summed over tensors before dividing (a tensor only one patch changes
    adds to its support and to the union).

Everything is deterministic: the low-rank SVD runs under a forked RNG seeded
with ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from patchctl.errors import InvalidArgument

K_DEFAULT = 10
EPS_DEFAULT = 0.5
TOP_SV = 10  # singular values listed per matrix
EXACT_MAX_DIM = 512  # svd="auto": exact when the smaller side is at most this
LOWRANK_NITER = 6
LOWRANK_OVERSAMPLE = 30
SVD_MODES = ("auto", "exact", "lowrank")


def _r(x: float) -> float:
    """6 significant digits: reports do not depend on the last bits of a reduction."""
    return float(f"{x:.6g}")


def check_params(k: Any, eps: Any, svd: str = "auto") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgument(f"-k must be a positive integer, got {k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise InvalidArgument(f"--eps must be in (0, 1], got {eps!r}")
    if svd not in SVD_MODES:
        raise InvalidArgument(f"unknown svd mode {svd!r}: choose auto, exact or lowrank")


def check_density(d: Any) -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise InvalidArgument(f"--density must be in (0, 1], got {d!r}")
    return float(d)


def svd_method(shape: tuple[int, ...], svd: str = "auto") -> str:
    """``exact`` or ``lowrank`` for a matrix of ``shape`` under ``svd``."""
    if svd != "auto":
        return svd
    return "exact" if min(shape) <= EXACT_MAX_DIM else "lowrank"


@dataclass(frozen=True)
class TensorNorms:
    norm_sq: float  # ‖Δ‖_F²
    base_norm_sq: float | None  # ‖W_base‖_F²
    nnz: int
    numel: int


def _sq(t: torch.Tensor) -> float:
    x = t.detach().reshape(-1)
    total = 0.0
    for s in range(0, x.numel(), 1 << 22):
        c = x[s : s + (1 << 22)].to(torch.float64)
        total += float(torch.dot(c, c))
    return total


def norms(delta: torch.Tensor, base: torch.Tensor | None = None) -> TensorNorms:
    return TensorNorms(_sq(delta), None if base is None else _sq(base), int(torch.count_nonzero(delta)),
                       delta.numel())


def stable_rank(s: torch.Tensor) -> float:
    """``Σσᵢ² / σ_max²`` from singular values (0 for a zero matrix)."""
    s = s.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    return float((s * s).sum()) / (top * top) if top > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli: ``exp(−Σ pᵢ log pᵢ)``, ``pᵢ = σᵢ / Σσ`` (0 log 0 = 0; 0 for a zero matrix)."""
    s = s.to(torch.float64).clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def singular_values(m: torch.Tensor, method: str) -> torch.Tensor:
    """All singular values of ``m``, descending, float64 (see the module docstring for ``method``)."""
    x = m.detach()
    if method == "exact":
        return torch.linalg.svdvals(x.to(torch.float64)).cpu()
    x = x.to(torch.float64)  # a float32 product leaves a noise floor of ~1e-3·σ_max that inflates the effective rank
    g = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    ev = torch.linalg.eigvalsh(g).flip(0).clamp_min(0)
    return ev.sqrt().cpu()


def spectrum(delta: torch.Tensor, k: int = TOP_SV, svd: str = "auto") -> dict[str, Any]:
    """Stable rank, effective rank and the top ``k`` singular values of a 2-D ``ΔW``."""
    if delta.dim() != 2:
        raise InvalidArgument(f"spectrum needs a 2-D tensor, got shape {list(delta.shape)}")
    method = svd_method(tuple(delta.shape), svd)
    s = singular_values(delta, method)
    return {
        "spectrum": "svdvals" if method == "exact" else "gram-eigvalsh",
        "stable_rank": _r(stable_rank(s)),
        "effective_rank": _r(effective_rank(s)),
        "top_sv": [_r(float(v)) for v in s[:k]],
    }


def _top_lowrank(m: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """Top ``q`` left singular vectors by ``torch.svd_lowrank`` under a forked, seeded RNG."""
    x = m.detach().to(torch.float32)
    q_all = min(q + LOWRANK_OVERSAMPLE, *x.shape)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(x, q=q_all, niter=LOWRANK_NITER)
    return u[:, :q].to(torch.float64)


def _basis(m: torch.Tensor) -> torch.Tensor:
    """Every left singular vector of a wide (or square) ``m``: eigenvectors of ``m mᵀ`` (float32 product, float64 eigh)."""
    x = m.detach().to(torch.float32)
    return torch.linalg.eigh((x @ x.T).to(torch.float64))[1].flip(1)


def intruders(base: torch.Tensor, new: torch.Tensor, k: int = K_DEFAULT, eps: float = EPS_DEFAULT,
              svd: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Intruder dimensions of ``new = W_base + ΔW`` against ``base`` (see the module docstring).

    Returns ``{"svd", "side", "k", "count", "indices", "max_cos"}``:
    ``indices`` are the ranks (0 = largest) of the intruders among the top
    ``k``, ``max_cos`` each top vector's largest ``|cos|`` to a base vector.
    """
    check_params(k, eps, svd)
    if base.shape != new.shape or base.dim() != 2:
        raise InvalidArgument(f"intruders need two matrices of one shape, got {list(base.shape)} and {list(new.shape)}")
    method = svd_method(tuple(base.shape), svd)
    side = "left" if base.shape[0] <= base.shape[1] else "right"
    b, n = (base, new) if side == "left" else (base.T, new.T)  # wide: the vectors live on the smaller side
    kk = min(k, *b.shape)
    if method == "exact":
        u0 = torch.linalg.svd(b.detach().to(torch.float64), full_matrices=False)[0]
        u1 = torch.linalg.svd(n.detach().to(torch.float64), full_matrices=False)[0][:, :kk]
        label = "exact"
    else:
        u0 = _basis(b)
        u1 = _top_lowrank(n, kk, seed)
        label = f"lowrank(niter={LOWRANK_NITER}, seed={seed}); base basis: eigh of the Gram matrix"
    best = (u1.T @ u0).abs().max(dim=1).values.cpu()
    sure = [j for j in range(kk) if float(best[j]) < eps]
    return {"svd": label, "side": side, "k": kk, "count": len(sure), "indices": sure,
            "max_cos": [_r(float(v)) for v in best]}


# -- interference between task vectors -------------------------------------------------------------------
PAIR_FIELDS = ("dot", "norm_sq_a", "norm_sq_b", "support_a", "support_b", "overlap", "conflicts")


def top_support(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``⌈density·n⌉`` largest ``|x|`` (non-zero entries only), flat.

    Ranked as TIES's trim ranks (:func:`patchctl.patches.merge.top_k_mask`: float32 magnitudes, ties
    broken by the lowest flat index), so the mask does not depend on the device or the sort, and
    :func:`patchctl.patches.host_merge.support` gives the same one without torch.
    """
    from patchctl.patches.merge import _keep_into, _top

    x = t.detach().reshape(-1)
    n = x.numel()
    k = min(n, math.ceil(density * n))
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    if k >= n:
        return x != 0
    ranked = x if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.to(torch.float32)
    mask = _keep_into(_top(ranked.contiguous(), k), ranked, 0, torch.empty(n, dtype=torch.bool, device=x.device))
    return mask & (x != 0)


def pair_counts(a: torch.Tensor | None, b: torch.Tensor | None, density: float) -> dict[str, float]:
    """Sums of one tensor pair (``None``: the patch does not change it); add them up over tensors."""
    out = dict.fromkeys(PAIR_FIELDS, 0.0)
    if a is None and b is None:
        return out
    ma = top_support(a, density) if a is not None else None
    mb = top_support(b, density) if b is not None else None
    if a is not None:
        out["norm_sq_a"] = _sq(a)
        out["support_a"] = float(ma.sum())  # type: ignore[union-attr]
    if b is not None:
        out["norm_sq_b"] = _sq(b)
        out["support_b"] = float(mb.sum())  # type: ignore[union-attr]
    if a is not None and b is not None:
        if a.shape != b.shape:
            raise InvalidArgument(f"task vectors of shapes {list(a.shape)} and {list(b.shape)} cannot be compared")
        fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
        dot = 0.0
        for s in range(0, fa.numel(), 1 << 22):
            dot += float(torch.dot(fa[s : s + (1 << 22)].to(torch.float64), fb[s : s + (1 << 22)].to(torch.float64)))
        out["dot"] = dot
        both = ma & mb  # type: ignore[operator]
        out["overlap"] = float(both.sum())
        out["conflicts"] = float((both & ((fa > 0) != (fb > 0))).sum())
    return out


def add_counts(acc: dict[str, float], c: dict[str, float]) -> None:
    for f in PAIR_FIELDS:
        acc[f] = acc.get(f, 0.0) + c[f]


def pair_summary(c: dict[str, float]) -> dict[str, Any]:
    """Cosine, sign-conflict fraction and Jaccard overlap from summed :func:`pair_counts`."""
    den = math.sqrt(c["norm_sq_a"] * c["norm_sq_b"])
    union = c["support_a"] + c["support_b"] - c["overlap"]
    return {
        "cosine": _r(c["dot"] / den) if den > 0 else 0.0,
        "sign_conflict": _r(c["conflicts"] / c["overlap"]) if c["overlap"] else 0.0,
        "jaccard": _r(c["overlap"] / union) if union else 0.0,
        "overlap": int(c["overlap"]),
        "conflicts": int(c["conflicts"]),
        "support_a": int(c["support_a"]),
        "support_b": int(c["support_b"]),
    }


__all__ = [
    "EPS_DEFAULT", "EXACT_MAX_DIM", "K_DEFAULT", "SVD_MODES", "TensorNorms", "add_counts", "check_density",
    "check_params", "effective_rank", "intruders", "norms", "pair_counts", "pair_summary", "singular_values",
    "spectrum", "stable_rank", "svd_method", "top_support",
]
