"""Task arithmetic, TIES and DARE on plain buffers: the exact top-k, DARE's drops, and the C kernels that
merge (no torch).

A merge of stored ``float32``/``float16``/``bfloat16`` deltas by task
arithmetic, TIES, ``dare_ties`` or ``dare_linear`` needs no more than the
fused kernels ``pc_weighted_sum`` and ``pc_ties`` (:mod:`patchctl.patches.native`)
and, for TIES, each input's exact top-k by magnitude; for DARE, each input's
drop mask (``pc_dare_drops``: torch's generator, bit for bit). Both are here, on numpy views of the deltas' bits,
so such a merge plans and streams without importing torch
(:mod:`patchctl.registry.ops.merging.host_stream`); :mod:`patchctl.patches.merge`
runs the same functions on its CPU tensors, so the two paths make the same
bits (``tests/test_host_merge.py`` compares them). The rules (``k`` entries
ranked by ``|x|`` descending, ties broken by the lowest flat index; the kth
magnitude found from histograms of the magnitude keys) are those of
:mod:`patchctl.patches.merge`'s docstring.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchctl.errors import InvalidArgument
from patchctl.patches import native
from patchctl.patches.host import CODES
from patchctl.patches.methods import dare_seed

_CHUNK = 1 << 18  # kernel ranges are cut on multiples of this many entries
_SCAN = 1 << 20  # entries per step of the histogram and tie scans
#: the magnitude key's mask (the float's bits without the sign) per dtype name, and the key of +inf
KEY_MASK = {"float16": 0x7FFF, "bfloat16": 0x7FFF, "float32": 0x7FFFFFFF}
INF_KEY = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}


def hist16(raw: np.ndarray) -> np.ndarray:
    """The count of each 16-bit pattern in ``raw``: the C kernel where it is built (3.5x ``np.bincount``,
    and it releases the GIL for the writer threads), else ``np.bincount``; the same counts."""
    if native.lib is not None and raw.flags.c_contiguous:
        h = np.zeros(1 << 16, dtype=np.int64)
        if native.lib.pc_hist16(native.ptr(raw), raw.size, native.ptr(h)) == 0:
            return h
    return np.bincount(raw, minlength=1 << 16)


def count_nonzero(bits: np.ndarray, dtype: str) -> int:
    """How many entries have ``|x| > 0`` (NaN included, as ``torch.count_nonzero``), from their bits."""
    if dtype != "float32" and native.lib is not None and bits.flags.c_contiguous and bits.size:
        return int(native.lib.pc_count16(native.ptr(bits), bits.size, 1))  # ~30x torch's on bfloat16
    mask = KEY_MASK[dtype]
    return sum(int(np.count_nonzero(bits[lo : lo + _SCAN] & mask)) for lo in range(0, bits.size, _SCAN))


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) and how many entries lie in higher bins."""
    cum = np.cumsum(hist[::-1])
    i = int(np.searchsorted(cum, k, side="left"))
    return len(hist) - 1 - i, (int(cum[i - 1]) if i else 0)


def kth_key(bits: np.ndarray, dtype: str, k: int) -> tuple[int, int, list[int] | None]:
    """``(t, above, per_scan)``: the k-th largest magnitude key (``1 <= k <= n``), how many keys exceed it,
    and (where the histograms give it for free) how many keys equal ``t`` in each ``_SCAN``-entry step."""
    n = bits.size
    if dtype != "float32":  # 2-byte floats: one histogram of the 15-bit keys per step
        steps = []
        for lo in range(0, n, _SCAN):
            h = hist16(bits[lo : lo + _SCAN])
            steps.append(h[: 1 << 15] + h[1 << 15 :])  # fold the sign bit
        t, above = _pick(np.sum(steps, axis=0), k)
        return t, above, [int(h[t]) for h in steps]
    high = np.zeros(1 << 15, dtype=np.int64)  # float32: the high 15 key bits, then the low 16
    for lo in range(0, n, _SCAN):
        high += np.bincount((bits[lo : lo + _SCAN] & 0x7FFFFFFF) >> 16, minlength=1 << 15)
    b, above = _pick(high, k)
    low = np.zeros(1 << 16, dtype=np.int64)
    for lo in range(0, n, _SCAN):
        key = bits[lo : lo + _SCAN] & 0x7FFFFFFF
        low += np.bincount(key[(key >> 16) == b] & 0xFFFF, minlength=1 << 16)
    s, above_in_bin = _pick(low, k - above)
    return (b << 16) | s, above + above_in_bin, None


def key_value(t: int, dtype: str) -> np.float32:
    """The float32 value of magnitude key ``t`` of ``dtype``."""
    if dtype == "float16":
        return np.array(t, dtype=np.uint16).view(np.float16).astype(np.float32)[()]
    b = t << 16 if dtype == "bfloat16" else t
    return np.array(b, dtype=np.uint32).view(np.float32)[()]


@dataclass(frozen=True)
class Top:
    """The top-k entries of a flat tensor: key > t, or key == t at a flat index < cutoff.

    ``above`` is the float32 value of key ``t`` and ``at_or_above`` the float32
    just below it: ``|x| > above`` is ``key > t`` and ``|x| > at_or_above`` is
    ``key >= t`` for the float32 copies of the entries (exact for every dtype
    read as is).
    """

    t: int
    cutoff: int
    above: float = 0.0
    at_or_above: float = 0.0

    def mask_into(self, keys: Any, lo: int, out: Any) -> Any:
        """``out`` = whether each entry of the chunk of torch ``keys`` starting at flat index ``lo`` is in the top."""
        import torch

        torch.gt(keys, self.t, out=out)
        m = min(self.cutoff - lo, keys.numel())
        if m > 0:
            out[:m] |= keys[:m] == self.t
        return out

    def keep(self, bits: np.ndarray, dtype: str) -> np.ndarray:
        """Whether each entry of ``bits`` (the whole flat tensor) is in the top, as a bool array."""
        keys = bits & KEY_MASK[dtype]
        out = keys > self.t
        out[: self.cutoff] |= keys[: self.cutoff] == self.t
        return out


def top(bits: np.ndarray, dtype: str, k: int) -> Top | bool:
    """The k entries ranked first (``|x|`` descending, lowest flat index first among ties) of the flat
    tensor whose bits are ``bits``.

    ``True`` when they are all the non-zero entries or more (the values are
    then unchanged), ``False`` when ``k <= 0``.
    """
    n = bits.size
    if k <= 0:
        return False
    if k >= n or count_nonzero(bits, dtype) <= k:  # cheaper than the histogram
        return True
    t, above, per_scan = kth_key(bits, dtype, k)
    if t == 0:  # fewer than k non-zero entries
        return True
    r = k - above  # how many entries equal to t make it, lowest index first
    mask, seen = KEY_MASK[dtype], 0
    for step, lo in enumerate(range(0, n, _SCAN)):
        if per_scan is not None and seen + per_scan[step] < r:  # counted already: skip the step
            seen += per_scan[step]
            continue
        hits = np.flatnonzero((bits[lo : lo + _SCAN] & mask) == t)
        c = len(hits)
        if seen + c >= r:
            value = key_value(t, dtype)
            return Top(t, lo + int(hits[r - seen - 1]) + 1, float(value), float(np.nextafter(value, np.float32(0))))
        seen += c
    raise AssertionError("histogram and scan disagree")  # pragma: no cover - integer counts


def den_floor(weights: Sequence[float]) -> float:
    """TIES's smallest non-zero denominator: the smallest positive weight as a float32 (1 without one)."""
    positive = [w for w in weights if w > 0]
    return float(np.float32(min(positive))) if positive else 1.0


# -- the fused kernels, over raw pointers (float32/float16/bfloat16 codes of patchctl.patches.host.CODES) --
def _split(fn: Callable[[int, int], None], n: int) -> None:
    from patchctl.patches._workers import run_ranges

    run_ranges(fn, n, _CHUNK, 1 << 20)


class Drops:
    """DARE's drop masks of one tensor's inputs (bit ``i`` set: entry ``i`` dropped), ``None`` for an input
    that drops nothing (density 1), made by ``pc_dare_drops`` on the streaming threads (one input each) in
    buffers of :data:`~patchctl.patches.host.POOL`; :meth:`release` gives them back.

    The bits are those of :func:`patchctl.patches.merge._dare_drops` (torch's generator seeded by
    :func:`~patchctl.patches.methods.dare_seed`, ``torch.rand(n) >= density``): the C generator is torch's
    MT19937 and its float32 draw, checked against torch in ``tests/test_host_merge.py``.
    """

    def __init__(self, n: int, density: float, seeds: Sequence[int]):
        from patchctl.patches._workers import run_ranges
        from patchctl.patches.host import POOL

        self.density = density
        self.masks: list[np.ndarray | None] = [None] * len(seeds)
        if density >= 1.0 or n == 0:
            return
        size, lib = (n + 7) // 8, native.lib
        self.masks = [POOL.take(size) for _ in seeds]

        def make(lo: int, hi: int) -> None:
            for q in range(lo, hi):
                lib.pc_dare_drops(seeds[q], n, density, self.masks[q].ctypes.data)

        run_ranges(make, len(seeds), 1, 1)

    def pointers(self) -> Any:
        k = len(self.masks)
        return (ctypes.c_void_p * k)(*(0 if m is None else m.ctypes.data for m in self.masks))

    def release(self) -> None:
        from patchctl.patches.host import POOL

        for m in self.masks:
            if m is not None:
                POOL.give(m)
        self.masks = [None] * len(self.masks)


def weighted_sum(ptrs: Sequence[int], codes: Sequence[int], ws: Sequence[float], lam: float, n: int,
                 optr: int, ocode: int, drops: Drops | None = None, post: float | None = None) -> None:
    """``λ · Σ wᵢτᵢ`` of ``n`` entries into ``optr`` (``pc_weighted_sum``; split over the streaming threads);
    with ``drops``, each τᵢ DARE-dropped first (``dare_linear``); ``post``: the float32 result times it
    (LiNeS's scale), before it is rounded into the output dtype."""
    k = len(ptrs)
    p = (ctypes.c_void_p * k)(*ptrs)
    c, w = (ctypes.c_int * k)(*codes), (ctypes.c_float * k)(*ws)
    mul = (ctypes.c_int * k)(*(x != 1.0 for x in ws))
    dp, density = (None, 1.0) if drops is None else (drops.pointers(), drops.density)
    lib = native.lib

    def part(lo: int, hi: int) -> None:
        if lib.pc_weighted_sum(p, c, w, mul, dp, density, k, lam, lam != 1.0, post or 0.0, post is not None, optr,
                               ocode, lo, hi):
            raise InvalidArgument("pc_weighted_sum: unknown dtype code")

    _split(part, n)


def ties(ptrs: Sequence[int], codes: Sequence[int], ws: Sequence[float], tops: Sequence[Top | bool] | Drops,
         floor: float, lam: float, n: int, optr: int, ocode: int, post: float | None = None) -> None:
    """TIES's trim (or, given :class:`Drops`, DARE's drop: ``dare_ties``), sign election and disjoint mean
    of ``n`` entries into ``optr`` (``pc_ties``); ``post`` as for :func:`weighted_sum`."""
    k = len(ptrs)
    c_f, c_i, c_i64 = ctypes.c_float * k, ctypes.c_int * k, ctypes.c_int64 * k
    p = (ctypes.c_void_p * k)(*ptrs)
    c, w, mul = c_i(*codes), c_f(*ws), c_i(*(x != 1.0 for x in ws))
    if isinstance(tops, Drops):
        dp, density = tops.pointers(), tops.density
        mode = c_i(*(0 if m is None else 3 for m in tops.masks))
        tops = [True] * k
    else:
        dp, density = None, 1.0
        mode = c_i(*(0 if t is True else 1 if t is False else 2 for t in tops))
    cutoff = c_i64(*(t.cutoff if isinstance(t, Top) else 0 for t in tops))
    at = c_f(*(t.at_or_above if isinstance(t, Top) else 0.0 for t in tops))
    above = c_f(*(t.above if isinstance(t, Top) else 0.0 for t in tops))
    lib = native.lib

    def part(lo: int, hi: int) -> None:
        rc = lib.pc_ties(p, c, w, mul, mode, cutoff, at, above, dp, density, k, floor, lam, lam != 1.0,
                         post or 0.0, post is not None, optr, ocode, lo, hi)
        if rc:
            raise MemoryError("pc_ties: no memory for its scratch") if rc == -2 else \
                InvalidArgument("pc_ties: unknown dtype code")

    _split(part, n)


def dare(method: str, ptrs: Sequence[int], codes: Sequence[int], ws: Sequence[float], density: float, lam: float,
         seed: int, name: str, n: int, optr: int, ocode: int, post: float | None = None) -> None:
    """``dare_ties`` or ``dare_linear`` of ``n`` entries into ``optr``: the drop masks of
    :func:`~patchctl.patches.methods.dare_seed` ``(seed, name, i)``, then ``pc_ties`` or ``pc_weighted_sum``."""
    drops = Drops(n, density, [dare_seed(seed, name, i) for i in range(len(ptrs))])
    try:
        if method == "dare_ties":
            ties(ptrs, codes, ws, drops, den_floor(ws), lam, n, optr, ocode, post)
        else:
            weighted_sum(ptrs, codes, ws, lam, n, optr, ocode, drops, post)
    finally:
        drops.release()


_L1_BLOCK = 1 << 16  # pc_l1_sums's block


def l1_sums(ptrs: Sequence[int], codes: Sequence[int], mptr: int, n: int) -> tuple[float, float]:
    """LiNeS's ``(‖Σᵢ τᵢ‖₁, ‖τ_merged‖₁)`` of one tensor (``pc_l1_sums``): ``Σᵢ τᵢ`` in float32 in input
    order (as :func:`patchctl.patches.lines.l1_norms`), the magnitudes summed in float64 by blocks, the
    blocks' sums added exactly (``math.fsum``) and rounded once: the same two numbers whatever the
    thread count (torch's own float64 sum may differ from them in the last bits)."""
    k = len(ptrs)
    p, c = (ctypes.c_void_p * k)(*ptrs), (ctypes.c_int * k)(*codes)
    parts = np.zeros(2 * max(1, -(-n // _L1_BLOCK)), np.float64)
    lib = native.lib

    def part(lo: int, hi: int) -> None:
        if lib.pc_l1_sums(p, c, k, mptr, lo, hi, parts.ctypes.data):
            raise InvalidArgument("pc_l1_sums: unknown dtype code")

    if n:
        _split(part, n)
    return math.fsum(parts[0::2].tolist()), math.fsum(parts[1::2].tolist())


def merge(method: str, deltas: Sequence[Any], weights: Sequence[float], params: dict[str, Any], out: Any, *,
          seed: int = 0, name: str = "-", memo: dict[str, Any] | None = None, post: float | None = None) -> None:
    """Merge one tensor's deltas (:class:`~patchctl.patches.host.HostTensor` s of one shape) into ``out``
    (a HostTensor of that shape; float32, float16 or bfloat16) by ``method``, one of
    :data:`~patchctl.patches.methods.HOST_METHODS`, with ``params`` resolved and checked
    (:func:`~patchctl.patches.methods.check_call`): the bits :func:`patchctl.patches.merge.merge_tensor` gives
    with ``generator_seed=seed`` and ``name`` (DARE's drops depend on both). ``memo``: TIES's top-k of each
    input by tensor name, kept from a first pass over the same inputs (LiNeS's α) for the second. ``post``:
    LiNeS's scale of this tensor, applied to the float32 result (as the torch path's ``mul_``) before it is
    rounded into ``out``."""
    n = out.numel()
    ptrs = [native.ptr(d.buf) for d in deltas]
    codes = [CODES[d.dtype] for d in deltas]
    ws = [float(w) for w in weights]
    lam = float(params["lam"])
    if method == "task_arithmetic":
        weighted_sum(ptrs, codes, ws, lam, n, native.ptr(out.buf), CODES[out.dtype], post=post)
    elif method == "ties":
        k = int(float(params["density"]) * n)
        tops = None if memo is None else memo.get(name)
        if tops is None:
            tops = [top(d.ints(), d.dtype, k) for d in deltas]
            if memo is not None:
                memo[name] = tops
        ties(ptrs, codes, ws, tops, den_floor(ws), lam, n, native.ptr(out.buf), CODES[out.dtype], post)
    elif method in ("dare_ties", "dare_linear"):
        dare(method, ptrs, codes, ws, float(params["density"]), lam, seed, name, n, native.ptr(out.buf),
             CODES[out.dtype], post)
    else:
        raise InvalidArgument(f"merge method {method!r} does not run on the host kernels")


def sign_counts(a: Any, b: Any, density: float) -> tuple[int, int]:
    """``(overlap, conflicts)`` of two deltas (HostTensors of one shape): how many entries are in both
    top-``⌈density·n⌉`` supports (non-zero entries only), and how many of those differ in the sign of
    ``x > 0`` (:func:`patchctl.patches.diagnostics.pair_counts`'s ``overlap`` and ``conflicts``)."""
    sup = [support(t, density) for t in (a, b)]
    both = sup[0] & sup[1]
    pos = [positive(t) for t in (a, b)]
    return int(np.count_nonzero(both)), int(np.count_nonzero(both & (pos[0] != pos[1])))


def support(t: Any, density: float) -> np.ndarray:
    """The top-``⌈density·n⌉`` entries of ``t`` by magnitude that are non-zero (ties: lowest index first),
    as a flat bool array (:func:`patchctl.patches.diagnostics.top_support`)."""
    bits, n = t.ints(), t.numel()
    nz = (bits & KEY_MASK[t.dtype]) != 0
    k = min(n, math.ceil(density * n))
    if k <= 0:
        return np.zeros(n, dtype=bool)
    kept = top(bits, t.dtype, k)
    if isinstance(kept, bool):
        return nz if kept else np.zeros(n, dtype=bool)
    return kept.keep(bits, t.dtype) & nz


def positive(t: Any) -> np.ndarray:
    """``x > 0`` for each entry of ``t`` (False for zeros and NaN), from its bits."""
    bits = t.ints()
    key = bits & KEY_MASK[t.dtype]
    sign = bits >> (8 * bits.itemsize - 1)
    return (sign == 0) & (key != 0) & (key <= INF_KEY[t.dtype])


__all__ = ["Drops", "Top", "count_nonzero", "dare", "kth_key", "l1_sums", "merge", "sign_counts", "support", "top"]
