"""The :class:`Registry`: every operation of the CLI, as a typed Python API.

>>> import patchctl, tempfile
>>> reg = patchctl.Registry(tempfile.mkdtemp() + "/reg")
>>> reg.ls()
[]
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import BaseMismatch, InvalidArgument, InvalidReference, NotFound
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.folder import Store
from patchctl.registry.store.index import Index
from patchctl.registry.store.manifest import Manifest, TensorEntry
from patchctl.registry.store.names import DIGEST_RE, Ref, is_digest, parse_ref

if TYPE_CHECKING:
    from collections.abc import Sequence

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.ops.compressing import CompressResult
    from patchctl.registry.ops.merging import MergeResult
    from patchctl.registry.ops.porting import PortReport
    from patchctl.registry.store.views import PatchView

Progress = Callable[[int, int], None] | None


class Registry:
    """A patch registry in a folder (default ``$PATCHCTL_HOME``, else ``~/.patchctl``).

    Opening a path that does not exist creates an empty registry there.
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
    def index_pending(self) -> Any:
        """Mark the window between a file write and its index update (kept on error)."""
        Registry._marker_seq += 1
        marker = self.path / "tmp" / f"index-pending-{os.getpid()}-{Registry._marker_seq}"
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

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Registry:
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
        from patchctl.registry.store.views import PatchView

        return PatchView(self.store, self.manifest(ref))

    # -- writing ---------------------------------------------------------------
    def _write_tensor(self, name: str, t: Any, pins: Any = None) -> TensorEntry:
        from patchctl.registry.formats.safetensors import dtype_name, tensor_to_bytes

        data = tensor_to_bytes(t)
        digest = self.store.put_blob(data)
        pin_meta = None
        if pins is not None:
            from patchctl.patches.apply import encode_pins

            pdata = encode_pins(*pins)
            pin_meta = {"digest": self.store.put_blob(pdata), "count": int(pins[0].numel()), "size": len(pdata)}
        return TensorEntry(digest, dtype_name(t.dtype), tuple(t.shape), "raw", len(data), pin_meta)

    def commit(self, m: Manifest, ref: str | None = None, message: str = "", move_latest: bool = True) -> str:
        """Store a manifest (its blobs must exist) and point ``ref`` at it."""
        self.index.db  # noqa: B018 - import sqlite-utils now: less time between file and index writes
        with self.index_pending():
            digest = self.store.put_manifest(m.to_bytes(), m.blob_digests())
            self.index.add_manifest(digest, m)
        if ref is not None:
            r = parse_ref(ref)
            self._move(r, digest, message)
            if move_latest and r.tag != "latest":
                self._move(Ref(r.name, "latest"), digest, message)
        return digest

    def _move(self, r: Ref, digest: str | None, message: str) -> None:
        with self.index_pending():
            entry = self.store.move_ref(r, digest, message)
            if entry is not None:
                self.index.record_ref(r, entry)
            else:
                self._resync_ref(r)

    def _resync_ref(self, r: Ref) -> None:
        """Catch the index up with a ref's log: a command killed between the two leaves it behind."""
        log = self.store.ref_log(r)
        if log and self.index.ref(r) != log[-1].new:
            self.index.record_ref(r, log[-1])

    def push(
        self,
        src: str | os.PathLike[str],
        ref: str,
        *,
        base: str | os.PathLike[str] | None = None,
        base_name: str | None = None,
        message: str = "",
        metadata: dict[str, Any] | None = None,
        dtype: str | None = None,
        trust_pickle: bool = False,
        move_latest: bool = True,
        evals: list[str] | None = None,
    ) -> str:
        """Import a PEFT folder, a fine-tuned checkpoint (with ``base``) or a diff file.

        Returns the new patch's digest; ``ref`` (``name[:tag]``) points at it,
        and ``name:latest`` too unless ``move_latest`` is false.
        """
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops import importing as importers

        parse_ref(ref)  # reject a bad name before any work
        suites = [self.resolve(e) for e in evals or []]
        srcp = Path(src)
        kind = importers.detect(srcp)
        base_ckpt = Checkpoint(base) if base is not None else None
        if kind == "peft":
            imp = importers.import_peft(srcp, trust_pickle)
            if base_ckpt is None:
                base_ckpt = _base_from_hint(imp.base_hint)
        else:
            if base_ckpt is None:
                raise InvalidArgument(f"pushing {srcp} needs the base it was fine-tuned from: --base BASE_DIR")
            if kind == "checkpoint":
                imp = importers.import_checkpoint(srcp, base_ckpt, dtype)
            else:
                imp = importers.import_diff_file(srcp, base_ckpt, trust_pickle)
        tensors: dict[str, TensorEntry] = {}
        with self.store.writing():
            if imp.kind == "lora" and imp.shapes is not None:
                from patchctl.registry.store.views import PatchView, check_against_base

                # check every A/B pair against the base before anything is stored
                zero = "sha256:" + "0" * 64
                probe = {n: TensorEntry(zero, d, s) for n, (d, s) in imp.shapes.items()}
                m0 = Manifest("lora", {"fingerprint": zero, "name": ""}, probe, imp.params)
                check_against_base(PatchView(self.store, m0), base_ckpt)
            for name, t, pins in imp.tensors:
                tensors[name] = self._write_tensor(name, t, pins)
            base_doc = _base_doc(base_ckpt, base_name, imp.base_hint)
            self.remember_base(base_doc["fingerprint"], base_ckpt.path)
            m = Manifest(
                kind=imp.kind,
                base=base_doc,
                tensors=tensors,
                params=imp.params,
                parents=(),
                recipe=imp.recipe,
                metadata=metadata or {},
            )
            if suites:
                from patchctl.registry.store import records

                for sd in suites:
                    sm = self.manifest(sd)
                    if sm.kind != "suite" or sm.fingerprint != m.fingerprint:
                        raise BaseMismatch(f"eval suite {sd[:19]}… is not a suite for this patch's base")
            digest = self.commit(m, ref, message or f"push {srcp.name}", move_latest)
            for sd in suites:
                records.attach(self.store, digest, sd, "target")
            return digest

    # -- reading ---------------------------------------------------------------
    def ls(self) -> list[dict[str, Any]]:
        """Every ``name:tag`` with its digest, kind, base, size and parameter count."""
        return self.index.refs()

    def show(self, ref: str) -> dict[str, Any]:
        """A patch's manifest plus what the registry knows about it (refs pointing at it)."""
        digest = self.resolve(ref)
        m = manifest_mod.parse(self.store.read_manifest_bytes(digest))
        doc = m.to_json()
        doc["digest"] = digest
        doc["refs"] = self.index.tags_of(digest)
        doc["stored_bytes"] = m.stored_bytes
        doc["num_params"] = m.num_params
        from patchctl.registry.store import records

        doc["suites"] = records.suites(self.store, digest)
        doc["validations"] = [{"record": k, **v} for k, v in records.validations(self.store, digest)]
        return doc

    def log(self, ref: str) -> dict[str, Any]:
        """The ref's history (every move) and the patch's lineage tree."""
        r = parse_ref(ref)
        history = [e.to_json() for e in self.store.ref_log(r)]
        if not history:
            raise NotFound(f"no patch named {r}")
        digest = self.store.ref_target(r)
        return {"ref": str(r), "history": history, "lineage": self._lineage(digest) if digest else None}

    def _lineage(self, digest: str, depth: int = 0) -> dict[str, Any]:
        node: dict[str, Any] = {"digest": digest, "refs": self.index.tags_of(digest)}
        if not self.store.has_manifest(digest):
            node["missing"] = True
            return node
        m = manifest_mod.parse(self.store.read_manifest_bytes(digest))
        node["kind"] = m.kind
        node["recipe"] = m.recipe
        node["parents"] = [self._lineage(p, depth + 1) for p in m.parents] if depth < 32 else []
        return node

    # -- refs ----------------------------------------------------------------------
    def tag(self, src: str, dst: str, message: str = "") -> str:
        digest = self.resolve(src)
        self._move(parse_ref(dst), digest, message or f"tag {src}")
        return digest

    def rm(self, ref: str, message: str = "") -> str:
        r = parse_ref(ref, default_tag=None)
        digest = self.store.ref_target(r)
        if digest is None:
            raise NotFound(f"no patch named {r}")
        self._move(r, None, message or "rm")
        return digest

    # -- remotes (remotes.py) -------------------------------------------------------
    def pull(self, ref: str, remote: str | None = None, *, progress: Progress = None,
             workers: int = 4) -> dict[str, Any]:
        """Pull ``REMOTE/NAME[:TAG]`` (or ``NAME[:TAG]`` from ``remote``, a name or URL); a summary."""
        from patchctl.registry.remote import transfer as remotes

        return remotes.pull(self, ref, remote, progress=progress, workers=workers)

    def publish(self, ref: str, remote: str, *, progress: Progress = None) -> dict[str, Any]:
        """Copy the local ``NAME[:TAG]`` to a registry-folder or ``hf://`` remote; a summary."""
        from patchctl.registry.remote import transfer as remotes

        return remotes.publish(self, ref, remote, progress=progress)

    def remotes(self) -> list[dict[str, Any]]:
        """The configured remotes (``remotes.json``)."""
        from patchctl.registry.remote import transfer as remotes

        return [r.to_json() for _, r in sorted(remotes.load_remotes(self.store).items())]

    def add_remote(self, name: str, url: str, token_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        from patchctl.registry.remote import transfer as remotes

        return remotes.add_remote(self.store, name, url, token_file).to_json()

    def remove_remote(self, name: str) -> dict[str, Any]:
        from patchctl.registry.remote import transfer as remotes

        return remotes.remove_remote(self.store, name).to_json()

    # -- maintenance ---------------------------------------------------------------
    def _reachable(self, include_history: bool) -> tuple[set[str], set[str]]:
        manifests: set[str] = set()
        for r in self.store.iter_refs():
            for e in self.store.ref_log(r) if include_history else []:
                if e.new:
                    manifests.add(e.new)
            t = self.store.ref_target(r)
            if t:
                manifests.add(t)
        from patchctl.registry.store import records

        blobs: set[str] = set()
        fingerprints: set[str] = set()
        subjects = set(manifests)
        for d in list(manifests):
            try:
                m = manifest_mod.parse(self.store.read_manifest_bytes(d))
            except NotFound:
                manifests.discard(d)
                continue
            blobs.update(m.blob_digests())
            fingerprints.add(m.fingerprint)
        subjects |= {"base:" + f for f in fingerprints}
        # suites and validation records that kept patches (and their bases) refer to
        for subj in subjects:
            for e in records.read(self.store, subj):
                if e.get("type") == "suite" and e["suite"] not in manifests and self.store.has_manifest(e["suite"]):
                    manifests.add(e["suite"])
                    blobs.update(manifest_mod.parse(self.store.read_manifest_bytes(e["suite"])).blob_digests())
                elif e.get("type") == "validation":
                    blobs.add(e["record"])
        return manifests, blobs

    def gc(self, dry_run: bool = False, prune_history: bool = False) -> dict[str, Any]:
        """Delete manifests and blobs no ref (nor, unless ``prune_history``, its history) reaches."""
        with self.store.exclusive():
            keep_m, keep_b = self._reachable(include_history=not prune_history)
            dead_m = [d for d in self.store.iter_digests("manifests") if d not in keep_m]
            dead_b = [d for d in self.store.iter_digests("objects") if d not in keep_b]
            freed = 0
            if not dry_run:
                self.index.db  # noqa: B018 - import sqlite-utils before deleting (see commit)
                with self.index_pending():
                    for d in dead_m:  # manifests first: a manifest never outlives its blobs
                        freed += self.store.remove("manifests", d)
                    # then their index rows, and any row whose file is already gone (a gc killed before this)
                    self.index.remove_manifests(dead_m + [d for d in self.index.all_manifest_digests()
                                                          if not self.store.has_manifest(d)])
                for d in dead_b:
                    freed += self.store.remove("objects", d)
                self.store.clean_tmp()
            else:
                freed = sum(self.store._path("manifests", d).stat().st_size for d in dead_m) + sum(
                    self.store.blob_path(d).stat().st_size for d in dead_b)
        return {"manifests": len(dead_m), "blobs": len(dead_b), "bytes": freed, "dry_run": dry_run}

    def rebuild_index(self) -> dict[str, int]:
        manifests = []
        for d in self.store.iter_digests("manifests"):
            try:
                manifests.append((d, manifest_mod.parse(self.store.read_manifest_bytes(d))))
            except Exception:  # noqa: BLE001 - fsck reports corrupt manifests; skip them here
                continue
        refs = [(r, self.store.ref_log(r)) for r in self.store.iter_refs()]
        return self.index.rebuild(manifests, refs)

    def fsck(self, rebuild_index: bool = False, repair: str | None = None) -> dict[str, Any]:
        """Verify every object's hash, every manifest's blobs, every ref, and the index.

        ``repair``: a remote (name, folder or URL) to fetch good copies of corrupt or
        missing objects from; the check is then run again and its result returned,
        with ``repaired`` / ``unrepaired`` digests.
        """
        import hashlib

        problems: list[str] = []
        corrupt_blobs: list[str] = []
        corrupt_manifests: list[str] = []
        blobs = set()
        for d in self.store.iter_digests("objects"):
            h = hashlib.sha256()
            with open(self.store.blob_path(d), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != d:
                corrupt_blobs.append(d)
                problems.append(f"blob {d}: content does not match its digest")
            else:
                blobs.add(d)
        manifests: dict[str, Manifest] = {}
        for d in self.store.iter_digests("manifests"):
            try:
                manifests[d] = manifest_mod.parse(self.store.read_manifest_bytes(d))
            except Exception as e:  # noqa: BLE001 - report, keep going
                corrupt_manifests.append(d)
                problems.append(f"manifest {d}: {e}")
        for d, m in manifests.items():
            for b in m.blob_digests():
                if b not in blobs and b not in corrupt_blobs:
                    problems.append(f"manifest {d}: blob {b} is missing")
        for r in self.store.iter_refs():
            t = self.store.ref_target(r)
            if t is not None and t not in manifests:
                problems.append(f"ref {r}: points at {t}, which is {'corrupt' if t in corrupt_manifests else 'missing'}")
        if repair is not None:
            from patchctl.registry.remote.transfer import repair as fetch_good_copies

            with self.store.writing():
                # manifests first: a repaired manifest tells the sizes (and names) of its blobs
                fixed = fetch_good_copies(self, repair, [], corrupt_manifests, {})
                for d in fixed["repaired"]:
                    manifests[d] = manifest_mod.parse(self.store.read_manifest_bytes(d))
                sizes = {d: n for m in manifests.values() for t in m.tensors.values() for d, n in t.blobs()}
                missing = sorted({b for m in manifests.values() for b in m.blob_digests()} - blobs - set(corrupt_blobs))
                more = fetch_good_copies(self, repair, corrupt_blobs + missing, [], sizes)
            again = self.fsck(rebuild_index=True)
            return {**again, "repaired": fixed["repaired"] + more["repaired"],
                    "unrepaired": fixed["failed"] + more["failed"]}
        stray = [p.name for p in (self.store.root / "tmp").iterdir()]
        rebuilt = None
        if rebuild_index:
            rebuilt = self.rebuild_index()
        else:
            file_refs = {(r.name, r.tag): self.store.ref_target(r) for r in self.store.iter_refs()}
            file_refs = {k: v for k, v in file_refs.items() if v is not None}
            if self.index.all_refs() != file_refs:
                problems.append("index: refs differ from the ref files (run `patchctl fsck --rebuild-index`)")
            if self.index.all_manifest_digests() != set(manifests):
                problems.append("index: manifests differ from the files (run `patchctl fsck --rebuild-index`)")
        return {
            "ok": not problems,
            "problems": problems,
            "corrupt_blobs": corrupt_blobs,
            "corrupt_manifests": corrupt_manifests,
            "blobs": len(blobs) + len(corrupt_blobs),
            "manifests": len(manifests) + len(corrupt_manifests),
            "tmp_files": len(stray),
            "rebuilt": rebuilt,
        }

    # -- export / apply ----------------------------------------------------------
    def export(self, ref: str, out: str | os.PathLike[str], format: str = "auto", dtype: str | None = None) -> Path:
        """Write a patch as a PEFT folder (``peft``) or a diff safetensors file (``diff``)."""
        from patchctl.registry.ops.exporting import export_diff, export_peft

        view = self.view(ref)
        fmt = format if format != "auto" else ("peft" if view.m.kind == "lora" else "diff")
        if fmt == "peft":
            return export_peft(view, Path(out))
        if fmt == "diff":
            return export_diff(view, Path(out), dtype)
        raise InvalidArgument(f"unknown export format {format!r}: choose peft or diff")

    def check_base(self, m: Manifest, base: Checkpoint) -> None:
        fp = base.fingerprint()
        if fp != m.fingerprint:
            raise BaseMismatch(
                f"the patch was made for base {m.base.get('name') or '?'} ({m.fingerprint[:19]}…), but "
                f"{base.path} has fingerprint {fp[:19]}…; use the right base or `patchctl port` the patch"
            )

    def apply(self, ref: str, base: str | os.PathLike[str], out: str | os.PathLike[str], progress: Progress = None) -> Path:
        """Write base + patch as a full HF checkpoint folder (sharded like the base)."""
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops.exporting import apply_to_base

        view = self.view(ref)
        ckpt = Checkpoint(base)
        self.check_base(view.m, ckpt)
        return apply_to_base(view, ckpt, Path(out), progress)

    # -- bases known on this machine ---------------------------------------------------
    def remember_base(self, fingerprint: str, path: str | os.PathLike[str]) -> None:
        """Record where base ``fingerprint`` lives locally (``bases.json``; not part of any patch)."""
        import json

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
        import json

        f = self.path / "bases.json"
        try:
            p = json.loads(f.read_text()).get(fingerprint) if f.is_file() else None
        except ValueError:
            return None
        return Path(p) if p and Path(p).is_dir() else None

    # -- eval suites and validation ---------------------------------------------------
    def eval_push(self, path: str | os.PathLike[str], ref: str, *, task: str, base: str | os.PathLike[str],
                  labels: list[str] | None = None, prompts: list[str] | None = None,
                  head: str | os.PathLike[str] | None = None, max_len: int = 128,
                  control: bool = False, message: str = "") -> str:
        """Store a JSONL eval suite for ``base``; ``control`` declares it the base's control suite."""
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops.suites import push_suite
        from patchctl.registry.store import records

        digest = push_suite(self, path, ref, task=task, base=base, labels=labels, prompts=prompts,
                            head=head, max_len=max_len, message=message)
        fp = Checkpoint(base).fingerprint()
        self.remember_base(fp, base)
        if control:
            records.attach(self.store, "base:" + fp, digest, "control")
        return digest

    def eval_attach(self, ref: str, suite: str) -> bool:
        """Declare that patch ``ref`` is judged by ``suite`` (a target suite)."""
        from patchctl.registry.store import records

        d, s = self.resolve(ref), self.resolve(suite)
        pm, sm = self.manifest(d), self.manifest(s)
        if sm.kind != "suite":
            raise InvalidArgument(f"{suite} is not an eval suite")
        if pm.kind == "suite":
            raise InvalidArgument(f"{ref} is an eval suite, not a patch")
        if pm.fingerprint != sm.fingerprint:
            raise BaseMismatch(f"suite {suite} is for another base than {ref}")
        return records.attach(self.store, d, s, "target")

    def validate(self, refs: list[str], *, base: str | os.PathLike[str] | None = None,
                 suites: list[str] | None = None, split: str = "test", device: str | None = None,
                 batch_size: int | None = None) -> list[dict[str, Any]]:
        """Compose base + ``refs`` and score it on their suites; records are stored with the patches."""
        from patchctl.registry.ops.validation import validate

        return validate(self, refs, base=base, suites=suites, split=split, device=device, batch_size=batch_size)

    def records(self, ref: str) -> dict[str, Any]:
        """A patch's attached suites and validation records."""
        from patchctl.registry.store import records

        d = self.resolve(ref)
        return {"suites": records.suites(self.store, d),
                "validations": [{"record": k, **v} for k, v in records.validations(self.store, d)]}

    # -- compress ------------------------------------------------------------------
    def compress(
        self,
        ref: str,
        as_ref: str | None = None,
        *,
        density: float | None = None,
        mode: str = "ternary",
        scale: str = "std",
        kappa: float = 1.0,
        per_tensor: bool = False,
        seed: int = 0,
        values_dtype: str = "float16",
        lora_delta: bool = False,
        message: str = "",
        metadata: dict[str, Any] | None = None,
        move_latest: bool = True,
        progress: Progress = None,
        search: bool = False,
        budget: int = 6,
        max_size: int | None = None,
        eval_device: str | None = None,
    ) -> CompressResult:
        """Compress a diff or LoRA patch into a new ``sparse`` patch, streaming tensor by tensor.

        ``mode``: ``ternary`` (ComPEFT: global top-``density`` by magnitude,
        then ``±α`` with ``α = kappa·std`` or, ``scale="mean"``, the mean kept
        magnitude per tensor), ``values`` (same selection, values kept in
        ``values_dtype``) or ``dare`` (random keep with probability
        ``density``, rescaled, seeded by ``seed``); ``per_tensor`` makes the
        threshold (and std) per tensor. A LoRA's A/B factors are compressed
        (``lora_delta``: its ΔW instead). ``as_ref`` defaults to
        ``NAME:TAG-d<density>``. The manifest records the parent, the recipe
        and a size/error report (``metadata["compression"]``). Already sparse
        patches are refused. See :mod:`patchctl.registry.ops.compressing`.

        ``max_size`` (bytes) chooses the largest density whose stored size
        fits (``density`` may then be None); ``search=True`` chooses κ on the
        validation split of the source's eval suites within ``budget``
        candidates (:func:`patchctl.registry.ops.search.search_compress`) and then
        measures the chosen patch's gain kept on the test split (a
        ``compress-validation`` record). Both are kept in the recipe
        (``search``). The source's eval suites are attached to the result.
        """
        from patchctl.registry.ops.compressing import compress
        from patchctl.registry.store import records

        size_kw = {"mode": mode, "per_tensor": per_tensor, "seed": seed, "values_dtype": values_dtype,
                   "lora_delta": lora_delta}
        record: dict[str, Any] | None = None
        if max_size is not None:
            from patchctl.registry.ops.search import density_for_size

            density, size_rec = density_for_size(self, ref, max_size, size_kwargs=size_kw)
            record = {"size": size_rec}
        if density is None:
            raise InvalidArgument("give --density, or --max-size to choose it")
        with self.store.writing():  # held from the first candidate on: gc cannot collect them mid-search
            if search:
                from patchctl.registry.ops.search import search_compress

                kappa, rec = search_compress(self, ref, density=density, budget=budget, eval_device=eval_device,
                                             compress_kwargs={**size_kw, "scale": scale})
                record = {**rec, **(record or {})}
            res = compress(self, ref, as_ref, density=density, mode=mode, scale=scale, kappa=kappa,
                           per_tensor=per_tensor, seed=seed, values_dtype=values_dtype, lora_delta=lora_delta,
                           message=message, metadata=metadata, move_latest=move_latest, progress=progress,
                           search=record)
            suites = records.suites(self.store, res.source, "target")
            for sd in suites:
                records.attach(self.store, res.digest, sd, "target")
        if search:
            from dataclasses import replace

            from patchctl.registry.ops.validation import validate_derived

            res = replace(res, validation=validate_derived(self, res.source, res.digest, suites, device=eval_device,
                                                           search=record))
        return res

    # -- merge ---------------------------------------------------------------------
    def merge(
        self,
        inputs: list[str] | tuple[str, ...],
        ref: str | None = None,
        *,
        method: str = "task_arithmetic",
        weights: list[float] | tuple[float, ...] | None = None,
        params: dict[str, Any] | None = None,
        overrides: list[tuple[str, dict[str, Any]]] | None = None,
        lines: str | float | None = None,
        lines_beta: float | None = None,
        as_lora: str | None = None,
        rank: int | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        apply_to: str | os.PathLike[str] | None = None,
        base: str | os.PathLike[str] | None = None,
        message: str = "",
        metadata: dict[str, Any] | None = None,
        progress: Progress = None,
        validate: bool = True,
        gate: float = 0.9,
        eval_device: str | None = None,
        search: bool = False,
        budget: int = 12,
        with_control: bool = False,
    ) -> MergeResult:
        """Merge patches on one base into a new ``diff`` (or LoRA) patch, streaming tensor by tensor.

        ``method`` is a row of :data:`patchctl.patches.merge.METHODS`, with
        one weight per input (default 1 each) and its ``params`` (``density``,
        ``lambda``, ``gamma``); ``overrides`` are ``(regex, params)`` rules per
        tensor. ``lines`` (``"auto"`` or α) and ``lines_beta`` scale the merged
        delta per layer (LiNeS). ``as_lora="cat"`` (LoRA inputs, linear methods)
        or ``"svd"`` with ``rank`` store a PEFT LoRA instead of a diff.
        ``apply_to`` with ``base`` also writes the merged full model. Every
        problem is reported before any work; nothing is written on error. The
        same inputs and recipe give the same digest. See
        :mod:`patchctl.registry.ops.merging`.

        Unless ``validate`` is false, the merge is then validated
        (:func:`patchctl.registry.ops.validation.validate_merge`): each constituent's
        eval suites score the merged model against the constituent alone, the
        base's control suites against the base. A merge whose lowest normalized
        score is under ``gate`` is kept but marked ``fail`` and moves no ref.

        ``search=True`` first chooses λ (or LiNeS β, then the density where the
        method has one) on the validation split of the inputs' suites, within
        ``budget`` candidate merges (:mod:`patchctl.registry.ops.search`); the
        whole curve is kept in the recipe.
        """
        from dataclasses import replace

        from patchctl.registry.ops.merging import merge
        from patchctl.registry.store import records

        if ref is not None:
            parse_ref(ref)

        search_record = None
        if search:
            from patchctl.registry.ops.search import search_merge

            params, lines_beta, search_record = search_merge(
                self, list(inputs), method=method, weights=list(weights) if weights else None,
                params=dict(params or {}), lines=lines, lines_beta=lines_beta, budget=budget,
                with_control=with_control, base=None, eval_device=eval_device,
                merge_kwargs={"overrides": overrides, "as_lora": as_lora, "rank": rank, "dtype": dtype,
                              "device": device, "seed": seed})
        # held until the ref moves, so a concurrent gc cannot collect the new, not yet referenced manifest
        with self.store.writing():
            res = merge(self, inputs, None, method=method, weights=weights, params=params,
                        overrides=overrides, lines=lines, lines_beta=lines_beta, as_lora=as_lora, rank=rank,
                        dtype=dtype, device=device, seed=seed, apply_to=apply_to, base=base, message=message,
                        metadata=metadata, progress=progress, search=search_record)
            constituents = list(res.manifest.parents)
            fp = res.manifest.fingerprint
            has_suites = any(records.suites(self.store, c, "target") for c in constituents) or bool(
                records.suites(self.store, "base:" + fp, "control"))
            if validate and has_suites:
                from patchctl.registry.ops.validation import validate_merge

                validation = validate_merge(self, res.digest, constituents, base=base, gate=gate,
                                            device=eval_device, batch_size=None, search=search_record)
            else:
                why = "--no-validate" if not validate else "no eval suites attached to the inputs or the base"
                validation = {"type": "merge-validation", "merged": res.digest, "constituents": constituents,
                              "gate": gate, "verdict": "unvalidated", "reason": why, "rows": [],
                              "min_normalized": None, "device": None}
                validation["record"] = records.add_validation(self.store, res.digest, validation)
            moved = False
            if ref is not None and validation["verdict"] != "fail":
                r = parse_ref(ref)
                self._move(r, res.digest, res.message)
                if r.tag != "latest":
                    self._move(Ref(r.name, "latest"), res.digest, res.message)
                moved = True
            return replace(res, validation=validation, moved=moved)


    # -- port ------------------------------------------------------------------------
    def port(
        self,
        ref: str,
        to: str | os.PathLike[str],
        *,
        from_base: str | os.PathLike[str] | None = None,
        to_name: str | None = None,
        lam: float = 1.0,
        maps: Sequence[str] = (),
        as_ref: str | None = None,
        dry_run: bool = False,
        message: str = "",
        progress: Progress = None,
        validate: bool = True,
        gate: float = 0.8,
        eval_device: str | None = None,
        search: bool = False,
        budget: int = 6,
    ) -> PortReport:
        """Re-anchor a patch on another version of its base: delta ``lam·τ`` keyed by ``to``'s names.

        ``from_base`` is the patch's own base (needed to measure drift; default:
        the folder this registry saw it in, if any); ``maps`` are
        ``OLD_REGEX=NEW`` renames; ``as_ref`` names the result (default
        ``NAME:TAG-on-<8 hex of the new fingerprint>``). The diagnostics are
        computed before anything is written; ``dry_run`` writes nothing. See
        :mod:`patchctl.registry.ops.porting`.

        When the patch has eval suites, they are carried to the new base
        (:func:`~patchctl.registry.ops.porting.port_suites`, attached to the
        ported patch) and, unless ``validate`` is false, the ported patch is
        validated there (:func:`~patchctl.registry.ops.validation.validate_port`):
        the share of the gain it recovers on each suite's test split. A port
        recovering less than ``gate`` on some suite is kept but marked
        ``fail`` and moves no ref. ``search=True`` first chooses λ on the
        validation split within ``budget`` ports
        (:func:`~patchctl.registry.ops.search.search_port`).
        """
        from patchctl.registry.ops.porting import port, port_suites
        from patchctl.registry.store import records

        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
            raise InvalidArgument(f"--gate must be a finite number, got {gate!r}")
        kw = {"from_base": from_base, "to_name": to_name, "maps": maps}
        search_record = None
        if search and not dry_run:
            from patchctl.registry.ops.search import search_port

            lam, search_record = search_port(self, ref, to, budget=budget, eval_device=eval_device, port_kwargs=kw)
        if dry_run:
            return port(self, ref, to, lam=lam, as_ref=as_ref, dry_run=True, message=message, progress=progress, **kw)
        with self.store.writing():
            report = port(self, ref, to, lam=lam, as_ref=as_ref, message=message, progress=progress,
                          move_ref=False, search=search_record, **kw)
            assert report.digest is not None and report.ref is not None
            from patchctl.registry.formats.checkpoint import Checkpoint

            new = Checkpoint(to)
            src_suites = records.suites(self.store, report.source, "target")
            ported = port_suites(self, src_suites, new, report.to_base)
            for sd in ported:
                records.attach(self.store, report.digest, sd, "target")
            if validate and ported:
                from patchctl.registry.ops.validation import validate_port

                report.validation = validate_port(self, report.source, report.digest,
                                                  list(zip(src_suites, ported, strict=True)), old=report.from_path,
                                                  new=to, gate=float(gate), device=eval_device, search=search_record)
            else:
                why = "--no-validate" if not validate else "no eval suites attached to the patch"
                report.validation = {"type": "port-validation", "ported": report.digest, "source": report.source,
                                     "gate": gate, "verdict": "unvalidated", "reason": why, "rows": []}
                report.validation["record"] = records.add_validation(self.store, report.digest, report.validation)
            if report.validation["verdict"] != "fail":
                self._move(parse_ref(report.ref), report.digest, message or f"port {ref} to {report.to_fingerprint[:19]}")
                report.moved = True
        return report


def _base_doc(base: Checkpoint, base_name: str | None, hint: str | None) -> dict[str, Any]:
    name, revision = None, None
    if base_name:
        name, _, rev = base_name.partition("@")
        revision = rev or None
    else:
        name = hint or base.config().get("_name_or_path") or base.path.name
        m = re.search(r"snapshots/([0-9a-f]{40})(/|$)", base.path.as_posix())
        revision = m.group(1) if m else None
    return {"name": str(name), "revision": revision, "fingerprint": base.fingerprint()}


def _base_from_hint(hint: str | None) -> Checkpoint:
    from patchctl.registry.formats.checkpoint import Checkpoint

    if hint and Path(hint).expanduser().is_dir():
        return Checkpoint(Path(hint).expanduser())
    if hint:
        try:
            from huggingface_hub import snapshot_download

            return Checkpoint(snapshot_download(hint, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: ask for --base
            pass
    raise InvalidArgument(
        f"the adapter's base {hint!r} is not a local folder nor in the local Hugging Face cache; "
        "pass --base BASE_DIR"
    )


__all__ = ["DIGEST_RE", "Registry"]
