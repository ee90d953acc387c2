"""A stored patch seen as what it does to a base: one dense delta per base tensor.

Every consumer (apply, export as diff, merge, port, load) goes through
:class:`PatchView`, so each kind and encoding is decoded in one place:

- ``diff``: tensors are keyed by base tensor name; raw little-endian bytes.
- ``sparse``: the same, encoded with the sparse codec (``sparse-v1``).
- ``lora``: PEFT keys (``base_model.model.<module>.lora_A.weight``, ...);
  the delta of ``<module>.weight`` is ``B @ A * scaling`` (see
  :mod:`patchctl.patches.lora`). Other adapter tensors (``modules_to_save``,
  trained biases) replace the base tensor's value.

Tensors are read one at a time; nothing holds the whole patch in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchctl.errors import InvalidPatch, ShapeMismatch
from patchctl.registry.formats.safetensors import bytes_to_tensor, torch_dtype
from patchctl.registry.store.manifest import Manifest, TensorEntry

if TYPE_CHECKING:
    import torch

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.folder import Store

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class LoraModule:
    module: str  # module path without the PEFT prefix, e.g. encoder.layer.0.attention.self.query
    a: str  # manifest key of A
    b: str  # manifest key of B
    embedding: bool

    @property
    def weight_key(self) -> str:
        return self.module + ".weight"


@dataclass(frozen=True)
class Change:
    """What a patch does to one base tensor."""

    target: str  # base tensor name (before resolution against a checkpoint)
    op: str  # "add" (delta) or "replace" (value)
    sources: tuple[str, ...]  # manifest keys it is computed from


def strip_peft(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def lora_modules(m: Manifest) -> tuple[dict[str, LoraModule], list[str]]:
    """LoRA modules of a ``lora`` manifest, and the keys that are not LoRA factors."""
    parts: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in m.tensors:
        mt = _LORA_KEY.match(key)
        if not mt:
            other.append(key)
            continue
        module = mt.group("module") or mt.group("emodule")
        part = mt.group("part") or mt.group("epart")
        parts.setdefault(module, {})[part] = key
    mods: dict[str, LoraModule] = {}
    for module, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise InvalidPatch(f"LoRA module {strip_peft(module)!r} has only one of its A/B factors")
        mods[strip_peft(module)] = LoraModule(strip_peft(module), a, b, emb)
    return mods, other


def replace_target(key: str) -> str:
    k = strip_peft(key)
    k = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", k)
    return k


class PatchView:
    def __init__(self, store: Store, manifest: Manifest):
        self.store = store
        self.m = manifest
        self._lora: dict[str, LoraModule] | None = None
        if manifest.kind == "lora" or (manifest.kind == "sparse" and manifest.params.get("source_kind") == "lora"):
            self._lora, self._other = lora_modules(manifest)

    # -- raw tensors --------------------------------------------------------
    def tensor(self, key: str, device: str = "cpu") -> torch.Tensor:
        """The stored tensor ``key``, decoded (sparse → dense) on ``device``."""
        entry = self.m.tensors[key]
        return decode_entry(self.store.read_blob(entry.digest), entry, device)

    def pins(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from patchctl.patches.apply import decode_pins

        entry = self.m.tensors.get(key)
        if entry is None or not entry.pins:
            return None
        return decode_pins(self.store.read_blob(entry.pins["digest"]), torch_dtype(entry.dtype), entry.numel)

    # -- changes ---------------------------------------------------------------
    def changes(self) -> list[Change]:
        if self._lora is None:
            return [Change(k, "add", (k,)) for k in sorted(self.m.tensors)]
        out = [Change(mod.weight_key, "add", (mod.a, mod.b)) for mod in self._lora.values()]
        out += [Change(replace_target(k), "replace", (k,)) for k in self._other]
        return sorted(out, key=lambda c: c.target)

    def value(self, change: Change, device: str = "cpu") -> torch.Tensor:
        """The dense delta (op ``add``) or the new value (op ``replace``) of a change, fp32 for LoRA."""
        if self._lora is None or change.op == "replace":
            return self.tensor(change.sources[0], device)
        from patchctl.patches.lora import lora_delta, lora_scaling, pattern_value

        mod = next(m for m in self._lora.values() if m.a == change.sources[0])
        p = self.m.params
        a = self.tensor(mod.a, device)
        b = self.tensor(mod.b, device)
        r = int(a.shape[0])
        alpha = pattern_value(mod.module, p.get("alpha_pattern") or {}, p.get("lora_alpha", r))
        scaling = lora_scaling(r, float(alpha), bool(p.get("use_rslora", False)))
        if mod.embedding:
            return (lora_delta(a, b, scaling)).T.contiguous()
        return lora_delta(a, b, scaling, fan_in_fan_out=bool(p.get("fan_in_fan_out", False)))

    def shape_of(self, change: Change) -> tuple[int, ...]:
        """The shape of the base tensor a change applies to."""
        if self._lora is None or change.op == "replace":
            return tuple(self.m.tensors[change.sources[0]].shape)
        mod = next(m for m in self._lora.values() if m.a == change.sources[0])
        a, b = self.m.tensors[mod.a].shape, self.m.tensors[mod.b].shape
        if mod.embedding:
            return (a[1], b[0])
        if self.m.params.get("fan_in_fan_out"):
            return (a[1], b[0])
        return (b[0], a[1])

    def iter_deltas(self, device: str = "cpu") -> Iterator[tuple[str, str, torch.Tensor]]:
        for c in self.changes():
            yield c.target, c.op, self.value(c, device)


def decode_entry(data: bytes, entry: TensorEntry, device: str = "cpu") -> torch.Tensor:
    if entry.encoding == "raw":
        if len(data) != entry.size:
            raise InvalidPatch(f"blob {entry.digest} has {len(data)} bytes, expected {entry.size}")
        return bytes_to_tensor(data, entry.dtype, entry.shape).to(device)
    if entry.encoding == "sparse-v1":
        from patchctl.patches import codec

        sp = codec.decode(data)
        if tuple(sp.shape) != tuple(entry.shape):
            raise InvalidPatch(f"sparse blob {entry.digest} decodes to shape {sp.shape}, expected {entry.shape}")
        return codec.to_dense(sp, device=device).to(torch_dtype(entry.dtype))
    raise InvalidPatch(f"unknown encoding {entry.encoding!r}")


def check_against_base(view: PatchView, base: Checkpoint) -> dict[str, str]:
    """Resolve every change to a base tensor; report every problem at once.

    Returns ``{change target: base key}``.
    """
    problems: list[str] = []
    resolved: dict[str, str] = {}
    for c in view.changes():
        key = base.resolve(c.target)
        if key is None:
            problems.append(f"{c.target}: not in the base")
            continue
        info = base.info(key)
        shape = view.shape_of(c)
        if tuple(shape) != tuple(info.shape):
            problems.append(f"{c.target}: patch shape {list(shape)} != base shape {list(info.shape)}")
        resolved[c.target] = key
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShapeMismatch(f"patch does not fit the base: {'; '.join(problems[:5])}{more}")
    return resolved
