"""The one-pass streaming engine of a diff merge, and the per-target helpers the other passes share.

**Streaming.** A diff output is made in one pass (:func:`_stream`): target by
target (sorted by name), or with ``--apply`` base tensor by base tensor in
each shard's data order. Each input's blob (and base tensor) is mapped, not
copied; the tensor merged in float32 chunks, rounded to the output dtype into
a reused buffer (LiNeS: scaled in float32 first) and stored as a blob; with
``--apply``, ``combine(base, stored)`` is written to the model's shard from
the same tensor, so the model is byte-identical to ``patchctl apply`` of the
stored merge (no second read of the patch). Every raw input blob is hashed by
a :class:`~.verify._Verifier` started before torch is imported; nothing is
committed before all of them have matched. Outputs go around the page cache
(:class:`~patchctl.registry.store.folder.DirectFile`); the ``--apply`` shards are not
fsynced (an export), the blobs are. Merging this tensor and storing and
writing the previous ones overlap on threads; memory is a few copies of the
largest tensor.

LiNeS ``auto`` needs the model-wide L1 norms first, so it makes one more
pass (:func:`_lines_alpha`) that merges each tensor, accumulates
:func:`~patchctl.patches.lines.l1_norms` and discards it. LoRA outputs
(:mod:`.lora`) keep a per-target loop over :func:`_deltas` and :func:`_merged`.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import PatchctlError
from patchctl.patches._workers import capped, workers
from patchctl.registry.formats.safetensors import (
    StreamingWriter,
    data_order,
    dtype_name,
    header_bytes,
    tensor_to_bytes,
    torch_dtype,
)
from patchctl.registry.ops.exporting import copy_side_files
from patchctl.registry.ops.merging.plan import _Plan
from patchctl.registry.ops.merging.verify import _map, _map_blob, _Verifier
from patchctl.registry.store.folder import BlobWriter, DirectFile
from patchctl.registry.store.manifest import TensorEntry

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

Progress = Callable[[int, int], None] | None

# -- the streaming pass: merged diff blobs and (--apply) the merged model, one read of each input --
_SLOTS = 4  # output buffers in flight: a tensor is merged while the previous ones are still being written


@dataclass(frozen=True)
class _Item:
    """One tensor of the pass: a merged target, and/or (apply) a base tensor written to a shard."""

    target: str | None  # None: a base tensor no input changes, copied as is
    shard: int = -1  # index into the base's files (apply), -1 without apply
    info: Any = None  # the base tensor's TensorInfo (apply)


class Buffers:
    """Named byte buffers reused from tensor to tensor, grown to the largest asked for.

    A fresh allocation of a large tensor is a fresh mmap: every page of it
    faults again, which cost more than the arithmetic. A buffer starts
    ``lead`` bytes after a page boundary, so that a tensor bound for file
    offset ``lead`` (mod the page size) can be written with direct I/O
    straight from it (:class:`~patchctl.registry.store.folder.DirectFile`).
    """

    PAGE = 4096

    def __init__(self) -> None:
        self._bufs: dict[str, Any] = {}

    def get(self, name: str, dtype: Any, shape: Sequence[int], lead: int = 0) -> torch.Tensor:
        import torch

        n = math.prod(shape) * dtype.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n + 2 * self.PAGE:
            buf = self._bufs[name] = torch.empty(n + 2 * self.PAGE, dtype=torch.uint8)
        start = -buf.data_ptr() % self.PAGE + lead % self.PAGE
        return buf[start : start + n].view(dtype).view(tuple(shape))



def _put_tensor(store: Any, t: torch.Tensor) -> TensorEntry:
    """Store a CPU tensor's bytes as a blob, hashing them once as they are written."""

    data = tensor_to_bytes(t)
    with BlobWriter(store, direct=True) as w:  # not read back here: around the page cache
        w.write(data)  # one hash call and one write (from the page-aligned buffer): few turns at the GIL
        digest = w.commit()
    return TensorEntry(digest, dtype_name(t.dtype), tuple(t.shape), "raw", len(data))



class _Reader:
    """Loads an item's inputs: each input's delta and the base tensor, as tensors over mapped file pages.

    Raw blobs are mapped, not read: the :class:`_Verifier` hashes them. A
    sparse-encoded or LoRA input is decoded (and verified) as
    :class:`PatchView` does. Zero deltas (an input that does not change a
    target) come from reused buffers.
    """

    def __init__(self, p: _Plan, store: Any, verifier: _Verifier):
        self.p, self.store, self.verifier = p, store, verifier
        self.zeros = Buffers()
        self.fds: dict[int, int] = {}  # the base's shards, open

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def delta(self, target: str, k: int) -> torch.Tensor:
        """Input ``k``'s delta for ``target`` (a zero tensor where that input does not change it)."""
        import torch


        inp = self.p.inputs[k]
        c = inp.changes.get(target)
        if c is None:
            return self.zeros.get(f"zero{k}", torch.bfloat16, self.p.shapes[target]).zero_()
        if c.op in ("dora", "rows"):  # ΔW = W' − W from the base (checked present by the plan)
            return _based_delta(inp, c, "cpu")
        entry = None if inp.lora else inp.view.m.tensors.get(c.sources[0])
        if entry is None or entry.encoding != "raw":  # sparse-encoded, LoRA: decoded (and verified) as PatchView does
            return inp.view.value(c, "cpu")
        if entry.digest not in self.verifier.digests:  # not in the manifests the verifier saw: never merged unchecked
            raise PatchctlError(f"internal error: blob {entry.digest} of {inp.ref} is not being verified")
        data = _map_blob(self.store, entry)
        if not data:
            return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        return torch.frombuffer(data, dtype=torch_dtype(entry.dtype)).view(entry.shape)

    def base(self, item: _Item) -> torch.Tensor:
        """The base tensor of an apply item, from its shard."""
        import torch


        info = item.info
        if not info.nbytes:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        fd = self.fds.get(item.shard)
        if fd is None:
            fd = self.fds[item.shard] = os.open(self.p.base.files[item.shard].path, os.O_RDONLY)
        data, off = _map(fd, info.start, info.nbytes)
        return torch.frombuffer(data, dtype=torch.uint8, offset=off, count=info.nbytes).view(
            torch_dtype(info.dtype)).view(info.shape)


class _Shards:
    """Writes the shards of the merged model (apply), tensor by tensor in the base's data order."""

    def __init__(self, p: _Plan, folder: Path):
        self.p, self.folder = p, folder
        self.offsets: dict[int, dict[str, int]] = {}  # shard -> tensor name -> file offset
        self.shard = -1
        self.f: Any = None
        self.w: Any = None

    def __call__(self, item: _Item, applied: Any) -> None:
        while self.shard < item.shard:
            self._next_shard()
        self.w.write(item.info.name, applied)

    def parts(self, item: _Item, parts: Any) -> None:
        """Write ``item``'s bytes given in consecutive parts (made chunk by chunk)."""
        while self.shard < item.shard:
            self._next_shard()
        self.w.write_parts(item.info.name, parts)

    def offset(self, item: _Item) -> int:
        """Where ``item``'s bytes go in its shard file."""

        if item.shard not in self.offsets:
            sf = self.p.base.files[item.shard]
            head, spans = header_bytes([(i.name, i.dtype, i.shape) for i in sf], sf.metadata or None)
            self.offsets[item.shard] = {name: len(head) + a for name, (a, _) in spans.items()}
        return self.offsets[item.shard][item.info.name]

    def _next_shard(self) -> None:

        self._close_shard()
        self.shard += 1
        sf = self.p.base.files[self.shard]
        fd = os.open(self.folder / sf.path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.f = DirectFile(fd)  # around the page cache: nothing reads the model back here
        self.w = StreamingWriter(self.f, [(i.name, i.dtype, i.shape) for i in sf], sf.metadata or None)

    def _close_shard(self) -> None:
        if self.f is not None:
            self.w.close()
            self.f.close()  # no fsync: an export, not registry state (docs/design.md, "merge --apply")
            self.f = None

    def finish(self) -> None:
        while self.shard < len(self.p.base.files) - 1:
            self._next_shard()
        self._close_shard()

    def abort(self) -> None:
        if self.f is not None:
            self.f.abort()
            self.f = None


def _items(p: _Plan, apply: bool) -> list[_Item]:
    """The tensors of the pass in write order: the base's shards and data order with apply, else the targets."""

    if not apply:
        return [_Item(t) for t in p.targets]
    by_key = {p.base.resolve(t): t for t in p.targets}
    out = []
    for s, sf in enumerate(p.base.files):
        for name, _, _ in data_order([(i.name, i.dtype, i.shape) for i in sf]):
            out.append(_Item(by_key.get(name), s, sf.tensors[name]))
    return out


def _copy_side_files(base: Any, folder: Path) -> None:
    """The base folder's config, tokenizer, ... (not weights, not pickles), as ``apply`` copies them."""

    copy_side_files(base, folder)


def _stream(p: _Plan, store: Any, verifier: _Verifier, alpha: float | None, beta: float, folder: Path | None,
            progress: Progress, done: list[int], total: int) -> dict[str, TensorEntry]:
    """Merge every target once; store each as a blob and (``folder``) write base + merged shard by shard.

    The stages overlap: this thread maps the inputs and merges the current
    tensor while ``_SLOTS - 1`` threads store the previous merged blobs
    (manifest keys are sorted, so the order they finish in does not matter)
    and one makes ``base + merged`` and writes the model's shards in order;
    the :class:`_Verifier` hashes the inputs meanwhile. Output buffers are
    reused (``_SLOTS`` sets), so memory is bounded by a few copies of the
    largest tensor. The arithmetic runs on one intra-op thread: the stages
    already fill the cores, and chunk-sized operations only lose to thread
    hand-offs.
    """
    import torch

    from patchctl.patches.apply import combine
    from patchctl.patches.finite import require_finite
    from patchctl.patches.lines import lines_scale
    from patchctl.patches.merge import merge_tensor

    out_dtype = getattr(torch, p.dtype)
    items = _items(p, folder is not None)
    shards = _Shards(p, folder) if folder is not None else None
    tensors: dict[str, TensorEntry] = {}

    def put(target: str, stored: torch.Tensor) -> None:
        tensors[target] = _put_tensor(store, require_finite(stored, target, "the merge"))

    def write(item: _Item, base: torch.Tensor, stored: torch.Tensor | None = None, out: Any = None) -> None:
        """``base + stored`` (or ``base`` as it is) into the model's shard, on the model's writer thread."""
        assert shards is not None
        shards(item, base if stored is None else combine(base, stored, out=out))

    outs, work = [Buffers() for _ in range(_SLOTS)], Buffers()

    reader = _Reader(p, store, verifier)

    def load(item: _Item) -> list[Any]:
        """``[deltas, base]`` of ``item`` (``step`` empties the list, so the mappings go with its names)."""
        deltas = [] if item.target is None else [reader.delta(item.target, k) for k in range(len(p.inputs))]
        return [deltas, reader.base(item) if item.info is not None else None]

    def step(item: _Item, slot: int, loaded: Any, bx: Any, mx: Any) -> list[Future[None]]:
        deltas, base = loaded
        loaded.clear()
        if item.target is None:
            return [] if base is None else [mx.submit(write, item, base)]  # a mapping of its own: as it is
        t = item.target
        shape = p.shapes[t]
        stored = outs[slot].get("stored", out_dtype, shape)
        # rounded into the stored dtype chunk by chunk where nothing scales the float32 result first
        direct = p.device == "cpu" and alpha is None and out_dtype in (torch.bfloat16, torch.float16)
        merged = merge_tensor(p.method, [d.to(p.device) for d in deltas], p.weights, generator_seed=p.seed,
                              name=t, params=p.per_tensor[t], out=stored if direct
                              else work.get("merged", torch.float32, shape) if p.device == "cpu" else None)
        del deltas
        if not direct:
            if alpha is not None:
                merged.mul_(lines_scale(t, p.num_blocks, alpha, beta))
            stored.copy_(merged)
        del merged
        futs = [bx.submit(put, t, stored)]
        if base is not None:  # base + merged is made on the model's writer thread
            assert shards is not None
            applied = outs[slot].get("applied", base.dtype, base.shape, shards.offset(item))
            futs.append(mx.submit(write, item, base, stored, applied))
        _tick(p, t, progress, done, total)
        return futs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pipeline(items, verifier, shards, reader, load, step)
    finally:
        torch.set_num_threads(threads)
    return tensors


def _pipeline(items: list[_Item], verifier: _Verifier, shards: _Shards | None, reader: Any,
              load: Callable[[_Item], Any], step: Callable[[_Item, int, Any, Any, Any], list[Future[None]]]) -> None:
    """The stages of a streaming pass, whatever does the arithmetic (torch here, the C kernels in
    :mod:`.host_stream`): for each item in order, ``load(item)`` on this thread (mapped inputs), then,
    once the futures of its buffer slot (``n % _SLOTS``) are done, ``step(item, slot, loaded, bx, mx)``
    merges it and returns the futures that store it on the blob writers ``bx`` (``_SLOTS - 1`` threads:
    each blob's fsync waits on the device) and write it on the model writer ``mx`` (one thread, shard
    order). Then every input is verified before the model is finished. The C kernels split a tensor over a
    quarter of the streaming threads (the stages already run on threads of their own); the cyclic GC is
    paused (thousands of chunk-sized tensor views would trigger full collections); the reader closed."""
    from concurrent.futures import ThreadPoolExecutor

    pending: list[list[Future[None]]] = [[] for _ in range(_SLOTS)]
    cap = capped(max(1, workers() // 4))
    cap.__enter__()
    collect = gc.isenabled()
    gc.disable()
    pools = [ThreadPoolExecutor(w, f"patchctl-merge-{s}") for s, w in (("blobs", _SLOTS - 1), ("model", 1))]
    bx, mx = pools
    try:
        for n, item in enumerate(items):
            verifier.check()  # a corrupt input stops the merge as soon as it is found
            loaded = load(item)
            slot = n % _SLOTS
            for f in pending[slot]:
                f.result()  # the buffers of this slot are free again
            pending[slot] = step(item, slot, loaded, bx, mx)
            del loaded
        for fs in pending:
            for f in fs:
                f.result()
        verifier.wait()  # every input checked before the model is finished and the patch committed
        if shards is not None:
            shards.finish()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        cap.__exit__()
        if collect:
            gc.enable()
        reader.close()
        if shards is not None:
            shards.abort()


def _deltas(p: _Plan, target: str, upcast: bool = True) -> list[torch.Tensor]:
    """Every input's delta for ``target``: float32, or (``upcast`` false) as stored (the merge methods
    read 16-bit floats as they are, and give the same result for the same values)."""
    import torch

    out = []
    for i in p.inputs:
        c = i.changes.get(target)
        if c is None:
            out.append(torch.zeros(p.shapes[target], dtype=torch.float32, device=p.device))
        elif c.op in ("dora", "rows"):
            out.append(_based_delta(i, c, p.device))
        else:
            v = i.view.value(c, p.device)
            out.append(v.to(torch.float32) if upcast else v)
    return out


def _based_delta(i: Any, c: Any, device: Any) -> torch.Tensor:
    """A DoRA / trainable-tokens change as the float32 ΔW = W' − W it makes to the base tensor."""
    key = i.base.resolve(c.target)
    if key is None:
        raise PatchctlError(f"{i.ref}: {c.target} is not in its base {i.base.path}")
    return i.view.delta(c, i.base.read(key), str(device))


def _merged(p: _Plan, target: str, deltas: list[torch.Tensor]) -> torch.Tensor:
    from patchctl.patches.merge import merge_tensor

    return merge_tensor(p.method, deltas, p.weights, generator_seed=p.seed, name=target, params=p.per_tensor[target])


def _lines_alpha(p: _Plan, progress: Progress, done: list[int], total: int) -> float | None:
    """α for LiNeS: the given number, or (auto) a first streaming pass over the L1 norms."""
    from patchctl.patches.lines import default_alpha, l1_norms

    if p.lines is None:
        return None
    if p.lines != "auto":
        return float(p.lines)
    import torch

    sum_l1 = merged_l1 = 0.0
    threads = torch.get_num_threads()
    # one intra-op thread, as in the streaming pass: chunk-sized ops only lose to thread hand-offs
    # (2 threads: 84 s, 1 thread: 24 s on the 468M bench), and the float64 L1 sums (so α) do not
    # depend on the machine's core count
    torch.set_num_threads(1)
    try:
        with capped(max(1, workers() // 4)):  # as in the streaming pass
            for t in p.targets:
                deltas = _deltas(p, t, upcast=False)  # TIES's top-k of 16-bit floats: one histogram, not two
                a, b = l1_norms(deltas, _merged(p, t, deltas))
                sum_l1 += a
                merged_l1 += b
                del deltas
                _tick(p, t, progress, done, total)
    finally:
        torch.set_num_threads(threads)
    return default_alpha(sum_l1, merged_l1, len(p.inputs))


def _tick(p: _Plan, t: str, progress: Progress, done: list[int], total: int) -> None:
    done[0] += math.prod(p.shapes[t]) * 4
    if progress:
        progress(done[0], total)
