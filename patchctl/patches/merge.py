"""Merge methods for task vectors (weight diffs), one tensor at a time.

A *task vector* (delta) is ``finetuned - base`` for one tensor. Every method
here is one small pure function with the same signature::

    fn(deltas, weights, *, generator_seed, name, **params) -> Tensor

It takes the deltas of ONE tensor (one per input patch, all the same shape) and
one weight per input, and returns the merged delta in float32; the engine adds
it to the base tensor and casts to the base dtype. Inputs of any floating dtype
are upcast to float32 and all the math happens in float32, on the device of
the first delta. ``name`` is the tensor's name: it seeds the random drops of
DARE and names the tensor in error messages. Nothing here reads files or knows
about the registry.

The methods are listed in ONE explicit table, :data:`METHODS`; nothing is
registered by importing a module. :func:`merge_tensor` looks a method up,
checks the number of inputs and fills in the defaults.

Semantic choices (where the papers are silent we follow mergekit):

* ``linear`` is a weighted *average*: ``Σ wᵢτᵢ / Σ wᵢ`` (mergekit's ``linear``
  with ``normalize=True``). Weights may be negative; ``Σ wᵢ = 0`` is an error.
  Use ``task_arithmetic`` for an un-normalized weighted sum.
* Top-k by magnitude keeps ``k = int(density · n)`` entries per tensor (as in
  mergekit; the ``int`` truncates, so a tensor with ``density · n < 1`` is
  zeroed). **Ties at the threshold**: an entry shares the fate of its
  best-ranked tie-mate, so every entry whose magnitude equals the k-th largest
  magnitude is kept, and more than ``k`` entries may survive. This makes the
  result independent of the order of the entries. (mergekit keeps exactly
  ``k``, picking among tied entries by sort order.) The threshold comes from
  ``torch.kthvalue`` on ``|τ|``; no full sort.
* TIES sign election: per entry the elected sign is the sign of
  ``Σ wᵢ·τ̂ᵢ`` over the trimmed deltas ("total mass"); a sum of exactly 0
  elects ``+`` (as mergekit). Input ``i`` agrees at an entry when
  ``wᵢ·τ̂ᵢ`` is non-zero and has the elected sign; zeros never agree. The
  disjoint mean is ``Σ_agree wᵢτ̂ᵢ / Σ_agree wᵢ``, 0 where none agree, then
  times ``lam``. Sign-electing methods (``ties``, ``dare_ties``) need weights
  ``≥ 0``: with a negative weight the disjoint mean would divide by it and
  undo the negation (use ``task_arithmetic`` to subtract a task vector).
* DARE drops each entry with probability ``p = 1 - density`` and divides the
  survivors by ``density`` (= ``1/(1-p)``). The keep mask is ``u < density``
  with ``u`` uniform in [0, 1) drawn in float32 on the CPU from a
  ``torch.Generator`` seeded by :func:`dare_seed` (sha256 of seed, tensor name
  and input index), so a merge is reproducible on any device and independent
  of the order tensors are visited. ``dare_ties`` uses the disjoint mean like
  ``ties`` (mergekit's ``dare_ties`` sums instead: ``normalize=False``).
* Breadcrumbs keeps the entries ranked ``[top, top + keep)`` by magnitude,
  ``top = int(gamma · n)``, ``keep = int(density · n)``; when
  ``top + keep > n``, ``top`` shrinks to ``n - keep`` (as mergekit). Ties: an
  entry tied with the ``top``-th largest magnitude is dropped as an outlier,
  one tied with the ``(top + keep)``-th is kept (same best-tie-mate rule).

Default densities are starting points from the papers, not tuned values:
TIES keeps the top 20 % (its paper's k = 20), DARE drops 90 % (p = 0.9, the
drop rate its paper highlights), breadcrumbs keeps 10 % after dropping the top
1 %. ``lam`` (λ) defaults to 1.

Per-tensor parameter overrides: :func:`resolve_params`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from patchctl.errors import InvalidArgument, ShapeMismatch

__all__ = [
    "METHODS",
    "MergeMethod",
    "breadcrumbs",
    "dare_linear",
    "dare_seed",
    "dare_ties",
    "get_method",
    "linear",
    "magnitude_prune",
    "merge_tensor",
    "resolve_params",
    "task_arithmetic",
    "ties",
]

MergeFn = Callable[..., Tensor]


# --------------------------------------------------------------------------
# checks and shared pieces


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float, or InvalidArgument naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidArgument(f"{what} must be finite, got {value!r}")
    return out


def _density(value: Any) -> float:
    d = _number(value, "density")
    if not 0.0 < d <= 1.0:
        raise InvalidArgument(f"density must be in (0, 1], got {value!r}")
    return d


def _prepare(
    deltas: Sequence[Tensor], weights: Sequence[float], name: str
) -> tuple[list[Tensor], list[float]]:
    """Check one tensor's inputs; return them as float32 and the weights as floats."""
    if len(deltas) == 0:
        raise InvalidArgument(f"tensor {name!r}: no inputs to merge")
    if len(weights) != len(deltas):
        raise InvalidArgument(
            f"tensor {name!r}: {len(weights)} weights for {len(deltas)} inputs; "
            "give exactly one weight per input"
        )
    ws = [_number(w, f"weight of input {i}") for i, w in enumerate(weights)]
    first = deltas[0]
    out: list[Tensor] = []
    for i, d in enumerate(deltas):
        if not isinstance(d, Tensor):
            raise InvalidArgument(f"tensor {name!r}: input {i} is a {type(d).__name__}, not a tensor")
        if not d.is_floating_point():
            raise InvalidArgument(
                f"tensor {name!r}: input {i} has dtype {d.dtype}; a floating dtype is needed"
            )
        if d.shape != first.shape:
            raise ShapeMismatch(
                f"tensor {name!r}: input {i} has shape {tuple(d.shape)} but input 0 has "
                f"{tuple(first.shape)}"
            )
        out.append(d.to(device=first.device, dtype=torch.float32))
    return out, ws


def _nonnegative(weights: Sequence[float], method: str) -> None:
    for i, w in enumerate(weights):
        if w < 0:
            raise InvalidArgument(
                f"{method} needs weights >= 0, got {w!r} for input {i}; "
                "subtract a task vector with task_arithmetic instead"
            )


def _weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    acc = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        acc.add_(d, alpha=w)
    return acc


def _kth_largest(magnitudes: Tensor, k: int) -> Tensor:
    """The k-th largest value (1-based) of a flat tensor, without a full sort."""
    n = magnitudes.numel()
    return torch.kthvalue(magnitudes, n - k + 1).values


def _magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``int(density·n)`` entries by magnitude (ties at the threshold kept)."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    return torch.where(mag >= _kth_largest(mag.reshape(-1), k), delta, 0.0)


def _breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the top ``gamma`` outliers, keep the next ``density`` by magnitude."""
    n = delta.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    if keep <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    flat = mag.reshape(-1)
    if top + keep < n:
        mask = mag >= _kth_largest(flat, top + keep)
    else:
        mask = torch.ones_like(mag, dtype=torch.bool)
    if top > 0:
        mask &= mag < _kth_largest(flat, top)
    return delta.masked_fill(~mask, 0.0)


def dare_seed(generator_seed: int, name: str, index: int) -> int:
    """The DARE generator seed for input ``index`` of tensor ``name``.

    The first 8 bytes (little-endian) of
    ``sha256(f"{generator_seed}\\0{name}\\0{index}")`` with the top bit cleared.
    Stable across processes and Python versions (unlike ``hash()``).
    """
    if isinstance(generator_seed, bool) or not isinstance(generator_seed, int):
        raise InvalidArgument(f"generator_seed must be an integer, got {generator_seed!r}")
    digest = hashlib.sha256(f"{generator_seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dare_drop(delta: Tensor, density: float, generator_seed: int, name: str, index: int) -> Tensor:
    """Bernoulli-drop with p = 1 - density, survivors divided by density."""
    seed = dare_seed(generator_seed, name, index)
    if density >= 1.0:
        return delta
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    u = torch.rand(delta.shape, generator=gen, dtype=torch.float32)
    keep = (u < density).to(delta.device)
    return delta.masked_fill(~keep, 0.0) / density


def _disjoint_mean(parts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES sign election by total mass, then the weighted mean of agreeing entries.

    With ``s = ±1`` the elected sign, input ``i`` agrees where ``s·wᵢ·τᵢ > 0``;
    the numerator is accumulated as ``s · Σ max(s·wᵢ·τᵢ, 0)`` (multiplying by
    ±1 is exact, so this is the plain sum of the agreeing ``wᵢτᵢ``).
    """
    total = _weighted_sum(parts, weights)
    sign = torch.ones_like(total).masked_fill_(total < 0, -1.0)
    del total
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for p, w in zip(parts, weights, strict=True):
        if w == 0:
            continue
        t = p.mul(w).mul_(sign)
        den.add_((t > 0).to(den.dtype), alpha=w)
        num.add_(t.clamp_min_(0.0))
    num.mul_(sign)
    den.masked_fill_(den == 0, 1.0)  # no agreeing input: num is 0 there
    return num.div_(den)


# --------------------------------------------------------------------------
# the methods


def linear(deltas: Sequence[Tensor], weights: Sequence[float], *, generator_seed: int, name: str) -> Tensor:
    """Weighted average ``Σ wᵢτᵢ / Σ wᵢ`` (mergekit ``linear``, normalize=True)."""
    ds, ws = _prepare(deltas, weights, name)
    total = math.fsum(ws)
    if total == 0:
        raise InvalidArgument(f"linear needs weights with a non-zero sum, got {ws!r}")
    return _weighted_sum(ds, ws) / total


def task_arithmetic(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    lam: float = 1.0,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``λ · Σ wᵢτᵢ``."""
    ds, ws = _prepare(deltas, weights, name)
    return _weighted_sum(ds, ws) * _number(lam, "lam")


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.2,
    lam: float = 1.0,
) -> Tensor:
    """TIES (Yadav et al. 2023): trim to top-k, elect sign by mass, disjoint mean, × λ."""
    ds, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    _nonnegative(ws, "ties")
    trimmed = [_magnitude_trim(d, density) for d in ds]
    return _disjoint_mean(trimmed, ws) * lam


def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE (Yu et al. 2023) then ``λ · Σ wᵢτ̃ᵢ``."""
    ds, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    dropped = [_dare_drop(d, density, generator_seed, name, i) for i, d in enumerate(ds)]
    return _weighted_sum(dropped, ws) * lam


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE (Yu et al. 2023) then TIES sign election and disjoint mean, × λ."""
    ds, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    _nonnegative(ws, "dare_ties")
    dropped = [_dare_drop(d, density, generator_seed, name, i) for i, d in enumerate(ds)]
    return _disjoint_mean(dropped, ws) * lam


def magnitude_prune(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.2,
    lam: float = 1.0,
) -> Tensor:
    """Trim each τᵢ to its top ``density`` by magnitude, then ``λ · Σ wᵢτ̂ᵢ``."""
    ds, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    return _weighted_sum([_magnitude_trim(d, density) for d in ds], ws) * lam


def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    gamma: float = 0.01,
    lam: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop top γ, keep next β, ``λ · Σ wᵢτ̂ᵢ``."""
    ds, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    gamma = _number(gamma, "gamma")
    if not 0.0 <= gamma < 1.0:
        raise InvalidArgument(f"gamma must be in [0, 1), got {gamma!r}")
    return _weighted_sum([_breadcrumbs_mask(d, density, gamma) for d in ds], ws) * lam


# --------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class MergeMethod:
    """One row of :data:`METHODS`."""

    name: str
    fn: MergeFn
    params: Mapping[str, float]  # parameter name -> default (same as the function's)
    needs_two_inputs: bool
    paper: str  # reference URL

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overlaid with ``params``; an unknown name is InvalidArgument."""
        out: dict[str, Any] = dict(self.params)
        for key, value in (params or {}).items():
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise InvalidArgument(
                    f"unknown parameter {key!r} for merge method {self.name!r}; known: {known}"
                )
            out[key] = value
        return out

    def check_inputs(self, count: int) -> None:
        """InvalidArgument unless ``count`` inputs are enough for this method."""
        least = 2 if self.needs_two_inputs else 1
        if count < least:
            raise InvalidArgument(
                f"merge method {self.name!r} needs at least {least} inputs, got {count}"
            )


METHODS: Mapping[str, MergeMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            MergeMethod("linear", linear, {}, True, "https://arxiv.org/abs/2203.05482"),
            MergeMethod(
                "task_arithmetic", task_arithmetic, {"lam": 1.0}, False, "https://arxiv.org/abs/2212.04089"
            ),
            MergeMethod(
                "ties", ties, {"density": 0.2, "lam": 1.0}, True, "https://arxiv.org/abs/2306.01708"
            ),
            MergeMethod(
                "dare_linear",
                dare_linear,
                {"density": 0.1, "lam": 1.0},
                False,
                "https://arxiv.org/abs/2311.03099",
            ),
            MergeMethod(
                "dare_ties",
                dare_ties,
                {"density": 0.1, "lam": 1.0},
                True,
                "https://arxiv.org/abs/2311.03099",
            ),
            MergeMethod(
                "magnitude_prune",
                magnitude_prune,
                {"density": 0.2, "lam": 1.0},
                False,
                "https://arxiv.org/abs/2306.01708",
            ),
            MergeMethod(
                "breadcrumbs",
                breadcrumbs,
                {"density": 0.1, "gamma": 0.01, "lam": 1.0},
                False,
                "https://arxiv.org/abs/2312.06795",
            ),
        )
    }
)


def get_method(method: str) -> MergeMethod:
    """The row of :data:`METHODS` named ``method``, or InvalidArgument listing them."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}"
        ) from None


def merge_tensor(
    method: str,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    params: Mapping[str, Any] | None = None,
) -> Tensor:
    """Merge one tensor's deltas with ``method``: checks, defaults, then the function."""
    row = get_method(method)
    row.check_inputs(len(deltas))
    return row.fn(deltas, weights, generator_seed=generator_seed, name=name, **row.resolve(params))


# --------------------------------------------------------------------------
# per-tensor overrides


def resolve_params(
    name: str,
    base_params: Mapping[str, Any],
    overrides: Sequence[tuple[str | re.Pattern[str], Mapping[str, Any]]],
) -> dict[str, Any]:
    """The parameters for tensor ``name``: ``base_params`` with matching overrides applied.

    Each override is ``(regex, params)``. A rule matches when
    ``re.search(regex, name)`` finds a match anywhere in the name (anchor with
    ``^``/``$`` or ``\\b`` as needed; ``re.fullmatch`` is not used). Every
    matching rule applies, in list order, so **later rules win** for a key
    they both set; keys a rule does not set are left as they are. A key that
    is not in ``base_params`` (a typo) or an invalid regex is InvalidArgument,
    checked for every rule, whether or not it matches ``name``.
    """
    out = dict(base_params)
    for i, (pattern, params) in enumerate(overrides):
        try:
            rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise InvalidArgument(f"override {i}: invalid regex {pattern!r}: {exc}") from None
        for key in params:
            if key not in base_params:
                known = ", ".join(sorted(base_params)) or "none"
                raise InvalidArgument(
                    f"override {i} ({rx.pattern!r}) sets unknown parameter {key!r}; known: {known}"
                )
        if rx.search(name) is not None:
            out.update(params)
    return out
