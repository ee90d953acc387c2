"""Importers: outside formats → a stream of patch tensors.

- a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``);
- a full fine-tuned checkpoint (single or sharded safetensors) against its
  base → a ``diff`` patch, tensor by tensor, tensors equal to the base left out,
  with exact-value pins so applying it back is bit-exact;
- a diff safetensors file (tensors keyed by base tensor name).

Pickle files are refused unless ``trust_pickle``; then only
``torch.load(weights_only=True)``.

Configs and files are untrusted: ``lora_alpha`` (and ``alpha_pattern``
values) must be finite and at most :data:`MAX_ALPHA`; ``rank_pattern`` /
``alpha_pattern`` keys must compile as peft compiles them, and are matched in
bounded time (a linear-time engine, RE2, with a time-bounded fallback to
``re``: :func:`patchctl.patches.lora.pattern_matches`); every tensor name is
checked against the manifest's rule (:func:`check_tensor_names`) before any
blob is written; safetensors headers are capped before they are parsed
(:mod:`patchctl.registry.formats.safetensors`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import (
    BaseMismatch,
    InvalidArgument,
    InvalidPatch,
    NotFound,
    PatchctlError,
    PatchctlWarning,
    PickleRefused,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.patches import host
from patchctl.patches.finite import is_finite
from patchctl.patches.host import HostTensor
from patchctl.registry.formats import sidefiles
from patchctl.registry.formats.bases import base_doc, locate, public_name
from patchctl.registry.formats.checkpoint import PICKLE_SUFFIXES, Checkpoint
from patchctl.registry.formats.content import content_digest
from patchctl.registry.formats.safetensors import (
    FLOAT_DTYPES,
    SafetensorsFile,
    dtype_name,
    torch_dtype,
)
from patchctl.registry.formats.sidefiles import SideChanges
from patchctl.registry.ops.exporting import PIN_INDEX, PIN_VALUES
from patchctl.registry.store import records
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import parse_ref
from patchctl.registry.store.views import (
    _EXTRA_KEY,
    _LORA_KEY,
    _TOKENS_KEY,
    FILE_PREFIX,
    HEADER_SUFFIX,
    Change,
    PatchView,
    check_against_base,
    strip_peft,
    tied_changes,
    tied_targets,
    token_rows,
)

if TYPE_CHECKING:
    import torch

    from patchctl.registry.store.repository import Repository

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
#: ``lora_alpha`` (and ``alpha_pattern`` values) beyond this are refused: peft's are a few times ``r``.
MAX_ALPHA = 1e6
#: A tensor name's length cap: the manifest's (:func:`patchctl.registry.store.manifest.parse`).
MAX_TENSOR_NAME = 1024
#: A ``rank_pattern``/``alpha_pattern`` key's length cap.
MAX_PATTERN_KEY = 4096


@dataclass
class Imported:
    kind: str
    params: dict[str, Any]
    # (name, tensor, pins) — pins = (flat indices, values) or None
    tensors: Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
    base_hint: str | None = None
    shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None  # name -> (dtype, shape), when known up front
    recipe: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    side: SideChanges | None = None  # a fine-tune's config.json/tokenizer/generation changes (a diff)


def detect(src: Path) -> str:
    if not src.exists():
        raise NotFound(f"{str(src)!r} does not exist")
    if src.is_dir():
        if find_adapter(src) is not None:
            return "peft"
        return "checkpoint"
    if src.suffix == ".safetensors":
        return "diff-file"
    if src.suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise InvalidArgument(
        f"cannot tell what {src} is: expected a PEFT folder, a model folder, or a .safetensors diff file"
    )


def _load_pickle(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not trust_pickle:
        raise PickleRefused(
            f"{path} is a pickle file; loading it can run code. Convert it to safetensors, "
            "or pass --trust-pickle to load it with torch.load(weights_only=True)"
        )
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input
        raise InvalidPatch(f"{path}: cannot load with weights_only=True: {str(e).splitlines()[0]}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InvalidPatch(f"{path}: not a flat mapping of names to tensors")
    return sd


# -- PEFT ---------------------------------------------------------------------
ADAPTER_CARD = "README.md"
#: Options of a LoRA adapter_config.json that patchctl cannot merge into a base: (key, when set, why).
_UNSUPPORTED_OPTIONS: tuple[tuple[str, str], ...] = (
    ("layer_replication", "it stacks copies of base layers, so the adapted model is not the base's shape"),
    ("target_parameters", "LoRA on bare nn.Parameters (MoE experts) is not handled"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA) changes only tokens after its invocation, "
                                "so it has no merged weights"),
    ("use_qalora", "QA-LoRA pools its inputs; its update is not B @ A"),
    ("use_bdlora", "block-diagonal LoRA factors are not handled"),
    ("arrow_config", "Arrow routes between adapters per token; it has no merged weights"),
    ("kasa_config", "KaSA truncates the base weight's singular values, so it needs a changed base"),
    ("monteclora_config", "MonteCLoRA samples its factors; it has no single merged weight"),
)
#: init_lora_weights values whose adapters need a base that the initialisation changed.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def find_adapter(folder: Path) -> Path | None:
    """The folder holding the adapter's ``adapter_config.json``: ``folder`` itself or, as PEFT saves an
    adapter with a name other than ``default``, its one subfolder that holds one."""
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    except OSError:
        return None
    if len(subs) > 1:
        names = ", ".join(p.name for p in subs[:5])
        raise InvalidArgument(f"{folder} holds {len(subs)} PEFT adapters ({names}); push one of them: "
                              f"{folder / subs[0].name}")
    return subs[0] if subs else None


def read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise InvalidPatch(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, an int of 4300+ digits, nesting too deep
        raise InvalidPatch(f"{path}: malformed JSON ({type(e).__name__}: {str(e)[:100]})") from None
    except OSError as e:
        raise InvalidPatch(f"{path}: cannot read: {e.strerror}") from None
    return check_peft_config(cfg, str(path))


def _not_json(name: str) -> Any:
    """NaN or Infinity anywhere in a config: was a ValueError when the manifest (canonical JSON) was written."""
    raise ValueError(f"{name} is not JSON (a patch records its config as canonical JSON)")


def check_peft_config(cfg: Any, where: str = ADAPTER_CONFIG) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise InvalidPatch(f"{where}: expected a JSON object")
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise InvalidPatch(f"{where}: no peft_type; is this a PEFT adapter?")
    if ptype != "LORA":
        raise UnsupportedPatch(f"{where}: unsupported peft_type {ptype!r}; patchctl handles LORA adapters")
    for key, why in _UNSUPPORTED_OPTIONS:
        if cfg.get(key) not in (None, False, [], {}):
            raise UnsupportedPatch(f"{where}: {key}={json.dumps(cfg[key])[:60]} is not supported: {why}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedPatch(f"{where}: init_lora_weights={init!r} changed the base weights when the adapter was "
                               "made, so it does not apply to the original base; save it with PEFT's "
                               "path_initial_model_for_weight_conversion to get a plain LoRA")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InvalidPatch(f"{where}: bias must be \"none\", \"all\" or \"lora_only\", got {cfg['bias']!r:.40}")
    for key in ("use_dora", "lora_bias"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise InvalidPatch(f"{where}: {key} must be true or false")
    check_lora_numbers(cfg, where)
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        raise InvalidPatch(f"{where}: target_modules must be a string or a list")
    hint = cfg.get("base_model_name_or_path")
    if hint is not None and not isinstance(hint, str):  # was a TypeError where the base was looked up
        raise InvalidPatch(f"{where}: base_model_name_or_path must be a string (a Hub id or a folder), "
                           f"got {json.dumps(hint)[:40]}")
    for key in ("fan_in_fan_out", "use_rslora"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise InvalidPatch(f"{where}: {key} must be true or false")
    return cfg


def check_lora_numbers(cfg: dict[str, Any], where: str, need_r: bool = True) -> None:
    """The numbers LoRA math uses — ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` — are sane.

    ``r`` a positive integer; ``lora_alpha`` and ``alpha_pattern`` values finite and at most
    :data:`MAX_ALPHA` in magnitude (``1e300`` would export infinities); pattern keys strings that
    compile as peft compiles them. For an adapter config, and (``need_r`` false: the math takes
    the rank from the tensors) for a pulled LoRA manifest's params.
    """
    r = cfg.get("r", None if need_r else 1)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidPatch(f"{where}: r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not _sane_alpha(alpha):
        raise InvalidPatch(f"{where}: lora_alpha must be a finite number of magnitude at most {MAX_ALPHA:g}, "
                           f"got {alpha!r:.40}")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, dict) and all(
                _sane_alpha(x) and (key == "alpha_pattern" or isinstance(x, int) and x > 0) for x in v.values())):
            what = "positive integers" if key == "rank_pattern" else f"finite numbers of magnitude at most {MAX_ALPHA:g}"
            raise InvalidPatch(f"{where}: {key} must map module patterns to {what}")
        for k in v or {}:
            if not isinstance(k, str) or not 0 < len(k) <= MAX_PATTERN_KEY:
                raise InvalidPatch(f"{where}: {key} key {k!r:.60} must be a string of 1 to {MAX_PATTERN_KEY} characters")
            try:
                from patchctl.patches.lora import check_pattern_key  # here: lora.py imports torch

                check_pattern_key(k)
            except InvalidArgument as e:
                raise InvalidPatch(f"{where}: {key}: {e}") from None


def _sane_alpha(x: Any) -> bool:
    """A usable ``lora_alpha``: finite, and at most :data:`MAX_ALPHA` in magnitude (so scaling stays sane)."""
    return _finite(x) and abs(x) <= MAX_ALPHA


def check_tensor_names(names: Iterable[str], where: str) -> None:
    """Refuse, before any blob is written, a tensor name the manifest would refuse (its rule)."""
    for n in names:
        if not isinstance(n, str) or not 0 < len(n) <= MAX_TENSOR_NAME or not n.isprintable():
            raise InvalidPatch(f"{where}: tensor name {n!r:.80}{'…' if len(str(n)) > 80 else ''} "
                               f"({len(str(n))} characters) must be 1 to {MAX_TENSOR_NAME} printable "
                               "characters; nothing was stored")


def _finite(x: Any) -> bool:
    """A JSON number usable as a float: not a bool, NaN, Infinity or an int too big for a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return abs(x) < 2**1000 if isinstance(x, int) else math.isfinite(x)


def import_peft(folder: Path, trust_pickle: bool = False) -> Imported:
    """A PEFT LoRA folder (or its parent, PEFT's layout for an adapter not named ``default``).

    Besides the tensors, the files a byte-identical export needs are kept as ``uint8`` entries under
    :data:`~patchctl.registry.store.views.FILE_PREFIX`: ``adapter_config.json`` as read, the
    safetensors header (its order and ``__metadata__``), and the model card ``README.md`` (next to the
    config, or in the parent folder PEFT writes it to for a named adapter).
    """
    top = folder
    folder = find_adapter(folder) or folder
    cfg = read_peft_config(folder)
    hint = cfg.get("base_model_name_or_path")
    files: dict[str, bytes] = {ADAPTER_CONFIG: (folder / ADAPTER_CONFIG).read_bytes()}
    for card in (folder / ADAPTER_CARD, top / ADAPTER_CARD):
        if card.is_file():
            files[ADAPTER_CARD] = card.read_bytes()
            break
    public = public_name(hint) if isinstance(hint, str) else hint
    if isinstance(hint, str) and public != hint:
        # the trainer's local path: the patch (and anything `serve` publishes) names only the folder, so the
        # same adapter gets the same digest wherever it was trained; export then says that name instead
        cfg = {**cfg, "base_model_name_or_path": public}
        files = {k: v.replace(hint.encode(), (public or "").encode()) for k, v in files.items()}
    st = folder / ADAPTER_WEIGHTS
    if st.is_file():
        f = SafetensorsFile(st)
        names = sorted(f.tensors)
        shapes = {n: f.tensors[n].shape for n in names}
        dtypes = {n: f.tensors[n].dtype for n in names}
        with open(st, "rb") as fh:  # the header SafetensorsFile checked: 8-byte length + JSON, as written
            head = fh.read(8)
            files[ADAPTER_WEIGHTS + HEADER_SUFFIX] = head + fh.read(int.from_bytes(head, "little"))

        def load(n: str) -> torch.Tensor:
            return f.read(n)
    elif (folder / ADAPTER_PICKLE).is_file():
        sd = _load_pickle(folder / ADAPTER_PICKLE, trust_pickle)
        names = sorted(sd)
        shapes = {n: tuple(sd[n].shape) for n in names}
        dtypes = {n: dtype_name(sd[n].dtype) for n in names}

        def load(n: str) -> torch.Tensor:
            return sd[n]
    else:
        raise InvalidPatch(f"{folder}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}")
    if not names:
        raise InvalidPatch(f"{folder}: the adapter has no tensors")
    check_tensor_names(names, str(folder))
    bad = [n for n in names if n.startswith(FILE_PREFIX)]
    if bad:
        raise InvalidPatch(f"{folder}: tensor name {bad[0]!r:.80} starts with {FILE_PREFIX!r}, which patchctl keeps "
                           "for the adapter's files; rename it")
    _check_lora_shapes(names, shapes, cfg, str(folder))

    def gen() -> Iterator[tuple[str, torch.Tensor, None]]:
        import torch

        for n in names:
            yield n, load(n), None
        for fname, data in files.items():
            yield FILE_PREFIX + fname, torch.frombuffer(bytearray(data), dtype=torch.uint8), None

    return Imported(
        kind="lora", params=cfg, tensors=gen(), base_hint=hint,
        shapes={**{n: (dtypes[n], tuple(shapes[n])) for n in names},
                **{FILE_PREFIX + k: ("uint8", (len(v),)) for k, v in files.items()}},
        recipe={"op": "import", "format": "peft"},
    )


def _check_lora_shapes(names: list[str], shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any], where: str) -> None:
    ranks: dict[str, dict[str, tuple[int, ...]]] = {}
    for n in names:
        m = _LORA_KEY.match(n)
        if m:
            ranks.setdefault(m.group("module") or m.group("emodule"), {})[m.group("part") or m.group("epart")] = shapes[n]
        elif mx := _EXTRA_KEY.match(n):
            ranks.setdefault(mx.group("module"), {})["mag" if mx.group("mag") else "bias"] = shapes[n]
        elif mt := _TOKENS_KEY.match(n):
            rows = token_rows(cfg, strip_peft(mt.group("module")))
            if rows is None or len(shapes[n]) != 2 or shapes[n][0] != len(rows):
                raise InvalidPatch(f"{where}: {n} holds {list(shapes[n])[:1]} rows but trainable_token_indices lists "
                                   f"{'no rows' if rows is None else len(rows)} for {strip_peft(mt.group('module'))!r}")
    dora = cfg.get("use_dora") is True
    for module, parts in ranks.items():
        if ("mag" in parts) != dora:
            raise InvalidPatch(f"{where}: use_dora={'true' if dora else 'false'} but LoRA module "
                               f"{strip_peft(module)!r} {'has no' if dora else 'has a'} lora_magnitude_vector; "
                               "the config and the weights disagree")
        extra = [(k, parts[k]) for k in ("mag", "bias") if k in parts]
        if extra and "lora_A" not in parts and "lora_embedding_A" not in parts:
            raise InvalidPatch(f"{where}: {strip_peft(module)!r} has a "
                               f"{'lora_magnitude_vector (use_dora)' if extra[0][0] == 'mag' else 'lora_B.bias (lora_bias)'}"
                               " but no LoRA factors")
        b_shape = parts.get("lora_B", parts.get("lora_embedding_B"))
        for k, shape in extra:
            if b_shape is not None and len(b_shape) == 2 and tuple(shape) != (b_shape[0],):
                what = "lora_magnitude_vector (use_dora)" if k == "mag" else "lora_B.bias (lora_bias)"
                raise ShapeMismatch(f"{where}: {strip_peft(module)!r}: {what} is {list(shape)}, expected "
                                    f"[{b_shape[0]}] (one entry per output feature)")
        parts = {k: v for k, v in parts.items() if k not in ("mag", "bias")}
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        b = parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None:
            raise InvalidPatch(f"{where}: LoRA module {strip_peft(module)!r} has only one of its A/B factors")
        if len(a) != 2 or len(b) != 2:
            raise UnsupportedPatch(f"{where}: LoRA module {strip_peft(module)!r} is not a linear/embedding layer (conv LoRA is not supported)")
        if a[0] != b[1]:
            raise ShapeMismatch(f"{where}: LoRA module {strip_peft(module)!r}: A is {list(a)} and B is {list(b)}; their ranks differ")


# -- full fine-tune → diff -------------------------------------------------------
def _itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def import_checkpoint(src: Path, base: Checkpoint, dtype: str | None = None) -> Imported:
    ft = Checkpoint(src)
    extra = sorted(set(ft.names()) - set(base.names()))
    if extra:
        raise InvalidPatch(
            f"{src}: {len(extra)} tensor(s) are not in the base, e.g. {extra[:3]}; "
            "a diff can only change tensors the base has"
        )
    check_tensor_names(ft.names(), str(src))
    problems = []
    for n in ft.names():
        fi, bi = ft.info(n), base.info(n)
        if fi.shape != bi.shape:
            problems.append(f"{n}: {list(fi.shape)} vs base {list(bi.shape)}")
        elif fi.dtype != bi.dtype:
            problems.append(f"{n}: dtype {fi.dtype} vs base {bi.dtype}")
    if problems:
        raise ShapeMismatch(f"{src} does not match the base: {'; '.join(problems[:5])}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"--dtype {dtype!r}: choose one of {sorted(FLOAT_DTYPES)}")
    narrowed = sorted({i.dtype for i in (ft.info(n) for n in ft.names()) if i.dtype in FLOAT_DTYPES
                       and dtype is not None and _itemsize(dtype) < _itemsize(i.dtype)})
    if narrowed:  # the trade, stated before anything is written
        warnings.warn(f"--dtype {dtype} rounds the {'/'.join(narrowed)} diff: it stores about "
                      f"{_itemsize(narrowed[0]) // _itemsize(dtype)}x less, but base + patch is no longer the "
                      "fine-tune bit for bit (no exactness pins: they would cost more than they save); "
                      "omit --dtype for an exact patch", PatchctlWarning, stacklevel=2)

    def gen() -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        if dtype is None and host.usable(*{ft.info(n).dtype for n in ft.names()} & FLOAT_DTYPES):
            yield from _host_diffs(ft, base, src)  # no torch: ~2 s less for every push (issue #21)
            return
        import torch

        from patchctl.patches._workers import prefetched
        from patchctl.patches.apply import diff_with_pins, same_bytes, subtract

        # the next tensor pair is read on a thread while this one is diffed
        for n, (a, b) in prefetched(lambda n: (ft.read(n), base.read(n)), ft.names()):
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    raise InvalidPatch(f"{src}: non-float tensor {n!r} differs from the base; a diff cannot carry it")
                continue
            if same_bytes(a, b):
                continue
            want = torch_dtype(dtype) if dtype else a.dtype
            if want.itemsize < a.dtype.itemsize:  # asked for fewer bytes: rounded, no pins (stated above)
                d = subtract(a, b).to(want)
                del a, b
                yield n, d, None
                continue
            d, idx, vals = diff_with_pins(a, b, want)
            if dtype is None and a.dtype.itemsize < 4 and idx.numel() * (8 + a.dtype.itemsize) > \
                    a.numel() * (4 - a.dtype.itemsize):
                # pins only where they pay off: a float32 delta is exact for a 16-bit fine-tune, and smaller
                d, idx, vals = diff_with_pins(a, b, torch.float32)
            del a, b
            # pin values are read back in the stored delta's dtype (views.pins): widening is exact
            yield n, d, ((idx, vals.to(d.dtype)) if idx.numel() else None)

    cfg = base.config()
    # config.json as a JSON Patch on the base's, changed tokenizer/generation files whole (checked now,
    # before any blob is written)
    side = sidefiles.compare(base.path, src) if src.is_dir() and base.path.is_dir() else None
    return Imported(
        kind="diff", params={"dtype": dtype or "auto", **({"exact": False} if narrowed else {})}, tensors=gen(),
        base_hint=cfg.get("_name_or_path") or None, recipe={"op": "import", "format": "checkpoint"}, side=side,
    )


def _host_diffs(ft: Checkpoint, base: Checkpoint, src: Path) -> Iterator[tuple[str, HostTensor, Any]]:
    """``import_checkpoint``'s diffs (default ``--dtype``) on the C kernels: the same tensors, no torch.

    Buffers come from the reuse pool: the base's goes back after the diff, the delta's (the fine-tune's,
    overwritten in place) once it is stored (``Repository.put_tensor``).
    """
    from patchctl.patches._workers import prefetched

    for n, (a, b) in prefetched(lambda n: (ft.read_host(n), base.read_host(n)), ft.names()):
        try:
            if not a.is_floating_point():
                if not host.same_bytes(a, b):
                    raise InvalidPatch(f"{src}: non-float tensor {n!r} differs from the base; a diff cannot carry it")
                a.release()
                continue
            if host.same_bytes(a, b):
                a.release()
                continue
            size = host.itemsize(a.dtype)
            d, idx, vals = host.diff_with_pins(a, b, a.dtype)
            if size < 4 and idx.size * (8 + size) > a.numel() * (4 - size):
                # pins only where they pay off: a float32 delta is exact for a 16-bit fine-tune, and smaller
                d.release()
                a = ft.read_host(n)  # again: the first diff overwrote it (rare: most entries needed pins)
                d, idx, vals = host.diff_with_pins(a, b, "float32")
                a.release()
                vals = host.convert(vals, a.dtype, "float32")  # pin values in the stored delta's dtype (views.pins)
        finally:
            b.release()
        del a, b
        yield n, d, ((idx, vals) if idx.size else None)


def store_side_files(repo: Repository, side: SideChanges | None) -> dict[str, dict[str, Any]]:
    """The manifest's ``side_files`` for ``side``, its files stored as blobs (empty when nothing changed)."""
    out: dict[str, dict[str, Any]] = {}
    if side and side.config:
        out[sidefiles.CONFIG] = {"json_patch": side.config}
    for name, data in sorted((side.files if side else {}).items()):
        out[name] = {"digest": repo.store.put_blob(data), "size": len(data)}
    for name in side.removed if side else []:
        out[name] = {"removed": True}
    return out


# -- diff file ---------------------------------------------------------------------
def import_diff_file(src: Path, base: Checkpoint, trust_pickle: bool = False) -> Imported:
    """A diff file: tensors keyed by base tensor name. A file ``export --exact`` wrote brings its pins back
    (``NAME::pin_index``/``NAME::pin_values``), and one with ``patchctl.side_files`` in its
    ``__metadata__`` its side files: pushed again, it is the patch it was exported from."""
    pin_of: dict[str, tuple[str, str]] = {}
    side = None
    if src.suffix in PICKLE_SUFFIXES:
        sd = _load_pickle(src, trust_pickle)
        names = sorted(sd)
        shapes = {n: tuple(sd[n].shape) for n in names}

        def load(n: str) -> torch.Tensor:
            return sd[n]
    else:
        f = SafetensorsFile(src)
        names = sorted(f.tensors)
        shapes = {n: f.tensors[n].shape for n in names}
        pin_of = _exported_pins(names, str(src))
        names = [n for n in names if not n.endswith((PIN_INDEX, PIN_VALUES))]
        side = _exported_side_files(f.metadata, str(src))

        def load(n: str) -> torch.Tensor:
            return f.read(n)
    check_tensor_names(names, str(src))
    check_tensor_names([base.resolve(n) or n for n in names], str(base.path))
    problems = []
    for n in names:
        key = base.resolve(n)
        if key is None:
            problems.append(f"{n}: not in the base")
        elif base.info(key).shape != tuple(shapes[n]):
            problems.append(f"{n}: shape {list(shapes[n])} vs base {list(base.info(key).shape)}")
    if problems:
        raise ShapeMismatch(f"{src} does not fit the base: {'; '.join(problems[:5])}")

    def gen() -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        for n in names:
            t = load(n)
            dtype_name(t.dtype)
            if not t.is_floating_point():
                raise InvalidPatch(f"{src}: tensor {n!r} is {t.dtype}; a diff holds float tensors")
            yield base.resolve(n) or n, t, (_read_pins(load, pin_of[n], t, str(src)) if n in pin_of else None)

    return Imported(kind="diff", params={}, tensors=gen(), recipe={"op": "import", "format": "diff"}, side=side)


def _exported_pins(names: list[str], where: str) -> dict[str, tuple[str, str]]:
    """``{tensor: (its pin_index name, its pin_values name)}`` of a file ``export --exact`` wrote."""
    out = {}
    have = set(names)
    for n in names:
        if n.endswith(PIN_INDEX):
            t = n.removesuffix(PIN_INDEX)
            if t not in have or t + PIN_VALUES not in have:
                raise InvalidPatch(f"{where}: {n!r} has no {t!r} or no {t + PIN_VALUES!r} beside it")
            out[t] = (n, t + PIN_VALUES)
        elif n.endswith(PIN_VALUES) and n.removesuffix(PIN_VALUES) + PIN_INDEX not in have:
            raise InvalidPatch(f"{where}: {n!r} has no {n.removesuffix(PIN_VALUES) + PIN_INDEX!r} beside it")
    return out


def _read_pins(load: Any, names: tuple[str, str], t: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pins of ``t`` (indices, values in ``t``'s dtype): checked in range and held exactly."""
    import torch

    idx, vals = load(names[0]), load(names[1])
    ok = idx.dtype == torch.int64 and idx.dim() == vals.dim() == 1 and idx.numel() == vals.numel()
    if not ok or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.numel())):
        raise InvalidPatch(f"{where}: {names[0]!r} must be int64 positions inside the tensor, one per value "
                           f"in {names[1]!r}")
    held = vals.to(t.dtype)
    if not torch.equal(held.to(vals.dtype).view(-1).view(torch.uint8), vals.view(-1).view(torch.uint8)):
        raise InvalidPatch(f"{where}: {names[1]!r} ({vals.dtype}) does not fit the delta's {t.dtype} exactly")
    return idx, held


def _exported_side_files(metadata: dict[str, str], where: str) -> SideChanges | None:
    """The side files an exported diff carries in ``__metadata__["patchctl.side_files"]``, checked."""
    import base64
    import binascii

    raw = metadata.get("patchctl.side_files")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidPatch(f"{where}: __metadata__ patchctl.side_files is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidPatch(f"{where}: __metadata__ patchctl.side_files must be a JSON object")
    side = SideChanges()
    for name, f in sorted(doc.items()):
        if not sidefiles.is_side_file(name) or not isinstance(f, dict):
            raise InvalidPatch(f"{where}: side file {name!r:.80} is not a config, tokenizer or generation file")
        if name == sidefiles.CONFIG and set(f) == {"json_patch"}:
            side.config = sidefiles.check_ops(f["json_patch"], f"{where}: side file config.json")
        elif name != sidefiles.CONFIG and f == {"removed": True}:
            side.removed.append(name)
        elif name != sidefiles.CONFIG and set(f) == {"base64"} and isinstance(f["base64"], str):
            if len(f["base64"]) > sidefiles.MAX_SIDE_FILE * 4 // 3 + 4:
                raise InvalidPatch(f"{where}: side file {name} is over {sidefiles.MAX_SIDE_FILE >> 20} MiB")
            try:
                side.files[name] = base64.b64decode(f["base64"], validate=True)
            except binascii.Error:
                raise InvalidPatch(f"{where}: side file {name}: not base64") from None
        else:
            raise InvalidPatch(f"{where}: side file {name}: expected {{json_patch}} (config.json), {{base64}} or "
                               "{removed: true}")
    return side


def push(
    repo: Repository,
    src: str | os.PathLike[str],
    ref: str,
    *,
    base: str | os.PathLike[str] | None = None,
    base_name: str | None = None,
    message: str = "",
    metadata: dict[str, Any] | None = None,
    dtype: str | None = None,
    trust_pickle: bool = False,
    move_latest: bool = True,
    evals: list[str] | None = None,
    force_base: bool = False,
) -> str:
    """Import a PEFT folder, a fine-tuned checkpoint (with ``base``) or a diff file into ``repo``.

    Returns the new patch's digest; ``ref`` (``name[:tag]``) points at it,
    and ``name:latest`` too unless ``move_latest`` is false. An explicit ``base`` for
    a PEFT adapter wins over its config's ``base_model_name_or_path`` but must not
    contradict it (:func:`base_conflict`); ``force_base`` overrides that check.
    """
    parse_ref(ref)  # reject a bad name before any work
    suites = [repo.resolve(e) for e in evals or []]
    srcp = Path(src)
    kind = detect(srcp)
    base_ckpt = Checkpoint(base) if base is not None else None
    hint_named = True  # the manifest may name the base as the adapter's config does
    if kind == "peft":
        imp = import_peft(srcp, trust_pickle)
        if base_ckpt is None:
            base_ckpt = _adapter_base(imp.base_hint, repo)
        else:
            conflict = base_conflict(imp.base_hint, base_ckpt)
            if conflict and not force_base:
                raise BaseMismatch(f"{srcp}: its adapter_config.json names base {conflict}, but --base is "
                                   f"{base_ckpt.path}; pass the adapter's own base, or --force-base if it "
                                   "really was trained on this one")
            hint_named = not conflict
    else:
        if base_ckpt is None:
            raise InvalidArgument(f"pushing {srcp} needs the base it was fine-tuned from: --base BASE_DIR")
        if kind == "checkpoint":
            imp = import_checkpoint(srcp, base_ckpt, dtype)
        else:
            imp = import_diff_file(srcp, base_ckpt, trust_pickle)
    tensors: dict[str, TensorEntry] = {}
    with repo.store.writing():
        if imp.kind == "lora" and imp.shapes is not None:
            # check every A/B pair against the base before anything is stored
            zero = "sha256:" + "0" * 64
            probe = {n: TensorEntry(zero, d, s) for n, (d, s) in imp.shapes.items()}
            m0 = Manifest("lora", {"fingerprint": zero, "name": ""}, probe, imp.params)
            probe_view = PatchView(repo.store, m0)
            _check_peft_fit(probe_view, base_ckpt, str(srcp))
            check_against_base(probe_view, base_ckpt)
            for line in tied_changes(probe_view, base_ckpt):
                warnings.warn(line, PatchctlWarning, stacklevel=2)
            imp.tensors = _checked_copies(imp.tensors, base_ckpt, str(srcp))
        with repo.tensor_writer() as put:  # blobs hashed and written on a thread while the next tensor is made
            for name, t, pins in imp.tensors:
                if t.is_floating_point() and t.numel() and not is_finite(t):
                    raise InvalidPatch(f"{srcp}: tensor {name!r} contains NaN or Inf; a patch must be finite "
                                       "(nothing was tagged; `patchctl gc` collects what was written)")
                put(name, t, pins)
        tensors.update(put.entries)
        doc = base_doc(base_ckpt, base_name, imp.base_hint if hint_named else None)
        doc["content"] = content_digest(base_ckpt, repo.path / "cache")  # the exact base check's
        repo.remember_base(doc["fingerprint"], base_ckpt.path)
        m = Manifest(
            kind=imp.kind,
            base=doc,
            tensors=tensors,
            params=imp.params,
            parents=(),
            recipe=imp.recipe,
            metadata=metadata or {},
            side_files=store_side_files(repo, imp.side),
        )
        if suites:
            for sd in suites:
                sm = repo.manifest(sd)
                if sm.kind != "suite" or sm.fingerprint != m.fingerprint:
                    raise BaseMismatch(f"eval suite {sd[:19]}… is not a suite for this patch's base")
        digest = repo.commit(m, ref, message or f"push {srcp.name}", move_latest)
        for sd in suites:
            records.attach(repo.store, digest, sd, "target")
        return digest


def base_conflict(hint: str | None, base: Checkpoint) -> str | None:
    """How the adapter config's base ``hint`` contradicts the explicit ``base`` (None: they agree, or
    nothing here tells them apart).

    Two cases are certain: the hint is a model folder still on this machine whose
    fingerprint differs, or ``base`` is a Hub cache snapshot of another repository
    than the Hub id the hint names.
    """
    if not hint:
        return None
    p = Path(hint).expanduser()
    try:
        is_dir = p.is_dir()
    except OSError:  # ENAMETOOLONG (a hint of thousands of characters): no folder of that name here
        is_dir = False
    if is_dir:
        try:
            other = Checkpoint(p)
        except PatchctlError:
            return None
        if other.path.resolve() == base.path.resolve() or other.fingerprint() == base.fingerprint():
            return None
        return f"{hint!r} (fingerprint {other.fingerprint()[:19]}…, not {base.fingerprint()[:19]}…)"
    snap = re.search(r"models--([^/]+)--([^/]+)/snapshots/", base.path.resolve().as_posix())
    if snap and re.fullmatch(r"[\w.-]+/[\w.-]+", hint) and f"{snap.group(1)}/{snap.group(2)}".lower() != hint.lower():
        return f"{hint!r} (--base is a snapshot of {snap.group(1)}/{snap.group(2)})"
    return None


def _option(view: PatchView, c: Change) -> str:
    """The PEFT option that made a change (for messages that name it)."""
    p = view.m.params
    if c.op == "dora":
        return "use_dora=True"
    if c.op == "rows":
        return f"trainable_token_indices={json.dumps(p.get('trainable_token_indices'))[:60]}"
    if c.op == "add":
        return "lora_bias=True" if c.target.endswith(".bias") and len(c.sources) == 1 else \
            f"target_modules={json.dumps(p.get('target_modules'))[:60]}"
    if c.target.endswith(".bias") and p.get("bias") in ("all", "lora_only"):
        return f"bias={p['bias']!r}"
    return f"modules_to_save={json.dumps(p.get('modules_to_save'))[:60]}"


def _check_peft_fit(view: PatchView, base: Checkpoint, where: str) -> None:
    """Refuse, naming the PEFT option, a change that has no tensor to change in the base, or that PEFT's
    merge makes in a way a checkpoint with tied embeddings cannot hold."""
    cfg = base.config()
    tied = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings")) is True
    for target, (key, head) in tied_targets(view, base).items():
        c = next(c for c in view.changes() if c.target == target)
        if c.op == "replace":  # PEFT's merge swaps in a copy: the head keeps the old embedding
            raise UnsupportedPatch(f"{where}: {_option(view, c)} replaces {key}, which this base ties to {head} "
                                   "(tie_word_embeddings); PEFT's merged model unties them and a tied checkpoint "
                                   "cannot, so this adapter is not supported")
    for c in view.changes():
        if base.resolve(c.target) is not None:
            continue
        opt = _option(view, c)
        if tied and view.m.params.get("ensure_weight_tying") is True:
            raise UnsupportedPatch(f"{where}: ensure_weight_tying=True adds a tied adapter on {c.target}, which this "
                                   "base ties to its input embeddings and does not store; not supported (the "
                                   "adapter on the input embeddings alone is)")
        if c.op == "replace" and tied and opt.startswith("modules_to_save"):
            raise UnsupportedPatch(f"{where}: {opt} replaces {c.target}, which this base ties to its input embeddings "
                                   "(tie_word_embeddings) and does not store; a merged model cannot hold both, so "
                                   "this adapter is not supported")
        if opt == "lora_bias=True":
            raise UnsupportedPatch(f"{where}: {opt} adds a bias to {c.target.removesuffix('.bias')}, which has none "
                                   "(PEFT cannot merge it either); train it with lora_bias=False")
        raise UnsupportedPatch(f"{where}: {opt} changes {c.target}, which this base does not have; is the adapter for "
                               "another model?")


def _checked_copies(tensors: Iterator[tuple[str, torch.Tensor, Any]], base: Checkpoint,
                    where: str) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """The adapter's tensors, checking on the way that a saved copy of a LoRA-wrapped weight (peft's
    ``save_embedding_layers``, ``<module>.base_layer.weight``) is the base's own value."""
    for name, t, pins in tensors:
        if name.endswith(".base_layer.weight") and not name.startswith(FILE_PREFIX):
            key = base.resolve(strip_peft(name).replace(".base_layer.", "."))
            b = base.read(key) if key is not None else None
            if b is None or b.shape != t.shape or not t.to(b.dtype).equal(b):  # loaded into the base: its dtype
                raise UnsupportedPatch(f"{where}: {name} is a changed copy of the base's "
                                       f"{strip_peft(name).replace('.base_layer.', '.')} (save_embedding_layers with "
                                       "trained embeddings); only a LoRA on that layer is supported")
        yield name, t, pins


def _adapter_base(hint: str | None, repo: Repository | None = None) -> Checkpoint:
    """The base an adapter's config names: a local folder, a model in the local HF cache, or (a bare
    folder name, as exports write it) a base this registry has seen under that name."""
    try:
        if hint:
            return Checkpoint(locate(hint))
    except NotFound:
        pass
    if hint and repo is not None and "/" not in hint:
        for path in repo.known_bases():
            if path.name == hint:
                return Checkpoint(path)
    raise InvalidArgument(
        f"the adapter's base {hint!r} is not a local folder nor in the local Hugging Face cache; "
        "pass --base BASE_DIR"
    )


