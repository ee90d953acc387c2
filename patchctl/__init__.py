"""patchctl: a registry and toolchain for model patches (LoRA adapters, weight diffs).

>>> import patchctl
>>> sorted(patchctl.__all__)[:3]
['BaseMismatch', 'DigestMismatch', 'InvalidPatch']
"""

from __future__ import annotations

from .errors import BaseMismatch, DigestMismatch, InvalidPatch, NotFound, PatchctlError
from .registry.registry import Registry

__version__ = "0.1.0"
__all__ = ["BaseMismatch", "DigestMismatch", "InvalidPatch", "NotFound", "PatchctlError", "Registry", "__version__"]
