"""The shared tail of every derived patch (compress, merge, port).

A derived patch is committed without a ref first; then :func:`finish`
attaches the eval suites it is judged by, validates it (or records why it was
not validated), applies the gate, and only then moves its ref — so a patch
that failed its gate is kept (``gc`` may collect it) but never named. The
caller holds the store's writing lock across all of it, so a concurrent
``gc`` cannot collect the not yet referenced patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from patchctl.registry.store import records
from patchctl.registry.store.repository import Repository


def unvalidated(kind: str, reason: str, **fields: Any) -> dict[str, Any]:
    """The record of a derived patch that was not validated, and why."""
    return {"type": kind, **fields, "verdict": "unvalidated", "reason": reason, "rows": []}


def finish(
    repo: Repository,
    digest: str,
    ref: str | None,
    *,
    suites: Sequence[str],
    validate: Callable[[], dict[str, Any]] | None,
    otherwise: dict[str, Any] | None,
    message: str,
    move_latest: bool,
    lost: Callable[[dict[str, Any] | None], str | None] | None = None,
    force: bool = False,
) -> tuple[dict[str, Any] | None, str | None]:
    """Attach ``suites`` to ``digest``; run ``validate`` (else store ``otherwise``, an
    :func:`unvalidated` record, when given); then move ``ref`` (and ``NAME:latest``
    with ``move_latest``) — unless the verdict is ``fail`` or ``lost(validation)``
    says the patch lost most of its update, and ``force`` is not set.

    Returns ``(validation, held)``: ``held`` is None when the ref moved, else
    why it did not (the patch is kept under its digest; ``gc`` may collect it).
    """
    for sd in suites:
        records.attach(repo.store, digest, sd, "target")
    validation: dict[str, Any] | None
    if validate is not None:
        validation = validate()
    elif otherwise is not None:
        validation = dict(otherwise)
        validation["record"] = records.add_validation(repo.store, digest, validation)
    else:
        validation = None
    held: str | None = None
    if validation is not None and validation["verdict"] == "fail":
        held = "its validation failed the gate"
    elif lost is not None:
        held = lost(validation)
    if ref is None:
        return validation, held or "no ref was asked for"
    if held is not None and not force:
        return validation, held
    repo.move_ref(ref, digest, message, move_latest=move_latest)
    return validation, None


__all__ = ["finish", "unvalidated"]
