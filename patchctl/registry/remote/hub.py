"""The Hugging Face Hub as a remote: ``hf://org/repo[@revision]``.

A push to ``hf://org/repo`` makes one commit (``HfApi.create_commit``) with
the *patchctl layout* — the same objects as a registry folder, so a pull gets
the same digest back — and, for a LoRA patch, a PEFT layout at the root that
PEFT and transformers load as is (written by the exporter, bit-identical):

```
patchctl/refs/<name>/@<tag>          the manifest digest and a newline
patchctl/manifests/sha256/<hex>      the manifest bytes
patchctl/blobs/sha256/<hex>          the blobs
adapter_config.json                  (lora) the last pushed LoRA patch, as PEFT files
adapter_model.safetensors
```

A pull goes through ``huggingface_hub.snapshot_download`` — so the Hub cache,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave as everywhere else — pinned to one
commit: the ref file first, then the manifest (its sha256 checked against the
ref), then only the missing blobs; they enter the registry through the same
verified transfer as any other pull. A repo with no patchctl layout but an
``adapter_config.json`` is imported as a PEFT adapter (``Registry.push``),
with ``{"source": "hf://org/repo", "revision": <commit>}`` in the manifest
metadata. For a patchctl-layout pull the manifest stays byte-identical (so
its digest does), and the commit is recorded in the ref log message and the
summary instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from patchctl.errors import DigestMismatch, InvalidArgument, NotFound, PatchctlError, RemoteError
from patchctl.registry.ops import exporting, importing
from patchctl.registry.remote.config import Remote, parse_url
from patchctl.registry.remote.limits import LimitExceeded, PullLimits
from patchctl.registry.remote.sources import ReadInto, open_at
from patchctl.registry.remote.transfer import DEFAULT_WORKERS, check_space, read_manifest, transfer
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.folder import CHUNK, Store
from patchctl.registry.store.names import Ref, check_digest
from patchctl.registry.store.repository import Progress, Repository

HUB_REFS = "patchctl/refs"
HUB_MANIFESTS = "patchctl/manifests/sha256"
HUB_BLOBS = "patchctl/blobs/sha256"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def hub_repo(remote: Remote) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of an ``hf://`` remote."""
    repo, _, rev = parse_url(remote.url)[1][5:].partition("@")
    return repo, rev or None


def _hub_error(e: Exception, where: str) -> PatchctlError:
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError)):
        return NotFound(f"{where} is not in the local Hugging Face cache and the Hub cannot be reached "
                        "(HF_HUB_OFFLINE set, or no network)")
    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return NotFound(f"{where}: {str(e).splitlines()[0]}")
    return RemoteError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - translated to PatchctlError here, the one place
        raise _hub_error(e, f"hf://{repo}{'@' + revision if revision else ''}") from None


class SnapshotSource:
    """Blobs from a downloaded Hub snapshot in the patchctl layout (hashed by the transfer)."""

    def __init__(self, folder: Path, label: str):
        self.folder = folder
        self.label = label

    def manifest(self, ref: Ref) -> bytes:  # hub_pull reads and checks the manifest itself
        raise InvalidArgument("SnapshotSource has no manifests: hub_pull passes them to transfer()")

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        with open_at(self.folder / HUB_BLOBS / digest[7:], offset, f"blob {digest} is missing in {self.label}") as got:
            yield got


def hub_pull(reg: Repository, remote: Remote, r: Ref, *, progress: Progress = None,
             workers: int = DEFAULT_WORKERS, limits: PullLimits | None = None) -> dict[str, Any]:
    """Pull ``r`` from an ``hf://`` remote: the patchctl layout if the repo has it, else a PEFT adapter.

    The manifest's size, its blob count, the declared blob sizes and the free space are checked
    (``limits``) before ``snapshot_download`` fetches any blob; the Hub client's own timeouts
    (``HF_HUB_DOWNLOAD_TIMEOUT``) bound its reads, the copy into the registry runs under ``limits``.
    """
    limits = (limits or PullLimits()).check()
    repo, rev = hub_repo(remote)
    ref_file = f"{HUB_REFS}/{r.name}/@{r.tag}"
    snap = _snapshot(repo, rev, [ref_file, *PEFT_FILES])
    commit = snap.name if re.fullmatch(r"[0-9a-f]{40}", snap.name) else (rev or "main")
    pinned = f"hf://{repo}@{commit}"
    if (snap / ref_file).is_file():
        digest = check_digest((snap / ref_file).read_text().strip())
        snap = _snapshot(repo, commit, [f"{HUB_MANIFESTS}/{digest[7:]}"])
        mpath = snap / HUB_MANIFESTS / digest[7:]
        if not mpath.is_file():
            raise NotFound(f"{pinned}: {ref_file} names {digest}, but the manifest is not in the repo")
        if mpath.stat().st_size > limits.max_manifest_bytes:
            raise LimitExceeded(f"{pinned}: manifest {digest} is {mpath.stat().st_size} bytes, over the cap of "
                                f"{limits.max_manifest_bytes} (raise it with --max-manifest-bytes)")
        data = mpath.read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatch(f"{pinned}: manifest {digest} does not hash to its name")
        _, sizes = read_manifest(data, f"{pinned} {r}", limits)
        missing = {d: s for d, s in sizes.items() if not reg.store.has_blob(d)}
        if missing:
            check_space(reg.store, missing, limits, f"pulling {r} from {pinned}")
            snap = _snapshot(repo, commit, [f"{HUB_BLOBS}/{d[7:]}" for d in sorted(missing)])
        out = transfer(SnapshotSource(snap, pinned), reg, r, progress=progress, workers=workers,
                       message=f"pull {pinned} {r}", manifest_bytes=data, limits=limits)
        out.update(remote=remote.label, revision=commit, layout="patchctl")
        return out
    if (snap / "adapter_config.json").is_file():
        t0 = time.monotonic()
        digest = importing.push(reg, snap, str(r), message=f"pull {pinned}", move_latest=False,
                                metadata={"source": f"hf://{repo}", "revision": commit})
        return {"ref": str(r), "source_ref": pinned, "remote": remote.label, "digest": digest, "layout": "peft",
                "revision": commit, "seconds": round(time.monotonic() - t0, 3)}
    raise NotFound(f"{pinned} has neither {ref_file} (a patchctl push) nor adapter_config.json (a PEFT adapter)")


def _verified_path(store: Store, digest: str) -> str:
    """The blob's path, after checking that its bytes still hash to its name (streamed)."""
    path = store.blob_path(digest)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is missing (run `patchctl fsck`)") from None
    if "sha256:" + h.hexdigest() != digest:
        raise DigestMismatch(f"blob {digest} is corrupt (run `patchctl fsck`); not pushing it")
    return str(path)


def hub_push(reg: Repository, r: Ref, remote: Remote) -> dict[str, Any]:
    """One Hub commit with the patch in the patchctl layout (plus PEFT files for LoRA)."""
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    repo, rev = hub_repo(remote)
    digest = reg.resolve(str(r))
    data = reg.store.read_manifest_bytes(digest)
    m = manifest_mod.parse(data)
    ops = [CommitOperationAdd(f"{HUB_BLOBS}/{d[7:]}", _verified_path(reg.store, d)) for d in m.blob_digests()]
    ops.append(CommitOperationAdd(f"{HUB_MANIFESTS}/{digest[7:]}", data))
    ops.append(CommitOperationAdd(f"{HUB_REFS}/{r.name}/@{r.tag}", (digest + "\n").encode()))
    with tempfile.TemporaryDirectory(dir=reg.path / "tmp", prefix="hub-push-") as td:
        if m.kind == "lora":
            peft = exporting.export_peft(reg.view(digest), Path(td) / "peft")
            ops += [CommitOperationAdd(f, str(peft / f)) for f in PEFT_FILES]
        try:
            info = HfApi().create_commit(repo, ops, commit_message=f"patchctl push {r} ({digest})", revision=rev)
        except Exception as e:  # noqa: BLE001 - translated here, the one place
            raise _hub_error(e, f"hf://{repo}") from None
    return {"ref": str(r), "remote": remote.label, "digest": digest, "commit": getattr(info, "oid", None),
            "files": [op.path_in_repo for op in ops], "blobs": len(m.blob_digests()), "peft": m.kind == "lora"}

