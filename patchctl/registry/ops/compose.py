"""Composing a base model with patches in memory: :func:`load` and :func:`apply`.

``load(base, patches)`` loads a base model with transformers and changes its
weights in place, tensor by tensor, as the patches say. ``apply(module,
patches)`` does the same to a model already in memory and returns a
:class:`PatchHandle` whose :meth:`~PatchHandle.remove` puts the original
weights back bit for bit (it keeps a CPU copy of exactly the tensors it
changed), and whose :meth:`~PatchHandle.switch` moves to another patch set
without reloading the base.

The arithmetic is that of ``patchctl apply``
(:func:`patchctl.patches.apply.combine`: ``(base.f32 + delta.f32)`` cast back
to the base's dtype), so a composed model equals the folder ``patchctl apply``
writes, bit for bit:

- one patch, no ``method``: the patch as stored (a LoRA's ``B @ A · scaling``,
  a diff's delta, a replaced tensor), and a diff's *pins*: applying an
  imported diff to its own base gives back the fine-tuned weights exactly;
- several patches (or a ``method``, ``weights`` or merge parameters): per
  tensor, each patch's delta (a zero delta from a patch that does not change
  that tensor), merged in float32 by ``method`` from
  :data:`patchctl.patches.merge.METHODS` (default ``task_arithmetic``: with
  the default weights of 1, the plain sum of the deltas), then added. Pins are
  not used (they belong to one exact diff, not to a merge), so this equals
  ``patchctl merge`` into a float32 diff followed by ``patchctl apply``.

Tensors stream from the store to the device one at a time
(:meth:`PatchView.value`); the base is held once (the model itself).

Every check runs before the first weight changes: devices, method and
weights, base fingerprints, that every patch target names a tensor of the
model with the patch's shape. A failed check changes nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from patchctl.errors import (
    BaseMismatch,
    DeviceUnavailable,
    InvalidArgument,
    InvalidPatch,
    NotFound,
    PatchctlError,
    ShapeMismatch,
    UnsupportedPatch,
)

if TYPE_CHECKING:
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.registry import Registry
    from patchctl.registry.store.views import Change, PatchView

PathLike = str | os.PathLike[str]

__all__ = ["PatchHandle", "apply", "load"]


# -- devices, dtypes, bases, registries ------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → ``cuda`` when present, else ``cpu``; an absent device is DeviceUnavailable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"unknown device {device!r}: choose cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {str(device)!r} was asked for but no CUDA device is present; "
                "use device='cpu' (or device=None to pick cuda when present)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {str(device)!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError):
        raise DeviceUnavailable(f"device {str(device)!r} was asked for but is not available here; use 'cpu'") from None
    return dev


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidArgument(f"unknown dtype {dtype!r}: choose float32, bfloat16, float16 or float64")
    return value


def resolve_base(base: PathLike) -> Path:
    """A base model folder: ``base`` itself, or the snapshot of the model id ``base``
    (``NAME[@REVISION]``) in the local Hugging Face cache. Never downloads."""
    p = Path(base).expanduser()
    if p.is_dir():
        return p
    name, _, rev = str(base).partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=rev or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - invalid id, not cached, offline: all mean "not here"
        raise NotFound(
            f"base {str(base)!r} is neither a model folder nor a model in the local Hugging Face cache; "
            f"pass a folder, or download it first (huggingface-cli download {name})"
        ) from None


@contextlib.contextmanager
def _open_registry(registry: Registry | PathLike | None) -> Iterator[Registry]:
    from patchctl.registry.registry import Registry

    if isinstance(registry, Registry):
        yield registry
        return
    reg = Registry() if registry is None else Registry(registry, create=False)
    try:
        yield reg
    finally:
        reg.close()


# -- the patch set ----------------------------------------------------------------------
@dataclass
class _Input:
    ref: str
    digest: str
    view: PatchView


@dataclass
class _Plan:
    inputs: list[_Input]
    method: str | None  # None: one patch applied as stored, pins included
    weights: list[float]
    params: dict[str, Any]
    seed: int

    @property
    def fingerprint(self) -> str | None:
        return self.inputs[0].view.m.fingerprint if self.inputs else None


def _plan(
    reg: Registry,
    patches: Sequence[str],
    method: str | None,
    weights: Sequence[float] | None,
    seed: int,
    merge_params: Mapping[str, Any],
) -> _Plan:
    """Resolve the patches and check the merge settings; reads no tensor."""
    from patchctl.patches import merge as merge_mod
    from patchctl.registry.store.views import PatchView

    inputs = []
    for ref in patches:
        if not isinstance(ref, str):
            raise InvalidArgument(f"patches are NAME:TAG or digest strings, got {ref!r}")
        digest = reg.resolve(ref)
        inputs.append(_Input(ref, digest, PatchView(reg.store, reg.manifest(digest))))
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
        return _Plan(inputs, None, [1.0] * n, {}, seed)
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
        replaced = [c.target for c in i.view.changes() if c.op != "add"]
        if replaced:
            raise UnsupportedPatch(
                f"{i.ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}: "
                "modules_to_save or trained biases), which a merge of deltas cannot combine; apply it alone"
            )
    return _Plan(inputs, method, [float(w) for w in ws], params, seed)


def _check_fingerprint(plan: _Plan, fp: str, where: str) -> None:
    for i in plan.inputs:
        if i.view.m.fingerprint != fp:
            raise BaseMismatch(
                f"{i.ref} was made for base {i.view.m.base.get('name') or '?'} ({i.view.m.fingerprint[:19]}…), "
                f"but {where} has fingerprint {fp[:19]}…; use the right base or `patchctl port` the patch"
            )


# -- the module's tensors -----------------------------------------------------------------
class _Tensors:
    """A module's parameters and buffers by name, and base-tensor-name resolution."""

    def __init__(self, module: torch.nn.Module):
        self.by_name: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        self.by_name.update(module.named_buffers(remove_duplicate=False))

    def resolve(self, target: str) -> str | None:
        """The module name of base tensor ``target``: exact, else the unique ``*.target``,
        else ``target`` without leading components (a PEFT key's ``bert.``)."""
        if target in self.by_name:
            return target
        hits = [n for n in self.by_name if n.endswith("." + target)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None
        parts = target.split(".")
        for i in range(1, len(parts)):
            tail = ".".join(parts[i:])
            if tail in self.by_name:
                return tail
        return None


@dataclass
class _Step:
    name: str  # module tensor name
    merge_name: str  # base tensor name (names the tensor for the merge, e.g. DARE seeds)
    changes: dict[int, Change]  # input index -> its change to this tensor
    shape: tuple[int, ...]


def _steps(plan: _Plan, tensors: _Tensors) -> list[_Step]:
    """Resolve every change to a module tensor and check its shape; report every problem."""
    problems: list[str] = []
    steps: dict[str, _Step] = {}
    for k, inp in enumerate(plan.inputs):
        for c in inp.view.changes():
            name = tensors.resolve(c.target)
            if name is None:
                problems.append(f"{inp.ref}: {c.target} is not a tensor of the model")
                continue
            shape = tuple(inp.view.shape_of(c))
            have = tuple(tensors.by_name[name].shape)
            if shape != have:
                problems.append(f"{inp.ref}: {c.target} has shape {list(shape)} but the model's {name} has {list(have)}")
                continue
            step = steps.setdefault(name, _Step(name, c.target, {}, have))
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


def _delta(plan: _Plan, step: _Step, device: torch.device) -> tuple[str, torch.Tensor, Any]:
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


def _write(
    plan: _Plan,
    steps: list[_Step],
    tensors: _Tensors,
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
    from patchctl.registry.formats.safetensors import dtype_name

    with torch.no_grad():
        for step in steps:
            t = tensors.by_name[step.name]
            op, value, pins = _delta(plan, step, device or t.device)
            file_base = None
            if ckpt is not None:
                key = ckpt.resolve(step.merge_name)
                if key is not None and ckpt.info(key).dtype != dtype_name(t.dtype):
                    file_base = ckpt.read(key)
            if originals is not None:
                originals[step.name] = t.detach().to("cpu", copy=True)
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
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_holds(tensors: _Tensors, ckpt: Checkpoint) -> None:
    """BaseMismatch unless the module's tensors equal the checkpoint's where the fingerprint looks.

    Every checkpoint tensor that resolves to a module tensor is compared in the
    byte windows the fingerprint samples (cast to the module's dtype first), so
    the module holds the base exactly as far as the fingerprint can tell.
    Checkpoint tensors the module lacks, and module tensors the checkpoint
    lacks (a fresh head), are not compared.
    """
    from patchctl.registry.formats.checkpoint import sample_windows
    from patchctl.registry.formats.safetensors import ITEMSIZE, bytes_to_tensor

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
                iv = _INT_VIEW[got.element_size()]
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


# -- what patchctl knows about modules it loaded or patched ----------------------------------------
@dataclass
class _State:
    base: Path | None = None  # the folder load() read it from
    baked: tuple[str, ...] = ()  # patches load() merged in for good
    handle: weakref.ref[PatchHandle] | None = None  # the active handle, if any

    def active(self) -> PatchHandle | None:
        h = self.handle() if self.handle is not None else None
        return h if h is not None and h.active else None


_STATE: weakref.WeakKeyDictionary[torch.nn.Module, _State] = weakref.WeakKeyDictionary()


def _state(module: torch.nn.Module) -> _State:
    st = _STATE.get(module)
    if st is None:
        st = _STATE[module] = _State()
    return st


def _base_of(module: torch.nn.Module, base: PathLike | None, st: _State) -> Checkpoint:
    from patchctl.registry.formats.checkpoint import Checkpoint

    if base is not None:
        return Checkpoint(resolve_base(base))
    if st.base is not None:
        return Checkpoint(st.base)
    origin = getattr(module, "name_or_path", None) or getattr(getattr(module, "config", None), "_name_or_path", None)
    if origin:
        try:
            return Checkpoint(resolve_base(origin))
        except PatchctlError:
            pass
    raise InvalidArgument(
        "cannot tell which base this model holds"
        + (f" (it came from {origin!r}, which is not a local model folder)" if origin else "")
        + ": pass base=FOLDER_OR_MODEL_ID, load it with patchctl.load(), "
        "or pass fingerprint_check=False to check only tensor names and shapes"
    )


# -- the API ----------------------------------------------------------------------------------------
def load(
    base: PathLike,
    patches: Sequence[str] | str = (),
    *,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    registry: Registry | PathLike | None = None,
    seed: int = 0,
    model_cls: Any = None,
    load_kwargs: Mapping[str, Any] | None = None,
    **merge_params: Any,
) -> Any:
    """Load ``base`` with transformers and apply ``patches`` to it in memory.

    ``base``: a model folder, or a model id (``NAME[@REVISION]``) already in the
    local Hugging Face cache. ``patches``: ``NAME:TAG`` or digest strings in
    ``registry`` (a :class:`~patchctl.Registry`, a registry folder, or ``None``
    for the default registry). One patch is applied as stored (a diff with its
    pins: the result is the fine-tune, bit for bit); several, or any of
    ``method``, ``weights`` or merge parameters (``lam``, ``density``, ``gamma``
    as :data:`~patchctl.patches.merge.METHODS` lists them; ``seed`` for DARE),
    are merged tensor by tensor (``method`` defaults to ``task_arithmetic``).

    ``device``: where the model goes (``None``: ``cuda`` when present, else
    ``cpu``). ``dtype``: the model's dtype (``None``: the checkpoint's); a
    patched tensor is computed in the checkpoint's dtype and then cast, so the
    result equals loading ``patchctl apply``'s output with that dtype.
    ``model_cls``: a transformers class or its name (default: the class
    ``config.json``'s ``architectures`` names, else ``AutoModel``);
    ``load_kwargs`` go to its ``from_pretrained``.

    Checked before the model is loaded: the device, the merge settings, the
    base fingerprint of every patch (:class:`~patchctl.BaseMismatch`) and
    every patch tensor's name and shape. The model's weights are read once
    (by transformers) and changed in place; no second copy is made.

    The model remembers its base: :func:`apply` can patch a model loaded
    without patches and restore it, and refuses one loaded with patches.

    Example (``base``: a model folder; ``reg``: a registry holding ``lora:v1``
    and ``diff:v1``, both made for that base)::

        >>> import patchctl
        >>> model = patchctl.load(base, ["diff:v1"], registry=reg, device="cpu")
        >>> type(model).__name__
        'BertModel'
        >>> mix = patchctl.load(base, ["lora:v1", "diff:v1"], method="ties", weights=[0.5, 0.5],
        ...                     density=0.5, registry=reg, device="cpu")
        >>> bf16 = patchctl.load(base, "lora:v1", registry=reg, device="cpu", dtype="bfloat16")
        >>> next(bf16.parameters()).dtype
        torch.bfloat16
    """
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.views import check_against_base

    patches = [patches] if isinstance(patches, str) else list(patches)
    dev = resolve_device(device)
    td = _dtype(dtype)
    base_dir = resolve_base(base)
    ckpt = Checkpoint(base_dir)
    fp = ckpt.fingerprint()
    plan = None
    with contextlib.ExitStack() as stack:
        if patches:
            reg = stack.enter_context(_open_registry(registry))
            plan = _plan(reg, patches, method, weights, seed, merge_params)
            _check_fingerprint(plan, fp, str(base_dir))
            for i in plan.inputs:
                check_against_base(i.view, ckpt)
        elif method is not None or weights is not None or merge_params:
            raise InvalidArgument("method, weights and merge parameters need patches to merge")
        cls = _model_class(model_cls, ckpt.config())
        kw: dict[str, Any] = {"local_files_only": True}
        if td is not None:
            kw["dtype"] = td
        if dev.type != "cpu":
            kw["device_map"] = str(dev)
        kw.update(load_kwargs or {})
        model = cls.from_pretrained(str(base_dir), **kw)
        if dev.type != "cpu" and any(p.device != dev for p in model.parameters()):
            model.to(dev)
        if plan is not None:
            tensors = _Tensors(model)
            _write(plan, _steps(plan, tensors), tensors, dev, None, ckpt)
    _STATE[model] = _State(base_dir, tuple(i.ref for i in plan.inputs) if plan is not None else ())
    return model


def _model_class(model_cls: Any, config: Mapping[str, Any]) -> Any:
    import transformers

    if model_cls is None:
        archs = config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
        return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    if isinstance(model_cls, str):
        cls = getattr(transformers, model_cls, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise InvalidArgument(f"transformers has no model class {model_cls!r} (e.g. AutoModelForCausalLM)")
        return cls
    if not hasattr(model_cls, "from_pretrained"):
        raise InvalidArgument(f"model_cls {model_cls!r} has no from_pretrained")
    return model_cls


def apply(
    module: torch.nn.Module,
    patches: Sequence[str] | str,
    *,
    registry: Registry | PathLike | None = None,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    fingerprint_check: bool = True,
    base: PathLike | None = None,
    seed: int = 0,
    **merge_params: Any,
) -> PatchHandle:
    """Apply ``patches`` to ``module``'s weights in place; the handle undoes it exactly.

    ``patches``, ``registry``, ``method``, ``weights``, ``seed`` and merge
    parameters are as for :func:`load`. ``device``: where the deltas are
    computed (``None``: where each weight lives). Returns a
    :class:`PatchHandle`: ``remove()`` copies back the original values of the
    tensors it changed (kept on the CPU, so patching costs one CPU copy of
    the touched tensors); ``switch(other_patches)`` moves to another set
    without reloading the base; as a context manager it removes the patches
    on exit. A module carries at most one active handle.

    Which base does the module hold? (``fingerprint_check=True``.) A
    fingerprint covers the tensor names of the checkpoint *file*, which a
    model's ``state_dict`` need not have (buffers it does not save, tied
    weights, a ``bert.`` prefix), so it is not recomputed from the module.
    Instead the base checkpoint is found — ``base=`` (a folder or model id),
    else the folder :func:`load` read the module from, else the module's
    ``name_or_path`` when that is a local folder or cached model — its
    fingerprint must be the patches' (:class:`~patchctl.BaseMismatch`), and
    the module's tensors must equal the checkpoint's in every byte window the
    fingerprint samples (after a cast to the module's dtype): an already
    patched or different model fails. With no base to be found, apply refuses
    (:class:`~patchctl.errors.InvalidArgument`) unless
    ``fingerprint_check=False``, which checks only that every patch target
    names a module tensor (exact, else the unique ``*.target``) of the right
    shape. Those name and shape checks always run, before any weight changes.

    Example (``base``, ``reg`` as in :func:`load`)::

        >>> import patchctl, torch
        >>> model = patchctl.load(base, device="cpu")          # the base alone
        >>> w = model.get_parameter("encoder.layer.0.attention.self.query.weight")
        >>> before = w.detach().clone()
        >>> with patchctl.apply(model, ["lora:v1"], registry=reg) as h:
        ...     torch.equal(w, before)                         # patched inside the block
        False
        >>> torch.equal(w, before)                             # restored bit for bit
        True
        >>> h = patchctl.apply(model, ["lora:v1"], registry=reg)
        >>> h.switch(["diff:v1"]).refs                         # hot swap, no reload
        ('diff:v1',)
        >>> h.remove()
        >>> torch.equal(w, before)
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgument(f"apply needs a torch.nn.Module, got {type(module).__name__}")
    patches = [patches] if isinstance(patches, str) else list(patches)
    dev = resolve_device(device) if device is not None else None
    st = _state(module)
    active = st.active()
    if active is not None:
        raise InvalidArgument(
            f"the model already carries patches {list(active.refs)} from an active handle; "
            "call handle.switch([...]) to change them, or handle.remove() first"
        )
    if st.baked and fingerprint_check:
        raise InvalidArgument(
            f"the model was loaded with patches {list(st.baked)} merged in for good; to swap patches, "
            "load the base alone (patchctl.load(base)) and apply them to it, or pass fingerprint_check=False"
        )
    handle = PatchHandle(module, registry, dev, fingerprint_check, None, base)
    with _open_registry(registry) as reg:
        plan = _plan(reg, patches, method, weights, seed, merge_params)
        if fingerprint_check and plan.inputs:
            ckpt = _base_of(module, base, st)
            fp = ckpt.fingerprint()
            _check_fingerprint(plan, fp, str(ckpt.path))
            _check_holds(_Tensors(module), ckpt)
            handle._fingerprint = fp
        handle._apply(plan)
    st.handle = weakref.ref(handle)
    return handle


@dataclass(eq=False)
class PatchHandle:
    """Patches applied in place to a module by :func:`apply`.

    ``refs`` / ``digests``: the patch set now applied; ``touched``: the
    module tensor names it changed; ``active``: until :meth:`remove`.
    Dropping the handle without ``remove()`` leaves the patches in place.
    """

    module: torch.nn.Module
    registry: Any
    device: torch.device | None
    fingerprint_check: bool
    _fingerprint: str | None
    _base: PathLike | None = None
    refs: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()
    method: str | None = None
    active: bool = True
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def touched(self) -> tuple[str, ...]:
        return tuple(sorted(self._originals))

    def _apply(self, plan: _Plan) -> None:
        tensors = _Tensors(self.module)
        steps = _steps(plan, tensors)
        originals: dict[str, torch.Tensor] = {}
        try:
            _write(plan, steps, tensors, self.device, originals)
        except BaseException:
            _restore(tensors, originals)
            raise
        self._originals = originals
        self.refs = tuple(i.ref for i in plan.inputs)
        self.digests = tuple(i.digest for i in plan.inputs)
        self.method = plan.method

    def remove(self) -> None:
        """Put back the original values of every tensor the patches changed, bit for bit.

        Removing twice is a no-op."""
        if not self.active:
            return
        _restore(_Tensors(self.module), self._originals)
        self._originals = {}
        self.active = False

    def switch(
        self,
        patches: Sequence[str] | str,
        *,
        method: str | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        **merge_params: Any,
    ) -> PatchHandle:
        """Replace the applied patches with ``patches`` (same rules as :func:`apply`).

        The new set is resolved and checked first (same base fingerprint as
        the first set, names, shapes); on any error the old set stays applied.
        Then the original weights are restored and the new set applied; the
        base is never reloaded. Returns the handle.
        """
        if not self.active:
            raise InvalidArgument("these patches were removed; call patchctl.apply() for a new set")
        patches = [patches] if isinstance(patches, str) else list(patches)
        with _open_registry(self.registry) as reg:
            plan = _plan(reg, patches, method, weights, seed, merge_params)
            if self.fingerprint_check and plan.inputs:
                fp = self._fingerprint
                if fp is None:  # the set applied is empty, so the module holds its base: check it
                    ckpt = _base_of(self.module, self._base, _state(self.module))
                    fp = ckpt.fingerprint()
                    _check_fingerprint(plan, fp, str(ckpt.path))
                    _check_holds(_Tensors(self.module), ckpt)
                    self._fingerprint = fp
                _check_fingerprint(plan, fp, "the model's base")
            _steps(plan, _Tensors(self.module))  # names and shapes, before anything changes
            _restore(_Tensors(self.module), self._originals)
            self._originals = {}
            self.refs = self.digests = ()
            self._apply(plan)
        return self

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *_: Any) -> None:
        if self.active:
            self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({list(self.refs)}, method={self.method!r}, {len(self._originals)} tensors, {state})"


def _restore(tensors: _Tensors, originals: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, orig in originals.items():
            tensors.by_name[name].copy_(orig)
