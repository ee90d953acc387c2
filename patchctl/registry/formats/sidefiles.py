"""Side files of a model folder: ``config.json``, the tokenizer's files, ``generation_config.json``.

A full fine-tune changes more than tensors: a classifier's ``config.json`` gets its own
``id2label``/``label2id``, a tokenizer gains tokens. A ``diff`` patch records these next to its
tensors (the manifest's ``side_files``, :mod:`patchctl.registry.store.manifest`):

- ``config.json`` as a JSON Patch (RFC 6902: ``add``/``remove``/``replace`` ops on JSON Pointer
  paths, RFC 6901) that turns the base's ``config.json`` into the fine-tune's — :func:`json_diff`
  makes it, :func:`json_patch` applies it;
- a tokenizer or generation file (:data:`SIDE_FILE_RE`) whose bytes differ from the base's, or that
  the base lacks, whole, as a blob;
- such a file the base has and the fine-tune does not, as removed — but only when the fine-tune
  saved that kind of file at all (a tokenizer; a generation config): a fine-tune folder with no
  tokenizer files did not save its tokenizer, so it keeps the base's.

Only top-level files whose names match :data:`SIDE_FILE_RE` are side files, so a hostile manifest
can name no path outside the output folder, nor a weight file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchctl.errors import BaseMismatch, InvalidPatch

CONFIG = "config.json"
#: Tokenizer, chat-template and generation files: the side files besides ``config.json``.
SIDE_FILE_RE = re.compile(
    r"tokenizer\.json|tokenizer_config\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(?:txt|json)|merges\.txt|spiece\.model|sentencepiece\.bpe\.model|[A-Za-z0-9_.-]{1,100}\.tiktoken"
    r"|chat_template\.(?:jinja|json)|generation_config\.json"
)
#: A side file's size cap (bytes): a 256k-token ``tokenizer.json`` is ~35 MB.
MAX_SIDE_FILE = 256 << 20
#: ``config.json``'s size cap (bytes), before it is parsed.
MAX_CONFIG = 16 << 20
OPS = ("add", "remove", "replace")


def is_side_file(name: str) -> bool:
    """A file name (one path component) that a patch may carry: ``config.json`` or :data:`SIDE_FILE_RE`."""
    return isinstance(name, str) and (name == CONFIG or bool(SIDE_FILE_RE.fullmatch(name)))


@dataclass
class SideChanges:
    """What a fine-tune folder changes besides tensors, against its base folder."""

    config: list[dict[str, Any]] = field(default_factory=list)  # JSON Patch ops on the base's config.json
    files: dict[str, bytes] = field(default_factory=dict)  # changed or added side files
    removed: list[str] = field(default_factory=list)  # side files of the base the fine-tune lacks

    def __bool__(self) -> bool:
        return bool(self.config or self.files or self.removed)


def read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a JSON object (None when there is none); InvalidPatch when it is not one."""
    path = folder / CONFIG
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_CONFIG:
        raise InvalidPatch(f"{path} is over {MAX_CONFIG >> 20} MiB; a config.json is a few KiB")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidPatch(f"{path}: not a JSON object ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise InvalidPatch(f"{path}: not a JSON object")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a patch records config values as canonical JSON)")


#: config.json keys that say where a model was loaded from, not what it is: never part of a diff.
LOADED_FROM = ("_name_or_path",)


def compare(base: Path, finetune: Path) -> SideChanges:
    """The side-file changes that turn the base folder's files into the fine-tune folder's."""
    out = SideChanges()
    fcfg = read_config(finetune)
    if fcfg is not None:
        # where a config was loaded from is no change of the fine-tune's (and is often a local path,
        # which no manifest may name): the base's value stays
        drop = {k: None for k in LOADED_FROM}
        base_cfg = {k: v for k, v in (read_config(base) or {}).items() if k not in drop}
        out.config = json_diff(base_cfg, {k: v for k, v in fcfg.items() if k not in drop})
    names = {p.name for folder in (base, finetune) if folder.is_dir() for p in folder.iterdir()
             if p.is_file() and SIDE_FILE_RE.fullmatch(p.name)}
    saved = {_group(p.name) for p in finetune.iterdir() if p.is_file() and SIDE_FILE_RE.fullmatch(p.name)}
    for name in sorted(names):
        b, f = base / name, finetune / name
        if not f.is_file():
            if _group(name) in saved:
                out.removed.append(name)
            continue
        if f.stat().st_size > MAX_SIDE_FILE:
            raise InvalidPatch(f"{f} is {f.stat().st_size} bytes, over the side-file cap of {MAX_SIDE_FILE >> 20} MiB")
        data = f.read_bytes()
        if not b.is_file() or b.stat().st_size != len(data) or b.read_bytes() != data:
            out.files[name] = data
    return out


def _group(name: str) -> str:
    """Which kind of file a side file is: ``generation`` (its config) or ``tokenizer`` (every other)."""
    return "generation" if name == "generation_config.json" else "tokenizer"


# -- JSON Patch (RFC 6902) on objects ---------------------------------------------
def _pointer(parts: list[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _parts(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise InvalidPatch(f"JSON Pointer {pointer!r:.80} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def same(a: Any, b: Any) -> bool:
    """JSON equality that tells ``1`` from ``1.0`` and ``true`` (Python's ``==`` does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def json_diff(a: dict[str, Any], b: dict[str, Any], path: list[str] | None = None) -> list[dict[str, Any]]:
    """RFC 6902 ops turning object ``a`` into object ``b``: members added, removed or replaced (a list or a
    value whole; an object member by member), in key order, so the same inputs give the same ops."""
    path = path or []
    ops: list[dict[str, Any]] = []
    for k in sorted(a.keys() | b.keys()):
        p = [*path, k]
        if k not in b:
            ops.append({"op": "remove", "path": _pointer(p)})
        elif k not in a:
            ops.append({"op": "add", "path": _pointer(p), "value": b[k]})
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            ops += json_diff(a[k], b[k], p)
        elif not same(a[k], b[k]):
            ops.append({"op": "replace", "path": _pointer(p), "value": b[k]})
    return ops


def check_ops(ops: Any, where: str) -> list[dict[str, Any]]:
    """``ops`` is a list of JSON Patch ops this module writes (``add``/``remove``/``replace`` on members)."""
    if not isinstance(ops, list):
        raise InvalidPatch(f"{where}: a JSON Patch must be a list of ops")
    for op in ops:
        if (not isinstance(op, dict) or op.get("op") not in OPS or not isinstance(op.get("path"), str)
                or not op["path"].startswith("/") or (op["op"] == "remove") != ("value" not in op)
                or set(op) - {"op", "path", "value"}):
            raise InvalidPatch(f"{where}: bad JSON Patch op {json.dumps(op)[:100]}: expected "
                               '{"op": "add"|"replace", "path": "/…", "value": …} or {"op": "remove", "path": "/…"}')
    return ops


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """``doc`` with ``ops`` applied (a copy). An op whose path does not fit ``doc`` — a parent that is not an
    object, ``remove``/``replace`` of a member ``doc`` lacks — raises :class:`BaseMismatch`."""
    out = json.loads(json.dumps(doc))
    for op in check_ops(ops, where):
        *parents, key = _parts(op["path"])
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or (op["op"] != "add" and key not in node):
            raise BaseMismatch(f"{where}: {op['op']} {op['path']} does not fit this base's config.json "
                               "(it differs from the one the patch was made against)")
        if op["op"] == "remove":
            del node[key]
        else:
            node[key] = op["value"]
    return out


def dump_config(doc: dict[str, Any]) -> str:
    """``config.json`` text as transformers writes it (``indent=2``, sorted keys, a final newline)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
