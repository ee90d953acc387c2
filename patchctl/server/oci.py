"""``patchctl serve`` for OCI clients: the OCI image manifest of a patch, by content negotiation.

An ASGI layer in front of the server's router (inside the token guard):

- ``GET|HEAD /v2/<name>/manifests/<tag|digest>`` whose ``Accept`` names the OCI
  image manifest type and not patchctl's own
  (:data:`~patchctl.registry.remote.protocol.MANIFEST_MEDIA_TYPE`) answers the
  patch's OCI manifest (:func:`patchctl.registry.remote.oci.to_oci`, the same
  bytes a push to a registry writes), ``Docker-Content-Digest`` its digest. A
  digest reference is looked up among the OCI digests of ``name``'s tags.
- ``GET|HEAD /v2/<name>/blobs/<digest>`` of a digest that is a patchctl
  manifest (the OCI config blob) answers the manifest bytes; the empty config
  ``{}`` of a referrer is served too.
- ``GET /v2/<name>/referrers/<digest>[?artifactType=]`` answers the OCI 1.1
  referrers index of a patch's OCI manifest: its validation records as one
  referrer (:func:`patchctl.registry.remote.oci.records_manifest`) and each
  attached eval suite as one (:func:`patchctl.registry.remote.oci.suite_referrer`),
  the same bytes a push writes, then served by digest like the patch.

Everything else — patchctl's own client, which asks for its media type,
browsers, the JSON API — goes to the router unchanged, so older clients keep
working. Errors are OCI bodies (``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``,
``NAME_INVALID``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import anyio
from starlette.responses import Response

from patchctl.errors import NotFound, PatchctlError
from patchctl.registry.remote import oci
from patchctl.registry.remote.protocol import MANIFEST_MEDIA_TYPE
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store import records
from patchctl.registry.store.folder import Store
from patchctl.registry.store.names import DIGEST_RE, NAME_RE, TAG_RE, Ref

_MANIFEST_PATH = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")
_BLOB_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_REFERRERS_PATH = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})")
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(oci.EMPTY).hexdigest()


def _error(status: int, code: str, message: str) -> Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Response(body, status_code=status, media_type="application/json")


def wants_oci(accept: str) -> bool:
    """True when the client asks for an OCI or Docker v2 manifest and not patchctl's own type."""
    types = {t.split(";")[0].strip() for t in accept.split(",")}
    return bool(types & {oci.OCI_MANIFEST, oci.DOCKER_MANIFEST}) and MANIFEST_MEDIA_TYPE not in types


class OciArtifacts:
    """The ASGI layer (see the module docstring) around ``app``, serving ``store``."""

    CACHE = 4096

    def __init__(self, app: Any, store: Store, tags_of: Callable[[str], list[str]] | None = None):
        self.app, self.store = app, store
        self.tags_of = tags_of or (lambda digest: [])  # a suite's refs (the index), for its referrer's annotation
        self._by_oci: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # OCI digest → (name, OCI bytes)
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") in ("GET", "HEAD"):
            path = scope.get("path", "")
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            m = _MANIFEST_PATH.fullmatch(path)
            if m is not None and wants_oci(headers.get("accept", "")):
                resp = await anyio.to_thread.run_sync(self._manifest, m.group("name"), m.group("ref"),
                                                      scope["method"] == "HEAD")
                await resp(scope, receive, send)
                return
            r = _REFERRERS_PATH.fullmatch(path)
            if r is not None:
                query = scope.get("query_string", b"").decode("latin-1")
                resp = await anyio.to_thread.run_sync(self._referrers, r.group("name"), r.group("digest"), query)
                await resp(scope, receive, send)
                return
            b = _BLOB_PATH.fullmatch(path)
            if b is not None and b.group("digest") == _EMPTY_DIGEST:
                resp = Response(None if scope["method"] == "HEAD" else oci.EMPTY, media_type=oci.EMPTY_MEDIA_TYPE,
                                headers={"Docker-Content-Digest": _EMPTY_DIGEST, "Content-Length": "2"})
                await resp(scope, receive, send)
                return
            if b is not None and await anyio.to_thread.run_sync(self._is_config, b.group("digest")):
                resp = await anyio.to_thread.run_sync(self._config, b.group("digest"), scope["method"] == "HEAD")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _is_config(self, digest: str) -> bool:
        """A patchctl manifest that is not also a blob; anything odd on disk is left to the router's checks."""
        try:
            return not self.store.has_blob(digest) and self.store.has_manifest(digest)
        except Exception:  # noqa: BLE001 - e.g. a planted symlink: the router refuses it with its own error
            return False

    def _remember(self, name: str, body: bytes) -> str:
        key = "sha256:" + hashlib.sha256(body).hexdigest()
        with self._lock:
            self._by_oci[key] = (name, body)
            while len(self._by_oci) > self.CACHE:
                self._by_oci.popitem(last=False)
        return key

    def _oci_of(self, name: str, digest: str) -> bytes:
        data = self.store.read_manifest_bytes(digest)  # verifies the sha256
        body = oci.to_oci(name.rsplit("/", 1)[-1], manifest_mod.parse(data), data, digest)
        self._remember(name, body)
        return body

    def _records_of(self, name: str, digest: str, oci_body: bytes) -> bytes | None:
        """The validation-records referrer of patch ``digest`` (None when it has none)."""
        found = records.validations(self.store, digest)
        if not found:
            return None
        recs = [(d, self.store.blob_path(d).stat().st_size) for d, _ in found]
        body = oci.records_manifest("sha256:" + hashlib.sha256(oci_body).hexdigest(), len(oci_body), recs)
        self._remember(name, body)
        return body

    def _suites_of(self, name: str, digest: str, oci_body: bytes) -> list[bytes]:
        """The eval-suite referrers of patch ``digest``: the OCI manifests ``push --to oci://`` writes."""
        subject = ("sha256:" + hashlib.sha256(oci_body).hexdigest(), len(oci_body))
        out = []
        for e in records.read(self.store, digest):
            if e.get("type") != "suite":
                continue
            sd = e["suite"]
            data = self.store.read_manifest_bytes(sd)  # verifies the sha256
            body = oci.suite_referrer(oci.suite_ref_of(self.tags_of(sd), sd), str(e.get("role", "target")),
                                      manifest_mod.parse(data), data, sd, subject)
            self._remember(name, body)
            out.append(body)
        return out

    def _referrers(self, name: str, digest: str, query: str) -> Response:
        if len(name) > 128 or not NAME_RE.fullmatch(name):
            return _error(400, "NAME_INVALID", f"invalid repository name {name[:140]!r}")
        wanted = parse_qs(query).get("artifactType", [])
        manifests = []
        suites: list[bytes] = []
        try:
            subject = self._by_digest(name, digest)
            patch = json.loads(subject)["config"]["digest"]
            body = self._records_of(name, patch, subject)
            suites = self._suites_of(name, patch, subject)
        except NotFound:
            body = None  # an unknown subject has no referrers (the spec: an empty index, not 404)
        except (PatchctlError, OSError) as e:
            return _error(500, "UNKNOWN", f"cannot list referrers of {digest} ({type(e).__name__}); run `patchctl fsck`")
        if body is not None and (not wanted or oci.RECORDS_ARTIFACT_TYPE in wanted):
            manifests.append({"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                              "size": len(body), "artifactType": oci.RECORDS_ARTIFACT_TYPE})
        if not wanted or oci.SUITE_ARTIFACT_TYPE in wanted:
            manifests.extend({"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(s).hexdigest(),
                              "size": len(s), "artifactType": oci.SUITE_ARTIFACT_TYPE} for s in suites)
        headers = {"OCI-Filters-Applied": "artifactType"} if wanted else {}
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
        return Response(json.dumps(doc, sort_keys=True).encode(), media_type=oci.OCI_INDEX, headers=headers)

    def _manifest(self, name: str, reference: str, head: bool) -> Response:
        if len(name) > 128 or not NAME_RE.fullmatch(name):
            return _error(400, "NAME_INVALID", f"invalid repository name {name[:140]!r}")
        try:
            if DIGEST_RE.fullmatch(reference):
                body = self._by_digest(name, reference)
            elif TAG_RE.fullmatch(reference):
                target = self.store.ref_target(Ref(name, reference))
                if target is None:
                    return _error(404, "MANIFEST_UNKNOWN", f"no patch named {name}:{reference} on this server")
                body = self._oci_of(name, target)
            else:
                return _error(400, "TAG_INVALID", f"{reference[:140]!r} is neither a tag nor a sha256 digest")
        except NotFound as e:
            return _error(404, "MANIFEST_UNKNOWN", str(e))
        except (PatchctlError, OSError) as e:  # a damaged registry: fsck says what
            return _error(500, "UNKNOWN", f"cannot read {name}:{reference[:80]} ({type(e).__name__}); run `patchctl fsck`")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Cache-Control": "no-cache"}
        if head:
            headers["Content-Length"] = str(len(body))
            return Response(None, headers=headers, media_type=oci.OCI_MANIFEST)
        return Response(body, headers=headers, media_type=oci.OCI_MANIFEST)

    def _by_digest(self, name: str, digest: str) -> bytes:
        with self._lock:
            hit = self._by_oci.get(digest)
        if hit is not None and hit[0] == name:
            return hit[1]
        for ref in self.store.iter_refs():  # not seen yet: the OCI manifests of name's tags and their referrers
            if ref.name != name:
                continue
            target = self.store.ref_target(ref)
            if target is not None:
                body = self._oci_of(name, target)
                if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                    return body
                rec = self._records_of(name, target, body)
                if rec is not None and "sha256:" + hashlib.sha256(rec).hexdigest() == digest:
                    return rec
                for s in self._suites_of(name, target, body):
                    if "sha256:" + hashlib.sha256(s).hexdigest() == digest:
                        return s
        raise NotFound(f"no OCI manifest {digest} for {name} on this server")

    def _config(self, digest: str, head: bool) -> Response:
        try:
            data = self.store.read_manifest_bytes(digest)
        except (PatchctlError, OSError):
            return _error(404, "BLOB_UNKNOWN", f"no blob {digest} on this server")
        headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"',
                   "Cache-Control": "public, max-age=31536000, immutable"}
        if head:
            headers["Content-Length"] = str(len(data))
            return Response(None, headers=headers, media_type=oci.CONFIG_MEDIA_TYPE)
        return Response(data, headers=headers, media_type=oci.CONFIG_MEDIA_TYPE)


__all__ = ["OciArtifacts", "wants_oci"]
