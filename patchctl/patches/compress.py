"""Patch compression: magnitude top-k (ComPEFT), DARE, ternary or fp16/bf16 values.

A patch is given as a *stream*: a callable that returns a fresh iterator over
``(name, tensor)`` pairs each time it is called, so a caller can read tensors
from disk one at a time. Global top-k reads the stream twice (three times when
a float32 tensor holds entries in the threshold's histogram bin); peak memory
is about two copies of the largest tensor, plus at most 64 MiB of per-thread
histograms of large fp16/bf16 tensors kept from the first read (they spare
the selection a counting pass). Tensors must be float32, float16 or
bfloat16, finite (NaN/Inf raise :class:`InvalidPatch` naming the tensor), and
the stream must give the same names, shapes and values on every call.

Where the optional C kernels are built (``patchctl/_kernels.c``, loaded by
:mod:`patchctl.patches.native`), the fp16/bf16 histogram, counting and selection
passes run in C; the results are identical to the numpy path.

Public API
----------
``global_threshold(tensors, density) -> float``
    ComPEFT's threshold: with ``n`` entries over all tensors and
    ``m = int(n * density)``, the ``(n - m)``-th smallest ``|x|`` (torch
    ``kthvalue`` semantics). 0.0 when ``m >= n`` (density 1), ``inf`` when the
    patch has no entries. Exact; found from a 2**18-bin histogram of the
    float32 bit patterns of ``|x|`` (exact for fp16/bf16 entries), refined with
    an 8192-bin histogram of the low bits when float32 entries share the bin.
    For fp16/bf16 tensors, one histogram of the 2**16 raw bit patterns gives
    both the counts and, exactly per value, the sums behind ``std``.
``sparsify(tensors, density, *, mode="ternary", scale="std", kappa=1.0,
per_tensor=False, seed=0, values_dtype=torch.float16) -> Iterator[(name, SparseTensor)]``
    Yields one :class:`~patchctl.patches.codec.SparseTensor` per input tensor,
    in stream order, with the input's shape and dtype. Entries equal to zero
    are never stored (they decode to zero either way).

    * ``mode="ternary"`` (ComPEFT): keep ``|x| >= threshold`` (ties kept), the
      threshold global over the stream (or per tensor with ``per_tensor``);
      each kept entry becomes ``alpha * sign(x)``. ``scale="std"``:
      ``alpha = kappa * std(x)`` with the unbiased std over the whole unpruned
      patch (per tensor with ``per_tensor``), as ComPEFT; one alpha for all
      tensors. ``scale="mean"``: ``alpha = mean(|x_kept|)`` per tensor, the
      L2-optimal alpha for a fixed support (BitDelta's initialization;
      ``kappa`` is ignored). A patch (or tensor) with one entry has no
      unbiased std; ``"std"`` then falls back to ``"mean"``.
    * ``mode="values"``: same selection; kept entries keep their value, cast
      to ``values_dtype`` (float16, bfloat16 or float32).
    * ``mode="dare"`` (Yu et al. 2023): each entry is kept with probability
      ``density`` (dropped with ``p = 1 - density``) and survivors are scaled
      by ``1 / (1 - p)``, computed in float32 then cast to ``values_dtype``.
      The mask of tensor ``name`` comes from ``torch.rand(numel)`` (float32)
      under a ``torch.Generator`` seeded with the first 8 bytes (little-endian,
      top bit cleared) of ``sha256(f"{seed}:{name}")``: deterministic per
      (seed, name), independent of the other tensors. ``scale``, ``kappa`` and
      ``per_tensor`` do not apply.

    Arguments are checked when called (:class:`InvalidArgument`); the stream
    is read lazily, as the iterator is consumed. A value that overflows
    ``values_dtype`` raises :class:`InvalidArgument`.
``relative_l2_error(dense, sp) -> float``
    ``||dense - to_dense(sp)|| / ||dense||`` in float64 (0.0 if both are 0).
``entropy_bound_bits(density) -> float``
    ``H(d) + d`` bits per parameter: the Shannon bound for the positions of a
    uniformly random support of density ``d`` plus one sign bit per kept entry.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from patchctl.errors import InvalidArgument, InvalidPatch
from patchctl.patches import native
from patchctl.patches.codec import SparseTensor, _pmap, to_dense

__all__ = [
    "TensorStream",
    "global_threshold",
    "sparsify",
    "relative_l2_error",
    "entropy_bound_bits",
]

TensorStream = Callable[[], Iterable[tuple[str, torch.Tensor]]]

_KEY_SHIFT = 13  # histogram key = float32 bits of |x| >> 13 (exact for fp16 and bf16)
_NKEYS = 1 << (31 - _KEY_SHIFT)
_SUB = 1 << _KEY_SHIFT
_F32_INF = 0x7F800000

# float16 magnitudes 0..0x7C00 (inf): their float32 bit patterns and float64 values
_F16_ABS = np.arange(0x7C01, dtype=np.uint16).view(np.float16)
_F16_BITS32 = _F16_ABS.astype(np.float32).view(np.uint32)
_F16_KEYS = (_F16_BITS32[:0x7C00] >> _KEY_SHIFT).astype(np.int64)
_F16_F64 = _F16_ABS[:0x7C00].astype(np.float64)
_BF16_KEYS = np.arange(0x7F80, dtype=np.int64) << 3
_BF16_F64 = (np.arange(0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_VALUES_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- argument checks


def _check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
        raise InvalidArgument(f"density must be a number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise InvalidArgument(f"density must be in (0, 1], got {density!r}")
    return d


def _check_stream(tensors: object) -> TensorStream:
    if not callable(tensors):
        raise InvalidArgument(
            "tensors must be a callable returning an iterator of (name, tensor), "
            f"e.g. lambda: iter(state_dict.items()); got {type(tensors).__name__}"
        )
    return tensors  # type: ignore[return-value]


# --------------------------------------------------------------------------- per-tensor scan


_CHUNK = 1 << 20  # entries per step of the histogram passes (keeps temporaries small)
_SEL_CHUNK = 1 << 17  # entries per step of the selection pass (temporaries stay in cache)
_PART_HISTS_MAX_BYTES = 64 << 20  # per-part histograms kept between passes (saves a counting pass)
_SMALL = 1 << 14  # below this many entries, histograms come from np.unique
_PARALLEL_MIN = 1 << 21  # tensors this large are split over torch.get_num_threads() threads
_KEEP_HIST_MIN = 1 << 18  # fp16/bf16 tensors this large keep their |x| histogram for the selection

def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    b = [i * n // parts for i in range(parts + 1)]
    return [(b[i], b[i + 1]) for i in range(parts) if b[i + 1] > b[i]]


@dataclass
class _Flat:
    """One tensor, flattened, with its float bits viewed as signed ints."""

    name: str
    shape: tuple[int, ...]
    tensor: torch.Tensor  # flat, contiguous, CPU
    bits: np.ndarray  # int16 (fp16/bf16) or int32 (fp32) view of tensor
    # fp16/bf16 tensors split over threads or of 2**18 entries or more: the scan's |x|
    # histogram of each part (int32, by |x| bit pattern), so the selection knows each
    # part's count without a counting pass
    part_hists: tuple[list[tuple[int, int]], list[np.ndarray]] | None = None

    @property
    def wide(self) -> bool:
        return self.tensor.dtype == torch.float32

    @property
    def n(self) -> int:
        return self.bits.shape[0]

    @property
    def absmask(self) -> np.int16 | np.int32:
        return np.int32(0x7FFFFFFF) if self.wide else np.int16(0x7FFF)

    def absbits(self) -> np.ndarray:
        return self.bits & self.absmask


def _flat(name: object, t: object) -> _Flat:
    if not isinstance(t, torch.Tensor):
        raise InvalidPatch(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.dtype not in _SUPPORTED:
        raise InvalidPatch(
            f"tensor {name!r} has dtype {t.dtype}; compression takes float32, float16 or bfloat16"
        )
    flat = t.detach().reshape(-1).cpu().contiguous()
    bits = flat.view(torch.int32 if flat.dtype == torch.float32 else torch.int16).numpy()
    return _Flat(str(name), tuple(t.shape), flat, bits)


def _nonfinite(f: _Flat) -> InvalidPatch:
    return InvalidPatch(f"tensor {f.name!r} contains NaN or Inf; a patch must be finite")


@dataclass
class _Stats:
    """Count, mean and sum of squared deviations (Chan et al. merge), float64."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta * delta * self.n * n / tot
        self.n = tot

    def std(self) -> float | None:
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1)) if self.n >= 2 else None


def _scan(f: _Flat, hist: np.ndarray, hist32: np.ndarray, stats: _Stats | None) -> None:
    """Add ``f``'s |x| histogram to ``hist`` (float32 entries also to ``hist32``)."""
    n = f.n
    if n == 0:
        return
    parts = _ranges(n, max(1, torch.get_num_threads()) if n >= _PARALLEL_MIN else 1)
    if f.wide:
        def part32(r: tuple[int, int]) -> tuple[np.ndarray | tuple, int, _Stats]:
            absb = f.bits[r[0] : r[1]] & np.int32(0x7FFFFFFF)
            top = int(absb.max())
            absb >>= _KEY_SHIFT
            if r[1] - r[0] < _SMALL:  # skip bincount's 2 MiB output for small tensors
                h = np.unique(absb, return_counts=True)
            else:
                h = torch.bincount(torch.from_numpy(absb), minlength=_NKEYS).numpy()
            del absb
            st = _Stats()
            if stats is not None and top < _F32_INF:
                # float64, chunk by chunk (torch.var_mean is ~6x slower on CPU)
                x = f.bits[r[0] : r[1]].view(np.float32)
                for s in range(0, len(x), 1 << 16):
                    c = x[s : s + (1 << 16)].astype(np.float64)
                    cm = float(c.sum()) / len(c)
                    c -= cm
                    st.merge(len(c), cm, float(np.einsum("i,i->", c, c)))
            return h, top, st

        for h, top, st in _pmap(part32, parts):
            if top >= _F32_INF:
                raise _nonfinite(f)
            if isinstance(h, tuple):
                hist[h[0]] += h[1]
                hist32[h[0]] += h[1]
            else:
                hist += h
                hist32 += h
            if stats is not None:
                stats.merge(st.n, st.mean, st.m2)
        return
    fp16 = f.tensor.dtype == torch.float16

    def part16(r: tuple[int, int]) -> np.ndarray:
        # one histogram of the raw 16-bit patterns gives the |x| histogram, the sum and
        # the sum of squares (exactly: every entry is one of 2**16 values)
        if native.lib is not None:
            h = np.zeros(0x10000, dtype=np.int64)
            if native.lib.pc_hist16(native.ptr(f.bits) + 2 * r[0], r[1] - r[0], native.ptr(h)) != 0:
                raise MemoryError("patchctl._kernels: hist16 could not allocate its 1 MiB scratch")
            return h
        if r[1] - r[0] < _SMALL:
            h = np.zeros(0x10000, dtype=np.int64)
            keys, counts = np.unique(f.bits[r[0] : r[1]].view(np.uint16), return_counts=True)
            h[keys] = counts
            return h
        acc = torch.zeros(0x10000, dtype=torch.int64)
        step = min(r[1] - r[0], _CHUNK)
        buf = np.empty(step, dtype=np.int32)  # torch.bincount takes no uint16
        for s in range(r[0], r[1], step):
            c = f.bits[s : min(s + step, r[1])]
            x = buf[: len(c)]
            np.copyto(x, c.view(np.uint16))
            acc += torch.bincount(torch.from_numpy(x), minlength=0x10000)
        return acc.numpy()

    results = _pmap(part16, parts)
    if len(parts) > 1 or n >= _KEEP_HIST_MIN:
        f.part_hists = (parts, [(r[:0x8000] + r[0x8000:]).astype(np.int32) for r in results])
    h = results[0] if len(results) == 1 else sum(results)
    pos, neg = h[:0x8000], h[0x8000:]
    lim = 0x7C00 if fp16 else 0x7F80
    if pos[lim:].any() or neg[lim:].any():
        raise _nonfinite(f)
    pos, neg = pos[:lim], neg[:lim]
    habs = pos + neg
    hist[_F16_KEYS if fp16 else _BF16_KEYS] += habs
    if stats is not None:
        vals = _F16_F64 if fp16 else _BF16_F64
        mean = float(np.sum((pos - neg) * vals)) / n
        sumsq = float(np.sum(habs * (vals * vals)))  # not np.dot: BLAS threads cost ms here
        stats.merge(n, mean, max(sumsq - n * mean * mean, 0.0))


def _refine(f: _Flat, b: int, sub: np.ndarray) -> None:
    """Add the low-bit histogram of ``f``'s float32 entries in key bin ``b`` to ``sub``."""
    if f.wide and f.n:
        absb = f.absbits()
        inbin = absb[(absb >> _KEY_SHIFT) == b] & (_SUB - 1)
        sub += np.bincount(inbin, minlength=_SUB)


def _kth_bits(
    hist: np.ndarray,
    hist32: np.ndarray,
    n: int,
    density: float,
    refine: Callable[[int], np.ndarray],
) -> int | None:
    """float32 bit pattern of ComPEFT's threshold; 0 to keep all, None if n == 0."""
    if n == 0:
        return None
    m = int(n * density)
    if m >= n:
        return 0
    kth = n - m  # 1-based rank of the threshold among |x| ascending
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, kth, side="left"))
    rank = kth - (int(cum[b - 1]) if b else 0)
    if hist32[b] == 0:
        return b << _KEY_SHIFT  # every entry in the bin is one fp16/bf16 value
    sub = refine(b)
    sub[0] += int(hist[b] - hist32[b])  # fp16/bf16 entries sit at low bits 0
    if int(sub.sum()) != int(hist[b]):
        raise InvalidArgument("tensors() gave different values on a later pass; it must be repeatable")
    s = int(np.searchsorted(np.cumsum(sub), rank, side="left"))
    return (b << _KEY_SHIFT) | s


def _native_threshold(f: _Flat, tbits: int) -> int:
    """Smallest |x| bit pattern of ``f``'s dtype whose value is >= float32 bits ``tbits``, >= 1."""
    if f.wide:
        u = tbits
    elif f.tensor.dtype == torch.float16:
        u = int(np.searchsorted(_F16_BITS32, np.uint32(tbits), side="left"))
    else:
        u = (tbits + 0xFFFF) >> 16
    return max(u, 1)  # never keep zeros


def _bits_to_float(tbits: int) -> float:
    return float(np.array(tbits, dtype=np.uint32).view(np.float32))


class _Pass:
    """One read of the stream, checking it gives the same names and sizes as the first."""

    def __init__(self, tensors: TensorStream) -> None:
        self.tensors = tensors
        self.layout: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None
        self.part_hists: dict[int, tuple[list[tuple[int, int]], list[np.ndarray]]] = {}
        self.part_hists_bytes = 0

    def __call__(self) -> Iterator[_Flat]:
        seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        it = self.tensors()
        try:
            it = iter(it)
        except TypeError:
            raise InvalidArgument("tensors() must return an iterable of (name, tensor)") from None
        for item in it:
            try:
                name, t = item
            except (TypeError, ValueError):
                raise InvalidArgument("tensors() must yield (name, tensor) pairs") from None
            f = _flat(name, t)
            seen.append((f.name, f.shape, f.tensor.dtype))
            if self.layout is not None and (
                len(seen) > len(self.layout) or seen[-1] != self.layout[len(seen) - 1]
            ):
                raise InvalidArgument("tensors() gave different tensors on a later pass; it must be repeatable")
            pos = len(seen) - 1
            if self.layout is not None:
                f.part_hists = self.part_hists.get(pos)
            yield f
            if self.layout is None and f.part_hists is not None:
                size = sum(h.nbytes for h in f.part_hists[1])
                if self.part_hists_bytes + size <= _PART_HISTS_MAX_BYTES:
                    self.part_hists[pos] = f.part_hists
                    self.part_hists_bytes += size
        if self.layout is None:
            self.layout = seen
        elif len(seen) != len(self.layout):
            raise InvalidArgument("tensors() gave different tensors on a later pass; it must be repeatable")


def _threshold(
    passes: Callable[[], Iterable[_Flat]], density: float, stats: _Stats | None
) -> int | None:
    hist = np.zeros(_NKEYS, dtype=np.int64)
    hist32 = np.zeros(_NKEYS, dtype=np.int64)
    n = 0
    for f in passes():
        _scan(f, hist, hist32, stats)
        n += f.n

    def refine(b: int) -> np.ndarray:
        sub = np.zeros(_SUB, dtype=np.int64)
        for f in passes():
            _refine(f, b, sub)
        return sub

    return _kth_bits(hist, hist32, n, density, refine)


# --------------------------------------------------------------------------- public API


def global_threshold(tensors: TensorStream, density: float) -> float:
    """ComPEFT's global magnitude threshold (see the module docstring)."""
    d = _check_density(density)
    tbits = _threshold(_Pass(_check_stream(tensors)), d, None)
    if tbits is None:
        return math.inf
    return _bits_to_float(tbits)


def _select(
    f: _Flat, tbits: int | None, want_signs: bool, want_abs_sum: bool
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Flat positions with |x| >= threshold (never zeros), their signs, sum of their |x|."""
    n = f.n
    if tbits is None or n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.bool_), 0.0
    u = _native_threshold(f, tbits)
    table = None if f.wide else _F16_F64 if f.tensor.dtype == torch.float16 else _BF16_F64
    workers = max(1, torch.get_num_threads()) if n >= _PARALLEL_MIN else 1
    parts = _ranges(n, workers)

    def chunks(r: tuple[int, int]) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, entries, |x| bits, mask) per chunk of ``r``, in buffers reused from chunk to chunk."""
        step = min(r[1] - r[0], _SEL_CHUNK)
        absb = np.empty(step, dtype=f.bits.dtype)
        mask = np.empty(step, dtype=np.bool_)
        for s in range(r[0], r[1], step):
            c = f.bits[s : min(s + step, r[1])]
            a, m = absb[: len(c)], mask[: len(c)]
            np.bitwise_and(c, f.absmask, out=a)
            np.greater_equal(a, u, out=m)
            yield s, c, a, m

    # each part's count first, so that it writes its positions straight into the output:
    # from the scan's histograms when it kept them, else from a counting pass
    if f.part_hists is not None and f.part_hists[0] == parts:
        counts = [int(h[u:].sum(dtype=np.int64)) for h in f.part_hists[1]]
    elif native.lib is not None and not f.wide:
        counts = _pmap(lambda r: int(native.lib.pc_count16(native.ptr(f.bits) + 2 * r[0], r[1] - r[0], u)), parts)
    else:
        counts = _pmap(lambda r: sum(int(np.count_nonzero(m)) for _, _, _, m in chunks(r)), parts)
    offsets = np.cumsum([0, *counts]).tolist()
    idx = np.empty(offsets[-1], dtype=np.int64)
    signs = np.empty(offsets[-1], dtype=np.bool_) if want_signs else None

    if native.lib is not None and not f.wide and not want_abs_sum:
        sign_ptr = native.ptr(signs.view(np.uint8)) if signs is not None else 0

        def fill_native(j: int) -> None:
            (s, e), o = parts[j], offsets[j]
            got = native.lib.pc_select16(
                native.ptr(f.bits) + 2 * s, e - s, u, s, native.ptr(idx) + 8 * o,
                sign_ptr + o if sign_ptr else 0, offsets[j + 1] - o,
            )
            if got != offsets[j + 1] - o:
                raise InvalidArgument(f"tensor {f.name!r} changed while it was being compressed")

        _pmap(fill_native, list(range(len(parts))))
        return idx, signs, 0.0

    def fill(j: int) -> float:
        o = offsets[j]
        abs_sum = 0.0
        kept_bits = np.empty(min(parts[j][1] - parts[j][0], _SEL_CHUNK), dtype=f.bits.dtype)
        for s, c, a, m in chunks(parts[j]):
            nz = np.flatnonzero(m)
            e = o + len(nz)
            if e > offsets[j + 1]:
                break  # the tensor changed under us; caught below
            if signs is not None:
                np.less(np.take(c, nz, out=kept_bits[: len(nz)]), 0, out=signs[o:e])
            if want_abs_sum:
                kept = a[nz]
                vals = kept.view(np.float32) if table is None else table[kept]
                abs_sum += float(np.sum(vals, dtype=np.float64))
            np.add(nz, s, out=idx[o:e])
            o = e
        if o != offsets[j + 1]:
            raise InvalidArgument(f"tensor {f.name!r} changed while it was being compressed")
        return abs_sum

    abs_sums = _pmap(fill, list(range(len(parts))))
    return idx, signs, sum(abs_sums)


def _cast_values(f: _Flat, vals: torch.Tensor, values_dtype: torch.dtype) -> torch.Tensor:
    out = vals.to(values_dtype)
    if out.numel() and not bool(torch.isfinite(out).all()):
        raise InvalidArgument(
            f"tensor {f.name!r} has values that overflow {values_dtype}; use values_dtype=torch.bfloat16"
        )
    return out


def _make(
    f: _Flat, tbits: int | None, mode: str, alpha: float | None, values_dtype: torch.dtype
) -> SparseTensor:
    if mode == "ternary":
        idx, signs, abs_sum = _select(f, tbits, True, alpha is None)
        if alpha is None:  # scale="mean"
            alpha = abs_sum / len(idx) if len(idx) else 0.0
        return SparseTensor(f.shape, f.tensor.dtype, idx, "ternary", signs=signs, scale=alpha)
    idx, _, _ = _select(f, tbits, False, False)
    vals = _cast_values(f, f.tensor[torch.from_numpy(idx)], values_dtype)
    return SparseTensor(f.shape, f.tensor.dtype, idx, "values", values=vals)


def _dare_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dare(f: _Flat, density: float, seed: int, values_dtype: torch.dtype, shape: tuple[int, ...]) -> SparseTensor:
    n = f.n
    g = torch.Generator().manual_seed(_dare_seed(seed, f.name))
    keep = torch.rand(n, generator=g, dtype=torch.float32) < density
    if n:
        absb = f.absbits()
        if int(absb.max()) >= (_F32_INF if f.wide else 0x7C00 if f.tensor.dtype == torch.float16 else 0x7F80):
            raise _nonfinite(f)
        keep &= torch.from_numpy(absb != 0)
    idx = np.flatnonzero(keep.numpy())
    vals = f.tensor[torch.from_numpy(idx)].to(torch.float32) * (1.0 / density)
    return SparseTensor(shape, f.tensor.dtype, idx, "values", values=_cast_values(f, vals, values_dtype))


def sparsify(
    tensors: TensorStream,
    density: float,
    *,
    mode: str = "ternary",
    scale: str = "std",
    kappa: float = 1.0,
    per_tensor: bool = False,
    seed: int = 0,
    values_dtype: torch.dtype = torch.float16,
) -> Iterator[tuple[str, SparseTensor]]:
    """Compress a patch stream tensor by tensor (see the module docstring)."""
    d = _check_density(density)
    stream = _check_stream(tensors)
    if mode not in ("ternary", "values", "dare"):
        raise InvalidArgument(f"mode must be 'ternary', 'values' or 'dare', got {mode!r}")
    if scale not in ("std", "mean"):
        raise InvalidArgument(f"scale must be 'std' or 'mean', got {scale!r}")
    if (
        isinstance(kappa, bool)
        or not isinstance(kappa, (int, float, np.floating, np.integer))
        or not math.isfinite(kappa)
        or kappa <= 0
    ):
        raise InvalidArgument(f"kappa must be a finite number > 0, got {kappa!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgument(f"seed must be an int, got {seed!r}")
    if values_dtype not in _VALUES_DTYPES:
        raise InvalidArgument(f"values_dtype must be float16, bfloat16 or float32, got {values_dtype!r}")
    return _sparsify(stream, d, mode, scale, float(kappa), bool(per_tensor), int(seed), values_dtype)


def _sparsify(
    stream: TensorStream,
    d: float,
    mode: str,
    scale: str,
    kappa: float,
    per_tensor: bool,
    seed: int,
    values_dtype: torch.dtype,
) -> Iterator[tuple[str, SparseTensor]]:
    passes = _Pass(stream)
    want_std = mode == "ternary" and scale == "std"

    def alpha_of(stats: _Stats | None) -> float | None:
        if stats is None:
            return None
        std = stats.std()
        return None if std is None else kappa * std

    if mode == "dare" or per_tensor:
        for name, t in stream():
            f = _flat(name, t)
            if mode == "dare":
                yield f.name, _dare(f, d, seed, values_dtype, f.shape)
                continue
            stats = _Stats() if want_std else None
            tbits = _threshold(lambda f=f: [f], d, stats)
            yield f.name, _make(f, tbits, mode, alpha_of(stats), values_dtype)
        return

    stats = _Stats() if want_std else None
    tbits = _threshold(passes, d, stats)
    alpha = alpha_of(stats)
    for f in passes():
        yield f.name, _make(f, tbits, mode, alpha, values_dtype)


def relative_l2_error(dense: torch.Tensor, sp: SparseTensor) -> float:
    """``||dense - to_dense(sp)|| / ||dense||``, computed in float64."""
    if not isinstance(dense, torch.Tensor) or tuple(dense.shape) != sp.shape:
        raise InvalidArgument(
            f"dense tensor shape {tuple(getattr(dense, 'shape', ()))} does not match sparse shape {sp.shape}"
        )
    ref = dense.detach().cpu().to(torch.float64)
    err = torch.linalg.vector_norm(ref - to_dense(sp).to(torch.float64)).item()
    norm = torch.linalg.vector_norm(ref).item()
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


def entropy_bound_bits(density: float) -> float:
    """``H(d) + d``: bits per parameter for a random support of density ``d`` plus signs."""
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
        raise InvalidArgument(f"density must be a number in [0, 1], got {density!r}")
    d = float(density)
    if not 0.0 <= d <= 1.0:
        raise InvalidArgument(f"density must be in [0, 1], got {density!r}")
    if d in (0.0, 1.0):
        return d
    return -d * math.log2(d) - (1 - d) * math.log2(1 - d) + d
