"""Pull a patch, or a PEFT adapter, from an OCI registry.

- :class:`OciSource` — the :class:`~patchctl.registry.remote.sources.Source`
  a pull hands to :func:`~patchctl.registry.remote.transfer.transfer`, so an
  OCI pull is the same verified, resumable, parallel transfer as any other:
  nothing visible before every digest checks, then manifest, then ref.
- :func:`pull_patch` — fetches and checks the OCI manifest (4 MiB and
  100 000 layers at most, refused before any blob is fetched), then: a
  patchctl patch goes through the transfer (its config is the patchctl
  manifest, byte for byte), and its validation records and eval suites come
  along from its referrers; a PEFT adapter folder (``oras push
  adapter_config.json adapter_model.safetensors``) is fetched, verified and
  imported as a LoRA patch, its OCI digest and source kept in the metadata;
  anything else is refused with what it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from patchctl.errors import DigestMismatch, InvalidPatch, RemoteError
from patchctl.registry.remote import oci
from patchctl.registry.remote.limits import LimitExceeded, PullLimits
from patchctl.registry.remote.oci_http import OciClient, open_client, release
from patchctl.registry.remote.oci_push import remember_repo
from patchctl.registry.remote.sources import Interrupted, ReadInto
from patchctl.registry.remote.transfer import DEFAULT_WORKERS, check_space, transfer
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store import records
from patchctl.registry.store.folder import CHUNK
from patchctl.registry.store.names import Ref, parse_ref
from patchctl.registry.store.repository import Progress, Repository

MAX_PEFT_CONFIG = 1024 * 1024

# -- validation records and eval suites from referrers ---------------------------------------------


def _referrers_index(client: OciClient, oci_digest: str) -> bytes | None:
    """The referrers of ``oci_digest``: the referrers API, else (404, or nothing listed) the fallback tag."""
    index = client.get_optional(f"/v2/{client.ref.path}/referrers/{oci_digest}", "list referrers",
                                oci.MAX_OCI_MANIFEST_BYTES)
    if index is None or not (oci.referrer_digests(index, oci.RECORDS_ARTIFACT_TYPE)
                             or oci.referrer_digests(index, oci.SUITE_ARTIFACT_TYPE)):
        fallback = client.get_optional(f"/v2/{client.ref.path}/manifests/{oci.referrers_tag(oci_digest)}",
                                       "get the referrers tag", oci.MAX_OCI_MANIFEST_BYTES)
        index = fallback if fallback is not None else index
    return index


def _pull_suites(reg: Repository, client: OciClient, digest: str, oci_digest: str, index: bytes | None) -> int:
    """Fetch the eval suites referring to ``oci_digest`` (verified transfer each) and attach them; how many new."""
    if index is None:
        return 0
    have = {e.get("suite") for e in records.read(reg.store, digest) if e.get("type") == "suite"}
    new = 0
    for rdigest in oci.referrer_digests(index, oci.SUITE_ARTIFACT_TYPE):
        om, _, _ = resolve(client, rdigest)
        if om.subject != oci_digest or om.artifact_type != oci.SUITE_ARTIFACT_TYPE or om.config.digest in have:
            continue
        data, sm = patch_manifest(client, om)
        if sm.kind != "suite":
            raise InvalidPatch(f"{client.label}: suite referrer {rdigest} carries a {sm.kind} manifest")
        role = om.annotations.get(oci.A_SUITE_ROLE, "target")
        ref = parse_ref(om.annotations.get(oci.A_SUITE_REF) or f"suites/{om.config.digest[7:19]}:v1")
        if not reg.store.has_manifest(om.config.digest):
            if reg.store.ref_target(ref) not in (None, om.config.digest):  # never move a ref the user has
                ref = Ref(ref.name, f"{ref.tag}-{om.config.digest[7:15]}"[:128])
            transfer(OciSource(client), reg, ref, message=f"pull {client.ref.url()} (suite)", manifest_bytes=data)
        records.attach(reg.store, digest, om.config.digest, role if role in ("target", "control") else "target")
        have.add(om.config.digest)
        new += 1
    return new


def _pull_records(reg: Repository, client: OciClient, digest: str, oci_digest: str, index: bytes | None) -> int:
    """Fetch the validation records referring to ``oci_digest``; how many are new."""
    if index is None:
        return 0
    have = {d for d, _ in records.validations(reg.store, digest)}
    new = 0
    for rdigest in oci.referrer_digests(index, oci.RECORDS_ARTIFACT_TYPE):
        om, _, _ = resolve(client, rdigest)
        if om.subject != oci_digest or om.artifact_type != oci.RECORDS_ARTIFACT_TYPE or len(om.layers) > 10_000:
            continue
        for layer in om.layers:
            if layer.media_type != oci.RECORD_MEDIA_TYPE or layer.digest in have:
                continue
            data = client.get_small_blob(layer.digest, layer.size, oci.MAX_RECORD_BYTES, "a validation record")
            try:
                if not isinstance(json.loads(data), dict):
                    raise ValueError
            except ValueError:
                raise InvalidPatch(f"{client.label}: validation record {layer.digest} is not a JSON object") from None
            with reg.store.writing():
                if reg.store.put_blob(data) != layer.digest:
                    raise DigestMismatch(f"validation record {layer.digest} stored under another digest")
                records.append(reg.store, digest, {"type": "validation", "record": layer.digest})
            have.add(layer.digest)
            new += 1
    return new


# -- pull ------------------------------------------------------------------------------------------


class OciSource:
    """A repository of an OCI registry as the :class:`~patchctl.registry.remote.sources.Source` of a transfer.

    ``manifest(ref)`` answers the patchctl manifest (the config blob of the
    OCI manifest ``ref.tag`` names) after the checks of :func:`resolve`.
    """

    def __init__(self, client: OciClient):
        self.client = client
        self.label = client.ref.url()
        self.range_requests = 0
        self._lock = threading.Lock()

    def manifest(self, ref: Ref) -> bytes:
        om, _, _ = resolve(self.client, ref.tag)
        if not om.is_patch:
            raise InvalidPatch(f"{self.label} is {om.describe()}, not a patchctl patch")
        return patch_manifest(self.client, om)[0]

    @contextlib.contextmanager
    def blob(self, name: str, digest: str, offset: int) -> Iterator[tuple[int, ReadInto]]:
        if offset > 0:
            with self._lock:
                self.range_requests += 1
        resp = self.client.open_blob(digest, offset)
        start = 0
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range") or "")
            if m is None or int(m.group(1)) != offset:
                self.client._drop()
                raise RemoteError(f"{self.label} answered Range bytes={offset}- with "
                                  f"{resp.getheader('Content-Range')!r}")
            start = offset

        def readinto(buf: memoryview) -> int:
            try:
                return int(resp.readinto(buf))
            except (OSError, http.client.HTTPException) as e:
                self.client._drop()
                raise Interrupted(f"{type(e).__name__}: {e}") from None

        try:
            yield start, readinto
        finally:
            if not resp.isclosed():
                self.client._drop()
            release(resp)

    def abort(self) -> None:
        """The pull's watch stopped the transfer: make blocked reads return."""
        self.client.abort()

    def close(self) -> None:
        self.client.close()


def resolve(client: OciClient, reference: str) -> tuple[oci.OciManifest, bytes, str]:
    """The checked OCI manifest ``reference`` names: ``(parsed, bytes, digest)``."""
    data, ctype, digest = client.get_manifest(reference)
    where = f"{client.label}:{reference}" if not reference.startswith("sha256:") else f"{client.label}@{reference}"
    return oci.parse_oci_manifest(data, ctype, where), data, digest


def patch_manifest(client: OciClient, om: oci.OciManifest) -> tuple[bytes, manifest_mod.Manifest]:
    data = client.get_small_blob(om.config.digest, om.config.size, manifest_mod.MAX_MANIFEST_BYTES,
                                 "the patch manifest")
    m = manifest_mod.parse(data)
    oci.check_layers(om, m, client.label)
    return data, m


def _fetch_file(client: OciClient, d: oci.Descriptor, dest: Path) -> None:
    """One layer into ``dest``, hashed while streaming; deleted when it does not match."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    resp = client.open_blob(d.digest)
    try:
        with open(dest, "wb") as f:
            while k := resp.readinto(view):
                n += k
                if n > d.size:
                    break
                h.update(view[:k])
                f.write(view[:k])
    except (OSError, http.client.HTTPException) as e:
        client._drop()
        raise RemoteError(f"cannot get {d.title} from {client.label}: {type(e).__name__}; run the pull again") from None
    finally:
        if not resp.isclosed():
            client._drop()
        release(resp)
    if n != d.size or "sha256:" + h.hexdigest() != d.digest:
        dest.unlink(missing_ok=True)
        raise DigestMismatch(f"{d.title} from {client.label} does not hash to {d.digest}; nothing was stored")


def _pull_peft(reg: Repository, client: OciClient, om: oci.OciManifest, oci_digest: str, local: Ref,
               limits: PullLimits) -> dict[str, Any]:
    from patchctl.registry.ops import importing

    t0 = time.monotonic()
    files = om.titled()
    if files["adapter_config.json"].size > MAX_PEFT_CONFIG:
        raise InvalidPatch(f"{client.label}: adapter_config.json is over {MAX_PEFT_CONFIG} bytes")
    wanted = [f for f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin") if f in files]
    for f in wanted:
        if files[f].size > limits.max_blob_bytes:
            raise LimitExceeded(f"{client.label}: {f} is declared at {files[f].size} bytes, over the limit of "
                                f"{limits.max_blob_bytes} (raise it with --max-blob-bytes)")
    check_space(reg.store, {files[f].digest: files[f].size for f in wanted}, limits, f"pulling {client.label}")
    with tempfile.TemporaryDirectory(dir=reg.store.root / "tmp", prefix="oci-peft-") as td:
        for fname in wanted:
            _fetch_file(client, files[fname], Path(td) / fname)
        source = client.ref.url()
        digest = importing.push(reg, td, str(local), message=f"pull {source}", move_latest=False,
                                metadata={"source": source, "oci_digest": oci_digest})
    return {"ref": str(local), "source_ref": source, "remote": client.label, "digest": digest, "layout": "peft",
            "oci_digest": oci_digest, "blobs_fetched": len(wanted), "blobs_skipped": 0,
            "bytes_transferred": sum(files[f].size for f in wanted), "seconds": round(time.monotonic() - t0, 3)}


def pull_patch(reg: Repository, source: oci.OciRef, local: Ref, *, label: str = "", progress: Progress = None,
               workers: int = DEFAULT_WORKERS, limits: PullLimits | None = None) -> dict[str, Any]:
    """Pull ``source`` (a repository with a tag or digest) into ``reg`` as ``local``; a summary.

    ``limits`` caps what the registry may make the pull cost, as for every remote
    (:class:`~patchctl.registry.remote.limits.PullLimits`).
    """
    limits = (limits or PullLimits()).check()
    client = open_client(source, reg.store.root)
    try:
        reference = source.reference or "latest"
        om, _, oci_digest = resolve(client, reference)
        if om.is_patch:
            data, _ = patch_manifest(client, om)
            out = transfer(OciSource(client), reg, local, progress=progress, workers=workers,
                           message=f"pull {source.url()}", manifest_bytes=data, limits=limits)
            index = _referrers_index(client, oci_digest)
            out.update(remote=label or client.label, source_ref=source.url(), oci_digest=oci_digest, layout="patchctl",
                       suites=_pull_suites(reg, client, out["digest"], oci_digest, index),
                       validations=_pull_records(reg, client, out["digest"], oci_digest, index))
        elif om.is_peft:
            out = _pull_peft(reg, client, om, oci_digest, local, limits)
            out["remote"] = label or client.label
        else:
            raise InvalidPatch(f"{source.url()} is {om.describe()}: neither a patchctl patch nor a PEFT adapter "
                               "(adapter_config.json + adapter_model.safetensors)")
    finally:
        client.close()
    remember_repo(reg.store.root, source)
    return out


__all__ = ["OciSource", "patch_manifest", "pull_patch", "resolve"]
