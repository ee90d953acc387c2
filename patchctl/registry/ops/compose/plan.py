"""Planning a composition: devices, the patch set (bases, methods, weights), the module's tensors,
the per-tensor steps and their deltas, and the check that a module holds the base (no weight changes here
but in :func:`write_steps`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from patchctl.errors import (
    BaseMismatch,
    InvalidArgument,
    InvalidPatch,
    ShapeMismatch,
    UnsupportedPatch,
)
from patchctl.patches.device import resolve
from patchctl.registry.formats.checkpoint import Checkpoint, resolve_name, sample_windows
from patchctl.registry.formats.safetensors import ITEMSIZE, bytes_to_tensor, dtype_name
from patchctl.registry.store.repository import Repository
from patchctl.registry.store.views import PatchView

if TYPE_CHECKING:
    from patchctl.registry.store.views import Change

PathLike = str | os.PathLike[str]


# -- devices, dtypes, bases, registries ------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → ``cuda`` when present, else ``cpu``; an absent device is DeviceUnavailable
    (:func:`patchctl.patches.device.resolve`)."""
    return torch.device(resolve(device, remedy="device='cpu' (or device=None to pick cuda when present)"))


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidArgument(f"unknown dtype {dtype!r}: choose float32, bfloat16, float16 or float64")
    return value


@contextlib.contextmanager
def open_registry(registry: Repository | PathLike | None) -> Iterator[Repository]:

    if isinstance(registry, Repository):
        yield registry
        return
    reg = Repository() if registry is None else Repository(registry, create=False)
    try:
        yield reg
    finally:
        reg.close()


# -- the patch set ----------------------------------------------------------------------
@dataclass
class Input:
    ref: str
    digest: str
    view: PatchView


@dataclass
class Plan:
    inputs: list[Input]
    method: str | None  # None: one patch applied as stored, pins included
    weights: list[float]
    params: dict[str, Any]
    seed: int

    @property
    def fingerprint(self) -> str | None:
        return self.inputs[0].view.m.fingerprint if self.inputs else None


def make_plan(
    reg: Repository,
    patches: Sequence[str],
    method: str | None,
    weights: Sequence[float] | None,
    seed: int,
    merge_params: Mapping[str, Any],
) -> Plan:
    """Resolve the patches and check the merge settings; reads no tensor."""
    from patchctl.patches import merge as merge_mod

    inputs = []
    for ref in patches:
        if not isinstance(ref, str):
            raise InvalidArgument(f"patches are NAME:TAG or digest strings, got {ref!r}")
        digest = reg.resolve(ref)
        inputs.append(Input(ref, digest, PatchView(reg.store, reg.manifest(digest))))
    n = len(inputs)
    fps = {i.view.m.fingerprint for i in inputs}
    if len(fps) > 1:
        listed = "; ".join(f"{i.ref} is for {i.view.m.base.get('name') or '?'} ({i.view.m.fingerprint[:19]}…)"
                           for i in inputs)
        raise BaseMismatch(f"the patches are for different bases: {listed}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgument(f"seed must be an integer, got {seed!r}")
    merging = method is not None or n > 1 or weights is not None or bool(merge_params)
    if not merging:
        return Plan(inputs, None, [1.0] * n, {}, seed)
    method = method or "task_arithmetic"
    row = merge_mod.get_method(method)
    if n == 0:
        raise InvalidArgument(f"merge method {method!r} was given but no patches")
    row.check_inputs(n)
    params = row.resolve(merge_params)
    ws = [1.0] * n if weights is None else list(weights)
    if len(ws) != n:
        raise InvalidArgument(f"{len(ws)} weight(s) for {n} patch(es); give one weight per patch")
    for k, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidArgument(f"weight {k + 1} must be a finite number, got {w!r}")
    # a dry run surfaces the method's own checks (density range, weight signs, ...)
    merge_mod.merge_tensor(method, [torch.zeros(2)] * n, ws, generator_seed=seed, name="-", params=params)
    for i in inputs:
        based = [c for c in i.view.changes() if c.op in ("dora", "rows")]
        if based:
            what = "DoRA (use_dora)" if based[0].op == "dora" else "trainable_token_indices"
            raise UnsupportedPatch(f"{i.ref} uses {what}: its change to {based[0].target} is computed from the base "
                                   "weights, not a delta a merge can weigh; apply it alone, or `patchctl merge` it "
                                   "(which merges its ΔW against the base)")
        replaced = [c.target for c in i.view.changes() if c.op != "add"]
        if replaced:
            raise UnsupportedPatch(
                f"{i.ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}: "
                "modules_to_save or trained biases), which a merge of deltas cannot combine; apply it alone"
            )
    return Plan(inputs, method, [float(w) for w in ws], params, seed)


def check_fingerprint(plan: Plan, fp: str, where: str) -> None:
    for i in plan.inputs:
        if i.view.m.fingerprint != fp:
            raise BaseMismatch(
                f"{i.ref} was made for base {i.view.m.base.get('name') or '?'} ({i.view.m.fingerprint[:19]}…), "
                f"but {where} has fingerprint {fp[:19]}…; use the right base or `patchctl port` the patch"
            )


# -- the module's tensors -----------------------------------------------------------------
class ModuleTensors:
    """A module's parameters and buffers by name, and base-tensor-name resolution."""

    def __init__(self, module: torch.nn.Module):
        self.by_name: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        self.by_name.update(module.named_buffers(remove_duplicate=False))

    def resolve(self, target: str) -> str | None:
        """The module name of base tensor ``target`` (:func:`~patchctl.registry.formats.checkpoint.resolve_name`)."""
        return resolve_name(target, self.by_name)


@dataclass
class Step:
    name: str  # module tensor name
    merge_name: str  # base tensor name (names the tensor for the merge, e.g. DARE seeds)
    changes: dict[int, Change]  # input index -> its change to this tensor
    shape: tuple[int, ...]


def plan_steps(plan: Plan, tensors: ModuleTensors) -> list[Step]:
    """Resolve every change to a module tensor and check its shape; report every problem."""
    problems: list[str] = []
    steps: dict[str, Step] = {}
    for k, inp in enumerate(plan.inputs):
        for c in inp.view.changes():
            name = tensors.resolve(c.target)
            if name is None:
                problems.append(f"{inp.ref}: {c.target} is not a tensor of the model")
                continue
            shape = tuple(inp.view.shape_of(c))
            have = tuple(tensors.by_name[name].shape)
            if c.op == "rows" and len(have) == 2 and shape[1:] == have[1:] \
                    and all(0 <= r < have[0] for r in inp.view.rows(c)):
                shape = have  # trainable tokens: rows of the model's embedding
            if shape != have:
                problems.append(f"{inp.ref}: {c.target} has shape {list(shape)} but the model's {name} has {list(have)}")
                continue
            step = steps.setdefault(name, Step(name, c.target, {}, have))
            if k in step.changes:
                problems.append(f"{inp.ref}: {step.changes[k].target} and {c.target} are both the model's {name}")
            step.changes[k] = c
            if inp.view.m.kind != "lora":
                step.merge_name = c.target  # a diff's spelling is the base's, as in `patchctl merge`
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShapeMismatch(f"the patches do not fit the model: {'; '.join(problems[:5])}{more}")
    seen: dict[tuple[int, int], str] = {}
    for name in steps:
        t = tensors.by_name[name]
        if t.device.type == "meta":
            raise InvalidArgument(f"{name} is on the meta device (offloaded); load the model onto a real device")
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen:
            raise InvalidPatch(f"{seen[key]} and {name} are the same (tied) tensor of the model; a patch may change only one")
        seen[key] = name
    return [steps[n] for n in sorted(steps)]


def step_delta(plan: Plan, step: Step, device: torch.device) -> tuple[str, torch.Tensor, Any]:
    """``(op, value, pins)`` for one tensor, on ``device``: the delta (op ``add``; merged in
    float32 when the plan merges) or the new value (op ``replace``), and the pins to write."""
    from patchctl.patches.merge import merge_tensor

    if plan.method is None:
        ((k, c),) = step.changes.items()
        view = plan.inputs[k].view
        return c.op, view.value(c, str(device)), view.pins(c.sources[0]) if c.op == "add" else None
    zero: torch.Tensor | None = None  # one zero delta shared by every patch that leaves the tensor alone
    deltas = []
    for k, inp in enumerate(plan.inputs):
        ck = step.changes.get(k)
        if ck is None:
            if zero is None:
                zero = torch.zeros(step.shape, dtype=torch.float32, device=device)
            deltas.append(zero)  # the merge methods are pure functions: they never write to their inputs
        else:
            deltas.append(inp.view.value(ck, str(device)).to(torch.float32))
    merged = merge_tensor(plan.method, deltas, plan.weights, generator_seed=plan.seed, name=step.merge_name,
                          params=plan.params)
    return "add", merged, None


def write_steps(
    plan: Plan,
    steps: list[Step],
    tensors: ModuleTensors,
    device: torch.device | None,
    originals: dict[str, torch.Tensor] | None,
    ckpt: Checkpoint | None = None,
) -> None:
    """Change the module's tensors in place, one at a time, as ``patchctl apply`` would.

    ``device``: where deltas are computed (``None``: where each tensor lives).
    ``originals``: where to keep a CPU copy of each tensor before it changes.
    ``ckpt``: the file the model was loaded from; a tensor whose dtype in the
    model differs from the file's is computed from the file's value (in the
    file's dtype, as ``patchctl apply`` does), then cast to the model's.
    """
    from patchctl.patches.apply import apply_pins, combine

    with torch.no_grad():
        for step in steps:
            t = tensors.by_name[step.name]
            file_base = None
            if ckpt is not None:
                key = ckpt.resolve(step.merge_name)
                if key is not None and ckpt.info(key).dtype != dtype_name(t.dtype):
                    file_base = ckpt.read(key)
            if originals is not None:
                originals[step.name] = t.detach().to("cpu", copy=True)
            view = plan.inputs[next(iter(step.changes))].view
            if plan.method is None and view.m.kind == "lora":
                # one LoRA, every op (DoRA, trainable tokens: from the base tensor) as peft merges it
                c = next(iter(step.changes.values()))
                base_t = file_base if file_base is not None else t
                t.copy_(view.new_value(c, base_t, str(device or t.device)).to(base_t.dtype))
                continue
            op, value, pins = step_delta(plan, step, device or t.device)
            if op != "add":
                t.copy_(value.to(file_base.dtype) if file_base is not None else value)
            elif file_base is None and pins is None and t.dtype in (torch.float32, torch.float64):
                # combine() adds in the base's own dtype here: the same sum, without a temporary
                t.add_(value.to(device=t.device, dtype=t.dtype))
            else:
                out = combine(file_base.to(value.device) if file_base is not None else t, value)
                t.copy_(apply_pins(out, *pins) if pins is not None else out)
            del value


# -- does a module hold a base? ---------------------------------------------------------------
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_holds(tensors: ModuleTensors, ckpt: Checkpoint) -> None:
    """BaseMismatch unless the module's tensors equal the checkpoint's where the fingerprint looks.

    Every checkpoint tensor that resolves to a module tensor is compared in the
    byte windows the fingerprint samples (cast to the module's dtype first), so
    the module holds the base exactly as far as the fingerprint can tell.
    Checkpoint tensors the module lacks, and module tensors the checkpoint
    lacks (a fresh head), are not compared.
    """

    compared, differ = 0, []
    for name in ckpt.names():
        mname = tensors.resolve(name)
        if mname is None:
            continue
        t = tensors.by_name[mname]
        info = ckpt.info(name)
        if tuple(t.shape) != tuple(info.shape) or t.device.type == "meta":
            differ.append(name)
            continue
        size = ITEMSIZE[info.dtype]
        flat = t.detach().reshape(-1)
        with open(ckpt.where[name].path, "rb") as f:
            for off, n in sample_windows(info.nbytes):
                f.seek(info.start + off)
                want = bytes_to_tensor(bytearray(f.read(n)), info.dtype, (n // size,)).to(t.dtype)
                got = flat[off // size : (off + n) // size].to("cpu")
                iv = INT_VIEW[got.element_size()]
                if not torch.equal(got.view(iv), want.view(iv)):
                    differ.append(name)
                    break
        compared += 1
    if compared == 0:
        raise BaseMismatch(f"the model has none of the tensors of base {ckpt.path}; it is another model")
    if differ:
        raise BaseMismatch(
            f"the model's weights are not those of base {ckpt.path}: {len(differ)} of {compared} tensors differ "
            f"(e.g. {', '.join(differ[:3])}); it is another model, or already patched "
            "(remove the patches first, or pass fingerprint_check=False)"
        )


