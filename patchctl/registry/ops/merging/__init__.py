"""Merging stored patches: the streaming engine behind ``Registry.merge`` and ``patchctl merge``.

The math lives in :mod:`patchctl.patches.merge` (the methods),
:mod:`patchctl.patches.lines` (LiNeS) and :mod:`patchctl.patches.lora`; this
package plans a merge, checks it, and streams it into the store. It is laid
out like mergekit's config → plan → executor:

- :mod:`.spec` — :class:`MergeSpec`, every option of a merge declared once,
  its checks and the recipe it records; the CLI's and recipe files' parsers
  (:func:`parse_weights`, :func:`parse_override`, :func:`read_recipe`).
  Imports no torch.
- :mod:`.plan` — :func:`plan`: the inputs resolved, targets unified, every
  problem found before any tensor is read and reported at once.
- :mod:`.stream` — the one-pass streaming engine of a diff output (and of
  ``--apply``'s model); :mod:`.verify` hashes the input blobs beside it, in
  the standard-library program :mod:`._verifier_main`.
- :mod:`.lora` — LoRA outputs (``as_lora="cat"`` or ``"svd"``).
- :mod:`.run` — :func:`merge`, which runs the above, and :class:`MergeResult`.

**Determinism.** The recipe holds no paths or times (the ref history message
does); numbers are recorded as floats; DARE is seeded per tensor name; the
top-k trims are exact integer selections and the sums avoid fused
multiply-adds; so the same inputs and recipe give the same manifest digest.
(A merge on ``cuda`` is expected to match the CPU — tested where a GPU is
present — but the device is named in the history message.)
"""

from patchctl.registry.ops.merging.lora import EMBEDDING_RE
from patchctl.registry.ops.merging.plan import plan
from patchctl.registry.ops.merging.run import MergeResult, lost_update, merge
from patchctl.registry.ops.merging.spec import (
    AS_LORA,
    LINEAR_METHODS,
    RECIPE_KEYS,
    MergeSpec,
    parse_override,
    parse_weights,
    read_recipe,
)

__all__ = ["AS_LORA", "EMBEDDING_RE", "LINEAR_METHODS", "RECIPE_KEYS", "MergeResult", "MergeSpec", "lost_update",
           "merge", "parse_override", "parse_weights", "plan", "read_recipe"]
