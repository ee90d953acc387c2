"""Remotes: other registries to pull patches from and publish them to.

- :mod:`~patchctl.registry.remote.protocol` — the HTTP wire protocol (media types,
  paths, the token-file rule), shared with :mod:`patchctl.server.app`;
- :mod:`~patchctl.registry.remote.config` — ``remotes.json``, remote URLs, ``REMOTE/NAME:TAG``;
- :mod:`~patchctl.registry.remote.sources` — reading a folder or a ``patchctl serve``;
- :mod:`~patchctl.registry.remote.transfer` — the verified, resumable transfer;
- :mod:`~patchctl.registry.remote.repair` — ``fsck --repair``'s fetch of good copies;
- :mod:`~patchctl.registry.remote.limits` — what a pull may cost: caps, deadline, minimum rate;
- :mod:`~patchctl.registry.remote.hub` — ``hf://`` remotes (the Hugging Face Hub);
- :mod:`~patchctl.registry.remote.oci`, ``oci_http``, ``oci_push``, ``oci_pull``, ``auth`` —
  OCI registries (``oci://``): the artifact mapping, the distribution client, credentials;
- :mod:`~patchctl.registry.remote.sync` — ``pull`` and ``publish``.

This package works on a :class:`~patchctl.registry.store.repository.Repository`
and never imports the facade; it uses :mod:`patchctl.registry.ops` (importing
a pulled PEFT adapter, exporting one for the Hub). The names below are
re-exported lazily: importing the package imports none of its modules
(``patchctl remote ls`` stays quick).
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "Remote": "config", "add_remote": "config", "load_remotes": "config", "parse_url": "config",
    "read_token": "config", "remove_remote": "config", "resolve_remote": "config", "split_pull_ref": "config",
    "LimitExceeded": "limits", "PullLimits": "limits", "StorageError": "limits", "TransferTimeout": "limits",
    "MANIFEST_MEDIA_TYPE": "protocol", "read_token_file": "protocol",
    "publish": "sync", "pull": "sync",
    "clean_parts": "transfer", "part_path": "transfer",
    "repair": "repair",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# not re-exported: the function transfer.transfer (the name is the module's)
__all__ = sorted(_WHERE)
