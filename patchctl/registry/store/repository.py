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
        """Mark the window between a file write and its index update (kept on error: :meth:`close`, or
        the next open once this process is gone, rebuilds the index and removes it)."""
        Repository._marker_seq += 1
        marker = self.path / "tmp" / f"index-pending-{os.getpid()}-{Repository._marker_seq}"
        marker.touch()
        try:
            yield
        except BaseException:
            self._kept_markers = [*getattr(self, "_kept_markers", []), marker]
            raise
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
        kept = getattr(self, "_kept_markers", [])
        if kept:  # an error inside index_pending(): the index may be behind the files; catch it up, drop the marker
            with contextlib.suppress(Exception):
                self.rebuild_index()
                for marker in kept:
                    marker.unlink(missing_ok=True)
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
        digest = self.store.put_blob(data, direct=len(data) >= 1 << 20)  # large: around the page cache
        pin_meta = None
        host = isinstance(t.dtype, str)  # a patches.host.HostTensor (push without torch), pins as numpy arrays
        if pins is not None:
            if host:
                from patchctl.patches.host import encode_pins
            else:
                from patchctl.patches.apply import encode_pins

            pdata = encode_pins(*pins)
            count = int(pins[0].size) if host else int(pins[0].numel())
            pin_meta = {"digest": self.store.put_blob(pdata), "count": count, "size": len(pdata)}
        dtype = t.dtype if host else dtype_name(t.dtype)
        entry = TensorEntry(digest, dtype, tuple(t.shape), "raw", len(data), pin_meta)
        if host:
            del data
            t.release()  # a pooled buffer (push's delta) is free for the next tensor once stored
        return entry

    @contextlib.contextmanager
    def tensor_writer(self, depth: int = 3) -> Iterator[TensorSink]:
        """Store tensors on a writer thread while the caller makes the next ones (see :class:`TensorSink`)."""
        sink = TensorSink(self, depth)
        try:
            yield sink
            sink.finish()
        finally:
            sink.close()

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
        refs = [r, Ref(r.name, "latest")] if move_latest and r.tag != "latest" else [r]
        with self.index_pending():
            for one, entry in zip(refs, self.store.move_refs(refs, digest, message), strict=True):  # both at once
                if entry is not None:
                    self.index.record_ref(one, entry)
                else:
                    self.resync_ref(one)

    def resync_ref(self, r: Ref) -> None:
        """Catch the index up with a ref's log: a command killed between the two leaves it behind."""
        log = self.store.ref_log(r)
        if log and self.index.ref(r) != log[-1].new:
            self.index.record_ref(r, log[-1])

    # -- bases ---------------------------------------------------------------------
    def check_base(self, m: Manifest, base: Checkpoint) -> None:
        """Refuse ``base`` unless it is the one ``m`` was made for: the sampled fingerprint first
        (cheap), then, when ``m`` records one, the full content digest (cached by file)."""
        fp = base.fingerprint()
        if fp != m.fingerprint:
            raise BaseMismatch(
                f"the patch was made for base {m.base.get('name') or '?'} ({m.fingerprint[:19]}…), but "
                f"{base.path} has fingerprint {fp[:19]}…; use the right base or `patchctl port` the patch"
            )
        self.check_content(m, base)

    def check_content(self, m: Manifest, base: Checkpoint) -> None:
        """Refuse ``base`` when ``m`` records a content digest and ``base``'s bytes differ (tensors named)."""
        want = m.base.get("content")
        if not want:
            return  # made before content digests: the fingerprint is all there is
        from patchctl.registry.formats.content import content_digest, differing

        cache = self.path / "cache"
        have = content_digest(base, cache)
        if have != want:
            names = differing(want, base, cache)
            where = (f"tensor{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names[:3])}"
                     f"{f' and {len(names) - 3} more' if len(names) > 3 else ''}" if names
                     else f"content {have[:19]}… (the patch's base: {want[:19]}…)")
            raise BaseMismatch(
                f"{base.path} is not the base the patch was made for ({m.base.get('name') or '?'}): same names, "
                f"shapes and sampled bytes, but it differs in {where}; use the exact base or `patchctl port` the patch"
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

    def known_bases(self) -> list[Path]:
        """The local folders of the bases seen before that still exist (newest entry last)."""
        f = self.path / "bases.json"
        try:
            known = json.loads(f.read_text()) if f.is_file() else {}
        except ValueError:
            return []
        return [Path(p) for p in known.values() if isinstance(p, str) and Path(p).is_dir()]

    def base_path(self, fingerprint: str) -> Path | None:
        """The local folder of a base seen before (by push or eval push), if it still exists."""
        f = self.path / "bases.json"
        try:
            p = json.loads(f.read_text()).get(fingerprint) if f.is_file() else None
        except ValueError:
            return None
        return Path(p) if p and Path(p).is_dir() else None


class TensorSink:
    """``sink(name, tensor, pins)`` stores the tensor with :meth:`Repository.put_tensor` on writer threads.

    Hashing, writing and fsyncing release the GIL, so they overlap with the
    caller's reading and arithmetic; two writers, so that one blob's hash and
    write overlap with the previous blob's fsync (which waits on the device).
    At most ``depth`` tensors wait or are being written (the caller blocks on
    the oldest beyond that): memory stays a few tensors. The tensors must not change after they are handed over. A failed
    write raises in the caller at its next call or at :meth:`finish`;
    :attr:`entries` holds the manifest entries once :meth:`finish` returns.
    """

    WRITERS = 2

    def __init__(self, repo: Repository, depth: int = 3):
        from concurrent.futures import ThreadPoolExecutor

        self.repo, self.depth = repo, max(1, depth)
        self.pool = ThreadPoolExecutor(self.WRITERS, thread_name_prefix="patchctl-put")
        self.pending: list[tuple[str, Any]] = []
        self.entries: dict[str, TensorEntry] = {}

    def __call__(self, name: str, t: Any, pins: Any = None) -> None:
        while len(self.pending) >= self.depth:
            self._collect_oldest()
        self.pending.append((name, self.pool.submit(self.repo.put_tensor, t, pins)))

    def _collect_oldest(self) -> None:
        name, fut = self.pending.pop(0)
        self.entries[name] = fut.result()

    def finish(self) -> None:
        while self.pending:
            self._collect_oldest()

    def close(self) -> None:
        for _, fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)  # a write in progress ends (its temp file is removed) before the caller goes on
        self.pending.clear()


__all__ = ["Progress", "Repository", "TensorSink"]
