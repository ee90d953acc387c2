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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import (
    BaseMismatch,
    InvalidArgument,
    InvalidPatch,
    NotFound,
    PickleRefused,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.registry.formats.bases import base_doc, locate
from patchctl.registry.formats.checkpoint import PICKLE_SUFFIXES, Checkpoint
from patchctl.registry.formats.safetensors import (
    FLOAT_DTYPES,
    SafetensorsFile,
    dtype_name,
    torch_dtype,
)
from patchctl.registry.store import records
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import parse_ref
from patchctl.registry.store.views import _LORA_KEY, PatchView, check_against_base, strip_peft

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


def detect(src: Path) -> str:
    if not src.exists():
        raise NotFound(f"{str(src)!r} does not exist")
    if src.is_dir():
        if (src / ADAPTER_CONFIG).is_file():
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
def read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidPatch(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, an int of 4300+ digits, nesting too deep
        raise InvalidPatch(f"{path}: malformed JSON ({type(e).__name__}: {str(e)[:100]})") from None
    except OSError as e:
        raise InvalidPatch(f"{path}: cannot read: {e.strerror}") from None
    return check_peft_config(cfg, str(path))


def check_peft_config(cfg: Any, where: str = ADAPTER_CONFIG) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise InvalidPatch(f"{where}: expected a JSON object")
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise InvalidPatch(f"{where}: no peft_type; is this a PEFT adapter?")
    if ptype != "LORA":
        raise UnsupportedPatch(f"{where}: unsupported peft_type {ptype!r}; patchctl handles LORA adapters")
    if cfg.get("use_dora"):
        raise UnsupportedPatch(f"{where}: DoRA adapters (use_dora: true) are not supported yet")
    check_lora_numbers(cfg, where)
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        raise InvalidPatch(f"{where}: target_modules must be a string or a list")
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
    cfg = read_peft_config(folder)
    st = folder / ADAPTER_WEIGHTS
    if st.is_file():
        f = SafetensorsFile(st)
        names = sorted(f.tensors)
        shapes = {n: f.tensors[n].shape for n in names}
        dtypes = {n: f.tensors[n].dtype for n in names}

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
    _check_lora_shapes(names, shapes, cfg, str(folder))

    def gen() -> Iterator[tuple[str, torch.Tensor, None]]:
        for n in names:
            yield n, load(n), None

    return Imported(
        kind="lora", params=cfg, tensors=gen(), base_hint=cfg.get("base_model_name_or_path"),
        shapes={n: (dtypes[n], tuple(shapes[n])) for n in names},
        recipe={"op": "import", "format": "peft"},
    )


def _check_lora_shapes(names: list[str], shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any], where: str) -> None:
    ranks: dict[str, dict[str, tuple[int, ...]]] = {}
    for n in names:
        m = _LORA_KEY.match(n)
        if m:
            ranks.setdefault(m.group("module") or m.group("emodule"), {})[m.group("part") or m.group("epart")] = shapes[n]
    for module, parts in ranks.items():
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        b = parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None:
            raise InvalidPatch(f"{where}: LoRA module {strip_peft(module)!r} has only one of its A/B factors")
        if len(a) != 2 or len(b) != 2:
            raise UnsupportedPatch(f"{where}: LoRA module {strip_peft(module)!r} is not a linear/embedding layer (conv LoRA is not supported)")
        if a[0] != b[1]:
            raise ShapeMismatch(f"{where}: LoRA module {strip_peft(module)!r}: A is {list(a)} and B is {list(b)}; their ranks differ")


# -- full fine-tune → diff -------------------------------------------------------
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

    def gen() -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        import torch

        from patchctl.patches.apply import diff_with_pins

        for n in ft.names():
            a, b = ft.read(n), base.read(n)
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    raise InvalidPatch(f"{src}: non-float tensor {n!r} differs from the base; a diff cannot carry it")
                continue
            if torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)):
                continue
            d, idx, vals = diff_with_pins(a, b, torch_dtype(dtype) if dtype else a.dtype)
            del a, b
            yield n, d, ((idx, vals) if idx.numel() else None)

    cfg = base.config()
    return Imported(
        kind="diff", params={"dtype": dtype or "auto"}, tensors=gen(),
        base_hint=cfg.get("_name_or_path") or None, recipe={"op": "import", "format": "checkpoint"},
    )


# -- diff file ---------------------------------------------------------------------
def import_diff_file(src: Path, base: Checkpoint, trust_pickle: bool = False) -> Imported:
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

    def gen() -> Iterator[tuple[str, torch.Tensor, None]]:
        for n in names:
            t = load(n)
            dtype_name(t.dtype)
            if not t.is_floating_point():
                raise InvalidPatch(f"{src}: tensor {n!r} is {t.dtype}; a diff holds float tensors")
            yield base.resolve(n) or n, t, None

    return Imported(kind="diff", params={}, tensors=gen(), recipe={"op": "import", "format": "diff"})


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
) -> str:
    """Import a PEFT folder, a fine-tuned checkpoint (with ``base``) or a diff file into ``repo``.

    Returns the new patch's digest; ``ref`` (``name[:tag]``) points at it,
    and ``name:latest`` too unless ``move_latest`` is false.
    """
    parse_ref(ref)  # reject a bad name before any work
    suites = [repo.resolve(e) for e in evals or []]
    srcp = Path(src)
    kind = detect(srcp)
    base_ckpt = Checkpoint(base) if base is not None else None
    if kind == "peft":
        imp = import_peft(srcp, trust_pickle)
        if base_ckpt is None:
            base_ckpt = _adapter_base(imp.base_hint)
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
            check_against_base(PatchView(repo.store, m0), base_ckpt)
        for name, t, pins in imp.tensors:
            if t.is_floating_point() and t.numel() and not bool(t.isfinite().all()):
                raise InvalidPatch(f"{srcp}: tensor {name!r} contains NaN or Inf; a patch must be finite "
                                   "(nothing was tagged; `patchctl gc` collects what was written)")
            tensors[name] = repo.put_tensor(t, pins)
        doc = base_doc(base_ckpt, base_name, imp.base_hint)
        repo.remember_base(doc["fingerprint"], base_ckpt.path)
        m = Manifest(
            kind=imp.kind,
            base=doc,
            tensors=tensors,
            params=imp.params,
            parents=(),
            recipe=imp.recipe,
            metadata=metadata or {},
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


def _adapter_base(hint: str | None) -> Checkpoint:
    """The base an adapter's config names, when it is a local folder or in the local HF cache."""
    try:
        if hint:
            return Checkpoint(locate(hint))
    except NotFound:
        pass
    raise InvalidArgument(
        f"the adapter's base {hint!r} is not a local folder nor in the local Hugging Face cache; "
        "pass --base BASE_DIR"
    )


