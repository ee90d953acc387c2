"""Patches as OCI artifacts: ``oci://`` references and the patch ⇄ OCI image manifest mapping.

Pure functions, no I/O: :mod:`patchctl.registry.remote.oci_http` talks to
the registry. The mapping (docs/design.md, "OCI artifacts"):

- one patch version = one OCI image manifest (:data:`OCI_MANIFEST`) with
  ``artifactType`` :data:`ARTIFACT_TYPE`;
- its ``config`` is the patchctl manifest, byte for byte (:data:`CONFIG_MEDIA_TYPE`),
  so the patch's digest is the config digest;
- one layer per blob of the tensor table, in tensor-name order (a tensor's
  exact-value pins follow it), annotated with the tensor's name, dtype,
  shape, encoding and ``org.opencontainers.image.title``;
- manifest annotations: title (the patch name), description and source (from
  the patch's metadata when it has them), base fingerprint and name, kind.

``created`` is left out on purpose: when a patch was made is kept in the ref
history, not in the patch, so the OCI manifest is a pure function of
``(name, patchctl manifest)`` and the same patch gives the same OCI digest on
every push, from every machine. Serialization is canonical JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from patchctl.errors import InvalidArgument, InvalidPatch, InvalidReference
from patchctl.registry.formats import canonical
from patchctl.registry.store.manifest import Manifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: what a pull asks for; anything else is reported for what it is
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
ARTIFACT_TYPE = "application/vnd.patchctl.patch.v1"
#: the patchctl manifest as the config blob (the media type ``patchctl serve`` answers with)
CONFIG_MEDIA_TYPE = "application/vnd.patchctl.manifest.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.patchctl.tensor.v1"
PINS_MEDIA_TYPE = "application/vnd.patchctl.tensor-pins.v1"
SIDE_FILE_MEDIA_TYPE = "application/vnd.patchctl.side-file.v1"  # a diff patch's tokenizer/generation file
#: the validation records of a patch: an OCI 1.1 referrer (``subject`` = the patch's OCI manifest)
RECORDS_ARTIFACT_TYPE = "application/vnd.patchctl.validations.v1"
RECORD_MEDIA_TYPE = "application/vnd.patchctl.validation.v1+json"
#: an eval suite attached to a patch: its own manifest (kind ``suite``) mapped like a patch, with a subject
SUITE_ARTIFACT_TYPE = "application/vnd.patchctl.suite.v1"
A_SUITE_REF = "dev.patchctl.suite.ref"
A_SUITE_ROLE = "dev.patchctl.suite.role"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
MAX_RECORD_BYTES = 16 * 1024 * 1024
#: ORAS's default for a file pushed without a type, and the empty config of OCI 1.1
ORAS_CONFIG_TYPES = ("application/vnd.oci.empty.v1+json", "application/vnd.unknown.config.v1+json",
                     "application/vnd.oci.image.config.v1+json")

TITLE = "org.opencontainers.image.title"
DESCRIPTION = "org.opencontainers.image.description"
SOURCE = "org.opencontainers.image.source"
A_KIND = "dev.patchctl.kind"
A_FINGERPRINT = "dev.patchctl.base.fingerprint"
A_BASE = "dev.patchctl.base.name"
A_TENSOR = "dev.patchctl.tensor.name"
A_DTYPE = "dev.patchctl.tensor.dtype"
A_SHAPE = "dev.patchctl.tensor.shape"
A_ENCODING = "dev.patchctl.tensor.encoding"
A_ROLE = "dev.patchctl.tensor.role"

#: refused before any blob is fetched
MAX_OCI_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 100_000

# the distribution spec's grammar (lowercase repository path components)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"|\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]")
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
SCHEMES = {"oci://": "https", "oci+http://": "http"}
USAGE = "oci://HOST[:PORT]/NAMESPACE (oci+http:// for a plain-HTTP registry)"


@dataclass(frozen=True)
class OciRef:
    """``oci://HOST[:PORT]/PATH[:TAG|@DIGEST]`` taken apart.

    ``scheme`` is ``https`` (TLS verified) for ``oci://``, except on a loopback
    host, which is spoken to in plain HTTP (as docker treats ``localhost``);
    ``oci+http://`` asks for plain HTTP explicitly.
    """

    scheme: str
    host: str  # with the port, as registries and docker config files name it
    path: str  # repository path ("" for a registry root)
    tag: str | None = None
    digest: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def reference(self) -> str | None:
        return self.digest or self.tag

    def url(self, with_ref: bool = True) -> str:
        prefix = "oci+http://" if self.scheme == "http" and not is_loopback(self.host) else "oci://"
        out = f"{prefix}{self.host}" + (f"/{self.path}" if self.path else "")
        if with_ref and self.digest:
            return f"{out}@{self.digest}"
        if with_ref and self.tag:
            return f"{out}:{self.tag}"
        return out

    def child(self, name: str, tag: str | None = None, digest: str | None = None) -> OciRef:
        """The repository ``<path>/<name>`` under this namespace."""
        path = f"{self.path}/{name}" if self.path else name
        check_repository(path)
        return OciRef(self.scheme, self.host, path, tag, digest)


def is_loopback(host: str) -> bool:
    return _hostname(host.lower()) in LOOPBACK


def _hostname(host: str) -> str:
    """``host`` without its port."""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def check_repository(path: str) -> str:
    if len(path) > 255 or not REPO_RE.fullmatch(path):
        raise InvalidReference(f"invalid OCI repository {path!r}: lowercase letters, digits and . _ - between "
                               "them, components joined by /")
    return path


def parse_oci(url: str, *, reference: bool = False) -> OciRef:
    """Parse an ``oci://`` URL; with ``reference`` the last component may carry ``:TAG`` or ``@DIGEST``."""
    scheme = next((s for p, s in SCHEMES.items() if url.startswith(p)), None)
    if scheme is None:
        raise InvalidArgument(f"not an OCI URL {url!r}: expected {USAGE}")
    rest = url[url.index("://") + 3:]
    host, _, path = rest.partition("/")
    bad = f"invalid OCI {'reference' if reference else 'remote'} {url!r}: expected " + (
        "oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]" if reference else USAGE)
    if "@" in host or "?" in rest or "#" in rest:
        raise InvalidArgument(bad + " (no credentials, query or fragment in the URL; `patchctl login HOST`)")
    hostname, port = host, ""
    if not host.startswith("[") and ":" in host:
        hostname, _, port = host.partition(":")
    elif host.startswith("[") and "]:" in host:
        hostname, _, port = host.partition("]:")
        hostname += "]"
    if not _HOST_RE.fullmatch(hostname) or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
        raise InvalidArgument(bad)
    path = path.rstrip("/") if not reference else path
    tag = digest = None
    if reference:
        if "@" in path:
            path, _, digest = path.partition("@")
            if not DIGEST_RE.fullmatch(digest):
                raise InvalidReference(f"{bad}: {digest!r} is not sha256: and 64 lowercase hex digits")
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            if not TAG_RE.fullmatch(tag):
                raise InvalidReference(f"{bad}: invalid tag {tag!r}")
        if not path:
            raise InvalidReference(f"{bad}: no repository")
    if path and (len(path) > 255 or not REPO_RE.fullmatch(path)):
        raise InvalidReference(f"{bad}: {path!r} is not a repository path (lowercase letters, digits, . _ -)")
    if scheme == "https" and is_loopback(host):
        scheme = "http"
    return OciRef(scheme, host.lower(), path, tag, digest)


def check_transport(url: str, insecure: bool, *, stored: bool = False) -> None:
    """Refuse plain HTTP nobody asked for, and ``--insecure`` where it would mean nothing.

    TLS is verified for every ``oci://`` registry; a loopback host is spoken to in
    plain HTTP (as docker treats ``localhost``). Plain HTTP to any other host needs
    both the explicit ``oci+http://`` and ``--insecure`` (patches and credentials
    cross the network unencrypted); ``--insecure`` never turns off TLS verification.
    ``stored``: the URL is a configured remote's, added with that consent already.
    """
    if not url.startswith(("oci://", "oci+http://")):
        if insecure:
            raise InvalidArgument("--insecure is only for OCI registries (oci+http://HOST/... or a loopback host)")
        return
    explicit_http = url.startswith("oci+http://")
    host = url.split("://", 1)[1].partition("/")[0]
    if explicit_http and not is_loopback(host) and not (insecure or stored):
        raise InvalidArgument(f"{url} is plain HTTP: patches and credentials would cross the network unencrypted; "
                              "add --insecure if that registry really has no TLS (oci:// verifies TLS)")
    if insecure and not explicit_http and not is_loopback(host):
        raise InvalidArgument(f"--insecure is only for an explicit oci+http:// URL or a loopback host; {url} "
                              "always verifies TLS (write oci+http:// for a registry without TLS)")


# -- the mapping ---------------------------------------------------------------------------------


def _descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = annotations
    return d


def to_oci(name: str, m: Manifest, manifest_bytes: bytes, manifest_digest: str, *,
           artifact_type: str = ARTIFACT_TYPE, subject: tuple[str, int] | None = None,
           extra: dict[str, str] | None = None) -> bytes:
    """The OCI image manifest of patch ``m`` (its bytes ``manifest_bytes``) named ``name``: canonical JSON.

    An eval suite travels the same way as a referrer: ``artifact_type``
    :data:`SUITE_ARTIFACT_TYPE`, ``subject`` the patch's OCI manifest ``(digest, size)``,
    ``extra`` annotations (its ref and role).
    """
    layers = []
    for tname in sorted(m.tensors):
        t = m.tensors[tname]
        common = {A_TENSOR: tname, A_DTYPE: t.dtype, A_SHAPE: json.dumps(list(t.shape), separators=(",", ":")),
                  A_ENCODING: t.encoding}
        layers.append(_descriptor(LAYER_MEDIA_TYPE, t.digest, t.size, {**common, TITLE: tname}))
        if t.pins:
            layers.append(_descriptor(PINS_MEDIA_TYPE, t.pins["digest"], int(t.pins["size"]),
                                      {**common, A_ROLE: "pins", TITLE: tname + ".pins"}))
    for fname in sorted(m.side_files):  # a fine-tune's tokenizer/generation files (a diff patch's side files)
        f = m.side_files[fname]
        if "digest" in f:
            layers.append(_descriptor(SIDE_FILE_MEDIA_TYPE, f["digest"], int(f["size"]),
                                      {A_ROLE: "side-file", TITLE: "side_files/" + fname}))
    annotations = {TITLE: name, A_KIND: m.kind, A_FINGERPRINT: m.fingerprint}
    if isinstance(m.base.get("name"), str) and m.base["name"]:
        annotations[A_BASE] = m.base["name"]
    for key, field in ((DESCRIPTION, "description"), (SOURCE, "source")):
        if isinstance(m.metadata.get(field), str) and m.metadata[field]:
            annotations[key] = m.metadata[field]
    annotations.update(extra or {})
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": _descriptor(CONFIG_MEDIA_TYPE, manifest_digest, len(manifest_bytes)),
        "layers": layers,
        "annotations": annotations,
    }
    if subject is not None:
        doc["subject"] = _descriptor(OCI_MANIFEST, subject[0], subject[1])
    return canonical.dumps(doc)


def records_manifest(subject_digest: str, subject_size: int, records: list[tuple[str, int]]) -> bytes:
    """The referrer carrying a patch's validation records (``(digest, size)`` each, in log order)."""
    import hashlib

    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": RECORDS_ARTIFACT_TYPE,
        "config": _descriptor(EMPTY_MEDIA_TYPE, "sha256:" + hashlib.sha256(EMPTY).hexdigest(), len(EMPTY)),
        "layers": [_descriptor(RECORD_MEDIA_TYPE, d, n) for d, n in records],
        "subject": _descriptor(OCI_MANIFEST, subject_digest, subject_size),
    }
    return canonical.dumps(doc)


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's fallback tag for ``digest`` (``sha256-<hex>``)."""
    return digest.replace(":", "-")


def add_to_index(index: bytes | None, entry: dict[str, Any]) -> bytes | None:
    """The referrers index with ``entry`` added (None when it is there already)."""
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index is not None:
        try:
            got = json.loads(index)
        except ValueError:
            got = None
        if isinstance(got, dict) and isinstance(got.get("manifests"), list):
            doc = got
    if any(isinstance(m, dict) and m.get("digest") == entry["digest"] for m in doc["manifests"]):
        return None
    doc["manifests"].append(entry)
    return canonical.dumps(doc)


def suite_referrer(suite_ref: str, role: str, m: Manifest, manifest_bytes: bytes, suite_digest: str,
                   subject: tuple[str, int]) -> bytes:
    """The OCI manifest of eval suite ``suite_ref`` (its patchctl manifest ``m``) as a referrer of ``subject``.

    ``patchctl push --to oci://`` and ``patchctl serve`` both answer this, so a suite
    has one OCI digest wherever it is read from.
    """
    return to_oci(suite_ref.partition(":")[0].rsplit("/", 1)[-1], m, manifest_bytes, suite_digest,
                  artifact_type=SUITE_ARTIFACT_TYPE, subject=subject,
                  extra={A_SUITE_REF: suite_ref, A_SUITE_ROLE: role})


def suite_ref_of(tags: list[str], suite_digest: str) -> str:
    """The ref a suite travels under: a tag of it other than ``latest`` when it has one."""
    return next((x for x in tags if not x.endswith(":latest")), tags[0]) if tags else f"suites/{suite_digest[7:19]}:v1"


def referrer_digests(index: bytes, artifact_type: str) -> list[str]:
    """The digests of the referrers of ``artifact_type`` an index (API answer or fallback tag) lists."""
    try:
        doc = json.loads(index)
    except ValueError:
        return []
    out = []
    for m in doc.get("manifests", []) if isinstance(doc, dict) else []:
        if isinstance(m, dict) and m.get("artifactType") == artifact_type and DIGEST_RE.fullmatch(str(m.get("digest"))):
            out.append(str(m["digest"]))
    return out[:64]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)


@dataclass(frozen=True)
class OciManifest:
    """A parsed (and checked) OCI image manifest as a pull sees it."""

    media_type: str
    artifact_type: str | None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    subject: str | None = None

    @property
    def is_patch(self) -> bool:
        return self.artifact_type == ARTIFACT_TYPE or (
            self.config.media_type == CONFIG_MEDIA_TYPE and self.artifact_type != SUITE_ARTIFACT_TYPE)

    def titled(self) -> dict[str, Descriptor]:
        return {d.title: d for d in self.layers if d.title}

    @property
    def is_peft(self) -> bool:
        t = self.titled()
        return "adapter_config.json" in t and ("adapter_model.safetensors" in t or "adapter_model.bin" in t)

    def describe(self) -> str:
        """What this artifact is, in a few words (for the error on an artifact we cannot import)."""
        what = self.artifact_type or self.config.media_type
        if self.config.media_type in ("application/vnd.oci.image.config.v1+json",
                                      "application/vnd.docker.container.image.v1+json") and not self.artifact_type:
            what = "a container image"
        titles = [d.title for d in self.layers if d.title][:5]
        files = f"; files: {', '.join(titles)}" if titles else ""
        return f"{what} ({len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}{files})"


def _desc(d: Any, where: str) -> Descriptor:
    if not isinstance(d, dict):
        raise InvalidPatch(f"{where} is not a descriptor")
    mt, dg, sz, ann = d.get("mediaType"), d.get("digest"), d.get("size"), d.get("annotations") or {}
    if not isinstance(mt, str) or not isinstance(dg, str) or not DIGEST_RE.fullmatch(dg):
        raise InvalidPatch(f"{where}: a descriptor needs a mediaType and a sha256 digest (got {str(dg)[:80]!r})")
    if not isinstance(sz, int) or isinstance(sz, bool) or sz < 0:
        raise InvalidPatch(f"{where}: size must be a non-negative integer")
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise InvalidPatch(f"{where}: annotations must map strings to strings")
    return Descriptor(mt, dg, sz, dict(ann))


def parse_oci_manifest(data: bytes, content_type: str | None, where: str) -> OciManifest:
    """Check an OCI (or Docker v2) image manifest; an index or anything else is refused with what it is."""
    if len(data) > MAX_OCI_MANIFEST_BYTES:
        raise InvalidPatch(f"{where}: the OCI manifest is larger than the {MAX_OCI_MANIFEST_BYTES >> 20} MiB cap; "
                           "refused before fetching any blob")
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidPatch(f"{where}: the OCI manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidPatch(f"{where}: the OCI manifest is not a JSON object")
    mt = doc.get("mediaType") or content_type or ""
    if mt in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
        raise InvalidPatch(f"{where} is an image index (a multi-platform image or a set of manifests), "
                           "neither a patchctl patch nor a PEFT adapter")
    if mt not in (OCI_MANIFEST, DOCKER_MANIFEST) or doc.get("schemaVersion") != 2:
        raise InvalidPatch(f"{where}: unsupported manifest type {mt!r} (schemaVersion {doc.get('schemaVersion')!r})")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidPatch(f"{where}: the OCI manifest has no layers list")
    if len(layers) > MAX_LAYERS:
        raise InvalidPatch(f"{where}: the OCI manifest lists {len(layers)} layers, over the {MAX_LAYERS} cap; "
                           "refused before fetching any blob")
    at = doc.get("artifactType")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise InvalidPatch(f"{where}: annotations must be an object")
    subject = doc.get("subject")
    return OciManifest(mt, at if isinstance(at, str) else None, _desc(doc.get("config"), f"{where} config"),
                       tuple(_desc(d, f"{where} layer {i}") for i, d in enumerate(layers)),
                       {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)},
                       _desc(subject, f"{where} subject").digest if subject is not None else None)


def check_layers(om: OciManifest, m: Manifest, where: str) -> None:
    """Every blob the patchctl manifest names is a layer of the OCI manifest, with the same size."""
    have = {d.digest: d.size for d in om.layers}
    for digest, size in m.blobs():  # tensors, pins and side files
        if have.get(digest) != size:
            raise InvalidPatch(f"{where}: blob {digest} of the patch is not a layer of its OCI manifest "
                               "(or has another size); the artifact is damaged")


__all__ = [
    "ACCEPT",
    "ARTIFACT_TYPE",
    "CONFIG_MEDIA_TYPE",
    "LAYER_MEDIA_TYPE",
    "MAX_LAYERS",
    "MAX_OCI_MANIFEST_BYTES",
    "OCI_MANIFEST",
    "OciManifest",
    "OciRef",
    "check_layers",
    "check_transport",
    "suite_ref_of",
    "suite_referrer",
    "is_loopback",
    "parse_oci",
    "parse_oci_manifest",
    "to_oci",
]
