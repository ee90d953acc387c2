"""Merge methods for task vectors (weight diffs), one tensor at a time.

A *task vector* (delta) is ``finetuned - base`` for one tensor. Every method
here is one small pure function with the same signature::

    fn(deltas, weights, *, generator_seed, name, out=None, **params) -> Tensor

It takes the deltas of ONE tensor (one per input patch, all the same shape) and
one weight per input, and returns the merged delta in float32 — written into
``out`` when given (a contiguous float32 tensor of that shape, so the engine
can reuse one buffer). The engine adds it to the base tensor and casts to the
base dtype. Inputs of float32, float16 or bfloat16 are read as float32
(float64 inputs are rounded to float32 first) and all the math happens in
float32, on the device of the first delta. ``name`` is the tensor's name: it
seeds the random drops of DARE and names the tensor in error messages.
Nothing here reads files or knows about the registry.

The methods are listed in ONE explicit table, :data:`METHODS` (defined,
with the parameter checks, in :mod:`patchctl.patches.methods`, which does not
import torch; re-exported here); nothing is registered by importing a
module. :func:`merge_tensor` looks a method up, checks the number of inputs
and fills in the defaults. Task arithmetic, TIES and DARE on the CPU run on
the C kernels of :mod:`patchctl.patches.host_merge`, as does the top-k below.

**How the work is done.** A method first makes its whole-tensor choices (which
entries a trim keeps, which DARE drops), then walks the flattened tensors in
chunks of :data:`_CHUNK` entries (the whole tensor on an accelerator): each
input's chunk is copied into a reused float32 scratch buffer and everything
else is elementwise. So temporaries stay small whatever the tensor's size, and
the result does not depend on the chunking.

Semantic choices (where the papers are silent we follow mergekit):

* ``linear`` is a weighted *average*: ``Σ wᵢτᵢ / Σ wᵢ`` (mergekit's ``linear``
  with ``normalize=True``). Weights may be negative; ``Σ wᵢ = 0`` is an error.
  Use ``task_arithmetic`` for an un-normalized weighted sum.
* Weighted sums are ``round(w₁·τ₁) + round(w₂·τ₂) + ...`` in float32, added in
  input order: a multiply then an add, never a fused multiply-add, so the
  bits do not depend on the device, vector width or thread count.
* **Top-k by magnitude keeps exactly** ``k = int(density · n)`` **entries** per
  tensor (``int`` truncates, as mergekit: a tensor with ``density · n < 1`` is
  zeroed). Entries are ranked by ``|τ|`` descending, **ties broken by the
  lowest flat (row-major) index**: with ``t`` the k-th largest magnitude, the
  kept entries are every ``|τ| > t`` and then the first
  ``k - #{|τ| > t}`` entries with ``|τ| = t`` in flat order. (mergekit also
  keeps exactly ``k``; among tied entries it keeps whichever its sort puts
  first, which depends on the device and dtype.) ``t`` is found exactly and
  without a sort, from a histogram of the magnitude bit patterns (the float
  bits without the sign, which order like ``|τ|``: 15-bit keys for bf16/fp16,
  two 16-bit levels for float32), in the input's own dtype — it ranks as its
  float32 value does. Counts are integers, so the kept set is the same on any
  device and thread count. A tensor with at most ``k`` non-zero entries is
  kept as is (the zeros that fill up ``k`` change nothing).
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
  of the order tensors are visited. On the CPU the C kernel ``pc_dare_drops``
  makes the same masks without torch (its MT19937 and float32 draw, bit for
  bit) and the drop is fused into the merge's one pass. ``dare_ties`` uses
  the disjoint mean like ``ties`` (mergekit's ``dare_ties`` sums instead:
  ``normalize=False``).
* Breadcrumbs keeps the entries ranked ``[top, top + keep)`` in the order
  above (magnitude descending, lowest index first among ties),
  ``top = int(gamma · n)``, ``keep = int(density · n)``; when
  ``top + keep > n``, ``top`` shrinks to ``n - keep`` (as mergekit). Exactly
  ``keep`` entries survive.

Default densities are starting points from the papers, not tuned values:
TIES keeps the top 20 % (its paper's k = 20), DARE drops 90 % (p = 0.9, the
drop rate its paper highlights), breadcrumbs keeps 10 % after dropping the top
1 %. ``lam`` (λ) defaults to 1.

Per-tensor parameter overrides: :func:`resolve_params`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchctl.errors import InvalidArgument, ShapeMismatch
from patchctl.patches import host_merge as _hm
from patchctl.patches import native
from patchctl.patches.apply import NATIVE_CODES as _CODES  # the C kernels' dtype codes
from patchctl.patches.host_merge import Top as _Top
from patchctl.patches.methods import METHODS, MergeMethod, dare_seed, get_method, resolve_params
from patchctl.patches.methods import density as _density
from patchctl.patches.methods import nonnegative as _nonnegative
from patchctl.patches.methods import number as _number
from patchctl.patches.methods import weights_of as _weights_of

__all__ = [
    "FUNCTIONS",
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
    "top_k_mask",
]

MergeFn = Callable[..., Tensor]

_CHUNK = 1 << 18  # entries per elementwise step on the CPU (1 MiB of float32 per operand)
_READ_AS_IS = (torch.float32, torch.float16, torch.bfloat16)
# magnitude key = the float's bits without the sign: (integer view, mask)
_KEY = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


# --------------------------------------------------------------------------
# checks


def _prepare(
    deltas: Sequence[Tensor], weights: Sequence[float], name: str
) -> tuple[list[Tensor], list[float]]:
    """Check one tensor's inputs; return them flat on one device (float64 as float32) and the weights."""
    ws = _weights_of(weights, len(deltas), name)
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
        dtype = d.dtype if d.dtype in _READ_AS_IS else torch.float32
        out.append(d.to(device=first.device, dtype=dtype).reshape(-1))
    return out, ws


# --------------------------------------------------------------------------
# the chunked elementwise pass

Step = Callable[[list[Tensor], Tensor, int], None]


def _chunk_size(n: int, device: torch.device) -> int:
    return max(1, min(n, _CHUNK) if device.type == "cpu" else n)


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_scratch_cache = threading.local()


def _scratch(count: int, size: int, device: torch.device) -> list[Tensor]:
    """``count`` float32 buffers of ``size`` entries, reused by this thread from call to call on the CPU.

    A fresh chunk-sized allocation is a fresh mapping whose pages all fault
    in again, tensor after tensor; callers must not hold on to them.
    """
    if device.type != "cpu":
        return [torch.empty(size, dtype=torch.float32, device=device) for _ in range(count)]
    bufs: list[Tensor] = getattr(_scratch_cache, "bufs", [])
    if len(bufs) < count or (bufs and bufs[0].numel() < size):
        bufs = [torch.empty(max(size, _CHUNK), dtype=torch.float32) for _ in range(max(count, len(bufs)))]
        _scratch_cache.bufs = bufs
    return [b[:size] for b in bufs[:count]]


def _elementwise(flats: Sequence[Tensor], shape: torch.Size, out: Tensor | None, step: Step) -> Tensor:
    """Run ``step(parts, acc, lo)`` over chunks; return the result of shape ``shape`` (float32 unless ``out``).

    ``parts`` are float32 copies of the inputs' entries ``[lo, lo + len(acc))``
    (the step may change them), ``acc`` the float32 slice of the result, or
    (``out`` of a 2-byte float dtype) a float32 chunk rounded into ``out``
    after the step: elementwise, so the same as rounding the whole result.
    """
    device = flats[0].device
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif out.shape != shape or out.dtype not in _OUT_DTYPES or out.device != device or not out.is_contiguous():
        raise InvalidArgument(
            f"out must be a contiguous float32, bfloat16 or float16 tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype}{tuple(out.shape)} on {out.device}"
        )
    n = out.numel()
    size = _chunk_size(n, device)
    flat_out = out.view(-1)
    rounded = out.dtype != torch.float32
    bufs = _scratch(len(flats) + rounded, size, device)
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        parts = [b[: hi - lo].copy_(f[lo:hi]) for b, f in zip(bufs[: len(flats)], flats, strict=True)]
        if rounded:
            acc = bufs[-1][: hi - lo]
            step(parts, acc, lo)
            flat_out[lo:hi].copy_(acc)
        else:
            step(parts, flat_out[lo:hi], lo)
    return out


def _weigh(parts: list[Tensor], weights: Sequence[float]) -> None:
    for p, w in zip(parts, weights, strict=True):
        if w != 1.0:  # x·1 is x: skip the pass
            p.mul_(w)


def _scale(acc: Tensor, lam: float) -> Tensor:
    return acc if lam == 1.0 else acc.mul_(lam)  # x·1 is x: skip the pass


def _sum_into(acc: Tensor, parts: Sequence[Tensor]) -> Tensor:
    acc.zero_()
    for p in parts:
        acc.add_(p)
    return acc


class _Scratch:
    """Per-call chunk buffers of the disjoint mean."""

    def __init__(self, size: int, device: torch.device, weights: Sequence[float]):
        self.sign = torch.empty(size, dtype=torch.float32, device=device)
        self.den = torch.empty(size, dtype=torch.float32, device=device)
        # the smallest non-zero denominator: a sum of float32 weights is at least its smallest term
        self.den_floor = _hm.den_floor(weights)


def _disjoint_mean_into(acc: Tensor, parts: Sequence[Tensor], weights: Sequence[float], sc: _Scratch) -> Tensor:
    """TIES sign election by total mass, then the weighted mean of agreeing entries, into ``acc``.

    ``parts`` are the weighted deltas ``wᵢ·τᵢ`` (changed in place). With
    ``s = ±1`` the elected sign (``+`` for a total of 0: the running sum starts
    at +0, so it is never -0), input ``i`` agrees where ``s·wᵢ·τᵢ > 0``; the
    numerator is ``s · Σ max(s·wᵢ·τᵢ, 0)`` (multiplying by ±1 is exact, so this
    is the plain sum of the agreeing ``wᵢτᵢ``) and the denominator
    ``Σ wᵢ·sign(max(s·wᵢ·τᵢ, 0))``, the sum of the agreeing weights. Where none
    agree the numerator is 0 and the denominator is raised to the smallest
    weight, so the mean is 0 there.
    """
    m = acc.numel()
    sign, den = sc.sign[:m], sc.den[:m]
    _sum_into(acc, parts)
    torch.copysign(sign.fill_(1.0), acc, out=sign)
    acc.zero_()
    den.zero_()
    for p, w in zip(parts, weights, strict=True):
        if w == 0:
            continue
        acc.add_(p.mul_(sign).clamp_min_(0.0))
        den.add_(p.sign_(), alpha=w)  # p is 0 or 1 here: w·p is exact, fused or not
    acc.mul_(sign)
    return acc.div_(den.clamp_min_(sc.den_floor))


# --------------------------------------------------------------------------
# exact top-k by magnitude


def _keys(flat: Tensor) -> Tensor:
    """Magnitude keys of a flat float tensor: its bits without the sign (they order like ``|x|``)."""
    itype, mask = _KEY[flat.dtype]
    return flat.view(itype).bitwise_and(mask)


_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _bits(flat: Tensor) -> np.ndarray:
    """The bits of a contiguous flat CPU float tensor read as is, as unsigned integers of its width (no copy)."""
    itype = _KEY[flat.dtype][0]
    return flat.view(itype).numpy().view(np.uint16 if itype == torch.int16 else np.uint32)


def _count_nonzero(flat: Tensor) -> int:
    """``torch.count_nonzero(flat)``; for 2-byte floats on the CPU the C kernel's count of keys >= 1
    (``|x| > 0``, NaN included, as torch counts): ~30x faster than torch's on bfloat16, GIL released."""
    if flat.device.type == "cpu" and flat.dtype in (torch.bfloat16, torch.float16) and flat.is_contiguous():
        return _hm.count_nonzero(_bits(flat), _NAMES[flat.dtype])
    return int(torch.count_nonzero(flat))


def _top(flat: Tensor, k: int) -> _Top | bool:
    """The k entries ranked first (``|x|`` descending, lowest flat index first among ties).

    ``True`` when they are all the non-zero entries or more (the values are
    then unchanged), ``False`` when ``k <= 0``. On the CPU:
    :func:`patchctl.patches.host_merge.top` on the tensor's bits (histograms of
    the magnitude keys, no sort); on an accelerator an exact selection on the
    integer keys. The same set either way.
    """
    if flat.device.type == "cpu":
        return _hm.top(_bits(flat.contiguous()), _NAMES[flat.dtype], k)
    n = flat.numel()
    if k <= 0:
        return False
    if k >= n or _count_nonzero(flat) <= k:
        return True
    keys = _keys(flat).to(torch.int64)
    t = int(torch.kthvalue(keys, n - k + 1).values)
    if t == 0:  # fewer than k non-zero entries
        return True
    r = k - int(torch.count_nonzero(keys > t))  # how many entries equal to t make it, lowest index first
    hits = torch.nonzero(keys == t).reshape(-1)
    value = _hm.key_value(t, _NAMES[flat.dtype])
    return _Top(t, int(hits[r - 1]) + 1, float(value), float(np.nextafter(value, np.float32(0))))


def _keep_into(top: _Top | bool, flat: Tensor, lo: int, out: Tensor) -> Tensor:
    """Whether each entry ``[lo, lo + len(out))`` of ``flat`` is in ``top``."""
    if isinstance(top, bool):
        return out.fill_(top)
    return top.mask_into(_keys(flat[lo : lo + out.numel()]), lo, out)


def top_k_mask(delta: Tensor, k: int) -> Tensor:
    """Bool mask (shape of ``delta``) of the ``k`` entries kept by the top-k rule above.

    Exactly ``min(max(k, 0), n)`` entries are True, except that when at most
    ``k`` entries are non-zero every entry is True (the same values survive).
    """
    (flat,), _ = _prepare([delta], [1.0], "-")
    top = _top(flat, int(k))
    return _keep_into(top, flat, 0, torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)).reshape(delta.shape)


def _trim(parts: list[Tensor], tops: Sequence[_Top | bool], lo: int) -> None:
    """Zero every entry of the float32 chunks that is not in its input's top set.

    ``hardshrink(x, λ)`` keeps ``x`` where ``|x| > λ`` and gives 0 elsewhere:
    one vectorized pass instead of a mask.
    """
    for p, top in zip(parts, tops, strict=True):
        if top is True:
            continue
        if top is False:
            p.zero_()
            continue
        cut = min(max(top.cutoff - lo, 0), p.numel())  # before it, entries equal to t are kept
        if cut:
            torch.ops.aten.hardshrink.out(p[:cut], top.at_or_above, out=p[:cut])
        if cut < p.numel():
            torch.ops.aten.hardshrink.out(p[cut:], top.above, out=p[cut:])


def _dare_drops(
    flats: Sequence[Tensor], density: float, generator_seed: int, name: str
) -> list[Tensor | None]:
    """Per input, the flat bool mask of dropped entries (``u >= density``); None drops nothing."""
    out: list[Tensor | None] = []
    for i, f in enumerate(flats):
        seed = dare_seed(generator_seed, name, i)
        if density >= 1.0:
            out.append(None)
            continue
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        u = torch.rand(f.numel(), generator=gen, dtype=torch.float32)
        out.append((u >= density).to(f.device))
    return out


def _dare_apply(parts: list[Tensor], drops: Sequence[Tensor | None], density: float, lo: int) -> None:
    """Bernoulli-drop with p = 1 - density, survivors divided by density."""
    for p, drop in zip(parts, drops, strict=True):
        if drop is not None:
            p.masked_fill_(drop[lo : lo + p.numel()], 0.0).div_(density)


# --------------------------------------------------------------------------
# the methods


def linear(
    deltas: Sequence[Tensor], weights: Sequence[float], *, generator_seed: int, name: str, out: Tensor | None = None
) -> Tensor:
    """Weighted average ``Σ wᵢτᵢ / Σ wᵢ`` (mergekit ``linear``, normalize=True)."""
    flats, ws = _prepare(deltas, weights, name)
    total = math.fsum(ws)
    if total == 0:
        raise InvalidArgument(f"linear needs weights with a non-zero sum, got {ws!r}")

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _weigh(parts, ws)
        _sum_into(acc, parts).div_(total)

    return _elementwise(flats, deltas[0].shape, out, step)


def task_arithmetic(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``λ · Σ wᵢτᵢ``."""
    flats, ws = _prepare(deltas, weights, name)
    lam = _number(lam, "lam")
    fused = _fused_weighted_sum(flats, ws, lam, deltas[0].shape, out)
    if fused is not None:
        return fused

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _weigh(parts, ws)
        _scale(_sum_into(acc, parts), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


def _native_out(flats: Sequence[Tensor], shape: torch.Size, out: Tensor | None) -> Tensor | None:
    """The output tensor of a fused kernel: ``out``, or a new float32 one; None where the kernels do not apply."""
    if native.lib is None or any(f.device.type != "cpu" or f.dtype not in _CODES or not f.is_contiguous()
                                 for f in flats):
        return None
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if out.shape != shape or out.dtype not in _CODES or out.device.type != "cpu" or not out.is_contiguous():
        return None  # _elementwise names the problem
    return out


def _fused_ties(flats: Sequence[Tensor], ws: Sequence[float], tops: Sequence[_Top | bool], den_floor: float,
                lam: float, shape: torch.Size, out: Tensor | None) -> Tensor | None:
    """TIES's trim, sign election and disjoint mean in one pass of the C kernel ``pc_ties`` (CPU; None where
    it does not apply): the torch path's operations in its order, each rounded to float32, so the same bits
    (tests/test_host_kernels.py compares them); split over the streaming threads."""
    out = _native_out(flats, shape, out)
    if out is None:
        return None
    _hm.ties([f.data_ptr() for f in flats], [_CODES[f.dtype] for f in flats], ws, tops, den_floor, lam,
             out.numel(), out.data_ptr(), _CODES[out.dtype])
    return out


def _fused_weighted_sum(flats: Sequence[Tensor], ws: Sequence[float], lam: float, shape: torch.Size,
                        out: Tensor | None) -> Tensor | None:
    """Task arithmetic in one pass of the C kernel ``pc_weighted_sum`` (CPU; None where it does not apply).

    The same operations in the same order as the chunked torch path (widen, ×w where w ≠ 1, sum in input
    order from +0, ×λ where λ ≠ 1, round once into ``out``), each rounded to float32: the same bits
    (tests/test_merge_methods.py runs both), without the chunk copies; split over the streaming threads.
    """
    out = _native_out(flats, shape, out)
    if out is None:
        return None
    _hm.weighted_sum([f.data_ptr() for f in flats], [_CODES[f.dtype] for f in flats], ws, lam, out.numel(),
                     out.data_ptr(), _CODES[out.dtype])
    return out


def _fused_dare(method: str, flats: Sequence[Tensor], ws: Sequence[float], density: float, lam: float,
                generator_seed: int, name: str, shape: torch.Size, out: Tensor | None) -> Tensor | None:
    """``dare_ties`` or ``dare_linear`` on the C kernels (CPU; None where they do not apply): the drop masks
    made by ``pc_dare_drops`` (torch's generator and draw, the bits of :func:`_dare_drops`), then the
    drop, weights, sum or disjoint mean and λ in the chunked path's order, fused (``pc_ties`` /
    ``pc_weighted_sum``): the same bits (tests/test_host_merge.py runs both)."""
    out = _native_out(flats, shape, out)
    if out is None:
        return None
    _hm.dare(method, [f.data_ptr() for f in flats], [_CODES[f.dtype] for f in flats], ws, density, lam,
             generator_seed, name, out.numel(), out.data_ptr(), _CODES[out.dtype])
    return out


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.2,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """TIES (Yadav et al. 2023): trim to exactly top-k, elect sign by mass, disjoint mean, × λ."""
    flats, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    _nonnegative(ws, "ties")
    k = int(density * flats[0].numel())
    tops = [_top(f, k) for f in flats]
    sc = _Scratch(_chunk_size(flats[0].numel(), flats[0].device), flats[0].device, ws)
    fused = _fused_ties(flats, ws, tops, sc.den_floor, lam, deltas[0].shape, out)
    if fused is not None:
        return fused

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _trim(parts, tops, lo)
        _weigh(parts, ws)
        _scale(_disjoint_mean_into(acc, parts, ws, sc), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """DARE (Yu et al. 2023) then ``λ · Σ wᵢτ̃ᵢ``."""
    flats, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    fused = _fused_dare("dare_linear", flats, ws, density, lam, generator_seed, name, deltas[0].shape, out)
    if fused is not None:
        return fused
    drops = _dare_drops(flats, density, generator_seed, name)

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _dare_apply(parts, drops, density, lo)
        _weigh(parts, ws)
        _scale(_sum_into(acc, parts), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """DARE (Yu et al. 2023) then TIES sign election and disjoint mean, × λ."""
    flats, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    _nonnegative(ws, "dare_ties")
    fused = _fused_dare("dare_ties", flats, ws, density, lam, generator_seed, name, deltas[0].shape, out)
    if fused is not None:
        return fused
    drops = _dare_drops(flats, density, generator_seed, name)
    sc = _Scratch(_chunk_size(flats[0].numel(), flats[0].device), flats[0].device, ws)

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _dare_apply(parts, drops, density, lo)
        _weigh(parts, ws)
        _scale(_disjoint_mean_into(acc, parts, ws, sc), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


def magnitude_prune(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.2,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Trim each τᵢ to exactly its top ``density`` by magnitude, then ``λ · Σ wᵢτ̂ᵢ``."""
    flats, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    k = int(density * flats[0].numel())
    tops = [_top(f, k) for f in flats]

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        _trim(parts, tops, lo)
        _weigh(parts, ws)
        _scale(_sum_into(acc, parts), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    density: float = 0.1,
    gamma: float = 0.01,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop top γ, keep next β, ``λ · Σ wᵢτ̂ᵢ``."""
    flats, ws = _prepare(deltas, weights, name)
    density, lam = _density(density), _number(lam, "lam")
    gamma = _number(gamma, "gamma")
    if not 0.0 <= gamma < 1.0:
        raise InvalidArgument(f"gamma must be in [0, 1), got {gamma!r}")
    n = flats[0].numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    # ranks [top, top + keep): in the top (top + keep) and not in the top `top`
    bounds = [(_top(f, top + keep) if keep > 0 else False, _top(f, top) if keep > 0 else False) for f in flats]
    size = _chunk_size(n, flats[0].device)
    inner = torch.empty(size, dtype=torch.bool, device=flats[0].device)
    outer = torch.empty(size, dtype=torch.bool, device=flats[0].device)

    def step(parts: list[Tensor], acc: Tensor, lo: int) -> None:
        m = acc.numel()
        for p, (hi_set, lo_set), f in zip(parts, bounds, flats, strict=True):
            kept = _keep_into(hi_set, f, lo, inner[:m])
            kept &= _keep_into(lo_set, f, lo, outer[:m]).logical_not_()
            p.masked_fill_(kept.logical_not_(), 0.0)
        _weigh(parts, ws)
        _scale(_sum_into(acc, parts), lam)

    return _elementwise(flats, deltas[0].shape, out, step)


# --------------------------------------------------------------------------
# the table


def merge_tensor(
    method: str,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator_seed: int,
    name: str,
    params: Mapping[str, Any] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor's deltas with ``method``: checks, defaults, then the function.

    ``out``: a contiguous tensor of the deltas' shape to write the result
    into (returned); by default a new float32 one. A bfloat16 or float16
    ``out`` gets the float32 result rounded to it, chunk by chunk (the same
    bytes as rounding the whole float32 result, without it in memory).
    """
    row = get_method(method)
    row.check_inputs(len(deltas))
    return FUNCTIONS[row.name](deltas, weights, generator_seed=generator_seed, name=name, out=out,
                               **row.resolve(params))


#: Each row of :data:`METHODS` by name: its function here.
FUNCTIONS: Mapping[str, MergeFn] = {fn.__name__: fn for fn in (
    linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, breadcrumbs)}
