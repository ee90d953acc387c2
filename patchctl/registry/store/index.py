"""The SQLite metadata index (sqlite-utils, WAL): a cache of manifests and refs.

It answers ``ls``, ``show`` and ``log`` without reading every manifest. It
holds nothing that the files do not: :meth:`Index.rebuild` recreates it from
``manifests/`` and ``refs/`` alone. Reads use the plain ``sqlite3`` connection;
sqlite-utils (which costs ~0.2 s to import) is loaded only to write.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from patchctl.errors import RegistryError
from patchctl.registry.store.folder import RefEntry
from patchctl.registry.store.manifest import Manifest
from patchctl.registry.store.names import Ref

INDEX_VERSION = 1


def manifest_row(digest: str, m: Manifest) -> dict[str, Any]:
    """The index row of manifest ``digest`` (derived from the file: the file is the truth)."""
    return {
        "digest": digest, "kind": m.kind, "base_name": m.base.get("name"),
        "base_revision": m.base.get("revision"), "base_fingerprint": m.fingerprint,
        "tensors": len(m.tensors), "params": m.num_params, "stored_bytes": m.stored_bytes,
        "parents": json.dumps(list(m.parents)), "op": (m.recipe or {}).get("op"),
        "json": m.to_bytes().decode(),
    }


class Index:
    def __init__(self, path: Path):
        self.path = path
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        self.conn = conn
        self._db: Any = None
        self._ensure_schema()

    @property
    def db(self) -> Any:
        """The sqlite-utils Database over the same connection (imported on first write)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self.conn.execute(sql, params or [])]
        except sqlite3.DatabaseError as e:  # "malformed": a damaged page; "could not decode": a flipped bit in text
            if type(e) is not sqlite3.DatabaseError and "Could not decode" not in str(e):
                raise  # OperationalError ("locked"...) is not damage
            raise RegistryError(f"{self.path.name} (the index, a cache of the files) is damaged ({e}); "
                                "`patchctl fsck` sets it aside and rebuilds it") from None

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction (the connection is in autocommit mode otherwise)."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _ensure_schema(self) -> None:
        if self._query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'manifests'"):
            return
        db = self.db
        with self._tx():
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["manifests"].create(
                {"digest": str, "kind": str, "base_name": str, "base_revision": str,
                 "base_fingerprint": str, "tensors": int, "params": int, "stored_bytes": int,
                 "parents": str, "op": str, "json": str},
                pk="digest", if_not_exists=True,
            )
            db["refs"].create(
                {"name": str, "tag": str, "digest": str, "updated": str}, pk=("name", "tag"), if_not_exists=True
            )
            db["ref_history"].create(
                {"name": str, "tag": str, "seq": int, "old": str, "new": str, "time": str,
                 "message": str, "user": str},
                pk=("name", "tag", "seq"), if_not_exists=True,
            )
            db["meta"].upsert({"key": "version", "value": str(INDEX_VERSION)}, pk="key")

    # -- writes ----------------------------------------------------------------
    def add_manifest(self, digest: str, m: Manifest) -> None:
        with self._tx():
            self._add_manifest(digest, m)

    def _add_manifest(self, digest: str, m: Manifest) -> None:
        self.db["manifests"].upsert(manifest_row(digest, m), pk="digest")

    def record_ref(self, ref: Ref, entry: RefEntry) -> None:
        with self._tx():
            self._record_ref(ref, entry)

    def _record_ref(self, ref: Ref, entry: RefEntry) -> None:
        # plain SQL, not sqlite-utils: `tag` and `rm` stay clear of its import (and numpy's)
        e = entry.to_json()
        self.conn.execute(
            "INSERT OR REPLACE INTO ref_history (name, tag, seq, old, new, time, message, user) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [ref.name, ref.tag, e["seq"], e["old"], e["new"], e["time"], e["message"], e["user"]])
        # writers update the index after the log's lock is released: one that appended earlier may get here
        # after one that appended later, so the refs row follows the highest seq, not the last to arrive
        top = self.conn.execute("SELECT max(seq) FROM ref_history WHERE name = ? AND tag = ?",
                                [ref.name, ref.tag]).fetchone()[0]
        if top is not None and e["seq"] < top:
            return
        if entry.new is None:
            self.conn.execute("DELETE FROM refs WHERE name = ? AND tag = ?", [ref.name, ref.tag])
        else:
            self.conn.execute("INSERT OR REPLACE INTO refs (name, tag, digest, updated) VALUES (?, ?, ?, ?)",
                              [ref.name, ref.tag, entry.new, entry.time])

    def remove_manifests(self, digests: Iterable[str]) -> None:
        with self._tx():
            for d in digests:
                self.db.execute("DELETE FROM manifests WHERE digest = ?", [d])

    def rebuild(self, manifests: Iterable[tuple[str, Manifest]], refs: Iterable[tuple[Ref, list[RefEntry]]]) -> dict[str, int]:
        counts = {"manifests": 0, "refs": 0, "history": 0}
        with self._tx():
            for t in ("manifests", "refs", "ref_history"):
                self.db.execute(f"DELETE FROM {t}")
            for digest, m in manifests:
                self._add_manifest(digest, m)
                counts["manifests"] += 1
            for ref, log in refs:
                for e in log:
                    self._record_ref(ref, e)
                    counts["history"] += 1
                if log and log[-1].new is not None:
                    counts["refs"] += 1
            self.db["meta"].upsert({"key": "rebuilt", "value": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, pk="key")
        return counts

    # -- reads -----------------------------------------------------------------
    def refs(self) -> list[dict[str, Any]]:
        return self._query(
            "SELECT r.name, r.tag, r.digest, r.updated, m.kind, m.base_name, m.tensors, m.params, "
            "m.stored_bytes, m.op FROM refs r LEFT JOIN manifests m ON m.digest = r.digest "
            "ORDER BY r.name, r.tag"
        )

    def ref(self, ref: Ref) -> str | None:
        rows = self._query("SELECT digest FROM refs WHERE name = ? AND tag = ?", [ref.name, ref.tag])
        return rows[0]["digest"] if rows else None

    def tags_of(self, digest: str) -> list[str]:
        return [f"{r['name']}:{r['tag']}" for r in self._query(
            "SELECT name, tag FROM refs WHERE digest = ? ORDER BY name, tag", [digest])]

    def history(self, ref: Ref) -> list[dict[str, Any]]:
        return self._query(
            "SELECT seq, old, new, time, message, user FROM ref_history WHERE name = ? AND tag = ? ORDER BY seq",
            [ref.name, ref.tag])

    def manifest_json(self, digest: str) -> str | None:
        rows = self._query("SELECT json FROM manifests WHERE digest = ?", [digest])
        return rows[0]["json"] if rows else None

    def digests_with_prefix(self, prefix: str) -> list[str]:
        return [r["digest"] for r in self._query(
            "SELECT digest FROM manifests WHERE digest LIKE ? LIMIT 3", [prefix + "%"])]

    def all_manifest_digests(self) -> set[str]:
        return {r["digest"] for r in self._query("SELECT digest FROM manifests")}

    def all_refs(self) -> dict[tuple[str, str], str]:
        return {(r["name"], r["tag"]): r["digest"] for r in self._query("SELECT name, tag, digest FROM refs")}

    def history_count(self) -> int:
        return int(self._query("SELECT count(*) AS n FROM ref_history")[0]["n"])

    def manifest_rows(self) -> dict[str, dict[str, Any]]:
        """Every manifest row, by digest (fsck compares them with the files)."""
        return {r["digest"]: r for r in self._query("SELECT * FROM manifests")}

    def history_rows(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every ref's history rows, by (name, tag), in seq order."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in self._query("SELECT * FROM ref_history ORDER BY name, tag, seq"):
            out.setdefault((r.pop("name"), r.pop("tag")), []).append(r)
        return out

    # -- reads for the registry browser (patchctl/server/pages.py) ---------------------
    def browse_refs(self) -> list[dict[str, Any]]:
        """Every ref with its manifest's columns and ``created``: when this ``name:tag`` first
        pointed at its current digest (one query; no manifest is read)."""
        return self._query(
            "SELECT r.name, r.tag, r.digest, r.updated, m.kind, m.base_name, m.base_revision, "
            "m.base_fingerprint, m.tensors, m.params, m.stored_bytes, m.op, "
            "(SELECT min(h.time) FROM ref_history h WHERE h.name = r.name AND h.tag = r.tag "
            " AND h.new = r.digest) AS created "
            "FROM refs r LEFT JOIN manifests m ON m.digest = r.digest ORDER BY r.name, r.tag"
        )

    def children_of(self, digest: str) -> list[dict[str, Any]]:
        """Manifests that list ``digest`` among their parents: digest, kind, op and JSON."""
        rows = self._query("SELECT digest, kind, op, parents, json FROM manifests WHERE parents LIKE ? "
                           "ORDER BY digest", ["%" + digest + "%"])
        return [r for r in rows if digest in json.loads(r.pop("parents") or "[]")]

    def manifest_row(self, digest: str) -> dict[str, Any] | None:
        """The index's columns of one manifest (no JSON), or None."""
        rows = self._query("SELECT digest, kind, base_name, base_revision, base_fingerprint, tensors, params, "
                           "stored_bytes, op FROM manifests WHERE digest = ?", [digest])
        return rows[0] if rows else None

    def ref_message(self, name: str, tag: str, digest: str) -> str | None:
        """The message of the ref move that pointed ``name:tag`` at ``digest`` last."""
        rows = self._query("SELECT message FROM ref_history WHERE name = ? AND tag = ? AND new = ? "
                           "ORDER BY seq DESC LIMIT 1", [name, tag, digest])
        return rows[0]["message"] if rows else None

    # -- reads for `patchctl serve` (/v2/_catalog and /v2/<name>/tags/list) -------------
    def names_page(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Names with at least one tag, sorted, those after ``after`` only, at most ``limit`` (one query
        over the ``refs`` primary key; no ref log is read)."""
        return [r["name"] for r in self._query(
            "SELECT DISTINCT name FROM refs WHERE name > ? ORDER BY name LIMIT ?",
            ["" if after is None else after, -1 if limit is None else limit])]

    def tags_page(self, name: str, after: str | None = None, limit: int | None = None) -> list[str]:
        """The tags of ``name``, sorted, those after ``after`` only, at most ``limit``."""
        return [r["tag"] for r in self._query(
            "SELECT tag FROM refs WHERE name = ? AND tag > ? ORDER BY tag LIMIT ?",
            [name, "" if after is None else after, -1 if limit is None else limit])]
