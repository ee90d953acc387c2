"""Patch diagnostics over stored patches: ``inspect``, pairwise interference, ``localize``.

The math is in :mod:`patchctl.patches.diagnostics`; this module streams a
stored patch through it, tensor by tensor (one ΔW, its base tensor and
``W_base + ΔW`` in memory at a time), aggregates per layer and per patch, and
keeps the result as a **record of the patch**:

    records/<patch>.jsonl  {"type": "inspect", "key": "sha256:…", "record": "sha256:…"}

``key`` is the sha256 of the canonical JSON of the parameters that decide the
result (what was computed, its version, the base fingerprint, k, ε, the SVD
mode, the density, the suites); ``record`` a canonical-JSON blob with the
result. A second request with the same key reads the blob instead of
computing (``cached: true`` in what is returned). A blob that is gone (``gc``)
or unreadable is computed again.

- :func:`inspect` — per tensor: ``‖Δ‖``, ``‖Δ‖/‖W_base‖``, density, and for
  2-D deltas stable rank, effective rank, top singular values and intruder
  dimensions; per layer (``…layer.N.`` / ``layers.N`` / ``h.N`` / ``blocks.N``
  in the name, else ``other``) and for the whole patch: the norms and
  densities summed, intruders counted. A LoRA's ``ΔW = B·A·scaling``; a
  tensor it *replaces* counts as ``Δ = new − W_base``. The base is the
  ``--base`` folder or the one the registry saw for the patch's fingerprint.
- :func:`interference` — for patches A B [C …] of one base: every pair's
  cosine similarity, TIES sign-conflict fraction and Jaccard overlap of the
  top-``d`` supports, whole and per layer.
- :func:`localize` — the skill-localization curve: base + the patch
  sparsified to each density of ``LOCALIZE_DENSITIES`` (global magnitude
  top-k, :func:`patchctl.registry.ops.compressing.compress` in ``values``
  mode with float32 values, ``lora_delta`` for a LoRA) scored on the
  validation split of the patch's eval suites, gain kept =
  ``(candidate − base) / (patch − base)``; the smallest density whose mean
  validation gain kept is ≥ ``LOCALIZE_KEEP`` is chosen and all of the curve
  is reported on the test split too. Candidates are stored unreferenced
  (``gc`` collects them), like ``compress --search``'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from patchctl.errors import BaseMismatch, DeviceUnavailable, InvalidArgument, NotFound
from patchctl.registry.formats import canonical
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.ops.compressing import CompressSpec, compress
from patchctl.registry.ops.suites import load_suite
from patchctl.registry.ops.validation import resolve_base, score_compositions
from patchctl.registry.store import records
from patchctl.registry.store.views import PatchView, check_against_base

if TYPE_CHECKING:
    import torch

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.store.repository import Repository

VERSION = 1
PAIR_DENSITY = 0.2  # TIES's default k = 20 %
LOCALIZE_DENSITIES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
LOCALIZE_KEEP = 0.95
HIGH_CONFLICT = 0.4  # sign-conflict fraction above which `inspect A B` flags a pair (random signs: 0.5)

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def layer_of(name: str) -> str:
    """``layer.N`` for a tensor of transformer block N, else ``other``."""
    m = _LAYER.search(name)
    return f"layer.{int(m.group(1))}" if m else "other"


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _key(params: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical.dumps(params)).hexdigest()


def cached(reg: Repository, subject: str, kind: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of ``kind`` (inspect, interference, localize) with these parameters, if any."""
    key = _key({"type": kind, **params})
    for e in reversed(records.read(reg.store, subject)):
        if e.get("type") == kind and e.get("key") == key:
            try:
                doc = json.loads(bytes(reg.store.read_blob(e["record"])))
            except (NotFound, ValueError, KeyError, TypeError):
                continue
            if isinstance(doc, dict) and doc.get("key") == key:
                return {**doc, "cached": True, "record": e["record"]}
    return None


def _store(reg: Repository, subject: str, kind: str, params: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    key = _key({"type": kind, **params})
    doc = {**doc, "type": kind, "key": key, "params": params}
    with reg.store.writing():
        digest = reg.store.put_blob(canonical.dumps(doc))
        records.append(reg.store, subject, {"type": kind, "key": key, "record": digest})
    return {**doc, "cached": False, "record": digest}


def latest(reg: Repository, ref: str, kind: str = "inspect") -> dict[str, Any] | None:
    """The most recent stored result of ``kind`` for ``ref`` (for ``show``), or None."""
    digest = reg.resolve(ref)
    for e in reversed(records.read(reg.store, digest)):
        if e.get("type") == kind:
            try:
                doc = json.loads(bytes(reg.store.read_blob(e["record"])))
            except (NotFound, ValueError, KeyError, TypeError):
                continue
            if isinstance(doc, dict):
                return doc
    return None


def find_base(reg: Repository, digest: str, ref: str, base: str | os.PathLike[str] | None) -> Checkpoint:
    """The patch's base: ``base`` or the folder the registry saw; one-line errors that name it."""

    m = reg.manifest(digest)
    name = m.base.get("name") or "?"
    if base is None:
        path = reg.base_path(m.fingerprint)
        if path is None:
            raise NotFound(
                f"the base of {ref}, {name} ({m.fingerprint[:19]}…), is not known locally; "
                f"give its folder with --base DIR"
            )
        base = path
    ckpt = Checkpoint(base)
    reg.check_base(m, ckpt)
    reg.remember_base(m.fingerprint, ckpt.path)
    return ckpt


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():

        raise DeviceUnavailable(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


class _Acc:
    """Sums of one group of tensors (a layer, the whole patch)."""

    def __init__(self) -> None:
        self.tensors = self.matrices = self.numel = self.nnz = 0
        self.norm_sq = self.base_norm_sq = 0.0
        self.intruders = 0

    def add(self, row: dict[str, Any], norm_sq: float, base_sq: float | None) -> None:
        self.tensors += 1
        self.numel += row["numel"]
        self.nnz += row["nnz"]
        self.norm_sq += norm_sq
        self.base_norm_sq += base_sq or 0.0
        if "stable_rank" in row:
            self.matrices += 1
        intr = row.get("intruders")
        if intr:
            self.intruders += intr["count"]

    def doc(self) -> dict[str, Any]:
        norm = math.sqrt(self.norm_sq)
        return {
            "tensors": self.tensors,
            "matrices": self.matrices,
            "numel": self.numel,
            "nnz": self.nnz,
            "density": _r(self.nnz / self.numel) if self.numel else 0.0,
            "norm": _r(norm),
            "rel_norm": _r(norm / math.sqrt(self.base_norm_sq)) if self.base_norm_sq > 0 else None,
            "intruders": self.intruders,
        }


def _deltas(view: PatchView, ckpt: Checkpoint | None, resolved: dict[str, str], dev: str):  # noqa: ANN202
    """``(base key, ΔW float32, W_base float32 or None)`` per change, one at a time."""
    import torch

    for c in view.changes():
        key = resolved.get(c.target, c.target)
        raw = ckpt.read(key) if ckpt is not None else None
        w = raw.to(dev, torch.float32) if raw is not None else None
        if c.op in ("dora", "rows"):  # DoRA, trainable tokens: ΔW = new − W_base, from the base
            if raw is not None:
                yield key, view.delta(c, raw, dev), w
            continue
        v = view.value(c, dev).to(torch.float32)
        if c.op == "replace":
            if w is None:
                continue
            v = v - w
        yield key, v, w


def inspect(
    reg: Repository,
    ref: str,
    *,
    base: str | os.PathLike[str] | None = None,
    k: int = 10,
    eps: float = 0.5,
    svd: str = "auto",
    device: str | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Diagnostics of one patch (see the module docstring); cached as a record of the patch."""
    import torch

    from patchctl.patches import diagnostics as dg

    dg.check_params(k, eps, svd)
    digest = reg.resolve(ref)
    m = reg.manifest(digest)
    if m.kind == "suite":
        raise InvalidArgument(f"{ref} is an eval suite, not a patch")
    ckpt = find_base(reg, digest, ref, base)
    params = {"version": VERSION, "base": m.fingerprint, "k": k, "eps": float(eps), "svd": svd, "seed": seed,
              "exact_max_dim": dg.EXACT_MAX_DIM}
    if use_cache:
        hit = cached(reg, digest, "inspect", params)
        if hit is not None:
            return hit
    dev = _device(device)
    view = PatchView(reg.store, m)
    resolved = check_against_base(view, ckpt)
    t0 = time.perf_counter()
    total, layers = _Acc(), {}
    tensors: dict[str, dict[str, Any]] = {}
    methods: dict[str, int] = {}
    with torch.no_grad():
        for key, delta, w in _deltas(view, ckpt, resolved, dev):
            nm = dg.norms(delta, w)
            row: dict[str, Any] = {
                "shape": list(delta.shape),
                "numel": nm.numel,
                "nnz": nm.nnz,
                "density": _r(nm.nnz / nm.numel) if nm.numel else 0.0,
                "norm": _r(math.sqrt(nm.norm_sq)),
                "rel_norm": _r(math.sqrt(nm.norm_sq / nm.base_norm_sq)) if nm.base_norm_sq else None,
            }
            if delta.dim() == 2 and min(delta.shape) > 1:
                method = dg.svd_method(tuple(delta.shape), svd)
                methods[method] = methods.get(method, 0) + 1
                row["svd"] = method
                row.update(dg.spectrum(delta, dg.TOP_SV, svd))
                if w is not None and nm.norm_sq > 0:
                    row["intruders"] = dg.intruders(w, w + delta, k, eps, svd, seed)
            tensors[key] = row
            total.add(row, nm.norm_sq, nm.base_norm_sq)
            layers.setdefault(layer_of(key), _Acc()).add(row, nm.norm_sq, nm.base_norm_sq)
            del delta, w
    doc = {
        "version": VERSION,
        "patch": digest,
        "kind": m.kind,
        "base": {"name": m.base.get("name"), "fingerprint": m.fingerprint},
        "device": dev,
        "svd": methods,
        "summary": total.doc(),
        "layers": {name: acc.doc() for name, acc in sorted(layers.items(), key=lambda kv: _layer_order(kv[0]))},
        "tensors": tensors,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    return _store(reg, digest, "inspect", params, doc)


def _layer_order(name: str) -> tuple[int, int]:
    return (0, int(name.split(".")[1])) if name.startswith("layer.") else (1, 0)


def interference(
    reg: Repository,
    refs: list[str],
    *,
    density: float = PAIR_DENSITY,
    base: str | os.PathLike[str] | None = None,
    device: str | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Pairwise cosine, TIES sign conflict and top-``d`` Jaccard of task vectors of one base.

    Tensors a LoRA replaces count as ``new − W_base`` when the base is known
    locally (``base`` or seen before), and are skipped otherwise (listed
    under ``skipped``). Cached as a record of the first patch.
    """
    import torch

    from patchctl.patches import diagnostics as dg

    if len(refs) < 2:
        raise InvalidArgument("give two or more patches to compare")
    d = dg.check_density(density)
    digests = [reg.resolve(r) for r in refs]
    if len(set(digests)) != len(digests):
        raise InvalidArgument("the same patch was given twice")
    ms = [reg.manifest(x) for x in digests]
    for r, m in zip(refs, ms, strict=True):
        if m.kind == "suite":
            raise InvalidArgument(f"{r} is an eval suite, not a patch")
        if m.fingerprint != ms[0].fingerprint:
            raise BaseMismatch(f"{r} is for another base than {refs[0]}; task vectors of different bases do not compare")
    params = {"version": VERSION, "patches": digests, "density": d}
    if use_cache:
        hit = cached(reg, digests[0], "interference", params)
        if hit is not None:
            return hit
    ckpt = None
    if base is not None or reg.base_path(ms[0].fingerprint) is not None:
        ckpt = find_base(reg, digests[0], refs[0], base)
    dev = _device(device)
    views = [PatchView(reg.store, m) for m in ms]
    changes: list[dict[str, Any]] = []
    for v in views:
        by: dict[str, Any] = {}
        for c in v.changes():
            key = (ckpt.resolve(c.target) if ckpt is not None else None) or c.target
            by[key] = c
        changes.append(by)
    names = sorted(set().union(*changes))
    pairs = [(i, j) for i in range(len(refs)) for j in range(i + 1, len(refs))]
    whole = {p: {} for p in pairs}  # type: dict[tuple[int, int], dict[str, float]]
    per_layer: dict[tuple[int, int], dict[str, dict[str, float]]] = {p: {} for p in pairs}
    skipped: set[str] = set()
    t0 = time.perf_counter()
    with torch.no_grad():
        for name in names:
            ts: list[torch.Tensor | None] = []
            w = None
            for v, by in zip(views, changes, strict=True):
                c = by.get(name)
                if c is None:
                    ts.append(None)
                    continue
                if c.op in ("dora", "rows"):  # ΔW needs the base
                    if ckpt is None:
                        skipped.add(name)
                        ts.append(None)
                        continue
                    ts.append(v.delta(c, ckpt.read(name), dev))
                    continue
                t = v.value(c, dev).to(torch.float32)
                if c.op == "replace":
                    if ckpt is None:
                        skipped.add(name)
                        ts.append(None)
                        continue
                    if w is None:
                        w = ckpt.read(name).to(dev, torch.float32)
                    t = t - w
                ts.append(t)
            for p in pairs:
                cnt = dg.pair_counts(ts[p[0]], ts[p[1]], d)
                dg.add_counts(whole[p], cnt)
                dg.add_counts(per_layer[p].setdefault(layer_of(name), {}), cnt)
            del ts, w
    out_pairs = []
    for i, j in pairs:
        s = dg.pair_summary(whole[i, j])
        s.update({"a": refs[i], "b": refs[j], "a_digest": digests[i], "b_digest": digests[j],
                  "layers": {ln: {k: v for k, v in dg.pair_summary(c).items() if k in ("cosine", "sign_conflict", "jaccard")}
                             for ln, c in sorted(per_layer[i, j].items(), key=lambda kv: _layer_order(kv[0]))},
                  "high_conflict": s["sign_conflict"] > HIGH_CONFLICT})
        out_pairs.append(s)
    doc = {"version": VERSION, "patches": digests, "density": d, "device": dev, "pairs": out_pairs,
           "skipped": sorted(skipped), "high_conflict_threshold": HIGH_CONFLICT,
           "wall_s": round(time.perf_counter() - t0, 3)}
    return _store(reg, digests[0], "interference", params, doc)


def _gain(cand: float, base: float, source: float) -> float | None:
    return (cand - base) / (source - base) if source - base > 1e-9 else None


def localize(
    reg: Repository,
    ref: str,
    *,
    suites: list[str] | None = None,
    densities: tuple[float, ...] | list[float] | None = None,
    keep: float = LOCALIZE_KEEP,
    device: str | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """The skill-localization curve of ``ref`` (see the module docstring); cached as a record of the patch."""
    from patchctl.patches.diagnostics import check_density

    digest = reg.resolve(ref)
    m = reg.manifest(digest)
    if m.kind == "suite":
        raise InvalidArgument(f"{ref} is an eval suite, not a patch")
    if m.kind not in ("diff", "lora"):
        raise InvalidArgument(f"{ref} is a {m.kind} patch; localize the dense patch it was made from")
    grid = sorted({check_density(x) for x in (LOCALIZE_DENSITIES if densities is None else densities)})
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InvalidArgument(f"keep must be in (0, 1], got {keep!r}")
    wanted = [reg.resolve(s) for s in suites] if suites else records.suites(reg.store, digest, "target")
    if not wanted:
        raise NotFound(f"no eval suite is attached to {ref}; attach one with `patchctl eval attach {ref} SUITE` "
                       "(or pass --suite SUITE)")
    loaded = [load_suite(reg, s) for s in wanted]
    for s in loaded:
        if s.manifest.fingerprint != m.fingerprint:
            raise BaseMismatch(f"suite {s.digest[:19]}… is for another base than {ref}")
        for split in ("validation", "test"):
            if not s.split(split):
                raise InvalidArgument(f"suite {s.digest[:19]}… has no {split} rows; localize selects on "
                                      "validation and reports on test")
    params = {"version": VERSION, "suites": [s.digest for s in loaded], "densities": grid, "keep": float(keep),
              "select": "global magnitude top-k, values float32"}
    if use_cache:
        hit = cached(reg, digest, "localize", params)
        if hit is not None:
            return hit
    ckpt = resolve_base(reg, m.fingerprint, None)
    t0 = time.perf_counter()

    def scores(split: str, patches: list[str]) -> list[float]:
        jobs = [(patches, s) for s in loaded]
        return [r["metrics"]["score"] for r in score_compositions(reg, ckpt, jobs, split=split, device=device,
                                                                   batch_size=None)]

    curve: list[dict[str, Any]] = []
    with reg.store.writing():  # held from the first candidate on: gc cannot collect them mid-curve
        ref_scores = {sp: {"base": scores(sp, []), "patch": scores(sp, [digest])} for sp in ("validation", "test")}
        for d in grid:
            if d >= 1.0:
                cand, nnz, numel = digest, None, None
            else:
                spec = CompressSpec(density=d, mode="values", values_dtype="float32", lora_delta=m.kind == "lora")
                res = compress(reg, digest, "localize:candidate", spec, move_ref=False)
                cand, nnz, numel = res.digest, res.report["nnz"], res.report["numel"]
            point: dict[str, Any] = {"density": d, "patch": cand, "nnz": nnz, "numel": numel}
            for sp in ("validation", "test"):
                got = scores(sp, [cand])
                gains = [_gain(c, b, s) for c, b, s in zip(got, ref_scores[sp]["base"], ref_scores[sp]["patch"],
                                                            strict=True)]
                known = [g for g in gains if g is not None]
                point[sp] = {"scores": got, "gain_kept": gains,
                             "mean_gain_kept": _r(sum(known) / len(known)) if known else None}
            curve.append(point)
    chosen = next((p for p in curve if (p["validation"]["mean_gain_kept"] or 0.0) >= keep), None)
    doc = {
        "version": VERSION,
        "patch": digest,
        "kind": m.kind,
        "suites": [{"suite": s.digest, "task": s.task} for s in loaded],
        "base_scores": {sp: v["base"] for sp, v in ref_scores.items()},
        "patch_scores": {sp: v["patch"] for sp, v in ref_scores.items()},
        "curve": curve,
        "keep": float(keep),
        "chosen": None if chosen is None else {
            "density": chosen["density"],
            "validation_gain_kept": chosen["validation"]["mean_gain_kept"],
            "test_gain_kept": chosen["test"]["mean_gain_kept"],
        },
        "selection": f"smallest density whose mean validation gain kept is ≥ {keep:g}",
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    return _store(reg, digest, "localize", params, doc)


__all__ = ["LOCALIZE_DENSITIES", "LOCALIZE_KEEP", "PAIR_DENSITY", "find_base", "inspect", "interference",
           "latest", "layer_of", "localize"]


SAMPLE_ENTRIES = 1 << 20  # the merge warning reads at most this many entries per input
Pair = tuple[int, int]


def _sign_conflict(counts: dict[str, float]) -> float:
    """The sign-conflict fraction of summed pair counts (:func:`~patchctl.patches.diagnostics.pair_summary`)."""
    # 6 significant digits, as pair_summary rounds (its module imports torch)
    return float(f"{counts['conflicts'] / counts['overlap']:.6g}") if counts["overlap"] else 0.0


def _host_conflicts(views: list[Any], changes: list[dict[str, Any]], picked: list[str], pairs: list[Pair],
                    density: float) -> dict[Pair, dict[str, float]] | None:
    """Each pair's summed overlap and conflicts over ``picked``, from the stored raw deltas' bits with the
    C kernels (no torch: a task-arithmetic merge then never imports it); None where a delta is not a raw
    float32/float16/bfloat16 blob or the kernels are not built (the torch path then)."""
    from patchctl.patches import host
    from patchctl.patches.host_merge import sign_counts

    if any(v.m.kind == "lora" or len(ch[t].sources) != 1 for v, ch in zip(views, changes, strict=True) for t in picked):
        return None  # a LoRA delta is B @ A: made by torch
    entries = [[v.m.tensors[ch[t].sources[0]] for v, ch in zip(views, changes, strict=True)] for t in picked]
    if not all(host.usable(e.dtype) and e.encoding == "raw" for row in entries for e in row):
        return None
    acc = {p: {"overlap": 0.0, "conflicts": 0.0} for p in pairs}
    for row in entries:
        ts = [host.HostTensor(v.store.read_blob(e.digest), e.dtype, e.shape) for v, e in zip(views, row, strict=True)]
        for (i, j), a in acc.items():
            overlap, conflicts = sign_counts(ts[i], ts[j], density)
            a["overlap"] += overlap
            a["conflicts"] += conflicts
    return acc


def _torch_conflicts(views: list[Any], changes: list[dict[str, Any]], picked: list[str], pairs: list[Pair],
                     density: float) -> dict[Pair, dict[str, float]]:
    import torch

    from patchctl.patches import diagnostics as dg

    acc: dict[Pair, dict[str, float]] = {p: {} for p in pairs}
    with torch.no_grad():
        for t in picked:
            ts = [v.value(ch[t]).to(torch.float32) for v, ch in zip(views, changes, strict=True)]
            for (i, j), a in acc.items():
                dg.add_counts(a, dg.pair_counts(ts[i], ts[j], density))
    return acc


CONFLICT_AWARE = ("ties", "dare_ties", "breadcrumbs_ties")  # methods that elect a sign per entry


def conflict_warning(reg: Repository, refs: list[str], method: str, density: float = PAIR_DENSITY) -> str | None:
    """A one-line warning when the inputs of a merge conflict in sign, from a sample (or None).

    The sample: the largest targets every input changes that fit in
    :data:`SAMPLE_ENTRIES` entries together (else the smallest one); on it, the TIES sign-conflict fraction
    among each pair's top-``density`` entries (:func:`~patchctl.patches.diagnostics.pair_counts`).
    Above :data:`HIGH_CONFLICT` for some pair, a method that does not elect
    signs (task arithmetic, linear, DARE linear, ...) lets them cancel: the
    warning names TIES. Methods in :data:`CONFLICT_AWARE` get no warning.
    """
    if method in CONFLICT_AWARE or len(refs) < 2:
        return None
    views = [reg.view(r) for r in refs]
    changes = [{c.target: c for c in v.changes() if c.op == "add"} for v in views]
    shared = set(changes[0]).intersection(*changes[1:])
    sizes = {t: math.prod(views[0].shape_of(changes[0][t])) for t in shared}
    picked, total = [], 0
    for t in sorted(shared, key=lambda t: (-sizes[t], t)):  # the largest targets that fit the budget
        if total + sizes[t] <= SAMPLE_ENTRIES:
            picked.append(t)
            total += sizes[t]
    if not picked and shared:  # every target is larger than the budget: the smallest one
        picked = [min(shared, key=lambda t: (sizes[t], t))]
    if not picked:
        return None
    pairs = [(i, j) for i in range(len(refs)) for j in range(i + 1, len(refs))]
    acc = _host_conflicts(views, changes, picked, pairs, density)
    if acc is None:
        acc = _torch_conflicts(views, changes, picked, pairs, density)
    worst = max(((_sign_conflict(a), p) for p, a in acc.items()), key=lambda x: x[0])
    if worst[0] <= HIGH_CONFLICT:
        return None
    i, j = worst[1]
    return (f"{refs[i]} and {refs[j]} disagree in sign on {worst[0]:.0%} of their top-{density:g} entries "
            f"(sampled on {len(picked)} tensors; above {HIGH_CONFLICT:.0%} {method} lets them cancel): "
            "--method ties elects a sign per entry")
