"""Maintenance of a repository: what is reachable, ``gc`` and ``fsck``.

Only :func:`gc` deletes, and only what no ref (nor, unless asked, its
history) reaches — with the suites and validation records the kept patches
and their bases refer to. :func:`fsck` verifies every object's hash, every
manifest's blobs, every ref and the index; with a ``fetch`` function (the
remote layer's ``repair``, passed in by the facade) it fetches good copies
of what is corrupt or missing and checks again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from patchctl.errors import LogDamaged, NotFound, RegistryError
from patchctl.registry.store import logfile, records
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.index import Index, manifest_row
from patchctl.registry.store.manifest import Manifest
from patchctl.registry.store.repository import Repository

# fetch(repo, remote, blobs, manifests, sizes) -> {"repaired": [...], "failed": [...]}
Fetch = Callable[[Repository, str, list[str], list[str], dict[str, int]], dict[str, list[str]]]


def reachable(repo: Repository, include_history: bool, force: bool = False) -> tuple[set[str], set[str]]:
    """The manifests and blobs that refs (and their logs, with ``include_history``) keep.

    A damaged ref or record log raises :class:`LogDamaged` (what it reaches is
    unknown); ``force`` leaves damaged logs out instead.
    """
    store = repo.store
    manifests: set[str] = set()
    for r in store.iter_refs():
        try:
            log = store.ref_log(r)
        except LogDamaged:
            if force:
                continue
            raise
        for e in log if include_history else []:
            if e.new:
                manifests.add(e.new)
        if log and log[-1].new:
            manifests.add(log[-1].new)
    blobs: set[str] = set()
    fingerprints: set[str] = set()
    subjects = set(manifests)
    for d in list(manifests):
        try:
            m = manifest_mod.parse(store.read_manifest_bytes(d))
        except NotFound:
            manifests.discard(d)
            continue
        blobs.update(m.blob_digests())
        fingerprints.add(m.fingerprint)
    subjects |= {"base:" + f for f in fingerprints}
    # suites and validation records that kept patches (and their bases) refer to
    for subj in subjects:
        try:
            entries = records.read(store, subj)
        except LogDamaged:
            if force:
                continue
            raise
        for e in entries:
            if e.get("type") == "suite" and e["suite"] not in manifests and store.has_manifest(e["suite"]):
                manifests.add(e["suite"])
                blobs.update(manifest_mod.parse(store.read_manifest_bytes(e["suite"])).blob_digests())
            elif isinstance(e.get("record"), str):  # validation, inspect, interference, localize records
                blobs.add(e["record"])
    return manifests, blobs


def gc(repo: Repository, dry_run: bool = False, prune_history: bool = False, force: bool = False) -> dict[str, Any]:
    """Delete manifests and blobs no ref (nor, unless ``prune_history``, its history) reaches.

    Refuses (:class:`LogDamaged`) while a ref or record log is damaged: what a
    damaged line pointed at would be deleted. ``force`` collects anyway,
    leaving the damaged logs out.
    """
    store = repo.store
    with store.exclusive():
        try:
            keep_m, keep_b = reachable(repo, include_history=not prune_history, force=force)
        except LogDamaged as e:
            raise LogDamaged(e.path, e.line, e.why + "; gc refuses to run while a log is damaged "
                             "(`gc --force` collects anyway, losing what only that log kept)") from None
        dead_m = [d for d in store.iter_digests("manifests") if d not in keep_m]
        dead_b = [d for d in store.iter_digests("objects") if d not in keep_b]
        freed = 0
        if not dry_run:
            repo.index.db  # noqa: B018 - import sqlite-utils before deleting (see commit)
            with repo.index_pending():
                for d in dead_m:  # manifests first: a manifest never outlives its blobs
                    freed += store.remove("manifests", d)
                # then their index rows, and any row whose file is already gone (a gc killed before this)
                repo.index.remove_manifests(dead_m + [d for d in repo.index.all_manifest_digests()
                                                      if not store.has_manifest(d)])
            for d in dead_b:
                freed += store.remove("objects", d)
            store.clean_tmp()
        else:
            freed = sum(store.manifest_path(d).stat().st_size for d in dead_m) + sum(
                store.blob_path(d).stat().st_size for d in dead_b)
    return {"manifests": len(dead_m), "blobs": len(dead_b), "bytes": freed, "dry_run": dry_run}


def damaged_logs(repo: Repository) -> list[LogDamaged]:
    """The first damaged line of every ref log and record log (none when all check)."""
    store, out = repo.store, []
    for r in store.iter_refs():
        try:
            store.ref_log(r)
        except LogDamaged as e:
            out.append(e)
    for subj in records.all_subjects(store):
        try:
            records.read(store, subj)
        except LogDamaged as e:
            out.append(e)
    return out


def cut_logs(repo: Repository) -> list[str]:
    """Ref logs that check but end before the index's copy of their history does (cut back by whole lines)."""
    store, out = repo.store, []
    history = repo.index.history_rows()
    for r in store.iter_refs():
        try:
            log = [e.to_json() for e in store.ref_log(r)]
        except LogDamaged:
            continue
        rows = history.get((r.name, r.tag), [])
        if len(rows) > len(log) and all(rows[i]["seq"] == e["seq"] and rows[i]["new"] == e["new"]
                                        for i, e in enumerate(log)):
            out.append(store.relative(store.ref_path(r)))
    return out


def repair_logs(repo: Repository) -> dict[str, list[str]]:
    """Restore damaged ref-log lines from the index's copy of the history, never dropping a line.

    A ref log is rewritten (sealed anew) only when the index holds an entry for
    every line of it and those entries agree with every line that still checks
    (same seq, old, new): then the damaged lines come back as they were
    recorded. Record logs have no second copy here: they are reported, to be
    restored from a backup or a remote. Returns ``repaired`` and ``unrepaired`` files.
    """
    store = repo.store
    history = repo.index.history_rows()
    repaired, unrepaired = [], []
    with store.logs_locked():
        cut = set(cut_logs(repo))
        for path in [e.path for e in damaged_logs(repo)] + sorted(cut):
            if not path.startswith("refs/"):
                unrepaired.append(path)
                continue
            name, _, tag = path[len("refs/"):].rpartition("/@")
            rows = history.get((name, tag), [])
            raw = (store.root / path).read_bytes()
            lines = [ln for ln in raw.split(b"\n")[:-1]]
            good = _readable_lines(lines)
            entries = [{k: r[k] for k in ("message", "new", "old", "seq", "time", "user")} for r in rows]
            agrees = (len(entries) > len(lines) if path in cut else len(entries) == len(lines)) and all(
                entries[i].get(k) == g.get(k) for i, g in good.items() for k in ("seq", "old", "new"))
            if not agrees:
                unrepaired.append(path)
                continue
            logfile.rewrite(store.root / path, entries, store.root / "tmp")
            repaired.append(path)
    return {"repaired": repaired, "unrepaired": unrepaired}


def _readable_lines(lines: list[bytes]) -> dict[int, dict[str, Any]]:
    """The lines (by index) that still parse as JSON objects (their checks aside)."""
    import json

    out = {}
    for i, line in enumerate(lines):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out[i] = e
    return out


def fsck(repo: Repository, rebuild_index: bool = False, repair: str | None = None,
         fetch: Fetch | None = None) -> dict[str, Any]:
    """Verify every object's hash, every manifest's blobs, every ref, and the index.

    ``repair``: a remote (name, folder or URL) that ``fetch`` takes good copies of
    corrupt or missing objects from; the check is then run again and its result
    returned, with ``repaired`` / ``unrepaired`` digests.
    """
    store = repo.store
    problems: list[str] = []
    corrupt_blobs: list[str] = []
    corrupt_manifests: list[str] = []
    blobs = set()
    digests = list(store.iter_digests("objects"))
    from patchctl.registry.store.hashing import sha256_files

    hashed = sha256_files([store.blob_path(d) for d in digests])  # two at a time on SHA-NI, on threads
    for d, got in zip(digests, hashed, strict=True):
        if got != d:
            corrupt_blobs.append(d)
            problems.append(f"blob {d}: content does not match its digest")
        else:
            blobs.add(d)
    manifests: dict[str, Manifest] = {}
    for d in store.iter_digests("manifests"):
        try:
            manifests[d] = manifest_mod.parse(store.read_manifest_bytes(d))
        except Exception as e:  # noqa: BLE001 - report, keep going
            corrupt_manifests.append(d)
            problems.append(f"manifest {d}: {e}")
    for d, m in manifests.items():
        for b in m.blob_digests():
            if b not in blobs and b not in corrupt_blobs:
                problems.append(f"manifest {d}: blob {b} is missing")
    damaged = damaged_logs(repo)
    problems += [str(e) for e in damaged]
    bad_logs = {e.path for e in damaged}
    for r in store.iter_refs():
        if store.relative(store.ref_path(r)) in bad_logs:
            continue
        t = store.ref_target(r)
        if t is not None and t not in manifests:
            problems.append(f"ref {r}: points at {t}, which is {'corrupt' if t in corrupt_manifests else 'missing'}")
    problems += [f"{kind} {p}: a symlink (the store never follows links; remove it)" for kind, p in store.symlinks()]
    if repair is not None:
        if fetch is None:
            raise ValueError("fsck(repair=...) needs a fetch function")
        with store.writing():
            # manifests first: a repaired manifest tells the sizes (and names) of its blobs
            fixed = fetch(repo, repair, [], corrupt_manifests, {})
            for d in fixed["repaired"]:
                manifests[d] = manifest_mod.parse(store.read_manifest_bytes(d))
            sizes = {d: n for m in manifests.values() for d, n in m.blobs()}
            missing = sorted({b for m in manifests.values() for b in m.blob_digests()} - blobs - set(corrupt_blobs))
            more = fetch(repo, repair, corrupt_blobs + missing, [], sizes)
        again = fsck(repo, rebuild_index=True)
        return {**again, "repaired": fixed["repaired"] + more["repaired"],
                "unrepaired": fixed["failed"] + more["failed"]}
    stray = [p.name for p in (store.root / "tmp").iterdir()]
    rebuilt, index_problems = None, []
    if not rebuild_index:
        index_problems = _index_problems(repo, manifests)
    cut = cut_logs(repo)
    problems += [f"{p}: the index knows later moves than the log holds (was it cut back?); "
                 "`patchctl fsck --repair-logs` restores them" for p in cut]
    if damaged or cut:
        # the index still holds the logs' history (`fsck --repair-logs` restores from it): keep it
        problems += [f"{p} (kept until the logs are repaired)" for p in index_problems]
    elif rebuild_index or index_problems:
        # the index is a cache of the files: a row that differs from them is rebuilt, never believed
        problems += [f"{p}; rebuilt from the files" for p in index_problems]
        rebuilt = repo.rebuild_index()
    return {
        "ok": not problems,
        "problems": problems,
        "corrupt_blobs": corrupt_blobs,
        "corrupt_manifests": corrupt_manifests,
        "blobs": len(blobs) + len(corrupt_blobs),
        "manifests": len(manifests) + len(corrupt_manifests),
        "tmp_files": len(stray),
        "rebuilt": rebuilt,
        "index_mismatches": index_problems,
        "damaged_logs": sorted(bad_logs | set(cut)),
    }


def _index_damage(repo: Repository) -> list[str]:
    """SQLite's own check of the index file (a flipped bit in a page, which a query may never see: an index
    b-tree that disagrees with its table). A damaged file is set aside (:func:`_set_index_aside`)."""
    try:
        got = [r[0] for r in repo.index.conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        if type(e) is not sqlite3.DatabaseError:  # OperationalError ("locked"...) is not damage
            raise
        got = [str(e)]
    return [] if got == ["ok"] else _set_index_aside(repo, got[0])


def _set_index_aside(repo: Repository, why: str) -> list[str]:
    """Move the damaged index into ``tmp/`` and open a fresh one, for fsck to rebuild from the files."""
    repo.index.close()
    for p in repo.path.glob("index.sqlite*"):
        with contextlib.suppress(OSError):
            p.replace(repo.path / "tmp" / f"{p.name}.damaged-{os.getpid()}")
    repo.index = Index(repo.path / "index.sqlite")
    return [f"index: index.sqlite is damaged ({why}); set aside into tmp/"]


def _index_problems(repo: Repository, manifests: dict[str, Manifest]) -> list[str]:
    """How the index differs from the files: SQLite's check, refs, history, and every manifest row's contents."""
    damage = _index_damage(repo)
    try:
        return damage + _index_differences(repo, manifests)
    except RegistryError as e:  # a row SQLite accepts but cannot give back (a flipped bit in its text)
        return _set_index_aside(repo, f"a row cannot be read back: {type(e).__name__}")


def _index_differences(repo: Repository, manifests: dict[str, Manifest]) -> list[str]:
    store, out = repo.store, []
    file_refs: dict[tuple[str, str], str] = {}
    file_history: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in store.iter_refs():
        try:
            log = store.ref_log(r)
        except LogDamaged:
            continue
        if log:
            file_history[(r.name, r.tag)] = [e.to_json() for e in log]
            if log[-1].new is not None:
                file_refs[(r.name, r.tag)] = log[-1].new
    if repo.index.all_refs() != file_refs:
        out.append("index: refs differ from the ref files")
    if repo.index.history_rows() != file_history:
        out.append("index: ref history differs from the ref logs")
    rows = repo.index.manifest_rows()
    if set(rows) != set(manifests):
        out.append("index: manifests differ from the files")
    bad = sorted(d for d, m in manifests.items() if d in rows and rows[d] != manifest_row(d, m))
    if bad:
        out.append(f"index: {len(bad)} manifest row(s) differ from their files, e.g. {bad[0]}")
    return out


__all__ = ["Fetch", "fsck", "gc", "reachable"]
