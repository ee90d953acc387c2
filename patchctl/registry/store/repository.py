"""The :class:`Repository`: the plumbing every operation works on.

One object owns a registry folder's store, its SQLite index and the moves of
its refs (restic's ``internal/repository``, git's plumbing): open (and repair)
the index, resolve a reference, read a manifest or a view, store a tensor,
commit a manifest, move a ref, and remember where bases live on this machine.
The operations in :mod:`patchctl.registry.ops` and :mod:`patchctl.registry.remote`
take a ``Repository``; :class:`patchctl.registry.registry.Registry` — one
short method per CLI verb — is a ``Repository`` too, and nothing here calls
back up into it.

>>> import tempfile
>>> repo = Repository(tempfile.mkdtemp() + "/reg")
>>> repo.index.refs()
[]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import BaseMismatch, InvalidReference, LogDamaged, NotFound
from patchctl.registry.formats.safetensors import dtype_name, tensor_to_bytes
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.folder import Store
from patchctl.registry.store.index import Index
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import Ref, is_digest, parse_ref
from patchctl.registry.store.views import PatchView

if TYPE_CHECKING:
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.views import PatchView

Progress = Callable[[int, int], None] | None


class Repository:
    """A registry folder (default ``$PATCHCTL_HOME``, else ``~/.patchctl``) and its index.

    Opening a path that does not exist creates an empty registry there
    (unless ``create`` is false).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, create: bool = True):
        self.store = Store.open(path, create=create)
        self.path = self.store.root
        index_path = self.path / "index.sqlite"
        fresh = not index_path.exists()
        try:
            self.index = Index(index_path)
        except sqlite3.DatabaseError as e:  # "not a database", "malformed": set the cache aside, rebuild it
            if type(e) is not sqlite3.DatabaseError:  # OperationalError ("locked"...) is not damage
                raise
            for p in self.path.glob("index.sqlite*"):
                with contextlib.suppress(OSError):
                    p.replace(self.path / "tmp" / f"{p.name}.damaged-{os.getpid()}")
            self.index, fresh = Index(index_path), True
        if (fresh and any(self.store.iter_refs())) or self._orphaned_markers():
            self.rebuild_index()
            for marker in self._orphaned_markers():
                marker.unlink(missing_ok=True)

    # -- keeping the index in step with the files ------------------------------------
    # A writer changes files first and the index second; a process killed in between
    # leaves the index behind. While it is in that window it holds a marker file
    # tmp/index-pending-<pid>-<n>; a marker whose process is gone means "rebuild".
    _marker_seq = 0

    @contextlib.contextmanager
    def index_pending(self) -> Iterator[None]:
        """Mark the window between a file write and its index update (kept on error)."""
        Repository._marker_seq += 1
        marker = self.path / "tmp" / f"index-pending-{os.getpid()}-{Repository._marker_seq}"
        marker.touch()
        yield
        marker.unlink(missing_ok=True)

    def _orphaned_markers(self) -> list[Path]:
        out = []
        for marker in (self.path / "tmp").glob("index-pending-*"):
            try:
                pid = int(marker.name.split("-")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                out.append(marker)
            except (ValueError, IndexError, PermissionError):
                continue
        return out

    def rebuild_index(self) -> dict[str, int]:
        """Rebuild the SQLite index from the manifest and ref files (the index is a cache)."""
        manifests = []
        for d in self.store.iter_digests("manifests"):
            try:
                manifests.append((d, manifest_mod.parse(self.store.read_manifest_bytes(d))))
            except Exception:  # noqa: BLE001 - fsck reports corrupt manifests; skip them here
                continue
        refs = []
        for r in self.store.iter_refs():
            try:
                refs.append((r, self.store.ref_log(r)))
            except LogDamaged:  # fsck reports it; the index leaves the damaged ref out
                continue
        return self.index.rebuild(manifests, refs)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- resolving ---------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The manifest digest that ``name:tag``, a digest or a unique digest prefix names."""
        if is_digest(ref):
            if not self.store.has_manifest(ref):
                raise NotFound(f"no patch with digest {ref}")
            return ref
        if ref.startswith("sha256:"):
            if not re.fullmatch(r"sha256:[0-9a-f]{4,63}", ref):
                raise InvalidReference(f"invalid digest {ref!r}")
            hits = self.index.digests_with_prefix(ref)
            if len(hits) != 1:
                raise NotFound(f"{'no' if not hits else 'more than one'} patch matches {ref}")
            return hits[0]
        r = parse_ref(ref)
        digest = self.store.ref_target(r)
        if digest is None:
            raise NotFound(f"no patch named {r}; `patchctl ls` lists them")
        return digest

    def manifest(self, ref: str) -> Manifest:
        digest = self.resolve(ref)
        return manifest_mod.parse(self.store.read_manifest_bytes(digest))

    def view(self, ref: str) -> PatchView:

        return PatchView(self.store, self.manifest(ref))

    # -- writing ---------------------------------------------------------------
    def put_tensor(self, t: Any, pins: Any = None) -> TensorEntry:
        """Store one tensor (and its exactness pins) as blobs; its manifest entry."""

        data = tensor_to_bytes(t)
        digest = self.store.put_blob(data)
        pin_meta = None
        if pins is not None:
            from patchctl.patches.apply import encode_pins

            pdata = encode_pins(*pins)
            pin_meta = {"digest": self.store.put_blob(pdata), "count": int(pins[0].numel()), "size": len(pdata)}
        return TensorEntry(digest, dtype_name(t.dtype), tuple(t.shape), "raw", len(data), pin_meta)

    def commit(self, m: Manifest, ref: str | None = None, message: str = "", move_latest: bool = True) -> str:
        """Store a manifest (its blobs must exist) and point ``ref`` (and ``name:latest``) at it."""
        self.index.db  # noqa: B018 - import sqlite-utils now: less time between file and index writes
        with self.index_pending():
            digest = self.store.put_manifest(m.to_bytes(), m.blob_digests())
            self.index.add_manifest(digest, m)
        if ref is not None:
            self.move_ref(ref, digest, message, move_latest=move_latest)
        return digest

    def move_ref(self, ref: str | Ref, digest: str | None, message: str, *, move_latest: bool = False) -> None:
        """Point ``ref`` at ``digest`` (None deletes it), in its log and then the index.

        ``move_latest`` also moves ``name:latest`` (when ``ref`` is another tag).
        """
        r = ref if isinstance(ref, Ref) else parse_ref(ref)
        with self.index_pending():
            entry = self.store.move_ref(r, digest, message)
            if entry is not None:
                self.index.record_ref(r, entry)
            else:
                self.resync_ref(r)
        if move_latest and r.tag != "latest":
            self.move_ref(Ref(r.name, "latest"), digest, message)

    def resync_ref(self, r: Ref) -> None:
        """Catch the index up with a ref's log: a command killed between the two leaves it behind."""
        log = self.store.ref_log(r)
        if log and self.index.ref(r) != log[-1].new:
            self.index.record_ref(r, log[-1])

    # -- bases ---------------------------------------------------------------------
    def check_base(self, m: Manifest, base: Checkpoint) -> None:
        """Refuse ``base`` unless its fingerprint is the one ``m`` was made for."""
        fp = base.fingerprint()
        if fp != m.fingerprint:
            raise BaseMismatch(
                f"the patch was made for base {m.base.get('name') or '?'} ({m.fingerprint[:19]}…), but "
                f"{base.path} has fingerprint {fp[:19]}…; use the right base or `patchctl port` the patch"
            )

    def remember_base(self, fingerprint: str, path: str | os.PathLike[str]) -> None:
        """Record where base ``fingerprint`` lives locally (``bases.json``; not part of any patch)."""
        f = self.path / "bases.json"
        try:
            known = json.loads(f.read_text()) if f.is_file() else {}
        except ValueError:
            known = {}
        p = str(Path(path).expanduser().resolve())
        if known.get(fingerprint) == p:
            return
        known[fingerprint] = p
        tmp = self.path / "tmp" / f"bases.json.{os.getpid()}"
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, f)

    def base_path(self, fingerprint: str) -> Path | None:
        """The local folder of a base seen before (by push or eval push), if it still exists."""
        f = self.path / "bases.json"
        try:
            p = json.loads(f.read_text()).get(fingerprint) if f.is_file() else None
        except ValueError:
            return None
        return Path(p) if p and Path(p).is_dir() else None


__all__ = ["Progress", "Repository"]
