"""Adding a delta to a base tensor, and the exact-value pins that make it lossless.

The arithmetic is fixed: ``out = (base.f32 + delta.f32).to(base.dtype)`` (float64
when the base is float64). A diff imported from a fine-tune stores, next to
the delta, *pins*: the few positions where that arithmetic cannot give back
the fine-tuned value (a weight that crossed zero, say) and the value itself.
With pins, applying the diff to its own base is bit-exact in every dtype.
"""

from __future__ import annotations

import struct

import torch

PINS_MAGIC = b"PCPN\x01\x00\x00\x00"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_CHUNK = 1 << 18  # entries per step on the CPU: small reused temporaries, whatever the tensor's size


def combine(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``base + delta`` in fp32 (fp64 for fp64 bases), cast back to the base's dtype.

    ``out``: a contiguous tensor of the base's dtype and shape to write into
    (returned); by default a new one. On the CPU the sum runs through two
    reused accumulator buffers of at most ``_CHUNK`` entries (the same values:
    every step is elementwise).
    """
    acc = _acc_dtype(base.dtype)
    delta = delta.to(device=base.device)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    elif out.shape != base.shape or out.dtype != base.dtype or out.device != base.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {base.dtype} tensor of shape {tuple(base.shape)}")
    n = base.numel()
    if base.device.type != "cpu" or n <= _CHUNK:
        return out.copy_(base.to(acc) + delta.to(acc))
    b, d, o = base.reshape(-1), delta.reshape(-1), out.view(-1)
    x, y = torch.empty(_CHUNK, dtype=acc), torch.empty(_CHUNK, dtype=acc)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        m = hi - lo
        o[lo:hi].copy_(x[:m].copy_(b[lo:hi]).add_(y[:m].copy_(d[lo:hi])))
    return out


def subtract(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``finetuned - base`` in fp32 (fp64 for fp64 inputs): IEEE subtraction is correctly rounded."""
    acc = torch.promote_types(_acc_dtype(finetuned.dtype), _acc_dtype(base.dtype))
    return finetuned.to(acc) - base.to(acc)


def diff_with_pins(
    finetuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta ``finetuned - base`` stored as ``dtype``, and the pins that make it exact.

    Works through the flattened tensors ``chunk`` elements at a time, so the
    fp32 temporaries stay small whatever the tensor's size (a 128k-token
    embedding included).
    """
    a, b = finetuned.reshape(-1), base.reshape(-1)
    out = torch.empty(a.numel(), dtype=dtype)
    idx_parts, val_parts = [], []
    for start in range(0, a.numel(), chunk):
        sl = slice(start, start + chunk)
        d = subtract(a[sl], b[sl]).to(dtype)
        out[sl] = d
        i, v = find_pins(b[sl], d, a[sl])
        if i.numel():
            idx_parts.append(i + start)
            val_parts.append(v)
    idx = torch.cat(idx_parts) if idx_parts else torch.empty(0, dtype=torch.int64)
    vals = torch.cat(val_parts) if val_parts else torch.empty(0, dtype=finetuned.dtype)
    return out.reshape(finetuned.shape), idx, vals


def find_pins(base: torch.Tensor, delta: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions where ``combine(base, delta)`` differs bitwise from ``target``, and the target values."""
    got = combine(base, delta)
    gb = got.reshape(-1).view(_int_view(got.dtype))
    tb = target.reshape(-1).view(_int_view(target.dtype))
    idx = torch.nonzero(gb != tb).reshape(-1)
    return idx.to(torch.int64), target.reshape(-1)[idx]


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def encode_pins(idx: torch.Tensor, values: torch.Tensor) -> bytes:
    """``magic | u64 count | count × i64 index | count × value`` (little-endian)."""
    n = int(idx.numel())
    return (
        PINS_MAGIC
        + struct.pack("<Q", n)
        + idx.to(torch.int64).numpy().astype("<i8").tobytes()
        + values.contiguous().view(torch.uint8).numpy().tobytes()
    )


def decode_pins(data: bytes, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    from patchctl.errors import InvalidPatch

    if len(data) < 16 or data[:8] != PINS_MAGIC:
        raise InvalidPatch("pins blob has no valid header")
    (n,) = struct.unpack("<Q", data[8:16])
    if n > numel or len(data) != 16 + n * (8 + dtype.itemsize):
        raise InvalidPatch("pins blob length does not match its count")
    idx = torch.frombuffer(bytearray(data[16 : 16 + 8 * n]), dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise InvalidPatch("pins blob has positions outside the tensor")
    vals = (
        torch.frombuffer(bytearray(data[16 + 8 * n :]), dtype=dtype) if n else torch.empty(0, dtype=dtype)
    )
    return idx, vals


def apply_pins(out: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if idx.numel():
        flat = out.reshape(-1)
        flat[idx.to(out.device)] = values.to(device=out.device, dtype=out.dtype)
    return out
