"""Push a patch, and its validation records and eval suites, to an OCI registry.

:func:`push_patch` sends the blobs first, the OCI manifest last. Each blob
(the config, i.e. the patchctl manifest, and every tensor blob) is
``HEAD``-ed and only a missing one is sent: mounted from another repository of
the same registry where this registry folder has seen it (``oci-repos.json``:
the repositories per host it pushed to or pulled from, :func:`remember_repo`),
else uploaded — monolithic under :data:`CHUNKED_FROM`, chunked above it. A
chunked upload's session URL is kept in ``tmp/oci-upload-<hex>.json`` after
every chunk, so a re-run resumes it where the registry says it stopped. Blobs
go in parallel (``workers``). Then the patch's validation records and eval
suites go as OCI 1.1 referrers of its manifest (listed under the referrers tag
where the registry does not index ``subject``). The requests themselves are
:class:`~patchctl.registry.remote.oci_http.OciClient`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from patchctl.errors import InvalidArgument, NotFound, RemoteError
from patchctl.registry.remote import oci, oci_http
from patchctl.registry.remote.oci_http import OciClient, open_client
from patchctl.registry.remote.transfer import DEFAULT_WORKERS
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store import records
from patchctl.registry.store.names import parse_ref
from patchctl.registry.store.repository import Progress, Repository

CHUNKED_FROM = 16 * 1024 * 1024  # blobs this large or larger go in chunks
CHUNK_BYTES = 64 * 1024 * 1024  # one PATCH
KNOWN_FILE = "oci-repos.json"
KNOWN_PER_HOST = 32
# RETRIES and BACKOFF are oci_http's, read at call time: one setting for the requests and the uploads


# -- mount candidates ------------------------------------------------------------------------------


def known_repos(root: Path) -> dict[str, list[str]]:
    """The repositories per host this registry folder pushed to or pulled from (``oci-repos.json``)."""
    try:
        doc = json.loads((root / KNOWN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {h: [r for r in v if isinstance(r, str)] for h, v in doc.items() if isinstance(v, list)} \
        if isinstance(doc, dict) else {}


def remember_repo(root: Path, ref: oci.OciRef) -> None:
    """Note that ``ref``'s repository holds blobs we know (most recent first, :data:`KNOWN_PER_HOST` per host)."""
    doc = known_repos(root)
    repos = [ref.path] + [r for r in doc.get(ref.host, []) if r != ref.path]
    doc[ref.host] = repos[:KNOWN_PER_HOST]
    tmp = root / "tmp" / f"{KNOWN_FILE}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / KNOWN_FILE)


# -- push ------------------------------------------------------------------------------------------


class _Bytes:
    def __init__(self, total: int, progress: Progress):
        self.total, self.progress = total, progress
        self.sent = self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.sent += n
            self.done += n
            done = self.done
        if self.progress is not None:
            self.progress(done, self.total)

    def skip(self, n: int) -> None:
        with self.lock:
            self.done += n
            done = self.done
        if self.progress is not None:
            self.progress(done, self.total)


def _session_file(reg: Repository, client: OciClient, digest: str) -> Path:
    key = hashlib.sha256(f"{client.ref.host}/{client.ref.path}/{digest}".encode()).hexdigest()[:32]
    return reg.store.root / "tmp" / f"oci-upload-{key}.json"


def _upload(reg: Repository, client: OciClient, digest: str, size: int, path: Path | None, data: bytes | None,
            counter: _Bytes) -> None:
    """Send one blob: monolithic below :data:`CHUNKED_FROM`, else chunked and resumable."""
    if data is not None or size < CHUNKED_FROM:
        for attempt in range(oci_http.RETRIES):
            location = client.start_upload()
            try:
                if data is not None:
                    client.finish_upload(location, digest, _BytesFile(data), 0, size, counter.add)
                else:
                    with open(path, "rb") as f:  # type: ignore[arg-type]
                        client.finish_upload(location, digest, f, 0, size, counter.add)
                return
            except RemoteError:
                if attempt == oci_http.RETRIES - 1:
                    raise
                time.sleep(oci_http.BACKOFF * 2 ** attempt)
        return
    state = _session_file(reg, client, digest)
    with open(path, "rb") as f:  # type: ignore[arg-type]
        for attempt in range(oci_http.RETRIES):
            location, offset = None, 0
            with contextlib.suppress(OSError, ValueError, KeyError):
                location = json.loads(state.read_text())["location"]
            if location is not None:
                got = client.upload_offset(location)
                location, offset = got if got is not None else (None, 0)
                if offset > size:
                    location, offset = None, 0
            if location is None:
                location = client.start_upload()
            try:
                while offset < size:
                    n = min(CHUNK_BYTES, size - offset)
                    location = client.patch_chunk(location, f, offset, n, counter.add)
                    offset += n
                    tmp = state.with_suffix(".new")
                    tmp.write_text(json.dumps({"location": location, "offset": offset}))
                    os.replace(tmp, state)
                client.finish_upload(location, digest)
                state.unlink(missing_ok=True)
                return
            except RemoteError:
                if attempt == oci_http.RETRIES - 1:
                    raise RemoteError(f"upload of blob {digest} to {client.label} failed {oci_http.RETRIES} times; "
                                      "run the push again to resume it") from None
                time.sleep(oci_http.BACKOFF * 2 ** attempt)


class _BytesFile:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _put_manifest_settled(client: OciClient, reference: str, body: bytes) -> str:
    """``PUT`` the manifest; a 400 right after the blob writes is tried again, twice, after a pause.

    distribution's filesystem driver rewrites a repository's blob link files in
    place, so a manifest check racing the last link write can read a partial
    link and answer ``DIGEST_INVALID`` (seen under load); the blobs are there.
    """
    for attempt in range(2):
        try:
            return client.put_manifest(reference, body)
        except RemoteError as e:
            if " 400 " not in str(e):
                raise
            time.sleep(0.5 * (attempt + 1))
    return client.put_manifest(reference, body)


def push_patch(reg: Repository, local: str, target: oci.OciRef, *, progress: Progress = None,
               workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Push the local patch ``local`` (``NAME[:TAG]``) to ``target`` (a repository and tag); a summary."""
    t0 = time.monotonic()
    r = parse_ref(local)
    digest = reg.resolve(str(r))
    data = reg.store.read_manifest_bytes(digest)
    m = manifest_mod.parse(data)
    if m.kind not in manifest_mod.PATCH_KINDS:
        raise InvalidArgument(f"{r} is a {m.kind}, not a patch; only patches are pushed to OCI registries")
    name = target.path.rsplit("/", 1)[-1]
    oci_bytes = oci.to_oci(name, m, data, digest)
    sizes = dict(m.blobs())
    blobs: list[tuple[str, int]] = sorted(sizes.items()) + [(digest, len(data))]
    for d, _ in blobs[:-1]:
        if not reg.store.has_blob(d):
            raise NotFound(f"blob {d} of {r} is missing locally (run `patchctl fsck`); not pushing")
    root = reg.store.root
    candidates = [p for p in known_repos(root).get(target.host, []) if p != target.path][:4]
    counter = _Bytes(sum(s for _, s in blobs), progress)
    outcome: dict[str, str] = {}
    client = open_client(target, root)
    lock = threading.Lock()

    def one(d: str, size: int) -> None:
        if client.has_blob(d):
            how = "skipped"
            counter.skip(size)
        else:
            how = ""
            for src in candidates:
                if client.has_blob(d, src) and client.mount(d, src):
                    how = "mounted"
                    counter.skip(size)
                    break
            if not how:
                _upload(reg, client, d, size, None if d == digest else reg.store.blob_path(d),
                        data if d == digest else None, counter)
                how = "uploaded"
        with lock:
            outcome[d] = how

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(blobs))), thread_name_prefix="patchctl-oci") as pool:
            for f in [pool.submit(one, d, s) for d, s in blobs]:
                f.result()
        oci_digest = _put_manifest_settled(client, target.tag or r.tag, oci_bytes)  # the manifest last
        pushed_records = _push_records(reg, client, digest, oci_digest, len(oci_bytes))
        pushed_suites = _push_suites(reg, client, digest, oci_digest, len(oci_bytes))
    finally:
        client.close()
    remember_repo(root, target)

    def total(how: str) -> int:
        return sum(s for d, s in blobs if outcome.get(d) == how)

    return {
        "ref": str(r), "digest": digest, "remote": target.url(), "oci_digest": oci_digest,
        "repository": target.path, "tag": target.tag or r.tag, "blobs": len(blobs),
        "blobs_uploaded": sum(1 for v in outcome.values() if v == "uploaded"),
        "blobs_mounted": sum(1 for v in outcome.values() if v == "mounted"),
        "blobs_skipped": sum(1 for v in outcome.values() if v == "skipped"),
        "bytes_sent": counter.sent, "bytes_uploaded": total("uploaded"), "bytes_mounted": total("mounted"),
        "bytes_skipped": total("skipped"), "oci_manifest_bytes": len(oci_bytes), "validations": pushed_records,
        "suites": pushed_suites,
        "requests": dict(sorted(client.requests.items())), "seconds": round(time.monotonic() - t0, 3),
    }


# -- validation records as OCI 1.1 referrers -------------------------------------------------------


def _push_records(reg: Repository, client: OciClient, digest: str, oci_digest: str, oci_size: int) -> int:
    """Push the patch's validation records as one referrer of its OCI manifest; how many records.

    Where the registry does not index ``subject`` itself (no ``OCI-Subject`` in the
    answer), the referrer is also listed in the referrers tag schema's index
    (tag ``sha256-<hex>``), read, extended and put back.
    """
    found = records.validations(reg.store, digest)
    if not found:
        return 0
    recs = [(d, reg.store.blob_path(d).stat().st_size) for d, _ in found]
    body = oci.records_manifest(oci_digest, oci_size, recs)
    empty = "sha256:" + hashlib.sha256(oci.EMPTY).hexdigest()
    for d, _ in [(empty, 2), *recs]:
        if not client.has_blob(d):
            data = oci.EMPTY if d == empty else bytes(reg.store.read_blob(d))
            location = client.start_upload()
            client.finish_upload(location, d, _BytesFile(data), 0, len(data))
    _put_referrer(client, oci_digest, body, oci.RECORDS_ARTIFACT_TYPE)
    return len(recs)


def _put_referrer(client: OciClient, oci_digest: str, body: bytes, artifact_type: str) -> None:
    """``PUT`` a referrer by digest; list it under the referrers tag where the registry does not index it."""
    rdigest = "sha256:" + hashlib.sha256(body).hexdigest()
    client.put_manifest(rdigest, body)
    if not client.subject_accepted:
        tag = oci.referrers_tag(oci_digest)
        try:
            index: bytes | None = client.get_manifest(tag)[0]
        except NotFound:
            index = None
        new = oci.add_to_index(index, {"mediaType": oci.OCI_MANIFEST, "digest": rdigest, "size": len(body),
                                       "artifactType": artifact_type})
        if new is not None:
            client.put_manifest(tag, new, oci.OCI_INDEX)


def _push_suites(reg: Repository, client: OciClient, digest: str, oci_digest: str, oci_size: int) -> int:
    """Push the eval suites attached to the patch, each as a referrer (its ref and role annotated)."""
    entries = [e for e in records.read(reg.store, digest) if e.get("type") == "suite"]
    for e in entries:
        sd = e["suite"]
        data = reg.store.read_manifest_bytes(sd)
        sm = manifest_mod.parse(data)
        ref = oci.suite_ref_of(reg.index.tags_of(sd), sd)
        body = oci.suite_referrer(ref, str(e.get("role", "target")), sm, data, sd, (oci_digest, oci_size))
        blobs = sorted(dict(sm.blobs()).items())
        for d, _ in blobs:
            if not client.has_blob(d):
                with open(reg.store.blob_path(d), "rb") as f:
                    client.finish_upload(client.start_upload(), d, f, 0, os.fstat(f.fileno()).st_size)
        if not client.has_blob(sd):
            client.finish_upload(client.start_upload(), sd, _BytesFile(data), 0, len(data))
        _put_referrer(client, oci_digest, body, oci.SUITE_ARTIFACT_TYPE)
    return len(entries)



__all__ = ["known_repos", "push_patch", "remember_repo"]
