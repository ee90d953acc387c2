"""patchctl: a registry and toolchain for model patches (LoRA adapters, weight diffs).

>>> import patchctl
>>> sorted(patchctl.__all__)[:3]
['BaseMismatch', 'DigestMismatch', 'InvalidPatch']
"""

from __future__ import annotations

from patchctl.errors import BaseMismatch, DigestMismatch, InvalidPatch, NotFound, PatchctlError
from patchctl.registry.registry import Registry

__version__ = "0.1.0"
__all__ = ["BaseMismatch", "DigestMismatch", "InvalidPatch", "NotFound", "PatchctlError", "Registry", "__version__",
           "apply", "load"]

_LAZY = ("apply", "load")  # in patchctl.registry.ops.compose, which imports torch: only on first use


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from patchctl.registry.ops import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'patchctl' has no attribute {name!r}")
