"""Merging stored patches: the streaming engine behind ``Registry.merge`` and ``patchctl merge``.

The math lives in :mod:`patchctl.patches.merge` (the methods),
:mod:`patchctl.patches.lines` (LiNeS) and :mod:`patchctl.patches.lora`; this
module plans a merge, checks it, and streams it into the store.

**Inputs.** Any mix of ``lora``, ``diff`` and ``sparse`` patches recorded for
one base fingerprint. Every input is read through :class:`PatchView`, so a
LoRA module contributes its ``ΔW = B @ A · scaling`` and a sparse tensor its
dense decoding. LoRA adapters that *replace* tensors (``modules_to_save``,
trained biases) are refused: a replacement is not a delta and cannot be merged.

**Targets.** The merged patch covers the union of the inputs' targets (base
tensor names). A target that an input does not change contributes a **zero
delta** from that input (so TIES/DARE see a zero there, and a ``linear``
average divides by every weight). A LoRA target that is not spelled like a
diff input's target is matched to the one diff target it is a dot-suffix of,
or that is a dot-suffix of it (``encoder.x.weight`` ↔ ``bert.encoder.x.weight``),
as :meth:`Checkpoint.resolve` does at apply time.

**Checks first.** Before any tensor is read, :func:`plan` checks everything
it can — bases, targets and shapes (``PatchView.shape_of``), the method and
its parameters (a dry run of the method on a 2-element tensor for every
distinct per-tensor parameter set), weights, LiNeS, output, dtype, device,
the ``--apply`` base — and reports every problem at once in one message, of
the most specific class among them (BaseMismatch, ShapeMismatch,
DeviceUnavailable, UnsupportedPatch, InvalidArgument). A failed check writes
nothing.

**Streaming.** A diff output is made in one pass (:func:`_stream`): target by
target (sorted by name), or with ``--apply`` base tensor by base tensor in
each shard's data order. Each input's blob (and base tensor) is mapped, not
copied; the tensor merged in float32 chunks, rounded to the output dtype into
a reused buffer (LiNeS: scaled in float32 first) and stored as a blob; with
``--apply``, ``combine(base, stored)`` is written to the model's shard from
the same tensor, so the model is byte-identical to ``patchctl apply`` of the
stored merge (no second read of the patch). Every raw input blob is hashed by
a :class:`_Verifier` started before torch is imported; nothing is committed
before all of them have matched. Outputs go around the page cache
(:class:`~patchctl.registry.store.folder.DirectFile`); the ``--apply`` shards are not
fsynced (an export), the blobs are. Merging this tensor and storing and
writing the previous ones overlap on threads; memory is a few copies of the
largest tensor. LiNeS ``auto`` needs the
model-wide L1 norms first, so it makes one more pass that merges each
tensor, accumulates :func:`~patchctl.patches.lines.l1_norms` and discards
it. LoRA outputs keep a per-target loop and apply the stored patch after.
The manifest is committed at the end, under the registry's writing lock;
with ``--apply`` the model is built in a staging folder beside the
destination and renamed into place after the commit.

**Outputs.** A ``diff`` patch (default), or a PEFT-format ``lora`` patch:

- ``as_lora="cat"``: exact rank concatenation (:func:`cat_lora`) — only when
  every input is LoRA and the method is linear in its inputs
  (``task_arithmetic``, ``linear``). Module rank = sum of the inputs' ranks.
- ``as_lora="svd"``, ``rank=r``: the merged ΔW re-factored by
  :func:`svd_lora`. Only 2-D ``*.weight`` targets can be LoRA modules; other
  targets (biases, norms) are left out, listed under ``dropped`` and counted
  with relative error 1. The per-tensor and overall relative Frobenius
  errors (``sqrt(Σ tail²) / sqrt(Σ ‖ΔW‖²)`` over all targets) are recorded in
  the manifest's ``metadata["svd"]`` and returned. A 2-D target is an
  embedding (``lora_embedding_A/B``) when a LoRA input has it as one, else
  when its module name matches :data:`EMBEDDING_RE`.

LoRA outputs use scaling 1: ``lora_alpha = r``, and modules whose rank is
not ``r`` get ``rank_pattern``/``alpha_pattern`` entries (escaped full module
names). ``fan_in_fan_out`` is that of the LoRA inputs (they must agree).

**LiNeS** (``lines="auto"`` or a number α, ``lines_beta`` β) scales each
merged tensor by :func:`~patchctl.patches.lines.lines_scale` after the
method; ``L`` is :func:`~patchctl.patches.lines.num_blocks` over the union of
the targets. β defaults to ``1 - α`` (the last block keeps its full merged
update). The recipe records the requested α, β, the α used and ``L``.

**dtype.** ``dtype`` if given; else float32 when every input is LoRA; else
the promotion of every stored tensor dtype of the inputs (bf16 + fp16 →
float32). The math is float32 whatever the dtype.

**Determinism.** The recipe holds no paths or times (the ref history message
does); numbers are recorded as floats; DARE is seeded per tensor name; the
top-k trims are exact integer selections and the sums avoid fused
multiply-adds; so the same inputs and recipe give the same manifest digest.
(A merge on ``cuda`` is expected to match the CPU — tested where a GPU is
present — but the device is named in the history message.)
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import (
    BaseMismatch,
    DeviceUnavailable,
    InvalidArgument,
    NotFound,
    PatchctlError,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.registry.formats.safetensors import FLOAT_DTYPES
from patchctl.registry.ops.exporting import staged
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.views import PEFT_PREFIX, Change, LoraModule, PatchView, lora_modules

if TYPE_CHECKING:
    import torch

    from patchctl.registry.registry import Registry

Progress = Callable[[int, int], None] | None

LINEAR_METHODS = ("task_arithmetic", "linear")
AS_LORA = ("cat", "svd")
EMBEDDING_RE = re.compile(r"(?:^|\.)(?:[^.]*embed[^.]*|wte|wpe|shared)$", re.IGNORECASE)
RECIPE_KEYS = ("inputs", "method", "weights", "params", "overrides", "lines", "lines_beta",
               "as_lora", "rank", "dtype", "seed")
# the most specific class wins when a plan has problems of several kinds
_SEVERITY: tuple[type[PatchctlError], ...] = (
    NotFound, BaseMismatch, ShapeMismatch, DeviceUnavailable, UnsupportedPatch, InvalidArgument,
)


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`Registry.merge` made."""

    digest: str
    manifest: Manifest
    device: str
    rel_error: float | None = None  # as_lora="svd": overall relative Frobenius error
    tensor_errors: dict[str, float] = field(default_factory=dict)  # svd: per target
    applied: Path | None = None  # apply_to: the merged full model folder
    message: str = ""  # the ref-history message
    validation: dict[str, Any] | None = None  # set by Registry.merge: the merge's validation record
    moved: bool = False  # whether the ref was moved to the new patch

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.manifest.recipe or {})


@dataclass
class _Input:
    ref: str
    digest: str
    view: PatchView
    changes: dict[str, Change]  # target -> change
    lora: dict[str, LoraModule]  # manifest key of A -> module (LoRA inputs)


@dataclass
class _Plan:
    inputs: list[_Input]
    targets: list[str]
    shapes: dict[str, tuple[int, ...]]
    method: str
    weights: list[float]
    params: dict[str, Any]  # method defaults overlaid with the user's (key "lam")
    overrides: list[tuple[str, dict[str, Any]]]
    per_tensor: dict[str, dict[str, Any]]
    lines: str | float | None
    lines_beta: float | None
    num_blocks: int
    as_lora: str | None
    rank: int | None
    dtype: str
    seed: int
    device: str
    fan_in_fan_out: bool
    base: Any  # Checkpoint | None


# -- parsing helpers shared by the CLI and recipe files --------------------------------
def _param_key(key: str) -> str:
    return "lam" if key == "lambda" else key


def _shown_key(key: str) -> str:
    return "lambda" if key == "lam" else key


def parse_weights(text: str) -> list[float]:
    """``"0.5,0.5"`` → ``[0.5, 0.5]``."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.5") from None


def parse_override(text: str) -> tuple[str, dict[str, float]]:
    """``"REGEX:key=val,key=val"`` → ``(REGEX, {key: val})`` (split at the last ``:``)."""
    pattern, sep, body = text.rpartition(":")
    if not sep or not pattern or not body:
        raise InvalidArgument(f"override {text!r}: expected REGEX:key=value[,key=value...]")
    params: dict[str, float] = {}
    for kv in body.split(","):
        k, eq, v = kv.partition("=")
        try:
            params[k.strip()] = float(v)
        except ValueError:
            raise InvalidArgument(f"override {text!r}: {kv!r} is not key=number") from None
        if not eq or not k.strip():
            raise InvalidArgument(f"override {text!r}: {kv!r} is not key=number")
    return pattern, params


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A recipe file (YAML or JSON) as keyword arguments of :meth:`Registry.merge`.

    Keys: ``inputs`` (list of refs), ``method``, ``weights`` (list or
    ``"0.5,0.5"``), ``params`` (``density``, ``lambda``, ``gamma``),
    ``overrides`` (list of ``"REGEX:key=val,..."`` or ``{pattern, params}``),
    ``lines`` (``auto`` or α), ``lines_beta``, ``as_lora``, ``rank``,
    ``dtype``, ``seed``. Values are checked by the merge itself.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidArgument(f"recipe {str(p)!r}: cannot read it: {e.strerror}") from None
    try:
        import yaml

        doc = yaml.safe_load(text)
    except ImportError:  # pragma: no cover - pyyaml missing: JSON recipes still work
        try:
            doc = json.loads(text)
        except ValueError:
            raise InvalidArgument(f"recipe {str(p)!r}: YAML needs pyyaml (pip install pyyaml); or write it as JSON") from None
    except Exception as e:  # noqa: BLE001 - any YAML syntax error is bad input
        raise InvalidArgument(f"recipe {str(p)!r}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"recipe {str(p)!r}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        raise InvalidArgument(f"recipe {str(p)!r}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(RECIPE_KEYS)}")
    out = dict(doc)
    if isinstance(out.get("inputs"), str):
        out["inputs"] = [out["inputs"]]
    if isinstance(out.get("weights"), str):
        out["weights"] = parse_weights(out["weights"])
    if out.get("overrides") is not None:
        if not isinstance(out["overrides"], list):
            raise InvalidArgument(f"recipe {str(p)!r}: overrides must be a list")
        rules = []
        for o in out["overrides"]:
            if isinstance(o, str):
                rules.append(parse_override(o))
            elif isinstance(o, dict) and set(o) == {"pattern", "params"} and isinstance(o["params"], dict):
                rules.append((o["pattern"], o["params"]))
            else:
                raise InvalidArgument(f"recipe {str(p)!r}: override {o!r}: expected 'REGEX:key=val' or {{pattern, params}}")
        out["overrides"] = rules
    return out


# -- planning: every check before any work ------------------------------------------
class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[type[PatchctlError], str]] = []

    def add(self, cls: type[PatchctlError], msg: str) -> None:
        self.items.append((cls, msg))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        classes = [k for k, _ in self.items]
        cls = next((c for c in _SEVERITY if c in classes), classes[0])
        msgs = [m.replace("\n", " ") for _, m in self.items]
        prefix = "cannot merge: " if len(msgs) == 1 else f"cannot merge ({len(msgs)} problems): "
        raise cls(prefix + "; ".join(msgs))


def _resolve_device(device: str, problems: _Problems) -> str:
    import torch

    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device or ""):
        if not torch.cuda.is_available():
            problems.add(DeviceUnavailable, f"device {device!r} was asked for but no CUDA device is present; use --device cpu")
        elif ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            problems.add(DeviceUnavailable, f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    problems.add(InvalidArgument, f"unknown device {device!r}: choose cpu, cuda, cuda:N or auto")
    return "cpu"


def _unify(inputs: list[_Input]) -> None:
    """Rename LoRA targets onto the diff inputs' spelling where it differs by a prefix."""
    names = {t for i in inputs if i.view.m.kind != "lora" for t in i.changes}
    for inp in inputs:
        if inp.view.m.kind != "lora" or not names:
            continue
        renamed: dict[str, Change] = {}
        for t, c in inp.changes.items():
            if t not in names:
                hits = [n for n in names if n.endswith("." + t) or t.endswith("." + n)]
                t = hits[0] if len(hits) == 1 else t
            renamed[t] = c
        inp.changes = renamed


def _common_dtype(inputs: list[_Input]) -> str:
    """float32 for LoRA-only inputs; else the promotion of every stored tensor dtype."""
    import torch

    if all(i.view.m.kind == "lora" for i in inputs):
        return "float32"
    dt: torch.dtype | None = None
    for i in inputs:
        for e in i.view.m.tensors.values():
            d = getattr(torch, e.dtype)
            if d.is_floating_point:
                dt = d if dt is None else torch.promote_types(dt, d)
    return str(dt or torch.float32).removeprefix("torch.")


def _finite(value: Any, what: str, problems: _Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.add(InvalidArgument, f"{what} must be a finite number, got {value!r}")
        return None
    return float(value)


def plan(
    reg: Registry,
    inputs: Sequence[str],
    *,
    method: str,
    weights: Sequence[float] | None,
    params: Mapping[str, Any] | None,
    overrides: Sequence[tuple[str, Mapping[str, Any]]] | None,
    lines: str | float | None,
    lines_beta: float | None,
    as_lora: str | None,
    rank: int | None,
    dtype: str | None,
    device: str,
    seed: int,
    apply_to: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> _Plan:
    """Resolve and check a merge; every problem is reported at once, nothing is written."""
    import torch

    from patchctl.patches import lines as lines_mod
    from patchctl.patches import merge as merge_mod

    problems = _Problems()
    if isinstance(inputs, str) or not inputs:
        raise InvalidArgument("cannot merge: give at least one patch (NAME:TAG or digest)")
    digests: list[str] = []
    for ref in inputs:
        try:
            digests.append(reg.resolve(ref))
        except PatchctlError as e:
            problems.add(type(e), str(e))
    if problems.items:
        problems.raise_if_any()
    loaded: list[_Input] = []
    for ref, digest in zip(inputs, digests, strict=True):
        view = PatchView(reg.store, reg.manifest(digest))
        mods = lora_modules(view.m)[0] if view.m.kind == "lora" else {}
        changes = view.changes()
        replaced = [c.target for c in changes if c.op != "add"]
        if replaced:
            problems.add(UnsupportedPatch, f"{ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}: "
                         "modules_to_save or trained biases), which a merge of deltas cannot combine")
        loaded.append(_Input(ref, digest, view, {c.target: c for c in changes if c.op == "add"},
                             {m.a: m for m in mods.values()}))
    n = len(loaded)

    # bases
    first = loaded[0]
    for i in loaded[1:]:
        if i.view.m.fingerprint != first.view.m.fingerprint:
            problems.add(BaseMismatch, f"{i.ref} is for base {i.view.m.base.get('name')!r} ({i.view.m.fingerprint[:19]}…) "
                         f"but {first.ref} is for base {first.view.m.base.get('name')!r} ({first.view.m.fingerprint[:19]}…); "
                         "merge patches of one base (`patchctl port` moves a patch to another)")
    one_base = not problems.items or not any(c is BaseMismatch for c, _ in problems.items)
    # targets and shapes
    _unify(loaded)
    seen: dict[str, dict[tuple[int, ...], list[str]]] = {}
    for i in loaded:
        for t, c in i.changes.items():
            seen.setdefault(t, {}).setdefault(tuple(i.view.shape_of(c)), []).append(i.ref)
    bad_shapes = [f"{t}: " + " vs ".join(f"{list(s)} in {', '.join(r)}" for s, r in seen[t].items())
                  for t in sorted(seen) if len(seen[t]) > 1]
    if bad_shapes and one_base:  # on different bases the shapes say nothing more
        more = f" (and {len(bad_shapes) - 5} more)" if len(bad_shapes) > 5 else ""
        problems.add(ShapeMismatch, "shapes differ: " + "; ".join(bad_shapes[:5]) + more)
    shapes = {t: next(iter(seen[t])) for t in sorted(seen)}
    targets = sorted(shapes)

    # method, weights, parameters
    row = None
    try:
        row = merge_mod.get_method(method)
        row.check_inputs(n)
    except InvalidArgument as e:
        problems.add(InvalidArgument, str(e))
        row = None
    ws: list[Any] = [1.0] * n if weights is None else list(weights)
    ok = True
    if len(ws) != n:
        problems.add(InvalidArgument, f"{len(ws)} weight(s) for {n} patch(es); give one weight per patch")
        ok = False
    ok &= None not in [_finite(w, f"weight {k + 1}", problems) for k, w in enumerate(ws)]
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.add(InvalidArgument, f"seed must be an integer, got {seed!r}")
        ok = False
    user_params = {_param_key(str(k)): v for k, v in (params or {}).items()}
    rules: list[tuple[str, dict[str, Any]]] = []
    for pat, ps in overrides or []:
        if not isinstance(pat, str) or not isinstance(ps, Mapping):
            problems.add(InvalidArgument, f"override ({pat!r}, {ps!r}): expected (REGEX, {{key: value}})")
            ok = False
            continue
        rules.append((pat, {_param_key(str(k)): v for k, v in ps.items()}))
    resolved: dict[str, Any] = {}
    per_tensor: dict[str, dict[str, Any]] = {}
    if row is not None:
        known = ", ".join(_shown_key(k) for k in sorted(row.params)) or "none"
        for k in user_params:
            if k not in row.params:
                problems.add(InvalidArgument, f"merge method {method!r} has no parameter {_shown_key(k)!r} (its parameters: {known})")
                ok = False
        for pat, ps in rules:
            for k in ps:
                if k not in row.params:
                    problems.add(InvalidArgument, f"override {pat!r} sets {_shown_key(k)!r}, which {method!r} does not have (its parameters: {known})")
                    ok = False
        resolved = {k: user_params.get(k, v) for k, v in row.params.items()}
        if ok:
            try:
                per_tensor = {t: merge_mod.resolve_params(t, resolved, rules) for t in targets}
            except InvalidArgument as e:
                problems.add(InvalidArgument, str(e))
                ok = False
        if ok:  # dry run: the method's own checks, once per distinct parameter set
            tried: set[str] = set()
            for tname in [None, *targets]:
                prm = resolved if tname is None else per_tensor[tname]
                key = json.dumps(prm, sort_keys=True, default=repr)
                if key in tried:
                    continue
                tried.add(key)
                try:
                    merge_mod.merge_tensor(method, [torch.zeros(2)] * n, ws, generator_seed=seed, name=tname or "-", params=prm)
                except PatchctlError as e:
                    where = "" if tname is None else f" (parameters for {tname}, set by an override)"
                    problems.add(InvalidArgument, f"{e}{where}")

    # LiNeS
    lines_v: str | float | None = None
    if lines is not None:
        if lines == "auto":
            lines_v = "auto"
        else:
            try:
                lines_v = _finite(float(lines), "LiNeS alpha", problems)
            except (TypeError, ValueError):
                problems.add(InvalidArgument, f"LiNeS alpha must be 'auto' or a number, got {lines!r}")
    beta = None
    if lines_beta is not None:
        if lines is None:
            problems.add(InvalidArgument, "lines_beta is set but lines is not; pass lines='auto' or an alpha too")
        beta = _finite(lines_beta, "LiNeS beta", problems)

    # output
    fifo_values = {bool(i.view.m.params.get("fan_in_fan_out", False)) for i in loaded if i.view.m.kind == "lora"}
    fifo = fifo_values == {True}
    if as_lora is not None and as_lora not in AS_LORA:
        problems.add(InvalidArgument, f"unknown LoRA output {as_lora!r}: choose cat or svd")
    if as_lora == "cat":
        not_lora = [f"{i.ref} is a {i.view.m.kind}" for i in loaded if i.view.m.kind != "lora"]
        if not_lora:
            problems.add(InvalidArgument, f"--as-lora cat needs LoRA inputs only ({'; '.join(not_lora)}); use --as-lora svd --rank R")
        if method not in LINEAR_METHODS:
            problems.add(InvalidArgument, f"--as-lora cat is exact only for methods linear in their inputs ({', '.join(LINEAR_METHODS)}), "
                         f"not {method!r}; use --as-lora svd --rank R or a diff output")
        if rank is not None:
            problems.add(InvalidArgument, "--rank is for --as-lora svd; cat keeps the sum of the inputs' ranks")
    if as_lora == "svd" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.add(InvalidArgument, f"--as-lora svd needs --rank R, an integer >= 1 (got {rank!r})")
    if as_lora is None and rank is not None:
        problems.add(InvalidArgument, "--rank needs --as-lora svd")
    if as_lora is not None and len(fifo_values) > 1:
        problems.add(InvalidArgument, "the LoRA inputs disagree on fan_in_fan_out; a LoRA output needs one layout")

    # dtype, device, base
    if dtype is not None and dtype not in FLOAT_DTYPES:
        problems.add(InvalidArgument, f"unknown dtype {dtype!r}: choose one of {', '.join(sorted(FLOAT_DTYPES))}")
    out_dtype = dtype if dtype in FLOAT_DTYPES else _common_dtype(loaded)
    dev = _resolve_device(device, problems)
    ckpt = None
    if apply_to is not None or base is not None:
        if apply_to is None or base is None:
            problems.add(InvalidArgument, "apply_to and base go together: --apply OUT --base BASE_DIR")
        else:
            ckpt = _check_apply(loaded, Path(apply_to), base, problems)
    problems.raise_if_any()
    return _Plan(loaded, targets, shapes, method, [float(w) for w in ws], resolved, rules, per_tensor,
                 lines_v, beta, lines_mod.num_blocks(targets), as_lora, rank, out_dtype, seed, dev, fifo, ckpt)


def _check_apply(loaded: list[_Input], out: Path, base: str | os.PathLike[str], problems: _Problems) -> Any:
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.views import check_against_base

    if out.exists():
        problems.add(InvalidArgument, f"{out} already exists; choose another --apply path or remove it first")
    try:
        ckpt = Checkpoint(base)
    except PatchctlError as e:
        problems.add(InvalidArgument, f"--base: {e}")
        return None
    fp = ckpt.fingerprint()
    if fp != loaded[0].view.m.fingerprint:
        problems.add(BaseMismatch, f"--base {ckpt.path} has fingerprint {fp[:19]}… but the patches are for "
                     f"{loaded[0].view.m.fingerprint[:19]}…")
        return None
    for i in loaded:
        try:
            check_against_base(i.view, ckpt)
        except ShapeMismatch as e:
            problems.add(ShapeMismatch, f"{i.ref}: {e}")
    return ckpt


# -- the work -------------------------------------------------------------------------
# -- the streaming pass: merged diff blobs and (--apply) the merged model, one read of each input --
_SLOTS = 4  # output buffers in flight: a tensor is merged while the previous ones are still being written


@dataclass(frozen=True)
class _Item:
    """One tensor of the pass: a merged target, and/or (apply) a base tensor written to a shard."""

    target: str | None  # None: a base tensor no input changes, copied as is
    shard: int = -1  # index into the base's files (apply), -1 without apply
    info: Any = None  # the base tensor's TensorInfo (apply)


class _Buffers:
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


def _import_torch() -> Any:
    """torch, imported with the cyclic GC paused: its import makes ~10⁵ objects, and the collections
    they trigger cost ~0.3 s (restored right after)."""
    collect = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if collect:
            gc.enable()
    return torch


def _map(fd: int, start: int, nbytes: int) -> tuple[Any, int]:
    """A private (copy-on-write) mapping of ``nbytes`` from ``start`` of a file, and the offset of ``start`` in it.

    Reading a tensor through the page cache's own pages saves the copy a
    ``read()`` into a buffer makes; writes to the mapping (there are none)
    would stay private.
    """
    import mmap

    off = start - start % mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fd, start + nbytes - off, access=mmap.ACCESS_COPY, offset=off), start - off


def _blob_error(problem: str, entry: TensorEntry) -> PatchctlError:
    """The error for an input blob that is ``missing``, of the wrong ``size`` or ``corrupt``."""
    from patchctl.errors import DigestMismatch, InvalidPatch

    if problem == "missing":
        return NotFound(f"object {entry.digest} is not in the registry")
    if problem == "size":
        return InvalidPatch(f"blob {entry.digest} does not have the {entry.size} bytes its manifest says")
    return DigestMismatch(f"object {entry.digest} is corrupt: its bytes hash to something else (run `patchctl fsck`)")


def _nbytes(entry: TensorEntry) -> int:
    from patchctl.registry.formats.safetensors import ITEMSIZE

    return math.prod(entry.shape) * ITEMSIZE[entry.dtype]


def _map_blob(store: Any, entry: TensorEntry) -> Any:
    """A raw blob's bytes, mapped (``b""`` for an empty one); its size checked against its shape."""
    try:
        fd = os.open(store.blob_path(entry.digest), os.O_RDONLY)
    except FileNotFoundError:
        raise _blob_error("missing", entry) from None
    try:
        size = os.fstat(fd).st_size
        if size != _nbytes(entry):
            raise _blob_error("size", entry)
        return _map(fd, 0, size)[0] if size else b""
    finally:
        os.close(fd)


# The verifier's own process: reads "DIGEST SIZE PATH" lines, hashes each file through a mapping and
# answers "ok", or "missing|size|corrupt DIGEST" for the first bad one. It needs only the standard
# library, so it starts in milliseconds (-I -S), and hashing there takes no turns at this process's GIL.
_VERIFY = r"""
import hashlib, mmap, os, sys
for line in sys.stdin:
    digest, size, path = line.rstrip("\n").split(" ", 2)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        sys.exit(print("missing", digest, flush=True))
    try:
        n = os.fstat(fd).st_size
        if n != int(size):
            sys.exit(print("size", digest, flush=True))
        h = hashlib.sha256()
        if n:
            with mmap.mmap(fd, n, access=mmap.ACCESS_READ) as m:
                h.update(m)
    finally:
        os.close(fd)
    if "sha256:" + h.hexdigest() != digest:
        sys.exit(print("corrupt", digest, flush=True))
print("ok", flush=True)
"""


def _put_tensor(store: Any, t: torch.Tensor) -> TensorEntry:
    """Store a CPU tensor's bytes as a blob, hashing them once as they are written."""
    from patchctl.registry.formats.safetensors import dtype_name, tensor_to_bytes
    from patchctl.registry.store.folder import BlobWriter

    data = tensor_to_bytes(t)
    with BlobWriter(store, direct=True) as w:  # not read back here: around the page cache
        w.write(data)  # one hash call and one write (from the page-aligned buffer): few turns at the GIL
        digest = w.commit()
    return TensorEntry(digest, dtype_name(t.dtype), tuple(t.shape), "raw", len(data))


class _Verifier:
    """Hashes the raw blobs of a merge's inputs beside the merge, started before anything else.

    Started before torch is imported, it checks the inputs while the import
    (single-threaded) runs, then beside the merge. The hashing runs in a
    small process of its own (:data:`_VERIFY`): in a thread it took turns at
    the GIL with the merge's thousands of short torch calls, which cost both
    sides about a second here. Where that process cannot start, a thread
    does the same. Each blob is mapped, hashed and unmapped, one at a time.
    The merge uses the same files through mappings of its own and commits
    nothing before :meth:`wait` has returned; :meth:`check` raises a
    mismatch found so far, so a corrupt input stops the merge early.
    """

    def __init__(self, store: Any, entries: Sequence[TensorEntry], process: bool = True):
        import threading

        self.store = store
        self.entries = list({e.digest: e for e in entries}.values())
        self.digests = {e.digest for e in self.entries}
        self.error: BaseException | None = None
        self._proc: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(process,), name="patchctl-merge-verify", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, store: Any, manifests: Sequence[Manifest]) -> _Verifier:
        """A verifier for the raw blobs of the diff and sparse patches among ``manifests``."""
        return cls(store, [e for m in manifests if m.kind != "lora" for e in m.tensors.values() if e.encoding == "raw"])

    @classmethod
    def start(cls, reg: Registry, inputs: Sequence[str]) -> _Verifier | None:
        """:meth:`of` the ``inputs``; None where one does not resolve (the plan then says why)."""
        try:
            return cls.of(reg.store, [reg.manifest(reg.resolve(ref)) for ref in inputs])
        except (PatchctlError, TypeError):
            return None

    def _run(self, process: bool) -> None:
        try:
            if self.entries and not (process and self._in_process()):
                self._in_thread()
        except BaseException as exc:  # noqa: BLE001 - raised in the merging thread by check()/wait()
            self.error = exc

    def _in_process(self) -> bool:
        """Check every blob in the verifier process; False where it could not run (then the thread does it)."""
        import subprocess
        import sys

        paths = [str(self.store.blob_path(e.digest)) for e in self.entries]
        if not sys.executable or any("\n" in p for p in paths):
            return False  # no interpreter to start, or a path the line format cannot carry
        lines = "".join(f"{e.digest} {_nbytes(e)} {p}\n" for e, p in zip(self.entries, paths, strict=True))
        try:
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _VERIFY], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if self._stop.is_set():  # cancelled while it started
                self._proc.kill()
            out, _ = self._proc.communicate(lines)
        except (OSError, ValueError):
            return False
        if self._stop.is_set():
            return True
        problem, _, digest = out.strip().partition(" ")
        if problem == "ok" and self._proc.returncode == 0:
            return True
        entry = next((e for e in self.entries if e.digest == digest), None)
        if problem in ("missing", "size", "corrupt") and entry is not None:
            raise _blob_error(problem, entry)
        return False  # the process failed some other way: check in this process instead

    def _in_thread(self) -> None:
        import hashlib

        for e in self.entries:
            if self._stop.is_set():
                return
            data = _map_blob(self.store, e)
            try:
                if "sha256:" + hashlib.sha256(data).hexdigest() != e.digest:  # releases the GIL as it hashes
                    raise _blob_error("corrupt", e)
            finally:
                if data:
                    data.close()

    def check(self) -> None:
        """Raise the failure found so far, if any."""
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Wait until every blob is checked; raise the failure, if any."""
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join()


class _Reader:
    """Loads an item's inputs: each input's delta and the base tensor, as tensors over mapped file pages.

    Raw blobs are mapped, not read: the :class:`_Verifier` hashes them. A
    sparse-encoded or LoRA input is decoded (and verified) as
    :class:`PatchView` does. Zero deltas (an input that does not change a
    target) come from reused buffers.
    """

    def __init__(self, p: _Plan, store: Any, verifier: _Verifier):
        self.p, self.store, self.verifier = p, store, verifier
        self.zeros = _Buffers()
        self.fds: dict[int, int] = {}  # the base's shards, open

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def delta(self, target: str, k: int) -> torch.Tensor:
        """Input ``k``'s delta for ``target`` (a zero tensor where that input does not change it)."""
        import torch

        from patchctl.registry.formats.safetensors import torch_dtype

        inp = self.p.inputs[k]
        c = inp.changes.get(target)
        if c is None:
            return self.zeros.get(f"zero{k}", torch.bfloat16, self.p.shapes[target]).zero_()
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

        from patchctl.registry.formats.safetensors import torch_dtype

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

    def __call__(self, item: _Item, applied: torch.Tensor) -> None:
        while self.shard < item.shard:
            self._next_shard()
        self.w.write(item.info.name, applied)

    def offset(self, item: _Item) -> int:
        """Where ``item``'s bytes go in its shard file."""
        from patchctl.registry.formats.safetensors import header_bytes

        if item.shard not in self.offsets:
            sf = self.p.base.files[item.shard]
            head, spans = header_bytes([(i.name, i.dtype, i.shape) for i in sf], sf.metadata or None)
            self.offsets[item.shard] = {name: len(head) + a for name, (a, _) in spans.items()}
        return self.offsets[item.shard][item.info.name]

    def _next_shard(self) -> None:
        from patchctl.registry.formats.safetensors import StreamingWriter
        from patchctl.registry.store.folder import DirectFile

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
    from patchctl.registry.formats.safetensors import data_order

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
    from patchctl.registry.ops.exporting import copy_side_files

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
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from patchctl.patches.apply import combine
    from patchctl.patches.lines import lines_scale
    from patchctl.patches.merge import merge_tensor

    out_dtype = getattr(torch, p.dtype)
    items = _items(p, folder is not None)
    shards = _Shards(p, folder) if folder is not None else None
    tensors: dict[str, TensorEntry] = {}

    def put(target: str, stored: torch.Tensor) -> None:
        tensors[target] = _put_tensor(store, stored)

    def write(item: _Item, base: torch.Tensor, stored: torch.Tensor | None = None, out: Any = None) -> None:
        """``base + stored`` (or ``base`` as it is) into the model's shard, on the model's writer thread."""
        assert shards is not None
        shards(item, base if stored is None else combine(base, stored, out=out))

    outs, work = [_Buffers() for _ in range(_SLOTS)], _Buffers()
    pending: list[list[Future[None]]] = [[] for _ in range(_SLOTS)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    collect = gc.isenabled()
    gc.disable()  # thousands of chunk-sized tensor views would trigger full collections of torch's objects
    # two blob writers: each blob's fsync waits on the device, so two keep it busy
    pools = [ThreadPoolExecutor(w, f"patchctl-merge-{s}") for s, w in (("blobs", _SLOTS - 1), ("model", 1))]
    bx, mx = pools
    reader = _Reader(p, store, verifier)

    try:
        for n, item in enumerate(items):
            verifier.check()  # a corrupt input stops the merge as soon as it is found
            deltas = [] if item.target is None else [reader.delta(item.target, k) for k in range(len(p.inputs))]
            base = reader.base(item) if item.info is not None else None
            slot = n % _SLOTS
            for f in pending[slot]:
                f.result()  # the buffers of this slot are free again
            pending[slot] = []
            if item.target is not None:
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
                pending[slot].append(bx.submit(put, t, stored))
                if base is not None:  # base + merged is made on the model's writer thread
                    applied = outs[slot].get("applied", base.dtype, base.shape, shards.offset(item))
                    pending[slot].append(mx.submit(write, item, base, stored, applied))
                _tick(p, t, progress, done, total)
            elif base is not None:
                pending[slot].append(mx.submit(write, item, base))  # a mapping of its own: written as it is
            del base
        for fs in pending:
            for f in fs:
                f.result()
        verifier.wait()  # every input checked before the model is finished and the patch committed
        if shards is not None:
            shards.finish()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        if collect:
            gc.enable()
        reader.close()
        if shards is not None:
            shards.abort()
    return tensors


def _deltas(p: _Plan, target: str) -> list[torch.Tensor]:
    import torch

    out = []
    for i in p.inputs:
        c = i.changes.get(target)
        if c is None:
            out.append(torch.zeros(p.shapes[target], dtype=torch.float32, device=p.device))
        else:
            out.append(i.view.value(c, p.device).to(torch.float32))
    return out


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
    sum_l1 = merged_l1 = 0.0
    for t in p.targets:
        deltas = _deltas(p, t)
        a, b = l1_norms(deltas, _merged(p, t, deltas))
        sum_l1 += a
        merged_l1 += b
        del deltas
        _tick(p, t, progress, done, total)
    return default_alpha(sum_l1, merged_l1, len(p.inputs))


def _tick(p: _Plan, t: str, progress: Progress, done: list[int], total: int) -> None:
    done[0] += math.prod(p.shapes[t]) * 4
    if progress:
        progress(done[0], total)


def _is_embedding(p: _Plan, target: str) -> bool:
    for i in p.inputs:
        c = i.changes.get(target)
        if c is not None and i.lora:
            return i.lora[c.sources[0]].embedding
    return EMBEDDING_RE.search(target.removesuffix(".weight")) is not None


def _lora_keys(module: str, embedding: bool) -> tuple[str, str]:
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def _cat_factors(p: _Plan, target: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank concatenation of the inputs' factors for ``target`` (× the LiNeS scale)."""
    from patchctl.patches.lora import cat_lora, lora_scaling, pattern_value

    lam = float(p.per_tensor[target].get("lam", 1.0))
    norm = math.fsum(p.weights) if p.method == "linear" else 1.0
    factors = []
    for i, w in zip(p.inputs, p.weights, strict=True):
        c = i.changes.get(target)
        if c is None:
            continue
        mod = i.lora[c.sources[0]]
        a, b = i.view.tensor(mod.a, p.device), i.view.tensor(mod.b, p.device)
        r = int(a.shape[0])
        prm = i.view.m.params  # the scaling exactly as PatchView.value computes it
        alpha = pattern_value(mod.module, prm.get("alpha_pattern") or {}, prm.get("lora_alpha", r))
        s = lora_scaling(r, float(alpha), bool(prm.get("use_rslora", False)))
        factors.append((a, b, s, w / norm * lam * scale))
    return cat_lora(factors)


def _peft_params(p: _Plan, ranks: dict[str, int], base_name: str) -> dict[str, Any]:
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else (p.rank or 1)
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": r,  # scaling 1; per-module alpha = rank below
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "base_model_name_or_path": base_name,
        "fan_in_fan_out": p.fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _recipe(p: _Plan, alpha: float | None, beta: float) -> dict[str, Any]:
    def shown(d: Mapping[str, Any]) -> dict[str, Any]:
        return {_shown_key(k): float(v) for k, v in d.items()}

    output: dict[str, Any] = {"kind": "diff"} if p.as_lora is None else {"kind": "lora", "as_lora": p.as_lora}
    if p.as_lora == "svd":
        output["rank"] = p.rank
    lines = None
    if p.lines is not None:
        lines = {"alpha": p.lines, "beta": beta, "resolved_alpha": alpha, "num_blocks": p.num_blocks}
    return {
        "op": "merge",
        "method": p.method,
        "weights": p.weights,
        "params": shown(p.params),
        "overrides": [{"pattern": pat, "params": shown(ps)} for pat, ps in p.overrides],
        "lines": lines,
        "output": output,
        "dtype": p.dtype,
        "seed": p.seed,
    }


def merge(
    reg: Registry,
    inputs: Sequence[str],
    ref: str | None = None,
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    overrides: Sequence[tuple[str, Mapping[str, Any]]] | None = None,
    lines: str | float | None = None,
    lines_beta: float | None = None,
    as_lora: str | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    apply_to: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    message: str = "",
    metadata: dict[str, Any] | None = None,
    progress: Progress = None,
    search: dict[str, Any] | None = None,
) -> MergeResult:
    """Plan, check, then stream the merge into the store; see the module docstring.

    ``search``: the record of a coefficient search that chose these settings
    (see :mod:`patchctl.registry.ops.search`); kept in the recipe.
    """
    from patchctl.registry.store.names import parse_ref

    if ref is not None:
        parse_ref(ref)
    # a diff output maps every raw input blob: hash them from now on, beside torch's import and the merge
    verifier = _Verifier.start(reg, inputs) if as_lora is None and not isinstance(inputs, str) else None
    try:
        torch = _import_torch()

        from patchctl.patches.lines import lines_scale, single_patch_beta
        from patchctl.patches.lora import svd_lora

        p = plan(reg, inputs, method=method, weights=weights, params=params, overrides=overrides, lines=lines,
                 lines_beta=lines_beta, as_lora=as_lora, rank=rank, dtype=dtype, device=device, seed=seed,
                 apply_to=apply_to, base=base)
        out_dtype = getattr(torch, p.dtype)
        passes = 2 if p.lines == "auto" else 1
        total = passes * sum(math.prod(s) * 4 for s in p.shapes.values())
        done = [0]
        tensors: dict[str, TensorEntry] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        dropped: list[str] = []
        tail_sq = total_sq = 0.0
        fused = p.as_lora is None  # a diff: one streaming pass stores it and (apply) writes the model
        with reg.store.writing(), (staged(Path(apply_to)) if fused and p.base is not None
                                   else contextlib.nullcontext()) as folder:
            alpha = _lines_alpha(p, progress, done, total)
            beta = p.lines_beta if p.lines_beta is not None else (single_patch_beta(alpha) if alpha is not None else 0.0)
            if folder is not None:
                _copy_side_files(p.base, folder)
            if fused:
                verifier = verifier or _Verifier.of(reg.store, [i.view.m for i in p.inputs])
                tensors = _stream(p, reg.store, verifier, alpha, beta, folder, progress, done, total)
            for t in p.targets if not fused else ():
                scale = lines_scale(t, p.num_blocks, alpha, beta) if alpha is not None else 1.0
                module = t.removesuffix(".weight")
                if p.as_lora == "cat":
                    a, b = _cat_factors(p, t, scale)
                    ka, kb = _lora_keys(module, _is_embedding(p, t))
                    tensors[ka] = reg._write_tensor(ka, a.to(out_dtype).cpu().contiguous())
                    tensors[kb] = reg._write_tensor(kb, b.to(out_dtype).cpu().contiguous())
                    ranks[module] = int(a.shape[0])
                    del a, b
                    _tick(p, t, progress, done, total)
                    continue
                deltas = _deltas(p, t)
                merged = _merged(p, t, deltas)
                del deltas
                if alpha is not None:
                    merged = merged * scale
                if p.as_lora == "svd":
                    sq = float(merged.square().sum(dtype=torch.float64))
                    total_sq += sq
                    if merged.dim() != 2 or not t.endswith(".weight"):
                        dropped.append(t)
                        errors[t] = 1.0 if sq > 0 else 0.0
                        tail_sq += sq
                    else:
                        emb = _is_embedding(p, t)
                        mat = merged.T if (emb or p.fan_in_fan_out) else merged
                        a, b, err = svd_lora(mat, int(p.rank or 0), seed=p.seed)
                        errors[t] = err
                        tail_sq += err * err * sq
                        ka, kb = _lora_keys(module, emb)
                        tensors[ka] = reg._write_tensor(ka, a.to(out_dtype).cpu().contiguous())
                        tensors[kb] = reg._write_tensor(kb, b.to(out_dtype).cpu().contiguous())
                        ranks[module] = int(p.rank or 0)
                del merged
                _tick(p, t, progress, done, total)
            first = p.inputs[0].view.m
            meta = dict(metadata or {})
            rel_error = None
            if p.as_lora == "svd":
                rel_error = math.sqrt(tail_sq / total_sq) if total_sq > 0 else 0.0
                meta["svd"] = {"rank": p.rank, "rel_error": rel_error, "tensor_rel_errors": errors, "dropped": dropped}
            m = Manifest(
                kind="diff" if p.as_lora is None else "lora",
                base=dict(first.base),
                tensors=tensors,
                params={} if p.as_lora is None else _peft_params(p, ranks, str(first.base.get("name") or "")),
                parents=tuple(i.digest for i in p.inputs),
                recipe=_recipe(p, alpha, beta) if search is None else {**_recipe(p, alpha, beta), "search": search},
                metadata=meta,
            )
            msg = message or f"merge {p.method} of {', '.join(i.ref for i in p.inputs)} on {p.device}"
            if apply_to is not None:
                msg += f"; applied to {Path(apply_to).resolve()}"
            digest = reg.commit(m, ref, msg)
    finally:
        if verifier is not None:
            verifier.cancel()
    applied = None
    if folder is not None:
        applied = Path(apply_to)  # type: ignore[arg-type]
    elif apply_to is not None and base is not None:
        applied = reg.apply(digest, base, apply_to, progress)
    return MergeResult(digest, m, p.device, rel_error, errors if p.as_lora == "svd" else {}, applied, msg,
                       moved=ref is not None)


__all__ = ["AS_LORA", "EMBEDDING_RE", "LINEAR_METHODS", "MergeResult", "merge", "parse_override",
           "parse_weights", "plan", "read_recipe"]
