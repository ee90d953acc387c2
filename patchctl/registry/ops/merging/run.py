"""Running a merge: :func:`merge` plans it, streams it into the store and commits it.

The order is fixed: the ref is checked; for a diff output the input blobs'
:class:`~.verify._Verifier` starts (before torch is imported, which it
overlaps); then :func:`~.plan.plan` checks everything; then, under the
registry's writing lock, LiNeS ``auto`` makes its first pass, the diff
streams in one pass (:func:`~.stream._stream`) or the LoRA output is made
target by target (:func:`~.lora.lora_tensors`), and the manifest is
committed at the end. With ``--apply`` the model of a diff output is built
in a staging folder beside the destination during the streaming pass and
renamed into place after the commit; a LoRA output is applied after it is
committed.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.patches import native
from patchctl.patches.methods import HOST_METHODS
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.ops.exporting import apply_to_base, staged
from patchctl.registry.ops.merging import host_stream
from patchctl.registry.ops.merging.lora import _peft_params, lora_tensors
from patchctl.registry.ops.merging.plan import plan
from patchctl.registry.ops.merging.spec import MergeSpec
from patchctl.registry.ops.merging.stream import Progress, _copy_side_files, _lines_alpha, _stream
from patchctl.registry.ops.merging.verify import _Verifier
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import parse_ref

if TYPE_CHECKING:
    from patchctl.registry.store.repository import Repository


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
    held: str | None = None  # why the asked-for ref was not moved (failed gate, lost update)
    warnings: list[str] = field(default_factory=list)  # e.g. the inputs conflict in sign (Registry.merge)

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.manifest.recipe or {})


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


def _host_spec(spec: MergeSpec) -> bool:
    """Whether a merge of ``spec`` may run on the C kernels without torch (:func:`.host_stream.usable` then
    decides on the plan): torch is imported up front for the others."""
    return (spec.method in HOST_METHODS and spec.as_lora is None and spec.device == "cpu"
            and native.available())


def merge(
    reg: Repository,
    inputs: Sequence[str],
    ref: str | None = None,
    spec: MergeSpec | None = None,
    *,
    apply_to: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    message: str = "",
    metadata: dict[str, Any] | None = None,
    progress: Progress = None,
    search: dict[str, Any] | None = None,
) -> MergeResult:
    """Plan, check, then stream the merge ``spec`` (default: task arithmetic, weights 1) into the store.

    ``apply_to`` with ``base`` also writes the merged full model. ``search``:
    the record of a coefficient search that chose these settings (see
    :mod:`patchctl.registry.ops.search`); kept in the recipe. See the
    package docstring.
    """

    spec = MergeSpec() if spec is None else spec
    if ref is not None:
        parse_ref(ref)
    # a diff output maps every raw input blob: hash them from now on, beside torch's import and the merge
    verifier = _Verifier.start(reg, inputs) if spec.as_lora is None and not isinstance(inputs, str) else None
    try:
        if not _host_spec(spec):
            _import_torch()  # with the cyclic GC paused, before the plan (which may need it)

        from patchctl.patches.lines import single_patch_beta

        p = plan(reg, inputs, spec, apply_to=apply_to, base=base)
        host = host_stream.usable(p)  # task arithmetic / TIES of raw float deltas: the C kernels, no torch
        if not host:
            _import_torch()
        passes = 2 if p.lines == "auto" else 1
        total = passes * sum(math.prod(s) * 4 for s in p.shapes.values())
        done = [0]
        tensors: dict[str, TensorEntry] = {}
        fused = p.as_lora is None  # a diff: one streaming pass stores it and (apply) writes the model
        with reg.store.writing(), (staged(Path(apply_to)) if fused and p.base is not None
                                   else contextlib.nullcontext()) as folder:
            # TIES's top-k per tensor: found in LiNeS auto's first pass, used in the second
            tops: dict[str, Any] | None = {} if p.lines == "auto" else None
            if host:
                verifier = verifier or _Verifier.of(reg.store, [i.view.m for i in p.inputs])
                alpha = host_stream.lines_alpha(p, reg.store, verifier, progress, done, total, tops)
            else:
                alpha = _lines_alpha(p, progress, done, total)
            beta = p.lines_beta if p.lines_beta is not None else (single_patch_beta(alpha) if alpha is not None else 0.0)
            if folder is not None:
                _copy_side_files(p.base, folder)
            params: dict[str, Any] = {}
            meta = dict(metadata or {})
            rel_error: float | None = None
            errors: dict[str, float] = {}
            first = p.inputs[0].view.m
            if fused:
                verifier = verifier or _Verifier.of(reg.store, [i.view.m for i in p.inputs])
                if host:
                    tensors = host_stream.stream(p, reg.store, verifier, folder, progress, done, total, alpha, beta,
                                                 tops)
                else:
                    tensors = _stream(p, reg.store, verifier, alpha, beta, folder, progress, done, total)
            else:
                lora = lora_tensors(p, reg, alpha, beta, progress, done, total)
                tensors = lora.tensors
                params = _peft_params(p, lora.ranks, str(first.base.get("name") or ""))
                if p.as_lora == "svd":
                    meta["svd"] = lora.svd_metadata(p.rank)
                    rel_error, errors = lora.rel_error, lora.errors
            recipe = p.recipe(alpha, beta)
            m = Manifest(
                kind="diff" if p.as_lora is None else "lora",
                base=dict(first.base),
                tensors=tensors,
                params=params,
                parents=tuple(i.digest for i in p.inputs),
                recipe=recipe if search is None else {**recipe, "search": search},
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
        applied = _apply(reg, digest, base, Path(apply_to), progress)
    return MergeResult(digest, m, p.device, rel_error, errors, applied, msg, moved=ref is not None)


def _apply(reg: Repository, digest: str, base: str | os.PathLike[str], out: Path, progress: Progress) -> Path:
    """Write base + the stored patch as a full model folder (what ``patchctl apply`` does)."""

    view = reg.view(digest)
    ckpt = Checkpoint(base)
    reg.check_base(view.m, ckpt)
    return apply_to_base(view, ckpt, out, progress)


LOSSY_SVD = 0.5  # an SVD LoRA output whose relative Frobenius error is at least this lost the merged update


def lost_update(res: MergeResult) -> str | None:
    """Why a merge result lost most of the merged update (an SVD LoRA output too far off), or None."""
    if res.rel_error is not None and res.rel_error >= LOSSY_SVD:
        return f"the rank-{res.manifest.params.get('r', '?')} SVD has relative error {res.rel_error:.2f} on the merged ΔW"
    return None
