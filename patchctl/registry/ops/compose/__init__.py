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

from patchctl.registry.ops.compose.api import PatchHandle, apply, load
from patchctl.registry.ops.compose.plan import resolve_device

__all__ = ["PatchHandle", "apply", "load", "resolve_device"]
