"""The streaming pass of a task-arithmetic, TIES or DARE merge on the C kernels, without torch (issue #21).

:func:`usable` says when a planned merge can run here: a diff output on the
CPU, method ``task_arithmetic``, ``ties``, ``dare_ties`` or ``dare_linear`` (LiNeS too), every input change
a stored raw delta of float32, float16 or bfloat16, the output (and, with
``--apply``, every changed base tensor) of one of those dtypes, and the C
kernels built (:mod:`patchctl.patches.native`; ``PATCHCTL_NATIVE=0`` turns
them off). Then :func:`stream` does what :func:`.stream._stream` does, in the
same order with the same threads, on :class:`~patchctl.patches.host.HostTensor`
views of the mapped blobs and base shards: merged by
:func:`patchctl.patches.host_merge.merge` (the fused kernels the torch path
also runs), checked finite, stored as a blob and (``--apply``) added to the
base by ``pc_add_cast``. The bits are the torch path's
(``tests/test_host_merge.py`` runs both); ``import torch`` (1.2-2 s of a
merge on a small VM) is never paid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchctl.errors import PatchctlError
from patchctl.patches import host, native
from patchctl.patches.finite import require_finite
from patchctl.patches.host import HostTensor
from patchctl.patches.host_merge import l1_sums
from patchctl.patches.host_merge import merge as merge_host
from patchctl.patches.methods import HOST_METHODS
from patchctl.registry.ops.merging.plan import _Plan
from patchctl.registry.ops.merging.stream import (
    Progress,
    _Item,
    _items,
    _pipeline,
    _Shards,
    _tick,
)
from patchctl.registry.ops.merging.verify import _map, _map_blob, _Verifier
from patchctl.registry.store.folder import BlobWriter
from patchctl.registry.store.manifest import TensorEntry

if TYPE_CHECKING:
    from concurrent.futures import Future


def usable(p: _Plan) -> bool:
    """Whether the merge ``p`` runs here (see the module docstring); else the torch engine does."""
    if (native.lib is None or p.method not in HOST_METHODS or p.device != "cpu" or p.as_lora is not None
            or p.dtype not in host.CODES):
        return False
    for inp in p.inputs:
        if inp.lora or inp.view.m.kind == "lora":
            return False
        for c in inp.changes.values():
            e = inp.view.m.tensors.get(c.sources[0]) if c.op == "add" and len(c.sources) == 1 else None
            if e is None or e.encoding != "raw" or e.dtype not in host.CODES:
                return False
    if p.base is not None:  # --apply: base + merged by pc_add_cast
        for t in p.targets:
            key = p.base.resolve(t)
            if key is None or p.base.info(key).dtype not in host.CODES:
                return False
    return True


_PART = 4 << 20  # bytes of base + merged made and written at a time (--apply): whole pages, whole elements


def _flat(t: HostTensor, lo: int, hi: int) -> HostTensor:
    """Elements ``[lo, hi)`` of ``t``, flat (a view)."""
    size = host.itemsize(t.dtype)
    return HostTensor(t.buf[lo * size : hi * size], t.dtype, (hi - lo,))


class _Held:
    """Buffers of :data:`~patchctl.patches.host.POOL` held by each slot of the pass until its next item.

    One pool for every slot, best fit: a buffer freed by one slot takes the next
    tensor of any slot, so fresh memory is the most the pass holds at once (a few
    of the largest tensors), not each slot's own largest buffers. Fresh pages cost
    their zeroing, and on a VM whose host reclaims free guest memory far more
    (first touch of 382 MB: 0.69 s here, against 0.02 s for pages used before).
    """

    PAGE = 4096

    def __init__(self) -> None:
        self.slots: dict[int, list[HostTensor]] = {}

    def take(self, slot: int, dtype: str, shape: Sequence[int], lead: int = 0) -> HostTensor:
        n = math.prod(shape) * host.itemsize(dtype)
        t = HostTensor(host.POOL.take(n, lead), dtype, tuple(shape), pooled=True)
        self.slots.setdefault(slot, []).append(t)
        return t

    def free(self, slot: int | None = None) -> None:
        """Give back ``slot``'s buffers (its item is stored and written), or every slot's."""
        for s in list(self.slots) if slot is None else [slot]:
            for t in self.slots.pop(s, []):
                t.release()


class _Reader:
    """An item's inputs as HostTensors over mapped file pages (the :class:`_Verifier` hashes the blobs)."""

    def __init__(self, p: _Plan, store: Any, verifier: _Verifier):
        self.p, self.store, self.verifier = p, store, verifier
        self.zeros: dict[tuple[int, ...], HostTensor] = {}  # bfloat16 zeros by shape, made once
        self.fds: dict[int, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def delta(self, target: str, k: int) -> HostTensor:
        inp = self.p.inputs[k]
        c = inp.changes.get(target)
        if c is None:  # this input does not change the target: a zero delta (bfloat16, as the torch engine)
            shape = self.p.shapes[target]
            if shape not in self.zeros:  # read only: one per shape serves every input
                self.zeros[shape] = HostTensor(np.zeros(math.prod(shape) * 2, np.uint8), "bfloat16", shape)
            return self.zeros[shape]
        entry = inp.view.m.tensors[c.sources[0]]
        if entry.digest not in self.verifier.digests:  # not in the manifests the verifier saw: never merged unchecked
            raise PatchctlError(f"internal error: blob {entry.digest} of {inp.ref} is not being verified")
        data = _map_blob(self.store, entry)
        return HostTensor(np.frombuffer(data, np.uint8) if data else b"", entry.dtype, entry.shape)

    def base(self, item: _Item) -> HostTensor:
        info = item.info
        if not info.nbytes:
            return HostTensor(b"", info.dtype, info.shape)
        fd = self.fds.get(item.shard)
        if fd is None:
            fd = self.fds[item.shard] = os.open(self.p.base.files[item.shard].path, os.O_RDONLY)
        data, off = _map(fd, info.start, info.nbytes)
        return HostTensor(np.frombuffer(data, np.uint8, count=info.nbytes, offset=off), info.dtype, info.shape)


def _put(store: Any, t: HostTensor) -> TensorEntry:
    """Store a merged tensor's bytes as a blob, hashing them once as they are written (around the page cache)."""
    data = memoryview(t.buf)
    with BlobWriter(store, direct=True) as w:
        w.write(data)
        digest = w.commit()
    return TensorEntry(digest, t.dtype, t.shape, "raw", len(data))


def lines_alpha(p: _Plan, store: Any, verifier: _Verifier, progress: Progress, done: list[int],
                total: int, memo: dict[str, Any] | None = None) -> float | None:
    """:func:`.stream._lines_alpha` of a :func:`usable` plan: the given α, or (``auto``) a first pass that
    merges each tensor into a pooled float32 buffer and adds up its L1 norms
    (:func:`patchctl.patches.host_merge.l1_sums`, the sums the torch engine's ``l1_norms`` takes on the
    CPU), in target order. ``memo`` keeps TIES's top-k of each tensor for :func:`stream`."""
    from patchctl.patches.lines import default_alpha

    if p.lines is None:
        return None
    if p.lines != "auto":
        return float(p.lines)
    reader = _Reader(p, store, verifier)
    sum_l1 = merged_l1 = 0.0
    try:
        for t in p.targets:
            deltas = [reader.delta(t, k) for k in range(len(p.inputs))]
            merged = HostTensor(host.POOL.take(math.prod(p.shapes[t]) * 4), "float32", p.shapes[t], pooled=True)
            try:
                merge_host(p.method, deltas, p.weights, p.per_tensor[t], merged, seed=p.seed, name=t, memo=memo)
                a, b = l1_sums([native.ptr(d.buf) for d in deltas], [host.CODES[d.dtype] for d in deltas],
                               native.ptr(merged.buf), merged.numel())
            finally:
                merged.release()
            sum_l1 += a
            merged_l1 += b
            del deltas
            _tick(p, t, progress, done, total)
    finally:
        reader.close()
    return default_alpha(sum_l1, merged_l1, len(p.inputs))


def stream(p: _Plan, store: Any, verifier: _Verifier, folder: Path | None, progress: Progress, done: list[int],
           total: int, alpha: float | None = None, beta: float = 0.0,
           memo: dict[str, Any] | None = None) -> dict[str, TensorEntry]:
    """:func:`.stream._stream` of a :func:`usable` plan, on the C kernels (same stages, same threads).
    ``alpha``/``beta``: LiNeS (each merged tensor, in float32, times its :func:`~patchctl.patches.lines.
    lines_scale` as a float32, then rounded into the stored dtype, as the torch engine does: in the merge
    kernel's last step); ``memo``: :func:`lines_alpha`'s."""
    from patchctl.patches.lines import lines_scale

    items = _items(p, folder is not None)
    shards = _Shards(p, folder) if folder is not None else None
    tensors: dict[str, TensorEntry] = {}

    def put(target: str, stored: HostTensor) -> None:
        tensors[target] = _put(store, require_finite(stored, target, "the merge"))

    sums = np.empty(_PART + _Held.PAGE, np.uint8)  # the model writer's (one thread) chunk of base + merged

    def write(item: _Item, base: HostTensor, stored: HostTensor | None = None) -> None:
        """``base`` as it is, or ``base + stored`` made and written a chunk at a time, into the model's shard.

        A chunk starts at an address congruent to its place in the file (chunks are whole pages), so
        the direct writer sends it without a copy; no tensor-sized buffer, so no fresh pages for it.
        """
        assert shards is not None
        if stored is None:
            shards(item, base)
            return
        size = host.itemsize(base.dtype)
        start = (-sums.ctypes.data + shards.offset(item)) % _Held.PAGE
        step = _PART // size

        def parts() -> Any:
            for lo in range(0, base.numel(), step):
                hi = min(base.numel(), lo + step)
                out = HostTensor(sums[start : start + (hi - lo) * size], base.dtype, (hi - lo,))
                yield memoryview(host.add_into(_flat(base, lo, hi), _flat(stored, lo, hi), out=out).buf)

        shards.parts(item, parts())

    held = _Held()
    reader = _Reader(p, store, verifier)

    def load(item: _Item) -> list[Any]:
        deltas = [] if item.target is None else [reader.delta(item.target, k) for k in range(len(p.inputs))]
        return [deltas, reader.base(item) if item.info is not None else None]

    def step(item: _Item, slot: int, loaded: list[Any], bx: Any, mx: Any) -> list[Future[None]]:
        deltas, base = loaded
        loaded.clear()
        held.free(slot)  # this slot's previous item is stored and written: its buffers go back to the pool
        if item.target is None:
            return [] if base is None else [mx.submit(write, item, base)]
        t = item.target
        stored = held.take(slot, p.dtype, p.shapes[t])
        scale = None if alpha is None else lines_scale(t, p.num_blocks, alpha, beta)
        merge_host(p.method, deltas, p.weights, p.per_tensor[t], stored, seed=p.seed, name=t, memo=memo, post=scale)
        del deltas
        futs = [bx.submit(put, t, stored)]
        if base is not None:
            futs.append(mx.submit(write, item, base, stored))
        _tick(p, t, progress, done, total)
        return futs

    try:
        _pipeline(items, verifier, shards, reader, load, step)
    finally:
        held.free()
    return tensors
