"""Compressing stored patches: the streaming engine behind ``Registry.compress`` and ``patchctl compress``.

The math lives in :mod:`patchctl.patches.compress` (ComPEFT top-k, ternary
quantization, DARE) and the bytes in :mod:`patchctl.patches.codec`
(``sparse-v1``); this module checks a request, streams a stored patch through
them, and writes a ``sparse`` patch with its lineage and a size/error report.

**Inputs and layouts.** The source is read through :class:`PatchView`, one
tensor at a time (the global threshold reads the stream twice, sometimes
three times; see :mod:`~patchctl.patches.compress`):

- a ``diff``: each delta tensor is compressed; the sparse manifest is keyed by
  base tensor names, as the source. Pins are dropped (they belong to the exact
  diff; compression changes the math). params:
  ``{"source_kind": "diff", "density", "mode"}``; recipe ``target: "delta"``.
- a ``lora`` (default): the A and B factors are compressed, as ComPEFT does
  (one global threshold over all factors unless ``per_tensor``). The
  manifest is keyed
  by the PEFT keys, and its params are the source's ``adapter_config`` plus
  ``{"source_kind": "lora"}``, so :class:`PatchView` reads it as a LoRA
  (``ΔW = B̂ @ Â · scaling``). Adapter tensors that *replace* base tensors
  (``modules_to_save``, trained biases) are not deltas: they are kept as they
  are (same blob, ``raw``) and listed under ``uncompressed``. Recipe
  ``target: "factors"``. Such a patch exports as a diff (``ΔW``); there is no
  PEFT export of sparse factors. Beware: A and B live on different scales
  (B starts at zero and stays small), so a global threshold keeps almost only
  entries of A — on the demo's LoRAs (r = 8) at d = 0.1 it kept no entry of
  any B, a null ΔW — and even per tensor, the product of two sparse factors
  loses most of the update (``bench/compress_quality.py``: ≤ 25 % of the
  gain kept, against ≈ 97 % for ``lora_delta`` with κ = 4). The report's
  ``delta_rel_error`` shows it.
- a ``lora`` with ``lora_delta=True``: each module's ``ΔW`` (float32) is
  compressed instead, giving a sparse diff keyed by base tensor names
  (``source_kind: "diff"``, recipe ``target: "delta"``). A LoRA that replaces
  tensors is refused here (a replacement is not a delta).
- a ``sparse`` patch is **refused**: re-sparsifying a decoded sparse patch
  compounds the error and its report would measure it against the sparse
  parent, not the real patch. The message names the source to compress
  instead (the sparse patch's lineage parent).

float64 tensors are compressed as float32 (the codec's widest dtype) and keep
``dtype: float64`` in the manifest, so they decode to float64.

**Output.** ``as_ref`` (``NAME:TAG``) gets the new patch, and ``NAME:latest``
too unless ``move_latest`` is false. Without ``as_ref`` the default is the
source's name with the tag ``<tag>-d<density>`` (``:g`` format) plus
``-<mode>`` for the values and dare modes: ``math:v2`` at ``d = 0.1`` →
``math:v2-d0.1``, ``math:v2-d0.05-values``. A source given by digest needs
``as_ref``. Other settings (κ, scale, ...) do not enter the default tag: give
``as_ref`` to keep two variants.

**Recipe** (no paths, no times; the ref history keeps the message)::

    {"op": "compress", "density", "mode", "scale", "kappa", "per_tensor",
     "seed", "target": "factors" | "delta", "values_dtype"}

Settings a mode does not use are ``null`` (``scale``/``kappa`` outside
ternary, ``kappa`` with ``scale="mean"``, ``per_tensor`` for dare, ``seed``
outside dare, ``values_dtype`` for ternary), so two requests that make the
same bytes make the same digest.

**Report**, ``metadata["compression"]`` (computed here against the source,
so ``patchctl show`` needs only the manifest)::

    {"mode", "density", "numel", "nnz", "kept",            # kept = nnz / numel
     "stored_bytes",                                       # the sparse blobs
     "dense_fp16_bytes", "ratio_fp16",                     # numel × 2, and / stored_bytes
     "bits_per_param", "bound_bits_per_param",             # 8 × stored / numel; bound below
     "rel_error",                                          # ‖τ − τ̂‖ / ‖τ‖ over all compressed tensors
     "tensors": {NAME: {"nnz", "rel_error"}},
     "delta_rel_error", "delta_rel_errors": {TARGET: e},   # LoRA factors only: on ΔW
     "uncompressed": [NAME, ...]}

The bound is ``Σᵢ nᵢ·(H(dᵢ) + dᵢ) / Σᵢ nᵢ`` over the tensors with their
kept fractions ``dᵢ`` (:func:`~patchctl.patches.compress.entropy_bound_bits`):
the Shannon bound for uniformly random supports of those per-tensor counts
(which the codec records) plus one sign bit per kept entry. It is the same
figure in every mode; in the values and dare modes the excess over it is
what the values cost beyond a sign bit. A real task vector's support is not
random (kept entries cluster in rows), so the codec can land under it.
Derived floats are rounded to 6 significant digits so the report, and hence
the digest, does not depend on the last bits of a float64 reduction.

**Checks first.** Everything that can be checked before writing is: the ref,
the kind, the arguments (density in (0, 1], mode, scale, κ > 0, values dtype,
seed), the output ref. NaN or Inf in a tensor (the error names it) and values
that overflow the values dtype are found by the first (threshold) pass in
global ternary mode; in the other modes (per-tensor, values, dare), whose
first pass already yields output, a checking pass runs first. So an error
writes nothing.

**Determinism.** Same source and recipe → same bytes → same digest, in any
process (tests/test_compress_engine.py). The work runs on the CPU (numpy and
torch CPU kernels); the history message says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from patchctl.errors import InvalidArgument, InvalidPatch, UnsupportedPatch
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import is_digest, parse_ref
from patchctl.registry.store.views import PatchView, lora_modules

if TYPE_CHECKING:
    import torch

    from patchctl.registry.registry import Registry

Progress = Callable[[int, int], None] | None

MODES = ("ternary", "values", "dare")
SCALES = ("std", "mean")
VALUES_DTYPES = ("float16", "bfloat16", "float32")


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


def _recipe(d: float, mode: str, scale: str, kappa: float, per_tensor: bool, seed: int, target: str,
            values_dtype: str) -> dict[str, Any]:
    ternary = mode == "ternary"
    return {
        "op": "compress",
        "density": d,
        "mode": mode,
        "scale": scale if ternary else None,
        "kappa": float(kappa) if ternary and scale == "std" else None,
        "per_tensor": bool(per_tensor) if mode != "dare" else None,
        "seed": int(seed) if mode == "dare" else None,
        "target": target,
        "values_dtype": None if ternary else values_dtype,
    }


@dataclass
class _Plan:
    source: str
    view: PatchView
    layout: str  # "diff" (base names) or "lora" (PEFT factor keys)
    target: str  # recipe target: "delta" or "factors"
    keys: list[str]  # what is compressed: manifest keys (diff, factors) or change targets (delta)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # dtype recorded in the output entry
    passthrough: list[str]  # LoRA keys kept as they are (replacements)
    read: Callable[[str], torch.Tensor]


def _plan(reg: Registry, ref: str, lora_delta: bool) -> _Plan:
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
        return _Plan(digest, view, "diff", "delta", keys, {k: m.tensors[k].shape for k in keys},
                     {k: m.tensors[k].dtype for k in keys}, [], raw)
    mods, other = lora_modules(m)
    if lora_delta:
        changes = {c.target: c for c in view.changes()}
        replaced = sorted(t for t, c in changes.items() if c.op != "add")
        if replaced:
            raise UnsupportedPatch(
                f"{ref} replaces whole tensors ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}); "
                "a replacement is not a delta: compress its factors (drop --lora-delta)"
            )
        keys = sorted(changes)

        def delta(target: str) -> torch.Tensor:
            import torch

            return view.value(changes[target]).to(torch.float32)

        return _Plan(digest, view, "diff", "delta", keys, {k: tuple(view.shape_of(changes[k])) for k in keys},
                     dict.fromkeys(keys, "float32"), [], delta)
    keys = sorted(k for mod in mods.values() for k in (mod.a, mod.b))
    return _Plan(digest, view, "lora", "factors", keys, {k: m.tensors[k].shape for k in keys},
                 {k: m.tensors[k].dtype for k in keys}, sorted(other), raw)


def _check_args(density: Any, mode: str, scale: str, kappa: Any, seed: Any, values_dtype: str) -> float:
    from patchctl.patches.compress import entropy_bound_bits

    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}: choose ternary, values or dare")
    if scale not in SCALES:
        raise InvalidArgument(f"unknown scale {scale!r}: choose std (κ·std, ComPEFT) or mean (mean |kept|)")
    if values_dtype not in VALUES_DTYPES:
        raise InvalidArgument(f"unknown values dtype {values_dtype!r}: choose float16, bfloat16 or float32")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise InvalidArgument(f"density must be in (0, 1], got {density!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa <= 0:
        raise InvalidArgument(f"kappa must be a finite number > 0, got {kappa!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgument(f"seed must be an integer, got {seed!r}")
    entropy_bound_bits(float(density))  # the bound is defined for it
    return float(density)


def _precheck(p: _Plan, mode: str, d: float, values_dtype: str) -> None:
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
    reg: Registry,
    ref: str,
    as_ref: str | None = None,
    *,
    density: float,
    mode: str = "ternary",
    scale: str = "std",
    kappa: float = 1.0,
    per_tensor: bool = False,
    seed: int = 0,
    values_dtype: str = "float16",
    lora_delta: bool = False,
    message: str = "",
    metadata: dict[str, Any] | None = None,
    move_latest: bool = True,
    progress: Progress = None,
    search: dict[str, Any] | None = None,
    move_ref: bool = True,
) -> CompressResult:
    """Check, then stream ``ref`` through :func:`~patchctl.patches.compress.sparsify`; see the module docstring.

    ``search``: the record of the search that chose these settings
    (:func:`patchctl.registry.ops.search.search_compress`), kept in the recipe.
    ``move_ref=False`` stores the patch without moving any ref (a search
    candidate; ``gc`` collects it).
    """
    import torch

    from patchctl.patches import codec
    from patchctl.patches.compress import entropy_bound_bits, sparsify

    d = _check_args(density, mode, scale, kappa, seed, values_dtype)
    target_ref = as_ref if as_ref is not None else default_ref(ref, d, mode)
    parse_ref(target_ref)
    if is_digest(target_ref):
        raise InvalidArgument(f"--as needs NAME:TAG, not a digest ({target_ref[:19]}…)")
    p = _plan(reg, ref, lora_delta)
    if not p.keys:
        raise InvalidPatch(f"{ref} has no tensors to compress")
    if mode != "ternary" or per_tensor:
        _precheck(p, mode, d, values_dtype)

    held: dict[str, torch.Tensor] = {}  # the source tensor sparsify is working on (one at a time)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for k in p.keys:
            t = p.read(k)
            held.clear()
            held[k] = t
            yield k, t

    vdt = getattr(torch, values_dtype)
    out = sparsify(stream, d, mode=mode, scale=scale, kappa=float(kappa), per_tensor=per_tensor, seed=int(seed),
                   values_dtype=vdt)
    total = sum(math.prod(p.shapes[k]) * 4 for k in p.keys)
    done = 0
    tensors: dict[str, TensorEntry] = {}
    per: dict[str, dict[str, Any]] = {}
    numel = nnz = stored = 0
    bound_bits = err_sq = norm_sq = 0.0
    with reg.store.writing():
        for name, sp in out:
            data = codec.encode(sp)
            tensors[name] = TensorEntry(reg.store.put_blob(data), p.dtypes[name], tuple(p.shapes[name]),
                                        "sparse-v1", len(data))
            e2, n2 = _sq_errors(held.pop(name), codec.to_dense(sp))
            n_i, k_i = sp.numel, sp.nnz
            numel, nnz, stored = numel + n_i, nnz + k_i, stored + len(data)
            if n_i:
                bound_bits += n_i * entropy_bound_bits(k_i / n_i)
            err_sq, norm_sq = err_sq + e2, norm_sq + n2
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
            recipe={**_recipe(d, mode, scale, float(kappa), per_tensor, int(seed), p.target, values_dtype),
                    **({"search": search} if search is not None else {})},
            metadata={**(metadata or {}), "compression": report},
        )
        if p.layout == "lora":
            report.update(_delta_errors(reg, p.view, m))
            m = replace(m, metadata={**(metadata or {}), "compression": report})
        msg = message or f"compress {ref} ({mode}, density {d:g}) on cpu"
        digest = reg.commit(m, target_ref if move_ref else None, msg, move_latest)
    return CompressResult(digest, m, p.source, target_ref if move_ref else None, "cpu", msg)


def stored_size(
    reg: Registry,
    ref: str,
    *,
    density: float,
    mode: str = "ternary",
    per_tensor: bool = False,
    seed: int = 0,
    values_dtype: str = "float16",
    lora_delta: bool = False,
) -> int:
    """Bytes the sparse blobs of ``compress(ref, density=...)`` would take; nothing is written.

    The ternary size does not depend on the scale (one float per tensor), so
    this is what a density search for a size target measures.
    """
    import torch

    from patchctl.patches import codec
    from patchctl.patches.compress import sparsify

    d = _check_args(density, mode, "std", 1.0, seed, values_dtype)
    p = _plan(reg, ref, lora_delta)
    stream = lambda: ((k, p.read(k)) for k in p.keys)  # noqa: E731
    out = sparsify(stream, d, mode=mode, per_tensor=per_tensor, seed=int(seed),
                   values_dtype=getattr(torch, values_dtype))
    return sum(len(codec.encode(sp)) for _, sp in out)


_CHUNK = 1 << 22


def _sq_errors(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(‖ref − approx‖², ‖ref‖²)`` in float64, chunk by chunk (numpy sums: no thread-count effects)."""
    import numpy as np
    import torch

    a, b = ref.detach().reshape(-1), approx.detach().reshape(-1)
    e2 = n2 = 0.0
    for s in range(0, a.numel(), _CHUNK):
        x = a[s : s + _CHUNK].to(torch.float64).numpy()
        diff = b[s : s + _CHUNK].to(torch.float64).numpy() - x
        e2 += float(np.sum(diff * diff))
        n2 += float(np.sum(x * x))
    return e2, n2


def _delta_errors(reg: Registry, source: PatchView, m: Manifest) -> dict[str, Any]:
    """Relative errors of each LoRA module's ΔW (compressed factors against the source's)."""
    out_view = PatchView(reg.store, m)  # its blobs are in the store already
    errors: dict[str, float] = {}
    err_sq = norm_sq = 0.0
    src_changes = {c.target: c for c in source.changes() if c.op == "add"}
    for c in out_view.changes():
        if c.op != "add":
            continue
        e2, n2 = _sq_errors(source.value(src_changes[c.target]), out_view.value(c))
        errors[c.target] = _r(math.sqrt(e2 / n2)) if n2 > 0 else 0.0
        err_sq, norm_sq = err_sq + e2, norm_sq + n2
    return {"delta_rel_error": _r(math.sqrt(err_sq / norm_sq)) if norm_sq > 0 else 0.0, "delta_rel_errors": errors}


__all__ = ["MODES", "SCALES", "VALUES_DTYPES", "CompressResult", "compress", "default_ref"]
