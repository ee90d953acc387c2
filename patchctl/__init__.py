"""patchctl: a registry and toolchain for model patches (LoRA adapters, weight diffs).

>>> import patchctl
>>> sorted(patchctl.__all__)[:3]
['BaseMismatch', 'DigestMismatch', 'InvalidPatch']
"""

from __future__ import annotations

from .errors import BaseMismatch, DigestMismatch, InvalidPatch, NotFound, PatchctlError
from .registry.registry import Registry

__version__ = "0.1.0"
__all__ = ["BaseMismatch", "DigestMismatch", "InvalidPatch", "NotFound", "PatchctlError", "Registry", "__version__",
           "apply", "load"]

_LAZY = ("apply", "load")  # in patchctl.compose, which imports torch: only on first use


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from . import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'patchctl' has no attribute {name!r}")
