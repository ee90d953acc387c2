"""A stored patch seen as what it does to a base: one dense delta per base tensor.

Every consumer (apply, export as diff, merge, port, load) goes through
:class:`PatchView`, so each kind and encoding is decoded in one place:

- ``diff``: tensors are keyed by base tensor name; raw little-endian bytes.
- ``sparse``: the same, encoded with the sparse codec (``sparse-v1``).
- ``lora``: PEFT keys (``base_model.model.<module>.lora_A.weight``, ...);
  the delta of ``<module>.weight`` is ``B @ A * scaling`` (see
  :mod:`patchctl.patches.lora`). Other adapter tensors (``modules_to_save``,
  trained biases: ``bias="all"|"lora_only"``) replace the base tensor's value;
  ``lora_B.bias`` (``lora_bias``) adds ``bias · scaling`` to the module's bias;
  ``lora_magnitude_vector`` makes the module DoRA (op ``dora``: the new weight
  is computed from the base weight); ``trainable_tokens_delta``
  (``trainable_token_indices``) replaces the listed rows (op ``rows``).
  Keys under :data:`FILE_PREFIX` are files of the adapter (its config bytes,
  model card, safetensors header), kept for a byte-identical export; they change
  no tensor.

Tensors are read one at a time; nothing holds the whole patch in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchctl.errors import InvalidPatch, ShapeMismatch, UnsupportedPatch
from patchctl.registry.formats.safetensors import bytes_to_tensor, torch_dtype
from patchctl.registry.store.manifest import FILE_PREFIX, Manifest, TensorEntry

if TYPE_CHECKING:
    import torch

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.folder import Store

PEFT_PREFIX = "base_model.model."
#: ``FILE_PREFIX + "adapter_model.safetensors" + HEADER_SUFFIX``: the safetensors header as PEFT wrote it.
HEADER_SUFFIX = "#header"
_EXTRA_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<mag>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?"
                        r"|(?P<bias>lora_B)(?:\.[^.]+)?\.bias)$")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class LoraModule:
    module: str  # module path without the PEFT prefix, e.g. encoder.layer.0.attention.self.query
    a: str  # manifest key of A
    b: str  # manifest key of B
    embedding: bool
    magnitude: str | None = None  # manifest key of lora_magnitude_vector (DoRA)
    bias: str | None = None  # manifest key of lora_B.bias (lora_bias)

    @property
    def weight_key(self) -> str:
        return self.module + ".weight"


@dataclass(frozen=True)
class Change:
    """What a patch does to one base tensor."""

    target: str  # base tensor name (before resolution against a checkpoint)
    op: str  # "add" (delta), "replace" (value), "dora" or "rows" (computed from the base: PatchView.new_value)
    sources: tuple[str, ...]  # manifest keys it is computed from


def strip_peft(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def lora_modules(m: Manifest) -> tuple[dict[str, LoraModule], list[str]]:
    """LoRA modules of a ``lora`` manifest, and the keys that are not LoRA factors."""
    parts: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in m.tensors:
        if key.startswith(FILE_PREFIX):
            continue
        mt = _LORA_KEY.match(key)
        if not mt:
            mx = _EXTRA_KEY.match(key)
            if mx:
                parts.setdefault(mx.group("module"), {})["mag" if mx.group("mag") else "bias"] = key
            else:
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
        mods[strip_peft(module)] = LoraModule(strip_peft(module), a, b, emb, p.get("mag"), p.get("bias"))
    # a LoRA-wrapped module's own weight saved next to its factors (peft's save_embedding_layers):
    # the base's value, checked at push (:func:`patchctl.registry.ops.importing.push`); no change
    kept = {mod.module + ".base_layer.weight" for mod in mods.values()}
    return mods, [k for k in other if strip_peft(k) not in kept]


def token_rows(params: dict[str, object], module: str) -> list[int] | None:
    """The rows ``trainable_token_indices`` lists for ``module`` (a list: the input embedding's;
    a dict: the entry whose key is the module's name or a dot-separated suffix of it)."""
    idx = params.get("trainable_token_indices")
    if isinstance(idx, dict):
        idx = next((v for k, v in idx.items() if isinstance(k, str) and (module == k or module.endswith("." + k))),
                   None)
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        return None
    return idx


def replace_target(key: str) -> str:
    k = strip_peft(key)
    k = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", k)
    k = re.sub(r"\.base_layer\.", ".", k)  # bias="all"|"lora_only": a LoRA-wrapped layer's own bias
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
        out = [Change(mod.weight_key, "dora", (mod.a, mod.b, mod.magnitude)) if mod.magnitude
               else Change(mod.weight_key, "add", (mod.a, mod.b)) for mod in self._lora.values()]
        out += [Change(mod.module + ".bias", "add", (mod.bias,)) for mod in self._lora.values() if mod.bias]
        for k in self._other:
            mt = _TOKENS_KEY.match(k)
            out.append(Change(strip_peft(mt.group("module")) + ".weight", "rows", (k,)) if mt
                       else Change(replace_target(k), "replace", (k,)))
        return sorted(out, key=lambda c: c.target)

    def _module(self, key: str) -> LoraModule:
        mod = next((m for m in (self._lora or {}).values() if key in (m.a, m.bias)), None)
        if mod is None:
            raise InvalidPatch(f"{key} is not a LoRA factor of this patch")
        return mod

    def scaling(self, mod: LoraModule) -> float:
        """peft's ``scaling`` of a module: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per its patterns."""
        from patchctl.patches.lora import lora_scaling, pattern_value

        p = self.m.params
        r = int(self.m.tensors[mod.a].shape[0])
        alpha = pattern_value(mod.module, p.get("alpha_pattern") or {}, p.get("lora_alpha", r))
        return lora_scaling(r, float(alpha), bool(p.get("use_rslora", False)))

    def rows(self, change: Change) -> list[int]:
        """The rows a ``rows`` change replaces (``trainable_token_indices``)."""
        mt = _TOKENS_KEY.match(change.sources[0])
        idx = token_rows(self.m.params, strip_peft(mt.group("module"))) if mt else None
        if idx is None:
            raise InvalidPatch(f"{change.sources[0]}: trainable_token_indices lists no rows for this module")
        return idx

    def new_value(self, change: Change, base: torch.Tensor, device: str | None = None) -> torch.Tensor:
        """The value ``base`` (the base tensor) takes under ``change``, in ``base``'s dtype, on ``device``.

        Every op: ``add`` is :func:`~patchctl.patches.apply.combine` plus the stored pins, ``replace`` the
        stored value, ``dora`` DoRA's merged weight, ``rows`` the base with the listed rows replaced —
        each as peft's ``merge_and_unload`` computes it.
        """
        import torch

        from patchctl.patches.apply import apply_pins, combine
        from patchctl.patches.lora import dora_weight

        dev = str(device or base.device)
        base = base.to(dev)
        if change.op == "add":
            v = self.value(change, dev)
            if self._lora is not None and self._module(change.sources[0]).embedding and base.dtype != v.dtype \
                    and base.dtype != torch.float64:
                v = v.to(base.dtype)  # peft's Embedding.merge rounds the update to the weight's dtype first
            out = combine(base, v)
            pins = self.pins(change.sources[0])
            return apply_pins(out, *pins) if pins is not None else out
        if change.op == "replace":
            return self.value(change, dev).to(base.dtype)
        if change.op == "rows":
            idx = self.rows(change)
            rows = self.tensor(change.sources[0], dev)
            if rows.dim() != 2 or rows.shape[0] != len(idx) or base.dim() != 2 or rows.shape[1] != base.shape[1] \
                    or any(not 0 <= i < base.shape[0] for i in idx):
                raise ShapeMismatch(f"{change.sources[0]}: {list(rows.shape)} rows for indices {idx[:8]} do not fit "
                                    f"{change.target} {list(base.shape)} (trainable_token_indices)")
            return base.index_copy(0, torch.tensor(idx, dtype=torch.int64, device=dev), rows.to(base.dtype))
        if change.op == "dora":
            mod = self._module(change.sources[0])
            delta = self._lora_delta(mod, dev)
            fifo = mod.embedding or bool(self.m.params.get("fan_in_fan_out", False))
            return dora_weight(base, delta, self.tensor(mod.magnitude or "", dev), fifo).to(base.dtype)
        raise InvalidPatch(f"unknown change op {change.op!r} on {change.target}")

    def delta(self, change: Change, base: torch.Tensor | None = None, device: str = "cpu") -> torch.Tensor:
        """A change as a dense float32 delta: :meth:`value` for ``add``; ``new − base`` for the ops
        that need the base (``dora``, ``rows``), which ``base`` must then be."""
        import torch

        if change.op == "add":
            return self.value(change, device).to(torch.float32)
        if base is None:
            raise UnsupportedPatch(f"{change.target}: a {self._op_name(change)} change is not a delta by itself; "
                                   "it needs the base weights (apply it to the base)")
        new = self.new_value(change, base, device)
        return new.to(torch.float32) - base.to(device=device, dtype=torch.float32)

    @staticmethod
    def _op_name(change: Change) -> str:
        return {"dora": "DoRA (use_dora)", "rows": "trainable_token_indices",
                "replace": "whole-tensor (modules_to_save or bias)"}.get(change.op, change.op)

    def value(self, change: Change, device: str = "cpu") -> torch.Tensor:
        """The dense delta (op ``add``) or the new value (op ``replace``) of a change, fp32 for LoRA.

        ``dora`` and ``rows`` changes have none without the base: :meth:`new_value`, :meth:`delta`.
        """
        if self._lora is None or change.op == "replace":
            return self.tensor(change.sources[0], device)
        if change.op != "add":
            raise UnsupportedPatch(f"{change.target}: a {self._op_name(change)} change has no value without the "
                                   "base weights; apply it to the base")
        import torch

        mod = self._module(change.sources[0])
        if change.sources[0] == mod.bias:  # lora_bias: peft merges bias += lora_B.bias * scaling
            return self.tensor(mod.bias, device).to(torch.float32) * self.scaling(mod)
        return self._lora_delta(mod, device)

    def _lora_delta(self, mod: LoraModule, device: str) -> torch.Tensor:
        from patchctl.patches.lora import lora_delta

        a = self.tensor(mod.a, device)
        b = self.tensor(mod.b, device)
        scaling = self.scaling(mod)
        if mod.embedding:
            return (lora_delta(a, b, scaling)).T.contiguous()
        return lora_delta(a, b, scaling, fan_in_fan_out=bool(self.m.params.get("fan_in_fan_out", False)))

    def shape_of(self, change: Change) -> tuple[int, ...]:
        """The shape of the base tensor a change applies to."""
        if self._lora is None or change.op == "replace":
            return tuple(self.m.tensors[change.sources[0]].shape)
        if change.op == "rows":  # the embedding's width; its row count is the base's
            return (-1, *self.m.tensors[change.sources[0]].shape[1:])
        mod = self._module(change.sources[0])
        if change.sources[0] == mod.bias:
            return tuple(self.m.tensors[mod.bias].shape)
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
        if c.op == "rows":
            rows = view.rows(c)
            if len(info.shape) != 2 or tuple(shape[1:]) != tuple(info.shape[1:]) \
                    or any(not 0 <= i < info.shape[0] for i in rows):
                problems.append(f"{c.target}: trainable_token_indices {rows[:8]} with rows of width "
                                f"{list(shape[1:])} do not fit base shape {list(info.shape)}")
        elif tuple(shape) != tuple(info.shape):
            problems.append(f"{c.target}: patch shape {list(shape)} != base shape {list(info.shape)}")
        resolved[c.target] = key
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShapeMismatch(f"patch does not fit the base: {'; '.join(problems[:5])}{more}")
    return resolved


#: The module name of an input embedding (``embed_tokens``, ``word_embeddings``, GPT-2's ``wte``, T5's ``shared``).
_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:[^.]*embed[^.]*|wte|shared)$", re.IGNORECASE)
#: Architectures (``config.json`` ``architectures``) whose name ends so have an output head.
_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration", "ForSeq2SeqLM")


def tied_changes(view: PatchView, base: Checkpoint) -> list[str]:
    """Base tensors the patch changes that the base ties to its output head, one line each.

    A base ties them when its ``config.json`` says ``tie_word_embeddings: true`` and its
    architecture has a head; the tied tensor is the input embedding (``[vocab_size, dim]``, named like one).
    peft's merge changes that one tensor, so the head changes too; so does ``apply``.
    """
    return [f"{key} is tied to {head} in this base (tie_word_embeddings): the patch changes both, "
            "as PEFT's merge does" for key, head in tied_targets(view, base).values()]


def tied_targets(view: PatchView, base: Checkpoint) -> dict[str, tuple[str, str]]:
    """``{change target: (base key, head)}`` for the changes to a tensor the base ties to its head."""
    cfg = base.config()
    sub = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    tie = cfg.get("tie_word_embeddings", sub.get("tie_word_embeddings"))
    arch = cfg.get("architectures")
    arch = arch if isinstance(arch, list) and arch else [""]
    if tie is not True or not isinstance(arch[0], str) or not arch[0].endswith(_HEAD_SUFFIXES):
        return {}
    vocab = cfg.get("vocab_size", sub.get("vocab_size"))
    head = "lm_head.weight" if arch[0].endswith(("ForCausalLM", "LMHeadModel")) else "the output embeddings"
    out = {}
    for c in view.changes():
        key = base.resolve(c.target)
        if key is None or "lm_head" in key:
            continue
        shape = base.info(key).shape
        if len(shape) == 2 and shape[0] == vocab and _INPUT_EMBEDDING.search(key.removesuffix(".weight")):
            out[c.target] = (key, head)
    return out
