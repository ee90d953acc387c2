"""Validation: compose base + patches, run eval suites, record the results.

- :func:`validate` scores one composition (a base plus zero or more patches,
  their deltas added together) on eval suites and stores one record per
  suite under each patch (or under the base when there is none).
- :func:`validate_merge` is what ``patchctl merge`` runs: for each
  constituent, the merged model's score on that constituent's suites against
  the constituent alone (the *normalized score*), and the base's control
  suites against the base (forgetting). The verdict is ``pass`` when every
  normalized score is at least the gate.

Scores are "higher is better" (accuracy; ``exp(-loss)`` for ``lm-loss``).
Scores of the base and of single constituents are cached: a record with the
same composition, suite, split and device is reused instead of re-run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchctl.errors import BaseMismatch, InvalidArgument, NotFound
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.ops.suites import Suite, load_suite
from patchctl.registry.store import records

if TYPE_CHECKING:
    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.repository import Repository

CLASSIFIER = "classification"


def _model_kind(task: str) -> str:
    return "encoder" if task == CLASSIFIER else "causal"


def resolve_base(reg: Repository, fingerprint: str, base: str | os.PathLike[str] | None) -> Checkpoint:

    if base is None:
        path = reg.base_path(fingerprint)
        if path is None:
            raise InvalidArgument(
                f"no local folder is known for base {fingerprint[:19]}…; pass --base BASE_DIR"
            )
        base = path
    ckpt = Checkpoint(base)
    if ckpt.fingerprint() != fingerprint:
        raise BaseMismatch(f"{ckpt.path} is not the base the patches were made for (fingerprint differs)")
    return ckpt


def _suites_for(reg: Repository, digests: list[str], fingerprint: str, explicit: list[str] | None) -> list[Suite]:
    if explicit:
        wanted = [reg.resolve(s) for s in explicit]
    else:
        wanted = []
        for d in digests:
            wanted += records.suites(reg.store, d, "target")
        wanted += records.suites(reg.store, "base:" + fingerprint, "control")
    out, seen = [], set()
    for s in wanted:
        if s in seen:
            continue
        seen.add(s)
        suite = load_suite(reg, s)
        if suite.manifest.fingerprint != fingerprint:
            raise BaseMismatch(f"suite {s[:19]}… is for another base than the patches")
        out.append(suite)
    return out


def _cached(reg: Repository, subject: str, composition: list[str], suite: str, split: str, device: str) -> dict[str, Any] | None:
    for _, rec in reversed(records.validations(reg.store, subject)):
        if (rec.get("suite") == suite and rec.get("split") == split and rec.get("device") == device
                and rec.get("composition", {}).get("patches") == composition and "metrics" in rec):
            return rec
    return None


def score_compositions(
    reg: Repository,
    ckpt: Checkpoint,
    jobs: list[tuple[list[str], Suite]],
    *,
    split: str,
    device: str | None,
    batch_size: int | None,
    use_cache: bool = True,
) -> list[dict[str, Any]]:
    """Run each (patches, suite) job; one model load per model kind, patches applied in place."""
    from patchctl.evals import runtime
    from patchctl.evals.evaluators import evaluate
    from patchctl.registry.ops.compose import apply as apply_patches

    dev = runtime.pick_device(device)
    dname = runtime.device_name(dev)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    todo: list[int] = []
    for i, (patches, suite) in enumerate(jobs):
        subject = patches[0] if len(patches) == 1 else ("base:" + ckpt_fp(reg, ckpt) if not patches else None)
        hit = _cached(reg, subject, patches, suite.digest, split, dname) if (use_cache and subject) else None
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    by_kind: dict[str, list[int]] = {}
    for i in todo:
        by_kind.setdefault(_model_kind(jobs[i][1].task), []).append(i)
    for idxs in by_kind.values():
        task = jobs[idxs[0]][1].task
        model, tok = _load(ckpt, task, dev, dname)
        for i in idxs:
            patches, suite = jobs[i]
            rows = suite.split(split)
            if not rows:
                raise InvalidArgument(f"suite {suite.digest[:19]}… has no {split!r} rows")
            params = dict(suite.params)
            if suite.head is not None:
                params["head"] = suite.head
            t0 = time.perf_counter()
            handle = apply_patches(model, patches, registry=reg, device=dev, fingerprint_check=False) if patches else None
            try:
                with runtime.threads(None):
                    metrics = evaluate(suite.task, model, tok, rows, params, dev, batch_size)
            finally:
                if handle is not None:
                    handle.remove()
            metrics.pop("predictions", None)
            rec = {
                "suite": suite.digest,
                "task": suite.task,
                "split": split,
                "composition": {"base": ckpt_fp(reg, ckpt), "patches": patches},
                "device": dname,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "batch_size": batch_size or params.get("batch_size") or 64,
                "metrics": metrics,
                "wall_s": round(time.perf_counter() - t0, 3),
            }
            subject = patches[0] if len(patches) == 1 else ("base:" + rec["composition"]["base"] if not patches else None)
            if subject is not None:
                rec["record"] = records.add_validation(reg.store, subject, {**rec, "verdict": "info"})
            results[i] = rec
    return [r for r in results if r is not None]


_FP_CACHE: dict[str, str] = {}
_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_MODELS_KEPT = 2  # a port's search and validation score on two bases


def _load(ckpt: Checkpoint, task: str, dev: Any, dname: str) -> tuple[Any, Any]:
    """The model for ``ckpt`` and ``task``, kept loaded between calls (searches score many candidates).

    Safe because every evaluation applies its patches through a handle whose
    ``remove()`` restores the weights bit for bit (tests/test_api.py), in a
    ``finally``. Keyed by the base's fingerprint, so a changed folder reloads.
    """
    from patchctl.evals import runtime

    key = (ckpt_fp_fresh(ckpt), _model_kind(task), dname)
    if key not in _MODELS:
        while len(_MODELS) >= _MODELS_KEPT:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = runtime.load_model(ckpt.path, task, dev)
    return _MODELS[key]


def ckpt_fp_fresh(ckpt: Checkpoint) -> str:
    return f"{ckpt.path}|{ckpt.fingerprint()}"


def ckpt_fp(reg: Repository, ckpt: Checkpoint) -> str:
    key = str(ckpt.path)
    if key not in _FP_CACHE:
        _FP_CACHE[key] = ckpt.fingerprint()
    return _FP_CACHE[key]


def validate(
    reg: Repository,
    refs: list[str],
    *,
    base: str | os.PathLike[str] | None = None,
    suites: list[str] | None = None,
    split: str = "test",
    device: str | None = None,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Score base + ``refs`` (deltas added) on their suites (or ``suites``); records are stored."""
    digests = [reg.resolve(r) for r in refs]
    fps = {reg.manifest(d).fingerprint for d in digests}
    if len(fps) > 1:
        raise BaseMismatch("the patches were made for different bases: " + ", ".join(sorted(f[:19] for f in fps)))
    if not digests and base is None:
        raise InvalidArgument("validate needs patches or --base")

    fp = fps.pop() if fps else Checkpoint(base).fingerprint()  # type: ignore[arg-type]
    ckpt = resolve_base(reg, fp, base)
    found = _suites_for(reg, digests, fp, suites)
    if not found:
        raise NotFound("no eval suites: attach some (`patchctl eval attach`) or pass --suite")
    return score_compositions(reg, ckpt, [(digests, s) for s in found], split=split, device=device,
                              batch_size=batch_size, use_cache=False)


def validate_merge(
    reg: Repository,
    merged: str,
    constituents: list[str],
    *,
    base: str | os.PathLike[str] | None = None,
    gate: float = 0.9,
    split: str = "test",
    device: str | None = None,
    batch_size: int | None = None,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Normalized scores of a merge against its constituents, forgetting against the base; the verdict.

    ``search``: the record of the coefficient search that chose the merge's
    settings, kept in the validation record too (it is also in the recipe)."""
    fp = reg.manifest(merged).fingerprint
    ckpt = resolve_base(reg, fp, base)
    jobs: list[tuple[list[str], Suite]] = []
    pairs: list[tuple[str, Suite]] = []
    for c in constituents:
        for s in _suites_for(reg, [c], fp, None):
            if s.digest in records.suites(reg.store, c, "target"):
                pairs.append((c, s))
    controls = [load_suite(reg, s) for s in records.suites(reg.store, "base:" + fp, "control")]
    for c, s in pairs:
        jobs += [([c], s), ([merged], s)]
    for s in controls:
        jobs += [([], s), ([merged], s)]
    res = score_compositions(reg, ckpt, jobs, split=split, device=device, batch_size=batch_size)
    rows = []
    for k, (c, s) in enumerate(pairs):
        ref_score, merged_score = res[2 * k]["metrics"]["score"], res[2 * k + 1]["metrics"]["score"]
        rows.append({"constituent": c, "suite": s.digest, "task": s.task, "role": "target",
                     "alone": ref_score, "merged": merged_score,
                     "normalized": merged_score / ref_score if ref_score else float("nan")})
    off = 2 * len(pairs)
    for k, s in enumerate(controls):
        ref_score, merged_score = res[off + 2 * k]["metrics"]["score"], res[off + 2 * k + 1]["metrics"]["score"]
        rows.append({"constituent": None, "suite": s.digest, "task": s.task, "role": "control",
                     "alone": ref_score, "merged": merged_score,
                     "normalized": merged_score / ref_score if ref_score else float("nan")})
    targets = [r["normalized"] for r in rows if r["role"] == "target"]
    if not targets:
        verdict = "unvalidated"
    else:
        verdict = "pass" if min(targets) >= gate else "fail"
    summary = {
        "type": "merge-validation",
        "merged": merged,
        "constituents": constituents,
        "gate": gate,
        "split": split,
        "device": res[0]["device"] if res else None,
        "rows": rows,
        "min_normalized": min(targets) if targets else None,
        "verdict": verdict,
    }
    return _recorded(reg, merged, summary, search)


def _recorded(reg: Repository, subject: str, summary: dict[str, Any], search: dict[str, Any] | None) -> dict[str, Any]:
    """``summary`` (with the ``search`` record that chose the subject, if any) stored as a validation
    record of ``subject``; its digest added as ``summary["record"]``."""
    if search is not None:
        summary["search"] = search
    summary["record"] = records.add_validation(reg.store, subject, summary)
    return summary


def base_dir_of(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def validate_port(
    reg: Repository,
    source: str,
    ported: str,
    suites: list[tuple[str, str]],
    *,
    old: str | os.PathLike[str],
    new: str | os.PathLike[str],
    gate: float = 0.8,
    split: str = "test",
    device: str | None = None,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """How much of its gain a ported patch recovers on the new base; the verdict (``search`` kept in it).

    ``suites`` pairs each of the source's suites (old base) with its port (new
    base). Per pair: the old base and old base + patch (cached when scored
    before), the new base and new base + ported patch; ``recovered`` =
    (new + ported − new) / (old + patch − old). ``pass`` when every suite
    recovers at least ``gate`` (``recovered`` is null where the patch had no
    gain on the old base; such a suite does not fail the port).
    """

    old_ck, new_ck = Checkpoint(old), Checkpoint(new)
    pairs = [(load_suite(reg, a), load_suite(reg, b)) for a, b in suites]
    before = score_compositions(reg, old_ck, [j for a, _ in pairs for j in (([], a), ([source], a))],
                                split=split, device=device, batch_size=None)
    after = score_compositions(reg, new_ck, [j for _, b in pairs for j in (([], b), ([ported], b))],
                               split=split, device=device, batch_size=None)
    rows = []
    for k, (a, b) in enumerate(pairs):
        ob, op = before[2 * k]["metrics"]["score"], before[2 * k + 1]["metrics"]["score"]
        nb, np_ = after[2 * k]["metrics"]["score"], after[2 * k + 1]["metrics"]["score"]
        gain = op - ob
        rows.append({"suite": a.digest, "ported_suite": b.digest, "task": a.task, "old_base": ob, "old_patched": op,
                     "new_base": nb, "new_ported": np_,
                     "recovered": (np_ - nb) / gain if gain > 1e-9 else None})
    rec = [r["recovered"] for r in rows if r["recovered"] is not None]
    summary = {
        "type": "port-validation",
        "ported": ported,
        "source": source,
        "gate": gate,
        "split": split,
        "device": after[0]["device"] if after else None,
        "rows": rows,
        "min_recovered": min(rec) if rec else None,
        "verdict": "pass" if not rec or min(rec) >= gate else "fail",
    }
    return _recorded(reg, ported, summary, search)


def validate_derived(
    reg: Repository,
    source: str,
    derived: str,
    suites: list[str],
    *,
    split: str = "test",
    device: str | None = None,
    kind: str = "compress-validation",
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gain kept by ``derived`` (e.g. a compressed patch) against its ``source`` on the same base.

    Per suite: base, source and derived scores and ``gain_kept`` = (derived −
    base) / (source − base) (null without a gain). Stored as a record of
    ``derived``; informational (no gate).
    """
    m = reg.manifest(derived)
    ckpt = resolve_base(reg, m.fingerprint, None)
    loaded = [load_suite(reg, s) for s in suites]
    res = score_compositions(reg, ckpt, [j for s in loaded for j in (([], s), ([source], s), ([derived], s))],
                             split=split, device=device, batch_size=None)
    rows = []
    for k, s in enumerate(loaded):
        b, src, d = (res[3 * k + i]["metrics"]["score"] for i in range(3))
        rows.append({"suite": s.digest, "task": s.task, "base": b, "source": src, "derived": d,
                     "gain_kept": (d - b) / (src - b) if src - b > 1e-9 else None})
    summary = {"type": kind, "derived": derived, "source": source, "split": split,
               "device": res[0]["device"] if res else None, "rows": rows, "verdict": "info"}
    return _recorded(reg, derived, summary, search)
