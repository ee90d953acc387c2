"""Records about patches that are not part of them: attached eval suites and validations.

Manifests are immutable, so what is learned about a patch later lives beside
it, in an append-only log per subject::

    records/<64 hex of the patch digest>.jsonl        a patch's records
    records/base-<64 hex of a base fingerprint>.jsonl a base's records

Each line is canonical JSON with its checksum chain (:mod:`.logfile`), one of:

- ``{"type": "suite", "role": "target" | "control", "suite": "sha256:…"}`` —
  the subject declares an eval suite (``control``: a base's general-ability
  suite, used to measure forgetting);
- ``{"type": "validation", "record": "sha256:…"}`` — a validation record,
  itself a canonical-JSON blob in ``objects/`` (suite digest, composition,
  device, dtype, batch size, metrics, wall time, verdict).

Like ref logs, the files are the truth and the index is rebuilt from them; gc
keeps the suites and records that a kept patch's log reaches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import InvalidArgument, NotFound
from patchctl.registry.formats import canonical
from patchctl.registry.store import logfile
from patchctl.registry.store.names import check_digest

if TYPE_CHECKING:
    from patchctl.registry.store.folder import Store


def subject_path(store: Store, subject: str) -> Path:
    """``subject`` is a patch digest or ``base:<fingerprint>``."""
    if subject.startswith("base:"):
        return store.no_links(store.root / "records" / f"base-{check_digest(subject[5:])[7:]}.jsonl")
    return store.no_links(store.root / "records" / f"{check_digest(subject)[7:]}.jsonl")


def read(store: Store, subject: str) -> list[dict[str, Any]]:
    """The subject's records, oldest first; :class:`~patchctl.errors.LogDamaged` when a line was altered."""
    p = subject_path(store, subject)
    return logfile.read(p, store.relative(p))


def append(store: Store, subject: str, entry: dict[str, Any]) -> None:
    p = subject_path(store, subject)
    p.parent.mkdir(exist_ok=True)
    store.append_entry(p, entry)


def attach(store: Store, subject: str, suite: str, role: str = "target") -> bool:
    """Declare ``suite`` for ``subject``; False when it was already declared."""
    if role not in ("target", "control"):
        raise InvalidArgument(f"role must be target or control, got {role!r}")
    if not store.has_manifest(suite):
        raise NotFound(f"suite {suite} is not in the registry")
    entry = {"type": "suite", "role": role, "suite": suite}
    if entry in read(store, subject):
        return False
    append(store, subject, entry)
    return True


def suites(store: Store, subject: str, role: str | None = None) -> list[str]:
    return [e["suite"] for e in read(store, subject)
            if e.get("type") == "suite" and (role is None or e.get("role") == role)]


def add_validation(store: Store, subject: str, record: dict[str, Any]) -> str:
    digest = store.put_blob(canonical.dumps(record))
    append(store, subject, {"type": "validation", "record": digest})
    return digest


def validations(store: Store, subject: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for e in read(store, subject):
        if e.get("type") == "validation":
            try:
                out.append((e["record"], json.loads(bytes(store.read_blob(e["record"])))))
            except NotFound:
                continue
    return out


def all_subjects(store: Store) -> list[str]:
    root = store.root / "records"
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.glob("*.jsonl")):
        stem = p.stem
        if stem.startswith("base-"):
            out.append("base:sha256:" + stem[5:])
        else:
            out.append("sha256:" + stem)
    return out
