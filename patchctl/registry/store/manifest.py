"""Manifests: the canonical JSON document that defines one patch version.

```
{"schema": 1,
 "kind": "lora" | "diff" | "sparse" | "suite",   # suite: an eval suite (registry/suites.py)
 "base": {"name": str, "revision": str | null, "fingerprint": "sha256:..."},
 "tensors": {NAME: {"digest": "sha256:...", "dtype": "float32", "shape": [..],
                    "encoding": "raw" | "sparse-v1", "size": BYTES,
                    "pins": {"digest": ..., "count": N, "size": BYTES}?}},
 "params": {...},             # LoRA: the whole adapter_config; sparse: density, mode...
 "lineage": {"parents": ["sha256:..."], "recipe": {...} | null},
 "metadata": {...},           # user metadata (free-form JSON)
 "side_files": {              # diff: what a fine-tune changed besides tensors (only when it did)
   "config.json": {"json_patch": [RFC 6902 ops on the base's config.json]},
   "tokenizer.json": {"digest": "sha256:...", "size": BYTES},   # the fine-tune's file, a blob
   "vocab.txt": {"removed": true}}}                             # the base has it, the fine-tune not
```

``side_files`` is left out when empty, so a manifest without side files has the bytes (and
digest) it had before the field existed. Names are those
:func:`patchctl.registry.formats.sidefiles.is_side_file` allows: one path component, never a
weight file.

Who and when are kept out (they live in the ref history), so re-running a
recipe on the same inputs gives the same bytes and digest. The patch version's
id is ``sha256`` of :meth:`Manifest.to_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from patchctl.errors import InvalidPatch
from patchctl.registry.formats import canonical
from patchctl.registry.formats.safetensors import ITEMSIZE
from patchctl.registry.formats.sidefiles import CONFIG, check_ops, is_side_file
from patchctl.registry.store.names import is_digest

SCHEMA_VERSION = 1
KINDS = ("lora", "diff", "sparse", "suite")
PATCH_KINDS = ("lora", "diff", "sparse")
ENCODINGS = ("raw", "sparse-v1")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: A ``lora`` manifest's tensor keys under this prefix are files of the adapter kept byte for byte
#: (``file:adapter_config.json``, ``file:README.md``, ``file:adapter_model.safetensors#header``) as
#: ``uint8`` entries, so every path that carries a patch's blobs carries them; they are not parameters.
FILE_PREFIX = "file:"


@dataclass(frozen=True)
class TensorEntry:
    digest: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str = "raw"
    size: int = 0
    pins: dict[str, Any] | None = None  # {"digest", "count", "size"}: exact-value pins

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "digest": self.digest,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "encoding": self.encoding,
            "size": self.size,
        }
        if self.pins:
            d["pins"] = dict(self.pins)
        return d

    def blobs(self) -> list[tuple[str, int]]:
        out = [(self.digest, self.size)]
        if self.pins:
            out.append((self.pins["digest"], int(self.pins["size"])))
        return out


@dataclass(frozen=True)
class Manifest:
    kind: str
    base: dict[str, Any]
    tensors: dict[str, TensorEntry]
    params: dict[str, Any] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    recipe: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    side_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> json_patch | blob | removed

    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA_VERSION,
            "kind": self.kind,
            "base": dict(self.base),
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "params": self.params,
            "lineage": {"parents": list(self.parents), "recipe": self.recipe},
            "metadata": self.metadata,
        }
        if self.side_files:  # absent when empty: older manifests keep their bytes and digests
            doc["side_files"] = {k: dict(v) for k, v in self.side_files.items()}
        return doc

    def to_bytes(self) -> bytes:
        return canonical.dumps(self.to_json())

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def fingerprint(self) -> str:
        return str(self.base["fingerprint"])

    @property
    def num_params(self) -> int:
        """Parameters the patch carries (0 for an eval suite, whose tensors are data)."""
        if self.kind == "suite":
            return 0
        return sum(t.numel for k, t in self.tensors.items() if not k.startswith(FILE_PREFIX))

    @property
    def stored_bytes(self) -> int:
        return sum(size for _, size in self.blobs())

    def blobs(self) -> list[tuple[str, int]]:
        """Every blob the patch names, with its size: tensors, their pins, side files (repeats kept)."""
        out = [b for t in self.tensors.values() for b in t.blobs()]
        return out + [(f["digest"], int(f["size"])) for f in self.side_files.values() if "digest" in f]

    def blob_digests(self) -> list[str]:
        return sorted({d for d, _ in self.blobs()})


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidPatch(f"invalid manifest: {msg}")


def parse(data: bytes) -> Manifest:
    """Parse and check manifest bytes; any defect raises :class:`InvalidPatch`."""
    _need(len(data) <= MAX_MANIFEST_BYTES, "larger than the 64 MiB cap")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also an int of 4300+ digits
        raise InvalidPatch("invalid manifest: not UTF-8 JSON") from None
    _need(isinstance(doc, dict), "not a JSON object")
    try:  # what parses must serialize canonically (to_bytes, the index): no NaN, Infinity, lone surrogate
        canonical.dumps(doc)
    except ValueError:
        raise InvalidPatch("invalid manifest: NaN, Infinity or a lone surrogate has no canonical JSON") from None
    _need(doc.get("schema") == SCHEMA_VERSION, f"unknown schema version {doc.get('schema')!r}")
    kind = doc.get("kind")
    _need(kind in KINDS, f"unknown kind {kind!r}")
    base = doc.get("base")
    _need(isinstance(base, dict), "base must be an object")
    _need(isinstance(base.get("fingerprint"), str) and is_digest(base["fingerprint"]), "base.fingerprint must be a digest")
    _need(isinstance(base.get("name"), str), "base.name must be a string")
    _need(base.get("revision") is None or isinstance(base.get("revision"), str), "base.revision must be a string or null")
    _need(base.get("content") is None or (isinstance(base["content"], str) and is_digest(base["content"])),
          "base.content must be a digest")
    tensors_doc = doc.get("tensors")
    _need(isinstance(tensors_doc, dict), "tensors must be an object")
    tensors: dict[str, TensorEntry] = {}
    for name, t in tensors_doc.items():
        _need(isinstance(t, dict), f"tensor {name!r} must be an object")
        _need(0 < len(name) <= 1024 and name.isprintable(), f"tensor name {name!r} is not printable or too long")
        _need(isinstance(t.get("digest"), str) and is_digest(t["digest"]), f"tensor {name!r}: bad digest")
        _need(isinstance(t.get("dtype"), str) and t["dtype"] in ITEMSIZE,
              f"tensor {name!r}: unknown dtype {t.get('dtype')!r}")
        shape = t.get("shape")
        _need(
            isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape),
            f"tensor {name!r}: bad shape {shape!r}",
        )
        _need(t.get("encoding") in ENCODINGS, f"tensor {name!r}: unknown encoding {t.get('encoding')!r}")
        size = t.get("size")
        _need(isinstance(size, int) and not isinstance(size, bool) and size >= 0, f"tensor {name!r}: bad size")
        if t["encoding"] == "raw":
            _need(size == math.prod(shape) * ITEMSIZE[t["dtype"]], f"tensor {name!r}: size does not match shape")
        pins = t.get("pins")
        if pins is not None:
            _need(
                isinstance(pins, dict) and isinstance(pins.get("digest"), str) and is_digest(pins["digest"])
                and isinstance(pins.get("count"), int) and isinstance(pins.get("size"), int),
                f"tensor {name!r}: bad pins",
            )
        tensors[name] = TensorEntry(t["digest"], t["dtype"], tuple(shape), t["encoding"], size, pins)
    params = doc.get("params", {})
    _need(isinstance(params, dict), "params must be an object")
    lineage = doc.get("lineage", {})
    _need(isinstance(lineage, dict), "lineage must be an object")
    parents = lineage.get("parents", [])
    _need(isinstance(parents, list) and all(isinstance(p, str) and is_digest(p) for p in parents), "lineage.parents must be digests")
    recipe = lineage.get("recipe")
    _need(recipe is None or isinstance(recipe, dict), "lineage.recipe must be an object or null")
    metadata = doc.get("metadata", {})
    _need(isinstance(metadata, dict), "metadata must be an object")
    side = doc.get("side_files", {})
    _need(isinstance(side, dict) and (side or "side_files" not in doc), "side_files must be a non-empty object")
    for name, f in side.items():
        _need(is_side_file(name), f"side file {name!r:.80} is not a config, tokenizer or generation file name")
        if name == CONFIG:
            _need(isinstance(f, dict) and set(f) == {"json_patch"}, "side file config.json must be a json_patch")
            check_ops(f["json_patch"], "invalid manifest: side file config.json")
        elif isinstance(f, dict) and set(f) == {"removed"}:
            _need(f["removed"] is True, f"side file {name!r}: removed must be true")
        else:
            _need(isinstance(f, dict) and set(f) == {"digest", "size"} and isinstance(f["digest"], str)
                  and is_digest(f["digest"]) and isinstance(f["size"], int) and not isinstance(f["size"], bool)
                  and f["size"] >= 0, f"side file {name!r}: expected {{digest, size}} or {{removed: true}}")
    return Manifest(kind, dict(base), tensors, params, tuple(parents), recipe, metadata, side)
