"""The one finiteness check every derived tensor passes before it is stored.

A patch is finite (push refuses NaN/Inf in what it imports); merge, port and
compress check what they *make* the same way, so an overflow (float16 inputs
with large weights, say) stops the operation with the tensor named instead of
storing a patch that would poison every model it is applied to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchctl.errors import InvalidPatch

if TYPE_CHECKING:
    import torch


def require_finite(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """``t`` itself when every value is finite; else :class:`InvalidPatch` naming ``name``.

    One reduction (NaN and Inf propagate through a sum) and the exact test only when
    the sum is not finite, which an overflow of the sum alone can also cause.
    """
    import torch

    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) \
            and not bool(torch.isfinite(t).all()):
        raise InvalidPatch(f"{what} gave NaN or Inf in tensor {name!r} (an overflow: try float32 with --dtype, "
                           "or smaller weights); nothing was tagged")
    return t


__all__ = ["require_finite"]
