"""Finding a base model and describing it in a manifest.

:func:`locate` is the one rule for "which folder is this base": a model
folder, or a model id ``NAME[@REVISION]`` already in the local Hugging Face
cache (never downloaded). :func:`base_doc` is the ``base`` block a manifest
records: a name, a revision when known, and the fingerprint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from patchctl.errors import NotFound
from patchctl.registry.formats.checkpoint import Checkpoint


def locate(base: str | os.PathLike[str]) -> Path:
    """A base model folder: ``base`` itself, or the snapshot of the model id ``base``
    (``NAME[@REVISION]``) in the local Hugging Face cache. Never downloads."""
    p = Path(base).expanduser()
    try:
        if p.is_dir():
            return p
    except OSError:  # ENAMETOOLONG (an adapter config's hint of thousands of characters): not a folder
        pass
    name, _, rev = str(base).partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=rev or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - invalid id, not cached, offline: all mean "not here"
        raise NotFound(
            f"base {str(base)!r} is neither a model folder nor a model in the local Hugging Face cache; "
            f"pass a folder, or download it first (huggingface-cli download {name})"
        ) from None


def base_doc(base: Checkpoint, base_name: str | None, hint: str | None) -> dict[str, Any]:
    """The manifest's ``base`` block: ``base_name`` (``NAME[@REV]``) if given, else the hint, the
    config's ``_name_or_path`` or the folder's name; the revision of a Hub cache snapshot."""
    name, revision = None, None
    if base_name:
        name, _, rev = base_name.partition("@")
        revision = rev or None
    else:
        name = public_name(hint) or public_name(base.config().get("_name_or_path")) or base.path.name
        m = re.search(r"snapshots/([0-9a-f]{40})(/|$)", base.path.as_posix())
        revision = m.group(1) if m else None
    return {"name": str(name), "revision": revision, "fingerprint": base.fingerprint()}


def public_name(name: str | None) -> str | None:
    """``name`` when it is a model id (``org/name``), else the last part of a local path: a manifest
    names no folder of the machine it was made on (the same adapter gives the same digest anywhere)."""
    if not name:
        return None
    text = str(name)
    local = text.startswith(("/", "~", "./", "../", ".\\")) or ":\\" in text or text.count("/") > 1 \
        or Path(text).expanduser().is_dir()
    return Path(text.rstrip("/")).name or None if local else text


__all__ = ["base_doc", "locate", "public_name"]
