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


from patchctl.registry.ops.compressing.run import (
    CompressResult,
    compress,
    default_ref,
    plan_source,
    stored_size,
)
from patchctl.registry.ops.compressing.spec import (
    KAPPA_RULE,
    LOSSY_DIRECTION,
    LOSSY_GAIN,
    MODES,
    SCALES,
    VALUES_DTYPES,
    CompressSpec,
    auto_kappa,
    lost_update,
)

__all__ = ["KAPPA_RULE", "LOSSY_DIRECTION", "LOSSY_GAIN", "MODES", "SCALES", "VALUES_DTYPES", "CompressResult",
           "CompressSpec", "auto_kappa", "compress", "default_ref", "lost_update", "plan_source", "stored_size"]
