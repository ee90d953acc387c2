"""The Python API: :func:`load` a base with patches, :func:`apply` patches to a model in memory,
and the :class:`PatchHandle` that removes or switches them (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchctl.errors import (
    InvalidArgument,
    PatchctlError,
)
from patchctl.registry.formats.bases import locate
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.ops.compose.plan import (
    ModuleTensors,
    Plan,
    as_dtype,
    check_fingerprint,
    check_holds,
    make_plan,
    open_registry,
    plan_steps,
    resolve_device,
    write_steps,
)
from patchctl.registry.store.repository import Repository
from patchctl.registry.store.views import check_against_base

PathLike = str | os.PathLike[str]



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

    if base is not None:
        return Checkpoint(locate(base))
    if st.base is not None:
        return Checkpoint(st.base)
    origin = getattr(module, "name_or_path", None) or getattr(getattr(module, "config", None), "_name_or_path", None)
    if origin:
        try:
            return Checkpoint(locate(origin))
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
    registry: Repository | PathLike | None = None,
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

    patches = [patches] if isinstance(patches, str) else list(patches)
    dev = resolve_device(device)
    td = as_dtype(dtype)
    base_dir = locate(base)
    ckpt = Checkpoint(base_dir)
    fp = ckpt.fingerprint()
    plan = None
    with contextlib.ExitStack() as stack:
        if patches:
            reg = stack.enter_context(open_registry(registry))
            plan = make_plan(reg, patches, method, weights, seed, merge_params)
            check_fingerprint(plan, fp, str(base_dir))
            for i in plan.inputs:
                reg.check_content(i.view.m, ckpt)  # the exact check (cached after the first time)
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
            tensors = ModuleTensors(model)
            write_steps(plan, plan_steps(plan, tensors), tensors, dev, None, ckpt)
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
    registry: Repository | PathLike | None = None,
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
    with open_registry(registry) as reg:
        plan = make_plan(reg, patches, method, weights, seed, merge_params)
        if fingerprint_check and plan.inputs:
            ckpt = _base_of(module, base, st)
            fp = ckpt.fingerprint()
            check_fingerprint(plan, fp, str(ckpt.path))
            check_holds(ModuleTensors(module), ckpt)
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

    def _apply(self, plan: Plan) -> None:
        tensors = ModuleTensors(self.module)
        steps = plan_steps(plan, tensors)
        originals: dict[str, torch.Tensor] = {}
        try:
            write_steps(plan, steps, tensors, self.device, originals)
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
        _restore(ModuleTensors(self.module), self._originals)
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
        with open_registry(self.registry) as reg:
            plan = make_plan(reg, patches, method, weights, seed, merge_params)
            if self.fingerprint_check and plan.inputs:
                fp = self._fingerprint
                if fp is None:  # the set applied is empty, so the module holds its base: check it
                    ckpt = _base_of(self.module, self._base, _state(self.module))
                    fp = ckpt.fingerprint()
                    check_fingerprint(plan, fp, str(ckpt.path))
                    check_holds(ModuleTensors(self.module), ckpt)
                    self._fingerprint = fp
                check_fingerprint(plan, fp, "the model's base")
            plan_steps(plan, ModuleTensors(self.module))  # names and shapes, before anything changes
            _restore(ModuleTensors(self.module), self._originals)
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


def _restore(tensors: ModuleTensors, originals: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, orig in originals.items():
            tensors.by_name[name].copy_(orig)
