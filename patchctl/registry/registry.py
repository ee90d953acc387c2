"""The :class:`Registry`: every operation of the CLI, as a typed Python API.

>>> import patchctl, tempfile
>>> reg = patchctl.Registry(tempfile.mkdtemp() + "/reg")
>>> reg.ls()
[]
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import BaseMismatch, InvalidArgument, NotFound
from patchctl.registry.ops.finish import finish
from patchctl.registry.store import maintenance, records
from patchctl.registry.store import manifest as manifest_mod
from patchctl.registry.store.names import DIGEST_RE, parse_ref
from patchctl.registry.store.repository import Progress, Repository

if TYPE_CHECKING:
    from collections.abc import Sequence

    from patchctl.registry.ops.compressing import CompressResult, CompressSpec
    from patchctl.registry.ops.merging import MergeResult, MergeSpec
    from patchctl.registry.ops.porting import PortReport, PortSpec
    from patchctl.registry.remote.limits import PullLimits


class Registry(Repository):
    """A patch registry in a folder (default ``$PATCHCTL_HOME``, else ``~/.patchctl``).

    Opening a path that does not exist creates an empty registry there.
    """

    def push(self, src: str | os.PathLike[str], ref: str, **options: Any) -> str:
        """Import a PEFT folder, a fine-tuned checkpoint (with ``base=``) or a diff file as ``ref``.

        Options (keywords): ``base``, ``base_name``, ``message``, ``metadata``,
        ``dtype``, ``trust_pickle``, ``move_latest``, ``evals`` — see
        :func:`patchctl.registry.ops.importing.push`. Returns the new patch's
        digest; ``ref`` (``name[:tag]``) points at it, and ``name:latest`` too
        unless ``move_latest`` is false.
        """
        from patchctl.registry.ops import importing

        return importing.push(self, src, ref, **options)

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
        self.move_ref(parse_ref(dst), digest, message or f"tag {src}")
        return digest

    def rm(self, ref: str, message: str = "") -> str:
        r = parse_ref(ref, default_tag=None)
        digest = self.store.ref_target(r)
        if digest is None:
            raise NotFound(f"no patch named {r}")
        self.move_ref(r, None, message or "rm")
        return digest

    # -- remotes (registry/remote/) -------------------------------------------------------
    def pull(self, ref: str, remote: str | None = None, *, progress: Progress = None,
             workers: int = 4, limits: PullLimits | None = None, insecure: bool = False,
             subfolder: str | None = None, base: str | os.PathLike[str] | None = None,
             trust_pickle: bool = False) -> dict[str, Any]:
        """Pull ``REMOTE/NAME[:TAG]`` (or ``NAME[:TAG]`` from ``remote``, a name or URL); a summary.

        From an ``hf://`` remote only: ``subfolder``, the folder in the repo; for a PEFT adapter,
        ``base`` (a folder, or a model id in the local Hugging Face cache) and ``trust_pickle``.

        ``limits`` caps what the remote may make it cost (:class:`~patchctl.registry.remote.limits.PullLimits`);
        ``insecure`` allows plain HTTP to an explicit ``oci+http://`` registry that is not on loopback.
        """
        from patchctl.registry.remote.hub import HubPull
        from patchctl.registry.remote.sync import pull

        hub = HubPull(subfolder, None if base is None else os.fspath(base), trust_pickle)
        return pull(self, ref, remote, progress=progress, workers=workers, limits=limits, insecure=insecure, hub=hub)

    def publish(self, ref: str, remote: str, *, progress: Progress = None, insecure: bool = False) -> dict[str, Any]:
        """Copy the local ``NAME[:TAG]`` to a registry-folder, ``hf://`` or ``oci://`` remote; a summary."""
        from patchctl.registry.remote.sync import publish

        return publish(self, ref, remote, progress=progress, insecure=insecure)

    def remotes(self) -> list[dict[str, Any]]:
        """The configured remotes (``remotes.json``)."""
        from patchctl.registry.remote import config as remotes

        return [r.to_json() for _, r in sorted(remotes.load_remotes(self.store).items())]

    def add_remote(self, name: str, url: str, token_file: str | os.PathLike[str] | None = None,
                   insecure: bool = False) -> dict[str, Any]:
        from patchctl.registry.remote import config as remotes

        return remotes.add_remote(self.store, name, url, token_file, insecure=insecure).to_json()

    def remove_remote(self, name: str) -> dict[str, Any]:
        from patchctl.registry.remote import config as remotes

        return remotes.remove_remote(self.store, name).to_json()

    # -- maintenance ---------------------------------------------------------------
    def gc(self, dry_run: bool = False, prune_history: bool = False, force: bool = False) -> dict[str, Any]:
        """Delete manifests and blobs no ref (nor, unless ``prune_history``, its history) reaches.

        Refuses while a ref or record log is damaged, unless ``force``. Part files that
        failed or killed pulls left in ``tmp/`` are deleted whatever their age when no pull
        is running (``parts`` in the result)."""
        from patchctl.registry.remote.transfer import clean_parts

        res = maintenance.gc(self, dry_run=dry_run, prune_history=prune_history, force=force)
        return {**res, "parts": 0 if dry_run else clean_parts(self.store)}

    def fsck(self, rebuild_index: bool = False, repair: str | None = None, repair_logs: bool = False) -> dict[str, Any]:
        """Verify every object's hash, every manifest's blobs, every ref and record log line, and the index.

        ``repair``: a remote (name, folder or URL) to fetch good copies of corrupt or
        missing objects from; the check is then run again and its result returned,
        with ``repaired`` / ``unrepaired`` digests. ``repair_logs`` first restores
        damaged ref-log lines from the index's copy of their history
        (:func:`~patchctl.registry.store.maintenance.repair_logs`); the result has
        ``logs_repaired`` / ``logs_unrepaired``.
        """
        if repair_logs:
            fixed = maintenance.repair_logs(self)
            res = self.fsck(rebuild_index=rebuild_index, repair=repair)
            return {**res, "logs_repaired": fixed["repaired"], "logs_unrepaired": fixed["unrepaired"]}
        fetch = None
        if repair is not None:
            from patchctl.registry.remote.repair import repair as fetch

        return maintenance.fsck(self, rebuild_index=rebuild_index, repair=repair, fetch=fetch)

    # -- export / apply ----------------------------------------------------------
    def export(self, ref: str, out: str | os.PathLike[str], format: str = "auto", dtype: str | None = None,
               exact: bool = False) -> Path:
        """Write a patch as a PEFT folder (``peft``) or a diff safetensors file (``diff``).

        ``auto`` picks ``diff`` for a ``.safetensors`` path (a LoRA as its dense ΔW) or a non-LoRA
        patch, else ``peft``. ``exact`` (diff): add the exactness pins, so base + diff equals the
        fine-tune bit for bit (:func:`patchctl.registry.ops.exporting.export_diff`).
        """
        from patchctl.registry.ops.exporting import export_diff, export_peft

        view = self.view(ref)
        to_file = Path(out).suffix == ".safetensors"  # a file path: the dense ΔW (a diff), never a folder
        fmt = format if format != "auto" else ("peft" if view.m.kind == "lora" and not to_file else "diff")
        if fmt == "peft" and to_file:
            raise InvalidArgument(f"a PEFT export is a folder, not {os.fspath(out)!r}: give a folder path, "
                                  "or --format diff to write the dense ΔW as a .safetensors file")
        if fmt == "peft":
            return export_peft(view, Path(out))
        if fmt == "diff":
            return export_diff(view, Path(out), dtype, exact)
        raise InvalidArgument(f"unknown export format {format!r}: choose peft or diff")

    def apply(self, ref: str, base: str | os.PathLike[str], out: str | os.PathLike[str], progress: Progress = None) -> Path:
        """Write base + patch as a full HF checkpoint folder (sharded like the base)."""
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops.exporting import apply_to_base

        view = self.view(ref)
        ckpt = Checkpoint(base)
        self.check_base(view.m, ckpt)
        return apply_to_base(view, ckpt, Path(out), progress)

    # -- eval suites and validation ---------------------------------------------------
    def eval_push(self, path: str | os.PathLike[str], ref: str, *, task: str, base: str | os.PathLike[str],
                  labels: list[str] | None = None, prompts: list[str] | None = None,
                  head: str | os.PathLike[str] | None = None, max_len: int = 128,
                  control: bool = False, message: str = "") -> str:
        """Store a JSONL eval suite for ``base``; ``control`` declares it the base's control suite."""
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops.suites import push_suite
        digest = push_suite(self, path, ref, task=task, base=base, labels=labels, prompts=prompts,
                            head=head, max_len=max_len, message=message)
        fp = Checkpoint(base).fingerprint()
        self.remember_base(fp, base)
        if control:
            records.attach(self.store, "base:" + fp, digest, "control")
        return digest

    def eval_attach(self, ref: str, suite: str) -> bool:
        """Declare that patch ``ref`` is judged by ``suite`` (a target suite)."""
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
        d = self.resolve(ref)
        return {"suites": records.suites(self.store, d),
                "validations": [{"record": k, **v} for k, v in records.validations(self.store, d)]}

    # -- diagnostics (ops/inspecting.py) ----------------------------------------------
    def inspect(self, ref: str, *, base: str | os.PathLike[str] | None = None, k: int = 10, eps: float = 0.5,
                svd: str = "auto", device: str | None = None) -> dict[str, Any]:
        """Per tensor, per layer and whole-patch diagnostics of ``ref``: norms, density, ranks, intruders.

        Needs the base (``base``, else the folder the registry saw for the
        patch's fingerprint). Kept as a record of the patch keyed by the
        parameters: asking again returns it (``cached: True``) without computing.
        See :mod:`patchctl.registry.ops.inspecting` and :mod:`patchctl.patches.diagnostics`.
        """
        from patchctl.registry.ops.inspecting import inspect

        return inspect(self, ref, base=base, k=k, eps=eps, svd=svd, device=device)

    def interference(self, refs: Sequence[str], *, density: float = 0.2, base: str | os.PathLike[str] | None = None,
                     device: str | None = None) -> dict[str, Any]:
        """Every pair of ``refs``: cosine of the task vectors, TIES sign conflict and Jaccard of the top-``density``."""
        from patchctl.registry.ops.inspecting import interference

        return interference(self, list(refs), density=density, base=base, device=device)

    def inspection(self, ref: str) -> dict[str, Any] | None:
        """The latest stored ``inspect`` result of ``ref`` (None when it was never inspected)."""
        from patchctl.registry.ops.inspecting import latest

        return latest(self, ref)

    def localize(self, ref: str, *, suites: Sequence[str] | None = None, device: str | None = None) -> dict[str, Any]:
        """The skill-localization curve: gain kept by ``ref`` sparsified to 1e-4 … 1 (validation, then test)."""
        from patchctl.registry.ops.inspecting import localize

        return localize(self, ref, suites=list(suites) if suites else None, device=device)

    # -- compress ------------------------------------------------------------------
    def compress(self, ref: str, as_ref: str | None = None, *, spec: CompressSpec | None = None, message: str = "",
                 metadata: dict[str, Any] | None = None, move_latest: bool = True, progress: Progress = None,
                 **options: Any) -> CompressResult:
        """Compress a diff or LoRA patch into a new ``sparse`` patch, streaming tensor by tensor.

        The settings are one :class:`~patchctl.registry.ops.compressing.CompressSpec`
        (``spec``), or its fields as keyword arguments: ``density``, ``mode``
        (``ternary`` — ComPEFT: global top-``density`` by magnitude, then
        ``±α`` with ``α = kappa·std`` or, ``scale="mean"``, the mean kept
        magnitude per tensor —, ``values`` or ``dare``), ``scale``, ``kappa``,
        ``per_tensor``, ``seed``, ``values_dtype``, ``lora_delta``,
        ``max_size``, ``search``, ``budget``, ``eval_device``. ``as_ref``
        defaults to ``NAME:TAG-d<density>``. The manifest records the parent,
        the recipe and a size/error report (``metadata["compression"]``).
        Already sparse patches are refused. See :mod:`patchctl.registry.ops.compressing`.

        ``max_size`` (bytes) chooses the largest density whose stored size
        fits (``density`` may then be None); ``search=True`` chooses κ on the
        validation split of the source's eval suites within ``budget``
        candidates (:func:`patchctl.registry.ops.search.search_compress`) and then
        measures the chosen patch's gain kept on the test split (a
        ``compress-validation`` record). Both are kept in the recipe
        (``search``). The source's eval suites are attached to the result.
        """
        from patchctl.registry.ops import search as searching
        from patchctl.registry.ops.compressing import CompressSpec, compress, lost_update
        from patchctl.registry.ops.validation import validate_derived

        if spec is None:
            spec = CompressSpec(**options)
        elif options:
            raise InvalidArgument(f"give spec= or its fields, not both ({', '.join(sorted(options))})")
        record: dict[str, Any] | None = None
        if spec.max_size is not None:
            density, size_rec = searching.density_for_size(self, ref, spec)
            spec, record = replace(spec, density=density), {"size": size_rec}
        with self.store.writing():  # held from the first candidate on: gc cannot collect them mid-search
            if spec.search:
                kappa, rec = searching.search_compress(self, ref, spec)
                spec, record = replace(spec, kappa=kappa), {**rec, **(record or {})}
            res = compress(self, ref, as_ref, spec, message=message, metadata=metadata, progress=progress,
                           search=record, move_ref=False)
            suites = records.suites(self.store, res.source, "target")

            def validate() -> dict[str, Any]:
                return validate_derived(self, res.source, res.digest, suites, device=spec.eval_device, search=record)

            validation, held = finish(self, res.digest, res.ref, suites=suites,
                                      validate=validate if spec.search else None, otherwise=None,
                                      message=res.message, move_latest=move_latest,
                                      lost=lambda v: lost_update(res.report, v), force=spec.force)
        return replace(res, validation=validation, ref=None if held else res.ref, held=held)

    # -- merge ---------------------------------------------------------------------
    def merge(self, inputs: list[str] | tuple[str, ...], ref: str | None = None, *, spec: MergeSpec | None = None,
              apply_to: str | os.PathLike[str] | None = None, base: str | os.PathLike[str] | None = None,
              message: str = "", metadata: dict[str, Any] | None = None, progress: Progress = None,
              validate: bool = True, gate: float = 0.9, eval_device: str | None = None, search: bool = False,
              budget: int = 12, with_control: bool = False, force: bool = False, **options: Any) -> MergeResult:
        """Merge patches on one base into a new ``diff`` (or LoRA) patch, streaming tensor by tensor.

        The merge itself is one :class:`~patchctl.registry.ops.merging.MergeSpec`
        (``spec``), or its fields as keyword arguments: ``method`` (a row of
        :data:`patchctl.patches.merge.METHODS`), ``weights`` (one per input,
        default 1 each), ``params`` (``density``, ``lambda``, ``gamma``),
        ``overrides`` (``(regex, params)`` rules per tensor), ``lines``
        (``"auto"`` or α) and ``lines_beta`` (LiNeS), ``as_lora`` (``"cat"``,
        or ``"svd"`` with ``rank``: a PEFT LoRA instead of a diff), ``dtype``,
        ``device``, ``seed``. ``apply_to`` with ``base`` also writes the merged
        full model. Every problem is reported before any work; nothing is
        written on error. The same inputs and recipe give the same digest. See
        :mod:`patchctl.registry.ops.merging`.

        Unless ``validate`` is false, the merge is then validated
        (:func:`patchctl.registry.ops.validation.validate_merge`): each constituent's
        eval suites score the merged model against the constituent alone, the
        base's control suites against the base. A merge whose lowest normalized
        score is under ``gate`` is kept but marked ``fail`` and moves no ref;
        so does an SVD LoRA output that lost most of the merged update
        (``force`` moves the ref anyway).

        ``search=True`` first chooses λ (or LiNeS β, then the density where the
        method has one) on the validation split of the inputs' suites, within
        ``budget`` candidate merges (:mod:`patchctl.registry.ops.search`); the
        whole curve is kept in the recipe.
        """
        from patchctl.registry.ops.finish import unvalidated
        from patchctl.registry.ops.inspecting import conflict_warning
        from patchctl.registry.ops.merging import MergeSpec, lost_update, merge
        from patchctl.registry.ops.search import search_merge
        from patchctl.registry.ops.validation import validate_merge

        if ref is not None:
            parse_ref(ref)
        if spec is None:
            spec = MergeSpec(**options)
        elif options:
            raise InvalidArgument(f"give spec= or its fields, not both ({', '.join(sorted(options))})")
        search_record = None
        if search:
            spec, search_record = search_merge(self, list(inputs), spec, budget=budget, with_control=with_control,
                                               base=None, eval_device=eval_device)
        # held until the ref moves, so a concurrent gc cannot collect the new, not yet referenced manifest
        with self.store.writing():
            res = merge(self, inputs, None, spec, apply_to=apply_to, base=base, message=message,
                        metadata=metadata, progress=progress, search=search_record)
            warning = conflict_warning(self, list(inputs), spec.method)
            constituents = list(res.manifest.parents)
            fp = res.manifest.fingerprint
            has_suites = any(records.suites(self.store, c, "target") for c in constituents) or bool(
                records.suites(self.store, "base:" + fp, "control"))

            def run_validation() -> dict[str, Any]:
                return validate_merge(self, res.digest, constituents, base=base, gate=gate, device=eval_device,
                                      batch_size=None, search=search_record)

            why = "--no-validate" if not validate else "no eval suites attached to the inputs or the base"
            validation, held = finish(
                self, res.digest, ref, suites=(), validate=run_validation if validate and has_suites else None,
                otherwise=unvalidated("merge-validation", why, merged=res.digest, constituents=constituents,
                                      gate=gate, min_normalized=None, device=None),
                message=res.message, move_latest=True, lost=lambda _v: lost_update(res), force=force)
            return replace(res, validation=validation, moved=held is None, held=None if ref is None else held,
                           warnings=[warning] if warning else [])

    # -- port ------------------------------------------------------------------------
    def port(self, ref: str, to: str | os.PathLike[str], *, spec: PortSpec | None = None, as_ref: str | None = None,
             dry_run: bool = False, message: str = "", progress: Progress = None, **options: Any) -> PortReport:
        """Re-anchor a patch on another version of its base: delta ``lam·τ`` keyed by ``to``'s names.

        The settings are one :class:`~patchctl.registry.ops.porting.PortSpec`
        (``spec``), or its fields as keyword arguments: ``from_base`` (the
        patch's own base, needed to measure drift; default: the folder this
        registry saw it in, if any), ``to_name``, ``lam``, ``maps``
        (``OLD_REGEX=NEW`` renames), ``gate``, ``validate``, ``search``,
        ``budget``, ``eval_device``. ``as_ref`` names the result (default
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
        from patchctl.registry.formats.checkpoint import Checkpoint
        from patchctl.registry.ops.finish import unvalidated
        from patchctl.registry.ops.porting import PortSpec, port, port_suites
        from patchctl.registry.ops.search import search_port
        from patchctl.registry.ops.validation import validate_port

        if spec is None:
            spec = PortSpec(**options)
        elif options:
            raise InvalidArgument(f"give spec= or its fields, not both ({', '.join(sorted(options))})")
        if dry_run:
            return port(self, ref, to, spec, as_ref=as_ref, dry_run=True, message=message, progress=progress)
        search_record = None
        if spec.search:
            lam, search_record = search_port(self, ref, to, spec)
            spec = replace(spec, lam=lam)
        with self.store.writing():
            report = port(self, ref, to, spec, as_ref=as_ref, message=message, progress=progress, move_ref=False,
                          search=search_record)
            if report.digest is None or report.ref is None:
                raise InvalidArgument(f"port of {ref} wrote no patch")
            src_suites = records.suites(self.store, report.source, "target")
            ported = port_suites(self, src_suites, Checkpoint(to), report.to_base)

            def validate() -> dict[str, Any]:
                return validate_port(self, report.source, report.digest or "", list(zip(src_suites, ported, strict=True)),
                                     old=report.from_path, new=to, gate=float(spec.gate), device=spec.eval_device,
                                     search=search_record)

            why = "--no-validate" if not spec.validate else "no eval suites attached to the patch"
            report.validation, report.held = finish(
                self, report.digest, report.ref, suites=ported,
                validate=validate if spec.validate and ported else None,
                otherwise=unvalidated("port-validation", why, ported=report.digest, source=report.source,
                                      gate=spec.gate),
                message=message or f"port {ref} to {report.to_fingerprint[:19]}", move_latest=False,
                force=spec.force)
            report.moved = report.held is None
        return report


__all__ = ["DIGEST_RE", "Registry"]
