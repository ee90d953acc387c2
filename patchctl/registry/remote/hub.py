"""The Hugging Face Hub as a remote: ``hf://org/repo[/sub/folder][@revision]``.

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

Both layouts may sit in a folder of the repo: ``hf://org/repo/sub/folder`` or
``--subfolder sub/folder`` (the files above, under that folder). A PEFT import
takes the options a local ``push`` of the same folder takes (:class:`HubPull`):
the base (``--base``, else the adapter's ``base_model_name_or_path`` when that
is a local folder or in the Hugging Face cache) and ``--trust-pickle`` for an
adapter that only has ``adapter_model.bin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchctl.errors import (
    DigestMismatch,
    InvalidArgument,
    NotFound,
    PatchctlError,
    PickleRefused,
    RemoteError,
)
from patchctl.registry.formats.bases import locate
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
PEFT_PICKLE = "adapter_model.bin"
PEFT_CARD = "README.md"  # the adapter's model card: a pull imports what a push of the folder would
#: A folder in a Hub repo: up to 8 parts of letters, digits, ``._-``, none starting with a dot.
SUBFOLDER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,95}){0,7}")


@dataclass(frozen=True)
class HubPull:
    """The options of a pull from the Hub: where in the repo, and how a PEFT adapter is imported.

    ``subfolder``: the folder inside the repo (``--subfolder``; also the path after ``ORG/REPO``
    in the URL). ``base``: the base model folder, or a model id in the local Hugging Face cache
    (``--base``). ``trust_pickle``: load an ``adapter_model.bin`` (``--trust-pickle``).
    """

    subfolder: str | None = None
    base: str | None = None
    trust_pickle: bool = False


def check_subfolder(sub: str) -> str:
    """``sub`` without surrounding slashes, when it is a plain relative folder path; else InvalidArgument."""
    s = sub.strip("/")
    if not SUBFOLDER_RE.fullmatch(s):  # no part starts with a dot: no "..", no "."
        raise InvalidArgument(f"invalid subfolder {sub!r}: give a folder path inside the repo, like adapters/math "
                              "(letters, digits, . _ -; no .. parts)")
    return s


def hub_location(remote: Remote, subfolder: str | None = None) -> tuple[str, str, str | None]:
    """``(repo_id, subfolder or "", revision or None)`` of an ``hf://`` remote (and ``--subfolder``)."""
    path, _, rev = parse_url(remote.url)[1][5:].partition("@")
    org, name, *rest = path.split("/")
    in_url = "/".join(rest)
    if subfolder is not None and in_url and check_subfolder(subfolder) != in_url:
        raise InvalidArgument(f"--subfolder {subfolder!r} and the URL's folder {in_url!r} disagree; give one of them")
    sub = check_subfolder(subfolder) if subfolder is not None else (check_subfolder(in_url) if in_url else "")
    return f"{org}/{name}", sub, rev or None


def hub_repo(remote: Remote) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of an ``hf://`` remote."""
    repo, _, rev = hub_location(remote)
    return repo, rev


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
             workers: int = DEFAULT_WORKERS, limits: PullLimits | None = None,
             options: HubPull | None = None) -> dict[str, Any]:
    """Pull ``r`` from an ``hf://`` remote: the patchctl layout if the repo has it, else a PEFT adapter.

    The manifest's size, its blob count, the declared blob sizes and the free space are checked
    (``limits``) before ``snapshot_download`` fetches any blob; the Hub client's own timeouts
    (``HF_HUB_DOWNLOAD_TIMEOUT``) bound its reads, the copy into the registry runs under ``limits``.
    ``options``: the folder inside the repo, and the base and pickle consent of a PEFT import.
    """
    limits = (limits or PullLimits()).check()
    opts = options or HubPull()
    repo, sub, rev = hub_location(remote, opts.subfolder)
    pre = f"{sub}/" if sub else ""
    ref_file = f"{pre}{HUB_REFS}/{r.name}/@{r.tag}"
    snap = _snapshot(repo, rev, [ref_file, *(pre + f for f in (*PEFT_FILES, PEFT_CARD))])
    commit = snap.name if re.fullmatch(r"[0-9a-f]{40}", snap.name) else (rev or "main")
    pinned = f"hf://{repo}{'/' + sub if sub else ''}@{commit}"
    if (snap / ref_file).is_file():
        digest = check_digest((snap / ref_file).read_text().strip())
        mname = f"{pre}{HUB_MANIFESTS}/{digest[7:]}"
        snap = _snapshot(repo, commit, [mname])
        mpath = snap / mname
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
            snap = _snapshot(repo, commit, [f"{pre}{HUB_BLOBS}/{d[7:]}" for d in sorted(missing)])
        out = transfer(SnapshotSource(snap / sub if sub else snap, pinned), reg, r, progress=progress,
                       workers=workers, message=f"pull {pinned} {r}", manifest_bytes=data, limits=limits)
        out.update(remote=remote.label, revision=commit, layout="patchctl", subfolder=sub or None)
        return out
    folder = snap / sub if sub else snap
    if (folder / "adapter_config.json").is_file():
        return _import_peft(reg, r, folder, repo, sub, commit, remote.label, opts, limits)
    where = f"{sub}/" if sub else "the repo root"
    raise NotFound(f"{pinned} has neither {ref_file} (a patchctl push) nor {pre}adapter_config.json (a PEFT adapter) "
                   f"in {where}; if the adapter is in a folder of the repo, pass --subfolder FOLDER "
                   "or use hf://ORG/REPO/FOLDER")


def _import_peft(reg: Repository, r: Ref, folder: Path, repo: str, sub: str, commit: str, label: str,
                 opts: HubPull, limits: PullLimits) -> dict[str, Any]:
    """Import the PEFT adapter in ``folder`` (a pinned snapshot) as ``r``, as ``push`` of that folder would."""
    t0 = time.monotonic()
    pre = f"{sub}/" if sub else ""
    if not (folder / PEFT_FILES[1]).is_file():  # only a pickle: fetched only when the user trusts it
        if not opts.trust_pickle:
            raise PickleRefused(f"hf://{repo}@{commit}: {pre}{PEFT_FILES[1]} is missing; {pre}{PEFT_PICKLE}, if "
                                "there is one, is a pickle file and loading it can run code. Pass --trust-pickle "
                                "to load it with torch.load(weights_only=True)")
        snap = _snapshot(repo, commit, [pre + PEFT_PICKLE])
        folder = snap / sub if sub else snap
    files = [f for f in (*PEFT_FILES, PEFT_PICKLE, PEFT_CARD) if (folder / f).is_file()]
    sizes = {f: (folder / f).stat().st_size for f in files}
    for f, n in sizes.items():
        if n > limits.max_blob_bytes:
            raise LimitExceeded(f"hf://{repo}@{commit}: {pre}{f} is {n} bytes, over the cap of "
                                f"{limits.max_blob_bytes} (raise it with --max-blob-bytes)")
    base: str | Path | None = None
    base_name = None
    if opts.base is not None:  # a folder, or a model id in the local HF cache: recorded as ID@COMMIT
        base = locate(opts.base)
        pin = re.search(r"snapshots/([0-9a-f]{40})$", base.as_posix())
        if not Path(opts.base).expanduser().is_dir():
            base_name = f"{opts.base.partition('@')[0]}@{pin.group(1)}" if pin else opts.base
    source = f"hf://{repo}" + (f"/{sub}" if sub else "")
    digest = importing.push(reg, folder, str(r), base=base, base_name=base_name, message=f"pull {source}@{commit}",
                            move_latest=False, metadata={"source": source, "revision": commit},
                            trust_pickle=opts.trust_pickle)
    m = reg.manifest(digest)
    return {"ref": str(r), "source_ref": f"{source}@{commit}", "remote": label, "digest": digest, "layout": "peft",
            "revision": commit, "subfolder": sub or None, "files": files, "tensors": len(m.tensors),
            "base": m.base.get("name"), "bytes_read": sum(sizes.values()),
            "seconds": round(time.monotonic() - t0, 3)}


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

    repo, sub, rev = hub_location(remote)
    pre = f"{sub}/" if sub else ""
    digest = reg.resolve(str(r))
    data = reg.store.read_manifest_bytes(digest)
    m = manifest_mod.parse(data)
    ops = [CommitOperationAdd(f"{pre}{HUB_BLOBS}/{d[7:]}", _verified_path(reg.store, d)) for d in m.blob_digests()]
    ops.append(CommitOperationAdd(f"{pre}{HUB_MANIFESTS}/{digest[7:]}", data))
    ops.append(CommitOperationAdd(f"{pre}{HUB_REFS}/{r.name}/@{r.tag}", (digest + "\n").encode()))
    with tempfile.TemporaryDirectory(dir=reg.path / "tmp", prefix="hub-push-") as td:
        if m.kind == "lora":
            peft = exporting.export_peft(reg.view(digest), Path(td) / "peft")
            ops += [CommitOperationAdd(pre + f, str(peft / f)) for f in (*PEFT_FILES, PEFT_CARD) if (peft / f).is_file()]
        try:
            info = HfApi().create_commit(repo, ops, commit_message=f"patchctl push {r} ({digest})", revision=rev)
        except Exception as e:  # noqa: BLE001 - translated here, the one place
            raise _hub_error(e, f"hf://{repo}") from None
    return {"ref": str(r), "remote": remote.label, "digest": digest, "commit": getattr(info, "oid", None),
            "files": [op.path_in_repo for op in ops], "blobs": len(m.blob_digests()), "peft": m.kind == "lora"}

