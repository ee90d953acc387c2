"""The one finiteness check every derived tensor passes before it is stored.

A patch is finite (push refuses NaN/Inf in what it imports); merge, port and
compress check what they *make* the same way, so an overflow (float16 inputs
with large weights, say) stops the operation with the tensor named instead of
storing a patch that would poison every model it is applied to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from patchctl.errors import InvalidPatch

if TYPE_CHECKING:
    import torch

    from patchctl.patches.host import HostTensor

T = TypeVar("T", "torch.Tensor", "HostTensor")


def require_finite(t: T, name: str, what: str) -> T:
    """``t`` itself when every value is finite; else :class:`InvalidPatch` naming ``name``.

    One vectorised ``aminmax`` pass (:func:`patchctl.patches.apply.all_finite`): NaN and ±Inf
    reach the minimum or the maximum.
    """
    if t.is_floating_point() and t.numel() and not is_finite(t):
        raise InvalidPatch(f"{what} gave NaN or Inf in tensor {name!r} (an overflow: try float32 with --dtype, "
                           "or smaller weights); nothing was tagged")
    return t


def is_finite(t: torch.Tensor | HostTensor) -> bool:
    """No NaN or Inf in ``t``: the C kernel's check for a :class:`~patchctl.patches.host.HostTensor` (no
    torch), :func:`patchctl.patches.apply.all_finite` for a torch tensor; the same verdict."""
    from patchctl.patches.host import HostTensor

    if isinstance(t, HostTensor):
        from patchctl.patches.host import all_finite
    else:
        from patchctl.patches.apply import all_finite
    return all_finite(t)


__all__ = ["is_finite", "require_finite"]
