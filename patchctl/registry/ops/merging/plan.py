"""Planning a merge: every check before any tensor is read, and the plan the engine follows.

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
it can — bases, targets and shapes (``PatchView.shape_of``), the options
(:meth:`MergeSpec.problems`: method, parameters, weights, LiNeS, output,
dtype, device), what the options need of the inputs (their count, the
per-tensor parameters, a dry run of the method on a 2-element tensor for
every distinct per-tensor parameter set, LoRA-only inputs for ``cat``), the
device's presence and the ``--apply`` base — and reports every problem at
once in one message, of the most specific class among them (BaseMismatch,
ShapeMismatch, DeviceUnavailable, UnsupportedPatch, InvalidArgument). A
failed check writes nothing.

**dtype.** ``dtype`` if given; else float32 when every input is LoRA; else
the promotion of every stored tensor dtype of the inputs (bf16 + fp16 →
float32). The math is float32 whatever the dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import (
    BaseMismatch,
    DeviceUnavailable,
    InvalidArgument,
    NotFound,
    PatchctlError,
    PatchctlWarning,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.patches.device import problem as device_problem
from patchctl.patches.device import resolve
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.formats.safetensors import FLOAT_DTYPES
from patchctl.registry.ops.merging.spec import MergeSpec, Problem
from patchctl.registry.store.views import (
    Change,
    LoraModule,
    PatchView,
    check_against_base,
    lora_modules,
    tied_changes,
)

if TYPE_CHECKING:
    from patchctl.registry.store.repository import Repository

# the most specific class wins when a plan has problems of several kinds
_SEVERITY: tuple[type[PatchctlError], ...] = (
    NotFound, BaseMismatch, ShapeMismatch, DeviceUnavailable, UnsupportedPatch, InvalidArgument,
)


@dataclass
class _Input:
    ref: str
    digest: str
    view: PatchView
    changes: dict[str, Change]  # target -> change
    lora: dict[str, LoraModule]  # manifest key of A -> module (LoRA inputs)
    base: Checkpoint | None = None  # the base, for DoRA / trainable tokens: merged as ΔW = W' − W


@dataclass
class _Plan:
    """A checked merge: the spec, and what it resolved to on these inputs."""

    spec: MergeSpec
    inputs: list[_Input]
    targets: list[str]
    shapes: dict[str, tuple[int, ...]]
    weights: list[float]
    params: dict[str, Any]  # method defaults overlaid with the user's (key "lam")
    per_tensor: dict[str, dict[str, Any]]
    num_blocks: int
    dtype: str  # the output dtype
    device: str  # resolved: cpu, cuda or cuda:N
    fan_in_fan_out: bool
    base: Any  # Checkpoint | None

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def as_lora(self) -> str | None:
        return self.spec.as_lora

    @property
    def rank(self) -> int | None:
        return self.spec.rank

    @property
    def lines(self) -> str | float | None:
        return self.spec.lines_alpha

    @property
    def lines_beta(self) -> float | None:
        return self.spec.beta

    def recipe(self, alpha: float | None, beta: float) -> dict[str, Any]:
        return self.spec.recipe(weights=self.weights, dtype=self.dtype, num_blocks=self.num_blocks,
                                alpha=alpha, beta=beta)


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, cls: type[PatchctlError], msg: str) -> None:
        self.items.append((cls, msg))

    def extend(self, items: Sequence[Problem]) -> None:
        self.items.extend(items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        classes = [k for k, _ in self.items]
        cls = next((c for c in _SEVERITY if c in classes), classes[0])
        msgs = [m.replace("\n", " ") for _, m in self.items]
        prefix = "cannot merge: " if len(msgs) == 1 else f"cannot merge ({len(msgs)} problems): "
        raise cls(prefix + "; ".join(msgs))


def _resolve_device(device: str, problems: _Problems) -> str:
    """The device to merge on; a well-formed name (:meth:`MergeSpec.output_problems`) that is absent is a problem."""
    if device_problem(device) is not None:
        return "cpu"  # not a device name: the spec's problem
    try:
        return resolve(device)
    except DeviceUnavailable as e:
        problems.add(DeviceUnavailable, str(e))
        return device


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


# the promotion of stored float dtypes (torch.promote_types) where it is a table lookup
_PROMOTE = {frozenset({"bfloat16", "float16"}): "float32"}
_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
_NOT_FLOAT = {"int64", "int32", "int16", "int8", "uint8", "bool"}


def _common_dtype(inputs: list[_Input]) -> str:
    """float32 for LoRA-only inputs; else the promotion of every stored tensor dtype (float ones)."""
    if all(i.view.m.kind == "lora" for i in inputs):
        return "float32"
    return promote_dtypes({e.dtype for i in inputs for e in i.view.m.tensors.values()})


def promote_dtypes(names: set[str]) -> str:
    """``torch.promote_types`` over the float dtypes among ``names`` (float32 without one); a table lookup
    for float16, bfloat16, float32 and float64 (no torch import), torch itself for the others (float8)."""
    floats = names - _NOT_FLOAT
    if floats <= set(_RANK):  # float16 and bfloat16 meet at float32, else the widest
        if not floats:
            return "float32"
        top = max(sorted(floats), key=_RANK.__getitem__)
        return _PROMOTE.get(frozenset(floats), top) if _RANK[top] == 1 else top
    import torch

    dt: torch.dtype | None = None
    for d in sorted(names):
        t = getattr(torch, d)
        if t.is_floating_point:
            dt = t if dt is None else torch.promote_types(dt, t)
    return str(dt or torch.float32).removeprefix("torch.")


def _load(reg: Repository, inputs: Sequence[str], problems: _Problems) -> list[_Input]:
    """The inputs, resolved and read (a ref that does not resolve stops the plan here)."""
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
        replaced = [c.target for c in changes if c.op == "replace"]
        if replaced:
            problems.add(UnsupportedPatch, f"{ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}: "
                         "modules_to_save or trained biases), which a merge of deltas cannot combine")
        based = [c for c in changes if c.op in ("dora", "rows")]
        base_ck = None
        if based:  # DoRA, trainable tokens: merged as their ΔW = W' − W against the base the registry knows
            path = reg.base_path(view.m.fingerprint)
            what = "DoRA (use_dora)" if based[0].op == "dora" else "trainable_token_indices"
            if path is None:
                problems.add(UnsupportedPatch, f"{ref} uses {what}, which merges as its ΔW = W' − W against the base; "
                             "this registry does not know where the base is: push the adapter with --base BASE_DIR")
            else:
                base_ck = Checkpoint(path)
        loaded.append(_Input(ref, digest, view, {c.target: c for c in changes if c.op != "replace"},
                             {m.a: m for m in mods.values()}, base_ck))
    return loaded


def _check_method(spec: MergeSpec, n: int, targets: list[str], problems: _Problems) -> dict[str, dict[str, Any]]:
    """The spec's method problems, then what they need of ``n`` inputs; the per-tensor parameters."""
    from patchctl.patches import methods

    own = spec.method_problems()
    problems.extend(own)
    row = spec.method_row()
    ok = not own and row is not None
    if row is not None:
        try:
            row.check_inputs(n)
        except InvalidArgument as e:
            problems.add(InvalidArgument, str(e))
            ok = False
    ws = spec.weights_for(n)
    if len(ws) != n:
        problems.add(InvalidArgument, f"{len(ws)} weight(s) for {n} patch(es); give one weight per patch")
        ok = False
    if not ok:
        return {}
    resolved, rules = spec.method_params(), spec.rules()
    try:
        per_tensor = {t: methods.resolve_params(t, resolved, rules) for t in targets}
    except InvalidArgument as e:
        problems.add(InvalidArgument, str(e))
        return {}
    tried: set[str] = set()  # dry run: the method's own checks, once per distinct parameter set
    for tname in [None, *targets]:
        prm = resolved if tname is None else per_tensor[tname]
        key = json.dumps(prm, sort_keys=True, default=repr)
        if key in tried:
            continue
        tried.add(key)
        try:
            if spec.method in methods.HOST_METHODS:  # the same checks without torch
                methods.check_call(spec.method, n, [float(w) for w in ws], prm, tname or "-")
            else:
                import torch

                from patchctl.patches.merge import merge_tensor

                merge_tensor(spec.method, [torch.zeros(2)] * n, [float(w) for w in ws],
                             generator_seed=spec.seed, name=tname or "-", params=prm)
        except PatchctlError as e:
            where = "" if tname is None else f" (parameters for {tname}, set by an override)"
            problems.add(InvalidArgument, f"{e}{where}")
    return per_tensor


def plan(
    reg: Repository,
    inputs: Sequence[str],
    spec: MergeSpec,
    *,
    apply_to: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> _Plan:
    """Resolve and check a merge; every problem is reported at once, nothing is written."""
    from patchctl.patches import lines as lines_mod

    problems = _Problems()
    loaded = _load(reg, inputs, problems)
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
            shape = tuple(i.view.shape_of(c))
            if c.op == "rows" and i.base is not None and (key := i.base.resolve(t)) is not None:
                shape = tuple(i.base.info(key).shape)  # trainable tokens: rows of the base's embedding
            seen.setdefault(t, {}).setdefault(shape, []).append(i.ref)
    bad_shapes = [f"{t}: " + " vs ".join(f"{list(s)} in {', '.join(r)}" for s, r in seen[t].items())
                  for t in sorted(seen) if len(seen[t]) > 1]
    if bad_shapes and one_base:  # on different bases the shapes say nothing more
        more = f" (and {len(bad_shapes) - 5} more)" if len(bad_shapes) > 5 else ""
        problems.add(ShapeMismatch, "shapes differ: " + "; ".join(bad_shapes[:5]) + more)
    shapes = {t: next(iter(seen[t])) for t in sorted(seen)}
    targets = sorted(shapes)

    # method, weights, parameters; then LiNeS, output, dtype and device names
    per_tensor = _check_method(spec, n, targets, problems)
    problems.extend(spec.output_problems())
    fifo_values = {bool(i.view.m.params.get("fan_in_fan_out", False)) for i in loaded if i.view.m.kind == "lora"}
    if spec.as_lora == "cat":
        not_lora = [f"{i.ref} is a {i.view.m.kind}" for i in loaded if i.view.m.kind != "lora"]
        if not_lora:
            problems.add(InvalidArgument, f"--as-lora cat needs LoRA inputs only ({'; '.join(not_lora)}); use --as-lora svd --rank R")
        based = [f"{i.ref} uses {'DoRA (use_dora)' if i.changes[t].op == 'dora' else 'trainable_token_indices'}"
                 for i in loaded for t in sorted(i.changes) if i.changes[t].op in ("dora", "rows")][:1]
        if based:
            problems.add(InvalidArgument, f"--as-lora cat concatenates LoRA factors; {based[0]}, whose update is not "
                         "B @ A alone: use --as-lora svd --rank R or a diff output")
    if spec.as_lora is not None and len(fifo_values) > 1:
        problems.add(InvalidArgument, "the LoRA inputs disagree on fan_in_fan_out; a LoRA output needs one layout")

    # dtype, device, base
    out_dtype = spec.dtype if spec.dtype in FLOAT_DTYPES else _common_dtype(loaded)
    dev = _resolve_device(spec.device, problems)
    ckpt = None
    if apply_to is not None or base is not None:
        if apply_to is None or base is None:
            problems.add(InvalidArgument, "apply_to and base go together: --apply OUT --base BASE_DIR")
        else:
            ckpt = _check_apply(loaded, Path(apply_to), base, problems)
    problems.raise_if_any()
    if apply_to is None:  # (with apply_to, writing the merged model warns)
        _warn_tied(reg, loaded)
    return _Plan(spec, loaded, targets, shapes, [float(w) for w in spec.weights_for(n)], spec.method_params(),
                 per_tensor, lines_mod.num_blocks(targets), out_dtype, dev, fifo_values == {True}, ckpt)


def _warn_tied(reg: Repository, loaded: list[_Input]) -> None:
    """One warning per tensor the merge changes that the base ties to its output head (as PEFT's merge does)."""
    import warnings

    path = reg.base_path(loaded[0].view.m.fingerprint)
    if path is None:
        return
    ck = Checkpoint(path)
    lines = dict.fromkeys(line for i in loaded for line in tied_changes(i.view, ck))
    for line in lines:
        warnings.warn(line, PatchctlWarning, stacklevel=3)


def _check_apply(loaded: list[_Input], out: Path, base: str | os.PathLike[str], problems: _Problems) -> Any:

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
