"""Adding a delta to a base tensor, and the exact-value pins that make it lossless.

The arithmetic is fixed: ``out = (base.f32 + delta.f32).to(base.dtype)`` (float64
when the base is float64). A diff imported from a fine-tune stores, next to
the delta, *pins*: the few positions where that arithmetic cannot give back
the fine-tuned value (a weight that crossed zero, say) and the value itself.
With pins, applying the diff to its own base is bit-exact in every dtype.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from patchctl.patches import host


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_CHUNK = 1 << 18  # entries per step on the CPU: small reused temporaries, whatever the tensor's size
_FAST = (torch.float16, torch.bfloat16, torch.float32)  # dtypes whose torch CPU kernels compute in fp32
_DIFF_CHUNK = 1 << 18  # entries per step of the fused diff (measured: 64K-1M alike; 16K loses to per-call overhead)


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
    if _native_add(base, delta, out):
        return out
    if base.device.type == "cpu" and delta.dtype == base.dtype and base.dtype in _FAST and delta.numel() == n:
        # one 16-bit (or fp32) add computes in fp32 and rounds once: the same bits, without the chunk copies;
        # memory-bound, so one thread (idle intra-op threads spin, taking cores from the reader and writer)
        with _one_intra_op_thread():
            torch.add(base.reshape(-1), delta.reshape(-1), out=out.view(-1))
        return out
    if base.device.type != "cpu" or n <= _CHUNK:
        return out.copy_(base.to(acc) + delta.to(acc))
    b, d, o = base.reshape(-1), delta.reshape(-1), out.view(-1)
    x, y = torch.empty(_CHUNK, dtype=acc), torch.empty(_CHUNK, dtype=acc)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        m = hi - lo
        o[lo:hi].copy_(x[:m].copy_(b[lo:hi]).add_(y[:m].copy_(d[lo:hi])))
    return out


#: torch dtype -> the C kernels' dtype code (:data:`.host.CODES`).
NATIVE_CODES = {getattr(torch, name): code for name, code in host.CODES.items()}


def _native_add(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> bool:
    """``combine`` on the C kernel ``pc_add_cast`` (the same bits: tests/test_host_kernels.py), split over
    the streaming threads; False where it does not apply (no kernels, not the CPU, other dtypes)."""
    from patchctl.patches import native

    if native.lib is None or base.device.type != "cpu" or delta.device.type != "cpu" or base.dtype not in NATIVE_CODES \
            or delta.dtype not in NATIVE_CODES or delta.numel() != base.numel() or not base.is_contiguous() \
            or not delta.is_contiguous():
        return False
    def name(t: torch.Tensor) -> str:
        return str(t.dtype).removeprefix("torch.")

    host.add_cast(base.data_ptr(), name(base), delta.data_ptr(), name(delta), out.data_ptr(), base.numel())
    return True


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
    if _fast_diff(finetuned, base, dtype):
        return _diff_with_pins_cpu(a, b, out, finetuned)
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


def _fast_diff(finetuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> bool:
    """The fused CPU pass applies: on the CPU, one input dtype, inputs and delta fp16/bf16/fp32 (fp32 arithmetic)."""
    return (finetuned.device.type == base.device.type == "cpu" and finetuned.dtype == base.dtype
            and finetuned.dtype in _FAST and dtype in _FAST and not (finetuned.requires_grad or base.requires_grad))


def _diff_with_pins_cpu(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, finetuned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`diff_with_pins` in one pass over cache-sized chunks, on the streaming threads.

    The same values as the general path, chunk by chunk: ``d = (a.f32 - b.f32).to(out.dtype)``;
    ``got = (b.f32 + d.f32).to(b.dtype)``; pins where ``got`` and ``a`` differ bitwise. Where the
    delta has the inputs' dtype, ``d`` and ``got`` are one torch op each on that dtype (torch's CPU
    kernels for fp16/bf16 compute in fp32 and round once: the same bits, checked against the
    float32 arithmetic in tests/test_streaming_io.py); else through fp32 scratch. Scratch is
    reused per thread (no fresh pages per chunk); torch runs one intra-op thread while the chunks
    are split over :func:`~patchctl.patches._workers.workers` threads.
    """
    from patchctl.patches._workers import run_ranges

    n = a.numel()
    iv = _int_view(a.dtype)

    a_int = a.view(iv).numpy()
    same = out.dtype == a.dtype  # d and got rounded by torch's own kernels: float32 arithmetic, one rounding

    def part(lo: int, hi: int) -> list[torch.Tensor]:
        step = min(_DIFF_CHUNK, hi - lo)
        g, ne = torch.empty(step, dtype=a.dtype), np.empty(step, dtype=np.bool_)
        if not same:
            x, y = torch.empty(step, dtype=torch.float32), torch.empty(step, dtype=torch.float32)
        found = []
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            m = e - s
            if same:  # a 16-bit (or fp32) op computes in fp32 and rounds once: the same bits as below
                d = torch.sub(a[s:e], b[s:e], out=out[s:e])
                got = torch.add(b[s:e], d, out=g[:m])
            else:
                xs, ys = x[:m].copy_(a[s:e]), y[:m].copy_(b[s:e])
                d = out[s:e].copy_(xs.sub_(ys))  # the delta, rounded once to the stored dtype
                got = g[:m].copy_(xs.copy_(ys).add_(d))  # combine(b, d): b.f32 + d.f32, rounded to b's dtype
            # numpy's compare and flatnonzero: ~9x faster than torch's ne/any/nonzero on sparse hits
            hits = np.flatnonzero(np.not_equal(got.view(iv).numpy(), a_int[s:e], out=ne[:m]))
            if hits.size:
                found.append(torch.from_numpy(hits.astype(np.int64, copy=False) + s))
        return found

    with _one_intra_op_thread():
        parts = run_ranges(part, n, _DIFF_CHUNK, 1 << 20)
    idx_parts = [i for p in parts for i in p]
    idx = torch.cat(idx_parts) if idx_parts else torch.empty(0, dtype=torch.int64)
    vals = a[idx] if idx.numel() else torch.empty(0, dtype=finetuned.dtype)
    return out.reshape(finetuned.shape), idx, vals


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. On the CPU by ``aminmax`` (NaN and ±Inf reach the minimum or the maximum):
    one vectorised pass, no tensor-sized temporary (``isfinite().all()`` was 20x slower)."""
    if t.device.type != "cpu" or not t.is_floating_point() or t.numel() == 0:
        return bool(t.isfinite().all())
    with _one_intra_op_thread():  # memory-bound: one thread (~15 GB/s)
        lo, hi = torch.aminmax(t.reshape(-1))
    return bool(lo.isfinite()) and bool(hi.isfinite())


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` (contiguous, same size in bytes) are equal byte for byte, compared as wide integers."""
    n = a.numel() * a.element_size()
    if n != b.numel() * b.element_size():
        return False
    fa, fb = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    for w in (torch.int64, torch.int32, torch.int16):  # widest view both allow: 4-15x faster than bytes
        size = w.itemsize
        if n % size == 0 and fa.data_ptr() % size == 0 and fb.data_ptr() % size == 0:
            try:
                wa, wb = fa.view(w), fb.view(w)
            except RuntimeError:  # an offset into its storage that the wider view refuses
                continue
            with _one_intra_op_thread():  # memory-bound: one thread
                return torch.equal(wa, wb)
    return torch.equal(fa, fb)


class _one_intra_op_thread:  # noqa: N801 - used as a context manager, like torch.no_grad
    """torch runs one intra-op thread inside the block (the caller splits the work over threads itself).

    torch's thread count is process-wide: nested and concurrent blocks count, and the last one out
    restores the count found by the first one in.
    """

    _depth = 0
    _saved = 0
    _lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            if _one_intra_op_thread._depth == 0:
                _one_intra_op_thread._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _one_intra_op_thread._depth += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            _one_intra_op_thread._depth -= 1
            if _one_intra_op_thread._depth == 0:
                torch.set_num_threads(_one_intra_op_thread._saved)


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
    """``magic | u64 count | count × i64 index | count × value`` (little-endian): :func:`.host.encode_pins`."""
    return host.encode_pins(idx.to(torch.int64).numpy(), values.contiguous().view(_int_view(values.dtype)).numpy())


def decode_pins(data: bytes, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and values of a pins blob as tensors (:func:`.host.decode_pins` checks it)."""
    idx, bits = host.decode_pins(data, str(dtype).removeprefix("torch."), numel)
    return (torch.frombuffer(bytearray(idx.tobytes()), dtype=torch.int64) if idx.size else torch.empty(0, dtype=torch.int64),
            torch.frombuffer(bytearray(bits.tobytes()), dtype=dtype) if bits.size else torch.empty(0, dtype=dtype))


def apply_pins(out: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if idx.numel():
        flat = out.reshape(-1)
        flat[idx.to(out.device)] = values.to(device=out.device, dtype=out.dtype)
    return out
