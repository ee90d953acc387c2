"""Tensors as plain bytes, and apply's and push's float arithmetic without torch.

``import torch`` costs about two seconds of every command on a small VM
(issue #21): more than reading and writing a 1 GB model. ``patchctl apply``
of a diff and ``patchctl push`` of a full fine-tune need no more than an
element-wise sum or difference in float32, one rounding, and a byte compare,
so where the C kernels are built (:mod:`patchctl.patches.native`) they run
here, on :class:`HostTensor` (a numpy byte buffer, a dtype name and a shape),
and torch is never imported. The values are those of
:mod:`patchctl.patches.apply` bit for bit (``tests/test_host_kernels.py`` runs
both on edge values: ties, subnormals, overflow, signed zeros); anything else
(float64, LoRA, compressed blobs, no C compiler, ``PATCHCTL_NATIVE=0``) takes
the torch path.
"""

from __future__ import annotations

import math
import struct
import threading
from typing import Any

import numpy as np

from patchctl.patches import native

#: dtype name -> the code the C kernels take (float32 0, float16 1, bfloat16 2).
CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
             "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
PINS_MAGIC = b"PCPN\x01\x00\x00\x00"  # the exactness pins blob format (encode_pins)
_CHUNK = 1 << 18  # entries per kernel call in the diff: the hits buffer stays 2 MiB


class BufferPool:
    """Byte buffers reused from tensor to tensor (at most :attr:`KEEP` kept free).

    A fresh allocation of a large tensor is a fresh mapping whose pages fault
    in (and a ``bytearray`` is zero-filled first); a reused one is neither
    (``bench/kernels.py``). A buffer handed out starts at an address congruent to ``lead``
    modulo the page size, so that a tensor bound for file offset ``lead`` goes
    out by direct I/O straight from it (:class:`~patchctl.registry.store.folder.DirectFile`).
    """

    PAGE = 4096
    KEEP = 8

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int, lead: int = 0) -> np.ndarray:
        need = n + self.PAGE
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= need]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].size)) if fits else None
        if base is None:
            base = np.empty(-(-need // (1 << 20)) << 20, dtype=np.uint8)  # whole MiB: more reuse
        start = (-base.ctypes.data + lead) % self.PAGE
        return base[start : start + n]

    def give(self, arr: np.ndarray) -> None:
        base = arr.base if isinstance(arr.base, np.ndarray) else arr
        with self._lock:
            if any(b is base for b in self._free):
                return
            if len(self._free) < self.KEEP:
                self._free.append(base)
            else:  # full: keep the larger buffers (a small one cannot take a large tensor)
                small = min(range(len(self._free)), key=lambda i: self._free[i].size)
                if self._free[small].size < base.size:
                    self._free[small] = base


#: The pool of :meth:`~patchctl.registry.formats.safetensors.SafetensorsFile.read_host`.
POOL = BufferPool()


class HostTensor:
    """A tensor's bytes (C order, little-endian, as safetensors stores them), dtype name and shape.

    Answers the few questions push and the safetensors writer ask a torch
    tensor (``dtype``, ``shape``, ``numel()``, ``is_floating_point()``).
    ``pooled``: its buffer came from :data:`POOL`; :meth:`release` gives it back.
    """

    __slots__ = ("buf", "dtype", "shape", "pooled")

    def __init__(self, data: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape: tuple[int, ...],
                 pooled: bool = False):
        self.buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        self.dtype, self.shape, self.pooled = dtype, tuple(shape), pooled
        if self.buf.size != math.prod(self.shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"{self.buf.size} bytes do not hold a {dtype} tensor of shape {list(self.shape)}")

    def release(self) -> None:
        """Give a pooled buffer back (the tensor must not be used after); nothing for others."""
        if self.pooled:
            self.pooled = False
            POOL.give(self.buf)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype in _FLOATS

    @property
    def nbytes(self) -> int:
        return int(self.buf.size)

    def ints(self) -> np.ndarray:
        """The elements as unsigned integers of the same width (their bits)."""
        return self.buf.view(_UINT[_ITEMSIZE[self.dtype]])


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def usable(*dtypes: str) -> bool:
    """The C kernels are loaded and handle every one of ``dtypes``."""
    return native.lib is not None and all(d in CODES for d in dtypes)


def _threads(fn: Any, n: int) -> list[Any]:
    from patchctl.patches._workers import run_ranges

    return list(run_ranges(fn, n, _CHUNK, 1 << 21))


def add_into(base: HostTensor, delta: HostTensor, out: HostTensor | None = None) -> HostTensor:
    """``base + delta`` in float32, rounded to the base's dtype, written into ``out`` (a tensor of the
    base's dtype and size) or, without it, over ``base``'s (writable) bytes; that tensor is returned.

    ``combine`` of :mod:`patchctl.patches.apply` bit for bit; split over the streaming threads.
    """
    n = base.numel()
    if delta.numel() != n:
        raise ValueError(f"delta of {delta.numel()} entries for a base of {n}")
    out = base if out is None else out
    if out.dtype != base.dtype or out.numel() != n:
        raise ValueError(f"out is {out.dtype} of {out.numel()} entries, not {base.dtype} of {n}")
    if n:
        add_cast(native.ptr(base.buf), base.dtype, native.ptr(delta.buf), delta.dtype, native.ptr(out.buf), n)
    return out


def add_cast(b0: int, bdtype: str, d0: int, ddtype: str, o0: int, n: int) -> None:
    """``pc_add_cast`` over ``n`` elements at raw addresses (base, delta, out; out in the base's dtype),
    split over the streaming threads: :func:`add_into`'s and ``apply.combine``'s kernel call."""
    bc, dc, bi, di = CODES[bdtype], CODES[ddtype], _ITEMSIZE[bdtype], _ITEMSIZE[ddtype]

    def part(lo: int, hi: int) -> None:
        if native.lib.pc_add_cast(b0 + lo * bi, bc, d0 + lo * di, dc, o0 + lo * bi, hi - lo):
            raise ValueError("pc_add_cast: unknown dtype code")

    _threads(part, n)


def diff_with_pins(a: HostTensor, b: HostTensor, dtype: str) -> tuple[HostTensor, np.ndarray, np.ndarray]:
    """``a - b`` in float32 stored as ``dtype``, and the pins that make it exact: ``(delta, positions, values)``.

    ``diff_with_pins`` of :mod:`patchctl.patches.apply` bit for bit; the pin values are ``a``'s
    elements (their bits, ``a``'s dtype) at the positions, int64 and ascending. Where ``dtype`` is
    ``a``'s, the delta is written over ``a``'s bytes (no new buffer to fault in): ``a`` is used up.
    """
    n = a.numel()
    ic, oc = CODES[a.dtype], CODES[dtype]
    ii, oi = _ITEMSIZE[a.dtype], _ITEMSIZE[dtype]
    in_place = dtype == a.dtype and a.buf.flags.writeable
    out = a.buf if in_place else np.empty(n * oi, dtype=np.uint8)
    a0, b0, o0 = native.ptr(a.buf), native.ptr(b.buf), native.ptr(out)

    def part(lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray]]:
        m0 = min(_CHUNK, hi - lo)
        hits, vals, found = np.empty(m0, dtype=np.int64), np.empty(m0, dtype=np.uint32), []
        for s in range(lo, hi, _CHUNK):
            m = min(hi, s + _CHUNK) - s
            k = native.lib.pc_diff_pins(a0 + s * ii, b0 + s * ii, ic, o0 + s * oi, oc, m, s, native.ptr(hits),
                                        native.ptr(vals))
            if k < 0:
                raise ValueError("pc_diff_pins: unknown dtype code")
            if k:
                found.append((hits[:k].copy(), vals[:k].copy()))
        return found

    parts = [p for ps in _threads(part, n) for p in ps]
    idx = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype=np.int64)
    bits = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype=np.uint32)
    d = HostTensor(out, dtype, a.shape, pooled=in_place and a.pooled)  # a's pooled buffer now belongs to d
    if in_place:
        a.pooled = False
    return d, idx, bits.astype(_UINT[ii])


def all_finite(t: HostTensor) -> bool:
    """No NaN or infinity among ``t``'s elements (``t``'s dtype a :data:`CODES` one)."""
    bad = native.lib.pc_nonfinite(native.ptr(t.buf), CODES[t.dtype], t.numel())
    if bad < 0:
        raise ValueError("pc_nonfinite: unknown dtype code")
    return bad == 0


def same_bytes(a: HostTensor, b: HostTensor) -> bool:
    return a.nbytes == b.nbytes and native.lib.pc_same(native.ptr(a.buf), native.ptr(b.buf), a.nbytes) == 1


def convert(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Float elements given by their bits, from dtype ``src`` to ``dst`` (round to nearest even), as bits.

    For pin values: few entries, widened when stored and narrowed back when applied (exact both ways).
    """
    if src == dst:
        return bits
    f32 = _to_f32(bits, src)
    if dst == "float32":
        return f32.view(np.uint32)
    if dst == "float16":
        with np.errstate(over="ignore"):  # beyond float16's range: infinity, as torch's cast gives
            return f32.astype(np.float16).view(np.uint16)
    if dst == "bfloat16":
        u = f32.view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)
    raise ValueError(f"no host conversion to {dst}")


def _to_f32(bits: np.ndarray, src: str) -> np.ndarray:
    if src == "float32":
        return bits.view(np.float32)
    if src == "float16":
        return bits.view(np.float16).astype(np.float32)
    if src == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"no host conversion from {src}")


def encode_pins(idx: np.ndarray, values: np.ndarray) -> bytes:
    """``magic | u64 count | count × i64 index | count × value`` (little-endian): ``encode_pins`` of apply.py."""
    return (PINS_MAGIC + struct.pack("<Q", int(idx.size)) + idx.astype("<i8", copy=False).tobytes()
            + values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())


def decode_pins(data: bytes, dtype: str, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (int64) and values (their bits, ``dtype``) of a pins blob; its checks are apply.py's."""
    from patchctl.errors import InvalidPatch

    size = _ITEMSIZE[dtype]
    if len(data) < 16 or data[:8] != PINS_MAGIC:
        raise InvalidPatch("pins blob has no valid header")
    (n,) = struct.unpack("<Q", data[8:16])
    if n > numel or len(data) != 16 + n * (8 + size):
        raise InvalidPatch("pins blob length does not match its count")
    idx = np.frombuffer(data, dtype="<i8", count=n, offset=16)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise InvalidPatch("pins blob has positions outside the tensor")
    return idx, np.frombuffer(data, dtype=_UINT[size], count=n, offset=16 + 8 * n)


def apply_pins(t: HostTensor, idx: np.ndarray, values: np.ndarray, dtype: str) -> HostTensor:
    """Set ``t``'s elements at ``idx`` to ``values`` (bits of ``dtype``, converted to ``t``'s dtype)."""
    if idx.size:
        t.ints()[idx] = convert(values, dtype, t.dtype)
    return t


__all__ = ["CODES", "PINS_MAGIC", "POOL", "BufferPool", "HostTensor", "add_cast", "add_into", "all_finite", "apply_pins", "convert", "decode_pins",
           "diff_with_pins", "encode_pins", "itemsize", "same_bytes", "usable"]
