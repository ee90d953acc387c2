"""``pull`` and ``publish``: pick the route by the remote's kind.

An ``http(s)://`` or folder remote goes through the verified transfer
(:func:`patchctl.registry.remote.transfer.transfer`) from its
:mod:`~patchctl.registry.remote.sources` source; an ``hf://`` remote through
:mod:`patchctl.registry.remote.hub`. ``patchctl serve`` is read-only, so a
publish goes to a registry folder or the Hub.
"""

from __future__ import annotations

import re
from typing import Any

from patchctl.errors import InvalidArgument, NotFound
from patchctl.registry.remote.config import folder_path, resolve_remote, split_pull_ref
from patchctl.registry.remote.hub import HubPull, hub_pull, hub_push
from patchctl.registry.remote.limits import PullLimits
from patchctl.registry.remote.oci import check_transport, parse_oci
from patchctl.registry.remote.oci_pull import pull_patch
from patchctl.registry.remote.oci_push import push_patch
from patchctl.registry.remote.sources import FolderSource, open_source
from patchctl.registry.remote.transfer import DEFAULT_WORKERS, transfer
from patchctl.registry.store.names import Ref, parse_ref
from patchctl.registry.store.repository import Progress, Repository


def pull(reg: Repository, ref: str, from_: str | None = None, *, progress: Progress = None,
         workers: int = DEFAULT_WORKERS, limits: PullLimits | None = None, insecure: bool = False,
         hub: HubPull | None = None) -> dict[str, Any]:
    """Pull ``REMOTE/NAME[:TAG]`` (or ``NAME[:TAG]`` from ``from_``) into ``reg`` under ``NAME:TAG``.

    ``hub``: what only an ``hf://`` pull takes (a folder in the repo; a PEFT import's base and
    pickle consent); refused for any other remote.

    ``limits``: what the remote may make the pull cost (:class:`PullLimits`; its defaults when None).

    ``oci://HOST/NAMESPACE/NAME[:TAG|@DIGEST]`` pulls that repository into ``NAME:TAG``
    (``latest`` without a tag).
    """
    if from_ is None and ref.startswith(("oci://", "oci+http://")):
        src = parse_oci(ref, reference=True)
        check_transport(ref, insecure)
        _hub_only(hub, ref)
        local = Ref(parse_ref(src.path.rsplit("/", 1)[-1]).name, src.tag or "latest")
        return pull_patch(reg, src, local, progress=progress, workers=workers, limits=limits)
    limits = (limits or PullLimits()).check()
    remote, r = split_pull_ref(reg.store, ref, from_)
    check_transport(remote.url, insecure, stored=bool(remote.name))
    if remote.kind == "hf":
        return hub_pull(reg, remote, r, progress=progress, workers=workers, limits=limits, options=hub)
    _hub_only(hub, remote.label)
    if remote.kind == "oci":
        return pull_patch(reg, parse_oci(remote.url).child(r.name, tag=r.tag), r, label=remote.label,
                          progress=progress, workers=workers, limits=limits)
    src = open_source(remote, limits)
    try:
        return transfer(src, reg, r, progress=progress, workers=workers, message=f"pull {remote.label} {r}",
                        limits=limits)
    finally:
        src.close()


def _hub_only(hub: HubPull | None, where: str) -> None:
    if hub is not None and hub != HubPull():
        raise InvalidArgument(f"--subfolder, --base and --trust-pickle apply to pulls from hf:// remotes; "
                              f"{where} is not one (drop them)")


def publish(reg: Repository, ref: str, remote_spec: str, *, progress: Progress = None,
            workers: int = DEFAULT_WORKERS, insecure: bool = False) -> dict[str, Any]:
    """Publish the local ``NAME[:TAG]`` to a folder, ``hf://`` or ``oci://`` remote under the same name and tag.

    An ``oci://HOST/NAMESPACE`` remote gets repository ``NAMESPACE/NAME``, tag ``TAG``;
    ``oci://HOST/REPOSITORY:TAG`` (a tag or ``@digest`` on the last component) names the
    target exactly.
    """
    r = parse_ref(ref)
    if remote_spec.startswith(("oci://", "oci+http://")) and re.search(r"[:@][^/]*$", remote_spec.split("://", 1)[1].partition("/")[2]):
        target = parse_oci(remote_spec, reference=True)
        check_transport(remote_spec, insecure)
        if target.digest:
            raise InvalidArgument(f"push to a tag, not a digest: {remote_spec}")
        return push_patch(reg, str(r), target, progress=progress, workers=workers)
    remote = resolve_remote(reg.store, remote_spec)
    check_transport(remote.url, insecure, stored=bool(remote.name))
    if remote.kind == "http":
        raise InvalidArgument(f"{remote.label} is an HTTP remote, and `patchctl serve` is read-only: "
                              "publish to a registry folder or an hf:// remote")
    if reg.store.ref_target(r) is None:
        raise NotFound(f"no patch named {r}; `patchctl ls` lists them")
    if remote.kind == "hf":
        return hub_push(reg, r, remote)
    if remote.kind == "oci":
        out = push_patch(reg, str(r), parse_oci(remote.url).child(r.name, tag=r.tag), progress=progress,
                         workers=workers)
        out["remote"] = remote.label
        return out
    src = FolderSource(reg.store, str(reg.path))
    with Repository(folder_path(remote.url)) as dst:  # the plumbing is all a transfer needs
        out = transfer(src, dst, r, progress=progress, workers=workers, message=f"publish from {reg.path}")
    out["remote"] = remote.label
    return out

