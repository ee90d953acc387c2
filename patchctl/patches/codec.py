"""Canonical bytes for one sparse patch tensor (the output of ``compress.sparsify``).

A :class:`SparseTensor` is a dense tensor with all but ``nnz`` entries zero. It
is either *ternary* (every kept entry is ``±scale``; one sign bit each) or
*values* (every kept entry carries its own fp16/bf16/fp32 value).

Public API
----------
``SparseTensor(shape, dtype, indices, mode, signs=None, scale=None, values=None)``
    ``indices``: int64 numpy array of flat (row-major) positions, strictly
    increasing, in ``[0, numel)``. ``mode == "ternary"``: ``signs`` is a bool
    numpy array of length nnz (True = negative) and ``scale`` a finite float
    ``>= 0`` (rounded to float32 on construction). ``mode == "values"``:
    ``values`` is a 1-D CPU torch tensor of dtype float16, bfloat16 or float32
    and length nnz. ``dtype`` (float32, float16 or bfloat16) is the dtype of the
    dense tensor it decodes to. (``sparsify`` never stores zero-valued
    entries; the codec does not require that.)
``encode(sp) -> bytes``
    Canonical: equal inputs give equal bytes (for one version of the zstd
    library, see "position coding 2" below).
``decode(data) -> SparseTensor``
    Raises :class:`~patchctl.errors.InvalidPatch` on any malformed input and
    nothing else; every allocation is bounded by ``len(data)`` (at most a
    factor 65536 for a zstd section) and by ``numel``.
``to_dense(sp, device="cpu") -> torch.Tensor``
    Builds the dense tensor on ``device`` (indices, signs and values are moved
    there and scattered there).

On the CPU, :func:`encode`, :func:`decode` and :func:`to_dense` work in chunks
of 65536 positions whose temporaries are reused (they stay in cache), and
split tensors with 2**20 or more kept entries over ``torch.get_num_threads()``
threads. The bytes do not depend on the number of threads. Where the
optional C kernels are built (``patchctl/_kernels.c``, :mod:`patchctl.patches.native`),
the index check, the Rice cost and the Rice coder run in C: same bytes.

Byte format, version 1 (all integers little-endian, unsigned)
--------------------------------------------------------------
Header, ``56 + 8*ndim`` bytes::

    off  size  field
     0     4   magic  b"PCSP"
     4     1   format version = 1
     5     1   mode: 1 = ternary, 2 = values
     6     1   dense dtype: 1 = float32, 2 = float16, 3 = bfloat16
     7     1   values dtype (same codes); 0 in ternary mode
     8     1   ndim, 0..64 (0 = a scalar, numel 1)
     9     1   position coding: 0 = none (nnz = 0), 1 = Golomb-Rice,
               2 = zstd of byte-shuffled gaps, 3 = all (nnz = numel, no data)
    10     1   position parameter: Rice k (0..62) for coding 1; gap width in
               bytes (4 or 8) for coding 2; 0 otherwise
    11     1   values coding: 0 = raw, 1 = zstd of byte-shuffled values;
               0 in ternary mode
    12     4   scale, float32: ternary alpha (finite, sign bit clear);
               all-zero bytes in values mode
    16     8   nnz (<= numel)
    24     8   length of section P1 (positions)
    32     8   length of section P2 (positions)
    40     8   length of section S (signs)
    48     8   length of section V (values)
    56  8*ndim shape, one uint64 per dimension (numel <= 2**62)

followed by the sections P1, P2, S, V, in that order, with nothing after them
(the data length must be exactly header + P1 + P2 + S + V).

Gaps: ``gap[0] = indices[0]``, ``gap[i] = indices[i] - indices[i-1] - 1``.

Position coding 1, Golomb-Rice with parameter ``k``: each gap is
``q * 2**k + r``. P1 is the unary part: for each gap in order, ``q`` zero bits
then a one bit, packed MSB-first into bytes, the last byte zero-padded; P1
ends with the byte that holds the last one bit. P2 holds the remainders as
``k`` bit-planes, most significant plane first; plane ``j`` is bit ``j`` of
every ``r``, packed MSB-first and zero-padded to ``ceil(nnz/8)`` bytes, so
``len(P2) = k * ceil(nnz/8)``. The encoder picks the ``k`` with the fewest
bits (the cost is convex in ``k``; ties go to the smaller ``k``).

Position coding 2: the gaps as ``width``-byte little-endian unsigned
integers (width 4 if every gap < 2**32, else 8), byte-shuffled (all first
bytes, then all second bytes, ...), as one zstd frame (level 3, content size
recorded, no checksum) in P1; P2 is empty. zstd output is deterministic for a
given zstd library version; the Rice path depends on nothing but this spec.

The encoder uses coding 0 iff nnz = 0, 3 iff nnz = numel, else the smaller of
1 and 2 (2 is tried only when zstd of a sample of the gaps -- 3 chunks of 16384
-- predicts a 2 % win; a tie goes to 1). The decoder accepts either.

Section S (ternary only): one bit per kept entry, 1 = negative, packed
MSB-first, zero-padded to ``ceil(nnz/8)`` bytes. Empty in values mode.

Section V (values only): the values as 2- or 4-byte little-endian words.
Values coding 0: raw, ``nnz * width`` bytes. Values coding 1: byte-shuffled
like position coding 2, one zstd frame. The encoder picks the smaller (ties:
raw; zstd is tried only when a sample suggests it wins). Empty in ternary mode.

A zstd section may not claim more than 65536 times its own length (zstd
itself cannot exceed about 32768x), so a decoder never allocates more than
that from a small input.

Decoding a ternary entry gives ``±float32(scale)`` rounded to the dense
dtype; a values entry gives its value cast to the dense dtype.

The decoder rejects (InvalidPatch): a bad magic or version; unknown codes;
fields that must be zero and are not (values fields in ternary mode, scale
and signs in values mode, the parameter of codings 0 and 3); a dimension or
numel over 2**62 (even beside a zero dimension); ``nnz > numel``;
coding 0 with nnz > 0, coding 3 with nnz != numel, codings 1/2 with nnz = 0
or nnz = numel; any section length other than the one implied; nonzero
padding bits; 8-byte gaps where 4 bytes suffice; a position >= numel; a zstd
frame whose content size is not the expected size or that is followed by
more bytes.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard

from patchctl.errors import DeviceUnavailable, InvalidPatch
from patchctl.patches import native

__all__ = ["SparseTensor", "encode", "decode", "to_dense", "MAGIC", "FORMAT_VERSION"]

MAGIC = b"PCSP"
FORMAT_VERSION = 1

_HEADER = struct.Struct("<4sBBBBBBBBIQQQQQ")  # scale read as raw uint32 bits
_MAX_NDIM = 64
_MAX_NUMEL = 1 << 62
_ZSTD_LEVEL = 3
_ZSTD_MAX_RATIO = 65536
_ZSTD_SAMPLE = 16384  # gaps/values per sample chunk for the "try zstd?" estimate

_MODES = {"ternary": 1, "values": 2}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_OF_CODE = {v: k for k, v in _DTYPES.items()}
_WIDTH = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_NP_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

POS_NONE, POS_RICE, POS_ZSTD, POS_ALL = 0, 1, 2, 3
VAL_RAW, VAL_ZSTD = 0, 1


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A dense tensor of ``shape``/``dtype`` that is zero except at ``indices``.

    See the module docstring for the meaning of each field. Construction
    checks types, lengths and the mode's fields (O(1)); :func:`encode` also
    checks that ``indices`` are strictly increasing and in range (O(nnz)).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: np.ndarray
    mode: str
    signs: np.ndarray | None = None
    scale: float | None = None
    values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) > _MAX_NDIM or any(
            not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0 or d > _MAX_NUMEL for d in shape
        ):
            raise InvalidPatch(f"sparse tensor shape {self.shape!r} is not a tuple of ints in [0, 2**62]")
        shape = tuple(int(d) for d in shape)
        if math.prod(shape) > _MAX_NUMEL:
            raise InvalidPatch(f"sparse tensor shape {shape} has more than 2**62 entries")
        object.__setattr__(self, "shape", shape)
        if self.dtype not in _DTYPES:
            raise InvalidPatch(f"sparse tensor dtype {self.dtype} is not float32, float16 or bfloat16")
        idx = self.indices
        if not isinstance(idx, np.ndarray) or idx.dtype != np.int64 or idx.ndim != 1:
            raise InvalidPatch("sparse tensor indices must be a 1-D int64 numpy array")
        nnz = idx.shape[0]
        if nnz > self.numel:
            raise InvalidPatch(f"sparse tensor has {nnz} indices for {self.numel} entries")
        if self.mode == "ternary":
            s = self.signs
            if not isinstance(s, np.ndarray) or s.dtype != np.bool_ or s.shape != (nnz,):
                raise InvalidPatch(f"ternary sparse tensor needs a bool signs array of length {nnz}")
            if self.values is not None:
                raise InvalidPatch("ternary sparse tensor must not carry values")
            if (
                isinstance(self.scale, bool)
                or not isinstance(self.scale, (int, float, np.floating, np.integer))
                or not math.isfinite(self.scale)
                or self.scale < 0
                or self.scale > float(np.finfo(np.float32).max)
            ):
                raise InvalidPatch(f"ternary scale {self.scale!r} must be finite, >= 0 and fit float32")
            object.__setattr__(self, "scale", float(np.float32(self.scale)) + 0.0)
        elif self.mode == "values":
            v = self.values
            if (
                not isinstance(v, torch.Tensor)
                or v.dtype not in _DTYPES
                or v.shape != (nnz,)
                or v.device.type != "cpu"
            ):
                raise InvalidPatch(
                    f"values sparse tensor needs a 1-D CPU float32/float16/bfloat16 tensor of length {nnz}"
                )
            if self.signs is not None or self.scale is not None:
                raise InvalidPatch("values sparse tensor must not carry signs or a scale")
        else:
            raise InvalidPatch(f"sparse tensor mode {self.mode!r} is not 'ternary' or 'values'")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])


# --------------------------------------------------------------------------- threads

_CHUNK = 1 << 16  # entries per step of the chunked coders: temporaries stay in cache, reused
_PARALLEL_MIN = 1 << 20  # nnz from which the coders split the work over threads

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _pmap(fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(i) for i in items]``, on a thread pool when there are several items.

    The work is numpy/torch kernels that release the GIL, so threads give
    real parallelism; the pool has ``torch.get_num_threads()`` workers.
    """
    global _pool, _pool_workers
    workers = max(1, torch.get_num_threads())
    if workers == 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with _pool_lock:
        if _pool is None or _pool_workers != workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="patchctl-codec")
            _pool_workers = workers
        pool = _pool
    return list(pool.map(fn, items))


def _split(n: int, align: int, min_n: int = _PARALLEL_MIN) -> list[tuple[int, int]]:
    """``[0, n)`` cut into one range per worker (one if ``n < min_n``), cuts at multiples of ``align``."""
    parts = max(1, torch.get_num_threads()) if n >= min_n else 1
    cuts = [0] + [min(n, (i * n // parts) // align * align) for i in range(1, parts)] + [n]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _small_uint(k: int) -> type:
    return np.uint8 if k <= 8 else np.uint16 if k <= 16 else np.uint32 if k <= 32 else np.uint64


# --------------------------------------------------------------------------- positions: gaps


def _bad_indices() -> InvalidPatch:
    return InvalidPatch("sparse tensor indices must be strictly increasing and in [0, numel)")


def _chunk_gaps(idx: np.ndarray, s: int, e: int, out: np.ndarray) -> np.ndarray:
    """Gaps ``idx[s:e] - idx[s-1:e-1] - 1`` (``idx[0]`` for the first) into ``out[: e - s]``."""
    g = out[: e - s]
    if s == 0:
        g[0] = idx[0]
        np.subtract(idx[1:e], idx[: e - 1], out=g[1:])
        g[1:] -= 1
    else:
        np.subtract(idx[s:e], idx[s - 1 : e - 1], out=g)
        g -= 1
    return g


def _gap_sums(idx: np.ndarray, numel: int, ks: list[int], check: bool) -> tuple[np.ndarray, int]:
    """Per chunk of ``_CHUNK`` gaps, ``sum(gap >> k)`` for each ``k`` in ``ks``, and the largest gap.

    With ``check``, raises InvalidPatch unless ``idx`` is strictly increasing
    in ``[0, numel)``. One pass, chunk by chunk, split over threads.
    """
    nnz = len(idx)
    nchunks = -(-nnz // _CHUNK)
    sums = np.zeros((nchunks, len(ks)), dtype=np.int64)
    if native.lib is not None and idx.flags.c_contiguous:
        def native_part(r: tuple[int, int]) -> int:
            gmax = np.zeros(1, dtype=np.int64)
            row = native.ptr(sums) + 8 * len(ks) * (r[0] // _CHUNK)
            rc = native.lib.pc_gap_sums(
                native.ptr(idx), r[0], r[1], numel, ks[0] if ks else 0, len(ks), _CHUNK, row, native.ptr(gmax), int(check)
            )
            if rc != 0:
                raise _bad_indices()
            return int(gmax[0])

        return sums, max(_pmap(native_part, _split(nnz, _CHUNK)))

    def part(r: tuple[int, int]) -> int:
        g_buf = np.empty(_CHUNK, dtype=np.int64)
        t_buf = np.empty(_CHUNK, dtype=np.int64)
        gmax = 0
        for s in range(r[0], r[1], _CHUNK):
            e = min(s + _CHUNK, r[1])
            if check:
                c = idx[max(s - 1, 0) : e]  # with the previous index: no int64 overflow below
                if int(c.min()) < 0 or int(c.max()) >= numel:
                    raise _bad_indices()
            g = _chunk_gaps(idx, s, e, g_buf)
            if check and int(g.min()) < 0:
                raise _bad_indices()
            gmax = max(gmax, int(g.max()))
            if ks:  # ks are consecutive: shift once, then one more bit per k
                t = np.right_shift(g, ks[0], out=t_buf[: e - s])
                row = sums[s // _CHUNK]
                row[0] = np.add.reduce(t)
                for j in range(1, len(ks)):
                    row[j] = np.add.reduce(np.right_shift(t, 1, out=t))
        return gmax

    return sums, max(_pmap(part, _split(nnz, _CHUNK)))


def _gap_slice(idx: np.ndarray, s: int, e: int) -> np.ndarray:
    return _chunk_gaps(idx, s, e, np.empty(e - s, dtype=np.int64))


def _gap_sample(idx: np.ndarray) -> np.ndarray:
    """The gaps at the positions ``_sample_chunks`` takes (all gaps when there are few)."""
    n = len(idx)
    if n <= 3 * _ZSTD_SAMPLE:
        return _gap_slice(idx, 0, n)
    mid = (n - _ZSTD_SAMPLE) // 2
    return np.concatenate(
        [_gap_slice(idx, 0, _ZSTD_SAMPLE), _gap_slice(idx, mid, mid + _ZSTD_SAMPLE), _gap_slice(idx, n - _ZSTD_SAMPLE, n)]
    )


# --------------------------------------------------------------------------- positions: Rice


def _rice_k_guess(mean: float) -> int:
    """The optimal ``k`` for a geometric source with this mean gap (Gallager & van Voorhis)."""
    p = 1.0 / (max(mean, 0.0) + 1.0)
    if p >= 0.5:
        return 0
    return max(0, min(62, math.ceil(math.log2(math.log(0.6180339887498949) / math.log1p(-p)))))


def _rice_best_k(idx: np.ndarray, numel: int) -> tuple[int, int, np.ndarray, int]:
    """Check ``idx``; the ``k`` with the fewest Rice bits (ties: smaller ``k``), those bits,
    the per-chunk ``sum(gap >> k)`` for that ``k``, and the largest gap.

    cost(k) = sum(gap >> k) + nnz * (k + 1) is convex in k. One pass computes
    it for the guess and its two neighbours; a further pass is needed only
    when the optimum lies farther away.
    """
    nnz = len(idx)
    k0 = _rice_k_guess((float(idx[-1]) - (nnz - 1)) / nnz)  # mean gap, if idx is valid
    ks = [k for k in (k0 - 1, k0, k0 + 1) if 0 <= k <= 62]
    sums, gmax = _gap_sums(idx, numel, ks, check=True)
    per_k = {k: sums[:, j] for j, k in enumerate(ks)}

    def cost(k: int) -> int:
        if k not in per_k:
            per_k[k] = _gap_sums(idx, numel, [k], check=False)[0][:, 0]
        return int(per_k[k].sum()) + nnz * (k + 1)

    k = k0
    best = cost(k)
    while k > 0:  # walk down while it does not get worse, then up while it gets better
        c = cost(k - 1)
        if c > best:
            break
        k, best = k - 1, c
    while k < 62:
        c = cost(k + 1)
        if c >= best:
            break
        k, best = k + 1, c
    return k, best, per_k[k], gmax


def _rice_encode(idx: np.ndarray, k: int, chunk_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P1 and P2 of ``idx``'s gaps with parameter ``k`` (``chunk_q``: per-chunk ``sum(gap >> k)``).

    The chunks' bit offsets in P1 are known in advance, so the threads write
    their ranges of P1 and P2 directly; the byte a thread shares with the one
    before it is OR-ed in after they finish.
    """
    nnz = len(idx)
    lens = chunk_q + np.minimum(_CHUNK, nnz - np.arange(len(chunk_q), dtype=np.int64) * _CHUNK)
    offs = np.concatenate([[0], np.cumsum(lens)])  # bit offset of each chunk's unary codes
    p1 = np.zeros((int(offs[-1]) + 7) // 8, dtype=np.uint8)
    plane = (nnz + 7) // 8
    p2 = np.empty(k * plane, dtype=np.uint8)
    if native.lib is not None and idx.flags.c_contiguous:
        def native_part(r: tuple[int, int]) -> tuple[int, int]:
            head = np.zeros(1, dtype=np.uint8)
            off = int(offs[r[0] // _CHUNK])
            native.lib.pc_rice_encode(
                native.ptr(idx), r[0], r[1], k, native.ptr(p1), off, native.ptr(p2), plane, native.ptr(head)
            )
            return off >> 3, int(head[0])

        for b0, byte in _pmap(native_part, _split(nnz, _CHUNK)):
            p1[b0] |= byte
        return p1, p2
    small = _small_uint(k)
    planes = [(p * plane, small(1 << (k - 1 - p))) for p in range(k)]

    def part(r: tuple[int, int]) -> tuple[int, int]:
        g_buf = np.empty(_CHUNK, dtype=np.int64)
        r_buf = np.empty(_CHUNK, dtype=small)
        b_buf = np.empty(_CHUNK, dtype=small)
        bits = np.empty(0, dtype=np.bool_)  # numpy scatters True into bool faster than 1 into uint8
        head = (0, 0)
        for s in range(r[0], r[1], _CHUNK):
            e = min(s + _CHUNK, r[1])
            g = _chunk_gaps(idx, s, e, g_buf)
            off = int(offs[s // _CHUNK])
            lo = off & 7
            nbits = lo + int(lens[s // _CHUNK])
            if len(bits) < nbits:
                bits = np.empty(max(nbits, 4 * _CHUNK), dtype=np.bool_)
            if k:  # remainders first: the unary pass below overwrites g
                rr = r_buf[: e - s]
                np.copyto(rr, g, casting="unsafe")  # wraps; only the low k bits are used
                bb = b_buf[: e - s]
                for base, bit in planes:
                    packed = np.packbits(np.bitwise_and(rr, bit, out=bb))
                    p2[base + s // 8 : base + s // 8 + len(packed)] = packed
            np.right_shift(g, k, out=g)
            g += 1
            ends = np.cumsum(g, out=g)
            ends += lo - 1  # position of each terminating one bit, from the chunk's first byte
            b = bits[:nbits]
            b.fill(False)
            b[ends] = True
            packed = np.packbits(b)
            b0 = off >> 3
            if s == r[0]:
                head = (b0, int(packed[0]))
            else:
                p1[b0] |= packed[0]
            p1[b0 + 1 : b0 + len(packed)] = packed[1:]
        return head

    for b0, byte in _pmap(part, _split(nnz, _CHUNK)):
        p1[b0] |= byte
    return p1, p2


def _unpack_exact(data: bytes | memoryview, nbits: int, what: str) -> np.ndarray:
    """MSB-first bits of ``data`` (which must be exactly ceil(nbits/8) bytes, zero-padded)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    _check_padding(buf, nbits, what)
    return np.unpackbits(buf, count=nbits)


def _check_padding(buf: np.ndarray, nbits: int, what: str) -> None:
    if len(buf) != (nbits + 7) // 8:
        raise InvalidPatch(f"{what}: section has {len(buf)} bytes, expected {(nbits + 7) // 8}")
    if nbits % 8 and buf[-1] & ((1 << (8 - nbits % 8)) - 1):
        raise InvalidPatch(f"{what}: padding bits are not zero")


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcounts(buf: np.ndarray) -> np.ndarray:
    """Set bits of each byte of ``buf`` (uint8)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(buf)
    return _POPCOUNT8[buf]


def _popcount(buf: np.ndarray) -> int:
    return int(_popcounts(buf).sum(dtype=np.int64))


def _ones_before(buf: np.ndarray, i: int) -> int:
    """Set bits among the first ``i`` bits (MSB-first) of ``buf``."""
    n = _popcount(buf[: i >> 3])
    if i & 7:
        n += int(buf[i >> 3] >> (8 - (i & 7))).bit_count()
    return n


_DEC_BYTES = 1 << 14  # P1 bytes per step of the Rice decoder

# the 8 bits of a byte, MSB first, as 8 uint8 lanes of one uint64; and of two bytes
# (plane a, plane b) as the lanes 2*a_bit + b_bit
_BITS8 = np.unpackbits(np.arange(256, dtype=np.uint8)).reshape(256, 8)
_LANES1 = np.ascontiguousarray(_BITS8).view(np.uint64).reshape(256)
_LANES2 = np.ascontiguousarray(
    ((_BITS8[:, None, :] << 1) | _BITS8[None, :, :]).reshape(65536, 8)
).view(np.uint64).reshape(65536)


def _remainders(planes: list[np.ndarray], i: int, m: int) -> np.ndarray:
    """The remainders of positions ``i .. i+m-1`` from ``k <= 8`` bit planes (MSB plane first), as uint8.

    Two planes at a time, a byte of each gives the 8 remainders' bits as the
    lanes of one uint64 from a table; a lane never exceeds ``2**k - 1 < 256``.
    """
    lo, hi = i >> 3, (i + m + 7) >> 3

    def pair(p: int) -> np.ndarray:
        key = planes[p][lo:hi].astype(np.uint16)
        key <<= np.uint16(8)
        key |= planes[p + 1][lo:hi]
        return _LANES2[key]

    first = len(planes) % 2  # an odd plane count starts with one plane alone
    acc = _LANES1[planes[0][lo:hi]] if first else pair(0)
    for p in range(2 - first, len(planes), 2):
        acc <<= np.uint64(2)
        acc |= pair(p)
    return acc.view(np.uint8)[i & 7 : (i & 7) + m]


def _rice_decode(p1: memoryview, p2: memoryview, k: int, nnz: int, numel: int) -> np.ndarray:
    a1 = np.frombuffer(p1, dtype=np.uint8)
    if len(a1) == 0 or a1[-1] == 0:
        raise InvalidPatch("positions: Rice unary section is empty or has a trailing zero byte")
    counts = _popcounts(a1)
    ones = int(counts.sum(dtype=np.int64))
    if ones != nnz:
        raise InvalidPatch(f"positions: Rice unary section codes {ones} gaps, header says {nnz}")
    last_byte = int(a1[-1])
    last_one = 8 * len(a1) - (last_byte & -last_byte).bit_length()  # bit position of the last one
    sum_q = last_one - (nnz - 1)
    plane = (nnz + 7) // 8
    planes: list[np.ndarray] = []
    sum_r = 0
    if k:
        if len(p2) != k * plane:
            raise InvalidPatch(f"positions: Rice remainder section has {len(p2)} bytes, expected {k * plane}")
        a2 = np.frombuffer(p2, dtype=np.uint8)
        for p in range(k):
            pl = a2[p * plane : (p + 1) * plane]
            _check_padding(pl, nnz, "positions")
            planes.append(pl)
            sum_r += _popcount(pl) << (k - 1 - p)
        if sum_r > numel:
            raise InvalidPatch("positions: Rice remainders run past the end of the tensor")
    elif len(p2):
        raise InvalidPatch("positions: Rice remainder section must be empty for k = 0")
    last = (sum_q << k) + sum_r + nnz - 1
    if last >= numel:
        raise InvalidPatch(f"positions: last index {last} is outside a tensor of {numel} entries")
    # idx_i = 2**k * (one_i - i) + cumsum(r)_i + i, with one_i the bit position of the
    # i-th one in P1; every term fits int64 since last < 2**62. Threads take ranges of
    # P1 bytes; the gaps and remainders before a range come from popcounts.
    out = np.empty(nnz, dtype=np.int64)
    small = _small_uint(k)
    cuts = _split(len(a1), 1, _PARALLEL_MIN // 8)  # P1 holds at least one bit per position
    starts = np.cumsum([0] + [int(counts[a:b].sum(dtype=np.int64)) for a, b in cuts])
    del counts

    def part(j: int) -> None:
        b_lo, b_hi = cuts[j]
        i = int(starts[j])
        carry = sum(_ones_before(pl, i) << (k - 1 - p) for p, pl in enumerate(planes))
        # for the ones at bit positions pos (from byte b0) with numbers i + jj:
        # idx = 2**k * (8*b0 + pos - i - jj) + carry + cumsum(r) + i + jj
        #     = (pos << k) + cumsum(r) - (2**k - 1) * jj + [2**k * (8*b0 - i) + carry + i]
        if native.lib is not None:
            native.lib.pc_rice_decode(
                native.ptr(a1), b_lo, b_hi, native.ptr(a2) if k else 0, plane, k, i, carry, native.ptr(out)
            )
            return
        ramp = np.arange(8 * _DEC_BYTES, dtype=np.int64) * ((1 << k) - 1)
        r = np.empty(8 * _DEC_BYTES, dtype=small)
        for b0 in range(b_lo, b_hi, _DEC_BYTES):
            b1 = min(b0 + _DEC_BYTES, b_hi)
            # on a bool view numpy uses its branch-free nonzero: 5x faster on ~50 % dense bits
            t = np.flatnonzero(np.unpackbits(a1[b0:b1]).view(np.bool_))
            m = len(t)
            if m == 0:
                continue
            base = ((8 * b0 - i) << k) + carry + i
            if k:
                t <<= k
                rr = _remainders(planes, i, m) if k <= 8 else r[:m]
                if k > 8:
                    rr.fill(0)
                    for pl in planes:
                        rr <<= small(1)
                        rr |= np.unpackbits(pl[i >> 3 : (i + m + 7) >> 3])[i & 7 : (i & 7) + m]
                cr = np.cumsum(rr, dtype=np.int64)
                carry += int(cr[-1])
                t += cr
                t -= ramp[:m]
            np.add(t, base, out=out[i : i + m])
            i += m

    _pmap(part, list(range(len(cuts))))
    return out


# --------------------------------------------------------------------------- zstd


def _shuffle(words: np.ndarray) -> bytes:
    w = words.dtype.itemsize
    return words.view(np.uint8).reshape(-1, w).T.tobytes()


def _unshuffle(raw: bytes, w: int, n: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(w, n).T.copy().view(_NP_WORD[w]).reshape(n)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(data)


def _unzstd(section: memoryview, expected: int, what: str) -> bytes:
    if len(section) == 0 or expected > _ZSTD_MAX_RATIO * len(section):
        raise InvalidPatch(f"{what}: zstd section of {len(section)} bytes cannot hold {expected} bytes")
    data = bytes(section)
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size != expected:
            raise InvalidPatch(f"{what}: zstd frame holds {params.content_size} bytes, expected {expected}")
        dobj = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompressobj()
        out = dobj.decompress(data)
        ok = dobj.eof and not dobj.unused_data and len(out) == expected
    except zstandard.ZstdError as e:
        raise InvalidPatch(f"{what}: bad zstd frame: {e}") from None
    if not ok:
        raise InvalidPatch(f"{what}: zstd frame is truncated, too long or followed by junk")
    return out


def _sample_chunks(words: np.ndarray) -> np.ndarray:
    n = len(words)
    if n <= 3 * _ZSTD_SAMPLE:
        return words
    mid = (n - _ZSTD_SAMPLE) // 2
    return np.concatenate(
        [words[:_ZSTD_SAMPLE], words[mid : mid + _ZSTD_SAMPLE], words[n - _ZSTD_SAMPLE :]]
    )


def _maybe_zstd(values: np.ndarray, word: np.dtype, beat: int) -> bytes | None:
    """zstd of ``values`` as byte-shuffled ``word``s if smaller than ``beat`` bytes, else None."""
    return _zstd_if_smaller(_sample_chunks(values), len(values), lambda: values, word, beat)


def _zstd_if_smaller(
    sample: np.ndarray, n: int, full: Callable[[], np.ndarray], word: np.dtype, beat: int
) -> bytes | None:
    """zstd of the ``n`` words ``full()`` if smaller than ``beat`` bytes, else None.

    ``sample`` (3 chunks of 16384 words, see ``_sample_chunks``) is compressed
    first; the whole array is compressed only if the sample's ratio predicts
    it wins by 2 %.
    """
    if len(sample) < n:
        est = len(_zstd(_shuffle(sample.astype(word)))) * n / len(sample)
        if est >= 0.98 * beat:
            return None
    words = full().astype(word)
    z = _zstd(_shuffle(words))
    if len(z) < beat and words.nbytes <= _ZSTD_MAX_RATIO * len(z):
        return z
    return None


# --------------------------------------------------------------------------- encode / decode


def encode(sp: SparseTensor) -> bytes:
    """The canonical bytes of ``sp`` (format in the module docstring)."""
    if not isinstance(sp, SparseTensor):
        raise InvalidPatch(f"encode() takes a SparseTensor, not {type(sp).__name__}")
    numel, nnz = sp.numel, sp.nnz
    p1: bytes | np.ndarray = b""
    p2: bytes | np.ndarray = b""
    s: bytes | np.ndarray = b""
    v: bytes = b""
    pos_param = 0
    if nnz == 0:
        pos = POS_NONE
    elif nnz == numel:
        pos = POS_ALL
        _gap_sums(sp.indices, numel, [], check=True)  # nnz distinct indices in [0, numel): arange
    else:
        k, bits, chunk_q, gmax = _rice_best_k(sp.indices, numel)
        rice_bytes = (bits - nnz * k + 7) // 8 + k * ((nnz + 7) // 8)
        width = 4 if gmax < (1 << 32) else 8
        idx = sp.indices
        z = _zstd_if_smaller(_gap_sample(idx), nnz, lambda: _gap_slice(idx, 0, nnz), _NP_WORD[width], rice_bytes)
        if z is None:
            pos, pos_param = POS_RICE, k
            p1, p2 = _rice_encode(idx, k, chunk_q)
        else:
            pos, pos_param, p1 = POS_ZSTD, width, z
    scale_bits = 0
    vdtype = 0
    vcoding = VAL_RAW
    if sp.mode == "ternary":
        s = np.packbits(sp.signs)
        scale_bits = int(np.array(sp.scale, dtype="<f4").view("<u4"))
    else:
        vals = sp.values
        vdtype = _DTYPES[vals.dtype]
        w = _WIDTH[vals.dtype]
        words = vals.detach().contiguous().view(_INT_VIEW[vals.dtype]).numpy().view(_NP_WORD[w])
        v = words.tobytes()
        if nnz:
            z = _maybe_zstd(words, words.dtype, len(v))
            if z is not None:
                v, vcoding = z, VAL_ZSTD
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _MODES[sp.mode],
        _DTYPES[sp.dtype],
        vdtype,
        len(sp.shape),
        pos,
        pos_param,
        vcoding,
        scale_bits,
        nnz,
        len(p1),
        len(p2),
        len(s),
        len(v),
    )
    shape = struct.pack(f"<{len(sp.shape)}Q", *sp.shape)
    return b"".join([header, shape, memoryview(p1), memoryview(p2), memoryview(s), v])


def decode(data: bytes | bytearray | memoryview) -> SparseTensor:
    """Parse bytes written by :func:`encode`; :class:`InvalidPatch` on anything else."""
    try:
        mv = memoryview(data).cast("B")
    except TypeError:
        raise InvalidPatch(f"decode() takes bytes, not {type(data).__name__}") from None
    if len(mv) < _HEADER.size:
        raise InvalidPatch(f"sparse tensor data is {len(mv)} bytes, shorter than the {_HEADER.size}-byte header")
    (magic, version, mode, dcode, vcode, ndim, pos, param, vcoding, scale_bits, nnz, l1, l2, ls, lv) = (
        _HEADER.unpack_from(mv, 0)
    )
    if magic != MAGIC:
        raise InvalidPatch(f"sparse tensor data starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise InvalidPatch(f"sparse tensor format version {version} is not supported (only {FORMAT_VERSION})")
    if mode not in _MODE_NAMES:
        raise InvalidPatch(f"sparse tensor mode code {mode} is unknown")
    if dcode not in _DTYPE_OF_CODE:
        raise InvalidPatch(f"sparse tensor dtype code {dcode} is unknown")
    if ndim > _MAX_NDIM:
        raise InvalidPatch(f"sparse tensor ndim {ndim} is over {_MAX_NDIM}")
    head = _HEADER.size + 8 * ndim
    if len(mv) < head:
        raise InvalidPatch("sparse tensor data is truncated inside the shape")
    shape = struct.unpack_from(f"<{ndim}Q", mv, _HEADER.size)
    numel = 1
    for d in shape:
        numel *= d
        if numel > _MAX_NUMEL or d > _MAX_NUMEL:  # a zero elsewhere does not make a 2**64 dim fit a tensor
            raise InvalidPatch(f"sparse tensor shape {shape} has more than 2**62 entries or a dimension over 2**62")
    if nnz > numel:
        raise InvalidPatch(f"sparse tensor nnz {nnz} is over numel {numel}")
    if head + l1 + l2 + ls + lv != len(mv):
        raise InvalidPatch(
            f"sparse tensor data is {len(mv)} bytes; header and section lengths say {head + l1 + l2 + ls + lv}"
        )
    o1 = head
    o2 = o1 + l1
    o3 = o2 + l2
    o4 = o3 + ls
    p1, p2, s_sec, v_sec = mv[o1:o2], mv[o2:o3], mv[o3:o4], mv[o4:]

    # every section length is checked against nnz before anything is allocated
    dtype = _DTYPE_OF_CODE[dcode]
    ternary = _MODE_NAMES[mode] == "ternary"
    if ternary:
        if vcode or vcoding or lv:
            raise InvalidPatch("ternary sparse tensor must have no values dtype, coding or section")
        if scale_bits >> 31 or scale_bits & 0x7F800000 == 0x7F800000:
            raise InvalidPatch("ternary scale must be finite with the sign bit clear")
        if ls != (nnz + 7) // 8:
            raise InvalidPatch(f"signs: section has {ls} bytes, expected {(nnz + 7) // 8}")
        vdtype, w = None, 0
    else:
        if vcode not in _DTYPE_OF_CODE:
            raise InvalidPatch(f"values dtype code {vcode} is unknown")
        if scale_bits or ls:
            raise InvalidPatch("values sparse tensor must have zero scale bytes and no signs section")
        vdtype = _DTYPE_OF_CODE[vcode]
        w = _WIDTH[vdtype]
        if vcoding == VAL_RAW:
            if lv != nnz * w:
                raise InvalidPatch(f"values: raw section has {lv} bytes, expected {nnz * w}")
        elif vcoding == VAL_ZSTD:
            if nnz == 0 or nnz * w > _ZSTD_MAX_RATIO * lv:
                raise InvalidPatch(f"values: zstd section of {lv} bytes cannot hold {nnz} values")
        else:
            raise InvalidPatch(f"values coding {vcoding} is unknown")

    # positions
    if pos == POS_NONE:
        if nnz != 0 or param or l1 or l2:
            raise InvalidPatch("positions: coding 'none' needs nnz = 0 and empty sections")
        indices = np.zeros(0, dtype=np.int64)
    elif pos == POS_ALL:
        if nnz != numel or nnz == 0 or param or l1 or l2:
            raise InvalidPatch("positions: coding 'all' needs nnz = numel > 0 and empty sections")
        indices = np.arange(nnz, dtype=np.int64)
    elif pos == POS_RICE:
        if not 0 < nnz < numel or param > 62:
            raise InvalidPatch(f"positions: Rice coding needs 0 < nnz < numel and k <= 62 (k = {param})")
        indices = _rice_decode(p1, p2, param, nnz, numel)
    elif pos == POS_ZSTD:
        if not 0 < nnz < numel or param not in (4, 8) or l2:
            raise InvalidPatch("positions: zstd coding needs 0 < nnz < numel, width 4 or 8, empty P2")
        raw = _unzstd(p1, nnz * param, "positions")
        g = _unshuffle(raw, param, nnz)
        gmax = int(g.max())
        if param == 8 and gmax < (1 << 32):
            raise InvalidPatch("positions: 8-byte gaps used where 4 bytes suffice (not canonical)")
        if gmax >= numel or float(np.sum(g, dtype=np.float64)) > numel:
            raise InvalidPatch("positions: gaps run past the end of the tensor")
        g = g.astype(np.int64)
        if int(np.sum(g)) + nnz - 1 >= numel:
            raise InvalidPatch("positions: gaps run past the end of the tensor")
        g += 1
        indices = np.cumsum(g, out=g)
        indices -= 1
    else:
        raise InvalidPatch(f"positions: coding {pos} is unknown")

    if ternary:
        scale = float(np.array(scale_bits, dtype="<u4").view("<f4"))
        signs = _unpack_exact(s_sec, nnz, "signs").view(np.bool_)
        return SparseTensor(shape, dtype, indices, "ternary", signs=signs, scale=scale)
    if vcoding == VAL_RAW:
        words = np.frombuffer(v_sec, dtype=_NP_WORD[w]).astype(_NP_WORD[w].newbyteorder("="))
    else:
        words = _unshuffle(_unzstd(v_sec, nnz * w, "values"), w, nnz)
    sint = np.int16 if w == 2 else np.int32
    values = torch.from_numpy(words.view(sint)).view(vdtype)
    return SparseTensor(shape, dtype, indices, "values", values=values)


def to_dense(sp: SparseTensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The dense tensor of ``sp``, built on ``device`` (e.g. ``"cuda"``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    if dev.type == "cpu":
        return _to_dense_cpu(sp)
    out = torch.zeros(sp.numel, dtype=sp.dtype, device=dev)
    if sp.nnz:
        idx = torch.from_numpy(sp.indices).to(dev, non_blocking=True)
        if sp.mode == "ternary":
            a = torch.tensor(sp.scale, dtype=torch.float32).to(sp.dtype).to(dev)
            s = torch.from_numpy(sp.signs).to(dev, non_blocking=True)
            vals = torch.where(s, -a, a)
        else:
            vals = sp.values.to(dev).to(sp.dtype)
        out[idx] = vals
    return out.view(sp.shape)


def _to_dense_cpu(sp: SparseTensor) -> torch.Tensor:
    # numpy: calloc'd zeros and fancy-index stores (threads take ranges of the sorted
    # indices, so each first-touches its own part of the output) beat torch's index_put
    w = _WIDTH[sp.dtype]
    word = _NP_WORD[w]
    out = np.zeros(sp.numel, dtype=word)
    idx = sp.indices
    if sp.mode == "ternary":
        a = torch.tensor(sp.scale, dtype=torch.float32).to(sp.dtype)
        abits = word.type(int(a.view(_INT_VIEW[sp.dtype]).numpy().view(word)))
        top = word.type(1 << (8 * w - 1))  # the sign bit of every float format is the top bit
        sgn = sp.signs.view(np.uint8)

        def part(r: tuple[int, int]) -> None:
            buf = np.empty(min(_CHUNK, r[1] - r[0]), dtype=word)
            for s in range(r[0], r[1], _CHUNK):
                e = min(s + _CHUNK, r[1])
                vals = np.multiply(sgn[s:e], top, out=buf[: e - s])
                vals |= abits
                out[idx[s:e]] = vals
    else:
        v = sp.values.to(sp.dtype).contiguous()
        words = v.view(_INT_VIEW[sp.dtype]).numpy().view(word)

        def part(r: tuple[int, int]) -> None:
            out[idx[r[0] : r[1]]] = words[r[0] : r[1]]

    if sp.nnz:
        _pmap(part, _split(sp.nnz, 1))
    sint = np.int16 if w == 2 else np.int32
    return torch.from_numpy(out.view(sint)).view(sp.dtype).view(sp.shape)
