"""The compress engine: plan the source, stream it through sparsify and the codec, write the sparse
patch with its report (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from patchctl.errors import InvalidArgument, InvalidPatch, UnsupportedPatch
from patchctl.registry.ops.compressing.spec import CompressSpec
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import is_digest, parse_ref
from patchctl.registry.store.views import PatchView, lora_modules

if TYPE_CHECKING:
    import torch

    from patchctl.registry.store.repository import Repository

Progress = Callable[[int, int], None] | None


@dataclass(frozen=True)
class CompressResult:
    """What :meth:`Registry.compress` made."""

    digest: str
    manifest: Manifest
    source: str  # the source patch's digest
    ref: str | None  # NAME:TAG moved to the new patch
    device: str = "cpu"
    message: str = ""  # the ref-history message
    validation: dict[str, Any] | None = None  # gain kept on the test split (after a search)
    held: str | None = None  # why no ref was moved: it lost most of the update (--force tags it anyway)

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.manifest.recipe or {})

    @property
    def report(self) -> dict[str, Any]:
        return dict(self.manifest.metadata.get("compression") or {})


def default_ref(ref: str, density: float, mode: str = "ternary") -> str:
    """``NAME:TAG`` → ``NAME:TAG-d<density>`` (``-<mode>`` added for values and dare)."""
    if ref.startswith("sha256:"):
        raise InvalidArgument(f"{ref[:19]}… is a digest; name the compressed patch with --as NAME:TAG")
    r = parse_ref(ref)
    tag = f"{r.tag}-d{float(density):g}" + ("" if mode == "ternary" else f"-{mode}")
    return str(parse_ref(f"{r.name}:{tag}"))


def _r(x: float) -> float:
    """6 significant digits: stable across float64 reduction orders, plenty for a report."""
    return float(f"{x:.6g}")


@dataclass
class SourcePlan:
    source: str
    view: PatchView
    layout: str  # "diff" (base names) or "lora" (PEFT factor keys)
    target: str  # recipe target: "delta" or "factors"
    keys: list[str]  # what is compressed: manifest keys (diff, factors) or change targets (delta)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # dtype recorded in the output entry
    passthrough: list[str]  # LoRA keys kept as they are (replacements)
    read: Callable[[str], torch.Tensor]


def plan_source(reg: Repository, ref: str, lora_delta: bool | None) -> SourcePlan:
    """What to compress; ``lora_delta`` None: a LoRA's ΔW (False: its factors)."""
    digest = reg.resolve(ref)
    m = reg.manifest(digest)
    if m.kind == "suite":
        raise InvalidArgument(f"{ref} is an eval suite, not a patch")
    if m.kind == "sparse":
        r = m.recipe or {}
        src = "the dense patch it was made from"
        if m.parents:
            tags = sorted(reg.index.tags_of(m.parents[0]), key=lambda t: (t.endswith(":latest"), t))
            src = tags[0] if tags else m.parents[0][:19]
        how = f" ({r.get('mode')}, density {r.get('density')})" if r.get("op") == "compress" else ""
        raise UnsupportedPatch(
            f"{ref} is already a sparse patch{how}; compressing it again compounds the error: "
            f"compress its source {src} instead"
        )
    view = PatchView(reg.store, m)
    if lora_delta and m.kind != "lora":
        raise InvalidArgument(f"--lora-delta compresses a LoRA's ΔW, but {ref} is a {m.kind} patch; drop --lora-delta")

    def raw(key: str) -> torch.Tensor:
        import torch

        t = view.tensor(key)
        return t.to(torch.float32) if t.dtype == torch.float64 else t

    if m.kind == "diff":
        keys = sorted(m.tensors)
        return SourcePlan(digest, view, "diff", "delta", keys, {k: m.tensors[k].shape for k in keys},
                     {k: m.tensors[k].dtype for k in keys}, [], raw)
    mods, other = lora_modules(m)
    if lora_delta is None or lora_delta:
        changes = {c.target: c for c in view.changes()}
        replaced = sorted(t for t, c in changes.items() if c.op == "replace")
        if replaced:
            raise UnsupportedPatch(
                f"{ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}); "
                "a replacement is not a delta: compress its A/B factors with --factors "
                "(the replaced tensors are kept as they are)"
            )
        keys = sorted(changes)
        based = {t: c for t, c in changes.items() if c.op in ("dora", "rows")}
        base = None
        if based:  # DoRA, trainable tokens: their ΔW = W' − W is computed from the base the registry knows
            path = reg.base_path(m.fingerprint)
            if path is None:
                what = "DoRA (use_dora)" if any(c.op == "dora" for c in based.values()) else "trainable_token_indices"
                raise UnsupportedPatch(f"{ref} uses {what}; its ΔW = W' − W needs the base, which this registry does "
                                       "not know: push the adapter with --base BASE_DIR")
            from patchctl.registry.formats.checkpoint import Checkpoint

            base = Checkpoint(path)
        shapes = {k: tuple(base.info(base.resolve(k) or k).shape) if k in based and base is not None
                  else tuple(view.shape_of(changes[k])) for k in keys}

        def delta(target: str) -> torch.Tensor:
            import torch

            c = changes[target]
            if base is not None and c.op in ("dora", "rows"):
                key = base.resolve(target)
                if key is None:
                    raise UnsupportedPatch(f"{ref}: {target} is not in its base {base.path}")
                return view.delta(c, base.read(key))
            return view.value(c).to(torch.float32)

        return SourcePlan(digest, view, "diff", "delta", keys, shapes, dict.fromkeys(keys, "float32"), [], delta)
    extras = [f"{mod.module} ({'lora_magnitude_vector, use_dora' if mod.magnitude else 'lora_B.bias, lora_bias'})"
              for mod in mods.values() if mod.magnitude or mod.bias]
    if extras:
        raise UnsupportedPatch(f"{ref}: --factors compresses the A/B factors only, and {extras[0]} is more than "
                               "that; compress its ΔW instead (without --factors)")
    keys = sorted(k for mod in mods.values() for k in (mod.a, mod.b))
    return SourcePlan(digest, view, "lora", "factors", keys, {k: m.tensors[k].shape for k in keys},
                 {k: m.tensors[k].dtype for k in keys}, sorted(other), raw)


def _precheck(p: SourcePlan, mode: str, d: float, values_dtype: str) -> None:
    """A reading pass that finds NaN/Inf and values-dtype overflow before anything is written."""
    import torch

    vdt = getattr(torch, values_dtype)
    factor = 1.0 / d if mode == "dare" else 1.0
    for k in p.keys:
        t = p.read(k)
        if t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise InvalidPatch(f"tensor {k!r} contains NaN or Inf; a patch must be finite")
        if mode != "ternary":
            top = (t.abs().max().to(torch.float32) * factor).to(vdt)
            if not bool(torch.isfinite(top)):
                raise InvalidArgument(
                    f"tensor {k!r} has values that overflow {values_dtype}; keep bfloat16 values (--values-dtype bfloat16)"
                )


def compress(
    reg: Repository,
    ref: str,
    as_ref: str | None,
    spec: CompressSpec,
    *,
    message: str = "",
    metadata: dict[str, Any] | None = None,
    move_latest: bool = True,
    progress: Progress = None,
    search: dict[str, Any] | None = None,
    move_ref: bool = True,
) -> CompressResult:
    """Check, then stream ``ref`` through :func:`~patchctl.patches.compress.sparsify`; see the module docstring.

    ``spec.density`` must be set. ``search``: the record of the search that
    chose the settings (:func:`patchctl.registry.ops.search.search_compress`),
    kept in the recipe. ``move_ref=False`` stores the patch without moving any
    ref (a search candidate, or a patch whose ref :func:`~patchctl.registry.ops.finish.finish`
    moves after measuring it; ``gc`` collects it if nothing does); ``ref`` of
    the result is then the ref it is meant for.
    """
    import torch

    from patchctl.patches import codec
    from patchctl.patches.compress import entropy_bound_bits, sparsify

    d = spec.d
    entropy_bound_bits(d)  # defined for it
    mode = spec.mode
    target_ref = as_ref if as_ref is not None else default_ref(ref, d, mode)
    parse_ref(target_ref)
    if is_digest(target_ref):
        raise InvalidArgument(f"--as needs NAME:TAG, not a digest ({target_ref[:19]}…)")
    p = plan_source(reg, ref, spec.lora_delta)
    if not p.keys:
        raise InvalidPatch(f"{ref} has no tensors to compress")
    if mode != "ternary" or spec.per_tensor:
        _precheck(p, mode, d, spec.values_dtype)

    held: dict[str, torch.Tensor] = {}  # the source tensor sparsify is working on (one at a time)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for k in p.keys:
            t = p.read(k)
            held.clear()
            held[k] = t
            yield k, t

    out = sparsify(stream, d, mode=mode, scale=spec.scale, kappa=spec.k, per_tensor=spec.per_tensor,
                   seed=int(spec.seed), values_dtype=getattr(torch, spec.values_dtype))
    total = sum(math.prod(p.shapes[k]) * 4 for k in p.keys)
    done = 0
    tensors: dict[str, TensorEntry] = {}
    per: dict[str, dict[str, Any]] = {}
    numel = nnz = stored = 0
    bound_bits = err_sq = norm_sq = approx_sq = 0.0
    with reg.store.writing():
        for name, sp in out:
            data = codec.encode(sp)
            tensors[name] = TensorEntry(reg.store.put_blob(data), p.dtypes[name], tuple(p.shapes[name]),
                                        "sparse-v1", len(data))
            e2, n2, a2 = _sq_errors(held.pop(name), codec.to_dense(sp))
            n_i, k_i = sp.numel, sp.nnz
            numel, nnz, stored = numel + n_i, nnz + k_i, stored + len(data)
            if n_i:
                bound_bits += n_i * entropy_bound_bits(k_i / n_i)
            err_sq, norm_sq, approx_sq = err_sq + e2, norm_sq + n2, approx_sq + a2
            per[name] = {"nnz": k_i, "rel_error": _r(math.sqrt(e2 / n2)) if n2 > 0 else 0.0}
            done += n_i * 4
            if progress:
                progress(done, total)
        for k in p.passthrough:  # LoRA replacements: kept as stored
            tensors[k] = p.view.m.tensors[k]
        report: dict[str, Any] = {
            "mode": mode,
            "density": d,
            "numel": numel,
            "nnz": nnz,
            "kept": _r(nnz / numel) if numel else 0.0,
            "stored_bytes": stored,
            "dense_fp16_bytes": 2 * numel,
            "ratio_fp16": _r(2 * numel / stored) if stored else 0.0,
            "bits_per_param": _r(8 * stored / numel) if numel else 0.0,
            "bound_bits_per_param": _r(bound_bits / numel) if numel else 0.0,
            "rel_error": _r(math.sqrt(err_sq / norm_sq)) if norm_sq > 0 else 0.0,
            "direction_kept": _cosine(err_sq, norm_sq, approx_sq),
            "tensors": per,
            "uncompressed": list(p.passthrough),
        }
        src_m = p.view.m
        if p.layout == "lora":
            params = {**src_m.params, "source_kind": "lora"}
        else:
            params = {"density": d, "mode": mode, "source_kind": "diff"}
        m = Manifest(
            kind="sparse",
            base=dict(src_m.base),
            tensors=tensors,
            params=params,
            parents=(p.source,),
            recipe={**spec.recipe(p.target),
                    **({"search": search} if search is not None else {})},
            metadata={**(metadata or {}), "compression": report},
            side_files=dict(src_m.side_files),  # the fine-tune's config/tokenizer changes: same base, kept
        )
        if p.layout == "lora":
            report.update(_delta_errors(reg, p.view, m))
            m = replace(m, metadata={**(metadata or {}), "compression": report})
        msg = message or f"compress {ref} ({mode}, density {d:g}) on cpu"
        digest = reg.commit(m, target_ref if move_ref else None, msg, move_latest)
    return CompressResult(digest, m, p.source, target_ref, "cpu", msg)


def stored_size(reg: Repository, ref: str, spec: CompressSpec) -> int:
    """Bytes the sparse blobs of ``compress(ref, spec)`` would take; nothing is written.

    The ternary size does not depend on the scale (one float per tensor), so
    this is what a density search for a size target measures.
    """
    import torch

    from patchctl.patches import codec
    from patchctl.patches.compress import sparsify

    p = plan_source(reg, ref, spec.lora_delta)
    stream = lambda: ((k, p.read(k)) for k in p.keys)  # noqa: E731
    out = sparsify(stream, spec.d, mode=spec.mode, per_tensor=spec.per_tensor, seed=int(spec.seed),
                   values_dtype=getattr(torch, spec.values_dtype))
    return sum(len(codec.encode(sp)) for _, sp in out)


_CHUNK = 1 << 22


def _sq_errors(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float, float]:
    """``(‖ref − approx‖², ‖ref‖², ‖approx‖²)`` in float64, chunk by chunk (numpy sums: no thread-count effects)."""
    import numpy as np
    import torch

    a, b = ref.detach().reshape(-1), approx.detach().reshape(-1)
    e2 = n2 = a2 = 0.0
    for s in range(0, a.numel(), _CHUNK):
        x = a[s : s + _CHUNK].to(torch.float64).numpy()
        y = b[s : s + _CHUNK].to(torch.float64).numpy()
        diff = y - x
        e2 += float(np.sum(diff * diff))
        n2 += float(np.sum(x * x))
        a2 += float(np.sum(y * y))
    return e2, n2, a2


def _cosine(e2: float, n2: float, a2: float) -> float:
    """cos(ref, approx) from the three squared norms (⟨r, a⟩ = (‖r‖² + ‖a‖² − ‖r − a‖²) / 2), 6 digits."""
    if n2 <= 0 or a2 <= 0:
        return 0.0
    return _r(max(-1.0, min(1.0, (n2 + a2 - e2) / (2 * math.sqrt(n2 * a2)))))


def _delta_errors(reg: Repository, source: PatchView, m: Manifest) -> dict[str, Any]:
    """Relative errors of each LoRA module's ΔW (compressed factors against the source's)."""
    out_view = PatchView(reg.store, m)  # its blobs are in the store already
    errors: dict[str, float] = {}
    err_sq = norm_sq = approx_sq = 0.0
    src_changes = {c.target: c for c in source.changes() if c.op == "add"}
    for c in out_view.changes():
        if c.op != "add":
            continue
        e2, n2, a2 = _sq_errors(source.value(src_changes[c.target]), out_view.value(c))
        errors[c.target] = _r(math.sqrt(e2 / n2)) if n2 > 0 else 0.0
        err_sq, norm_sq, approx_sq = err_sq + e2, norm_sq + n2, approx_sq + a2
    return {"delta_rel_error": _r(math.sqrt(err_sq / norm_sq)) if norm_sq > 0 else 0.0, "delta_rel_errors": errors,
            "direction_kept": _cosine(err_sq, norm_sq, approx_sq)}


__all__ = ["CompressResult", "compress", "default_ref", "plan_source", "stored_size"]
