"""Choosing coefficients on validation data: ``merge``, ``compress`` and ``port --search``.

The papers choose their scales on held-out data (Task Arithmetic's and TIES's
λ, LiNeS's β); this module does it for the user. Each candidate setting is
merged for real (:func:`patchctl.registry.ops.merging.merge`, no ref moved) and
scored on the **validation** split of the constituents' eval suites; the
objective is the mean normalized score (merged / constituent alone), or, with
``with_control``, ``(2·target + control) / 3`` as LiNeS weighs its forgetting
check. Selection never reads the ``test`` split; the final merge is validated
on ``test`` as usual, so the reported numbers are honest.

Coefficients searched, one at a time (coordinate search), each over a fixed
grid:

- ``lambda`` for every method without LiNeS: ``LAMBDA_GRID``;
- ``lines_beta`` when LiNeS is on (λ stays as given, default 1): ``BETA_GRID``;
- then ``density`` for TIES/DARE/magnitude_prune/breadcrumbs: ``DENSITY_GRID``.

The choice in each grid is the argmax of the objective smoothed 1-2-1 over
the evaluated grid neighbours (:func:`smoothed`): validation splits are
small and a single row moves a normalized score by points, so the raw argmax
follows noise (bench/README.md shows both).

With a budget smaller than a grid, a 1-D bracketing (ternary) search over the
grid's indices replaces the full scan; the budget counts candidate merges
evaluated (cached candidates do not count twice). Everything is deterministic:
the same inputs, suites and search give the same curve, the same choice and,
since the search record is part of the recipe, the same digest.

``compress --search`` (:func:`search_compress`) chooses ComPEFT's κ (ternary,
``α = κ·std``) over :func:`kappa_grid` — a grid around the rule ``κ·d ≈ 0.4``
that the MiniLM task vectors follow (κ = 4 at d = 0.1, 2 at d = 0.2) — and
``port --search`` (:func:`search_port`) the port's λ over ``PORT_LAMBDA_GRID``.
Both maximize the mean **gain kept** on the validation split, over the source
patch's suites: ``(candidate − base) / (source − base)``, the base and the
source each on their own base model (for a port, the source on the old base,
the candidate and the base on the new one); a suite where the source does not
beat its base scores ``candidate / source`` instead. A size target
(``compress --max-size``, :func:`density_for_size`) is met without
evaluations: the stored size is measured (nothing written) while a
bisection over the density narrows to the largest density that fits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from patchctl.errors import InvalidArgument, NotFound
from patchctl.registry.formats.checkpoint import Checkpoint
from patchctl.registry.ops.compressing import KAPPA_RULE, compress, plan_source, stored_size
from patchctl.registry.ops.merging import merge
from patchctl.registry.ops.porting import port, port_suites
from patchctl.registry.ops.suites import load_suite
from patchctl.registry.ops.validation import resolve_base, score_compositions
from patchctl.registry.store import records

if TYPE_CHECKING:
    from patchctl.registry.ops.compressing import CompressSpec
    from patchctl.registry.ops.merging import MergeSpec
    from patchctl.registry.ops.porting import PortSpec
    from patchctl.registry.store.repository import Repository

LAMBDA_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
KAPPA_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
PORT_LAMBDA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
BETA_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)
DENSITY_GRID = (0.1, 0.2, 0.4, 0.7)
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "breadcrumbs")


SELECTION = "argmax of the objective smoothed 1-2-1 over evaluated grid neighbours"


def smoothed(grid: tuple[float, ...], pts: dict[float, float]) -> dict[float, float]:
    """Each point's objective averaged with its evaluated grid neighbours, weights 1-2-1.

    Validation splits are small (the fortune task has 72 rows: one row moves a
    normalized score by 1.7 points), so the raw argmax of a grid follows the
    noise; the true curves are smooth in the coefficient, and averaging with
    the neighbours halves the variance of the figure the choice is made on.
    """
    order = sorted(pts, key=lambda v: grid.index(v) if v in grid else len(grid) + v)
    out = {}
    for i, v in enumerate(order):
        terms = [(2.0, pts[v])] + [(1.0, pts[order[j]]) for j in (i - 1, i + 1) if 0 <= j < len(order)]
        out[v] = sum(w * x for w, x in terms) / sum(w for w, _ in terms)
    return out


def choose(grid: tuple[float, ...], pts: dict[float, float], smooth: dict[float, float]) -> float:
    """The value with the best smoothed objective (ties: best raw objective, then the earlier grid value)."""
    return max(pts, key=lambda v: (smooth[v], pts[v], -(grid.index(v) if v in grid else len(grid))))


def _bracket(grid: tuple[float, ...], f: Callable[[float], float], budget: int) -> None:
    """Evaluate ``f`` over ``grid`` (all of it, or a ternary search when the budget is short)."""
    if budget >= len(grid):
        for x in grid:
            f(x)
        return
    lo, hi = 0, len(grid) - 1
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = f(grid[i])
        return seen[i]

    while hi - lo > 2 and len(seen) + 2 <= budget:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if at(m1) < at(m2):
            lo = m1
        else:
            hi = m2
    for i in range(lo, hi + 1):
        if len(seen) >= budget and i not in seen:
            break
        at(i)


def search_merge(
    reg: Repository,
    inputs: list[str],
    spec: MergeSpec,
    *,
    budget: int = 12,
    with_control: bool = False,
    base: str | os.PathLike[str] | None = None,
    eval_device: str | None = None,
) -> tuple[MergeSpec, dict[str, Any]]:
    """Return ``(spec, search record)``: ``spec`` with the ``params`` and ``lines_beta`` chosen on the validation split.

    Each candidate is ``spec`` with other ``params`` or ``lines_beta``
    (:func:`dataclasses.replace`), merged without moving a ref.
    """
    from dataclasses import replace


    if budget < 1:
        raise InvalidArgument(f"--budget must be at least 1, got {budget}")
    digests = [reg.resolve(r) for r in inputs]
    fp = reg.manifest(digests[0]).fingerprint
    pairs = [(c, s) for c in digests for s in records.suites(reg.store, c, "target")]
    if not pairs:
        raise NotFound("--search needs eval suites attached to the inputs (`patchctl eval attach`)")
    controls = records.suites(reg.store, "base:" + fp, "control") if with_control else []
    suites = {s: load_suite(reg, s) for s in {s for _, s in pairs} | set(controls)}
    for s in suites.values():
        if not s.split("validation"):
            raise InvalidArgument(f"suite {s.digest[:19]}… has no validation rows; --search selects on them")
    ckpt = resolve_base(reg, fp, base)
    method, lines = spec.method, spec.lines

    def score_refs() -> dict[tuple[str, str], float]:
        jobs = [([c], suites[s]) for c, s in pairs] + [([], suites[s]) for s in controls]
        res = score_compositions(reg, ckpt, jobs, split="validation", device=eval_device, batch_size=None)
        return {(j[0][0] if j[0] else "base", j[1].digest): r["metrics"]["score"] for j, r in zip(jobs, res, strict=True)}

    alone = score_refs()
    curve: list[dict[str, Any]] = []
    state = {"params": dict(spec.params or {}), "lines_beta": spec.lines_beta}
    cache: dict[str, dict[str, Any]] = {}
    stage: list[tuple[float, dict[str, Any]]] = []  # (value, curve entry) scored in the current stage

    def evaluate(coef: str, value: float) -> float:
        cand = dict(state["params"])
        beta = state["lines_beta"]
        if coef == "lines_beta":
            beta = value
        else:
            cand[coef] = value
        key = repr((sorted(cand.items()), beta))
        if key in cache:
            stage.append((value, cache[key]))
            return cache[key]["objective"]
        res = merge(reg, inputs, None, replace(spec, params=cand, lines_beta=beta))
        jobs = [([res.digest], suites[s]) for _, s in pairs] + [([res.digest], suites[s]) for s in controls]
        out = score_compositions(reg, ckpt, jobs, split="validation", device=eval_device, batch_size=None)
        target = [o["metrics"]["score"] / alone[(c, s)] for (c, s), o in zip(pairs, out, strict=False)]
        obj = sum(target) / len(target)
        ctrl = [o["metrics"]["score"] / alone[("base", s)] for s, o in zip(controls, out[len(pairs):], strict=True)]
        if ctrl:
            obj = (2 * obj + sum(ctrl) / len(ctrl)) / 3
        entry = {"coefficient": coef, "value": value, "params": {k: float(v) for k, v in sorted(cand.items())},
                 "lines_beta": beta, "target_normalized": target, "control_normalized": ctrl, "objective": obj}
        curve.append(entry)
        cache[key] = entry
        stage.append((value, entry))
        return obj

    plan: list[tuple[str, tuple[float, ...]]] = []
    if lines is not None:
        plan.append(("lines_beta", BETA_GRID))
    else:
        plan.append(("lambda", LAMBDA_GRID))
    if method in DENSITY_METHODS:
        plan.append(("density", DENSITY_GRID))
    spent_before = 0
    best_point: dict[str, Any] = {}
    for i, (coef, grid) in enumerate(plan):
        share = (budget - spent_before) // (len(plan) - i)
        stage.clear()
        _bracket(grid, lambda v, c=coef: evaluate(c, v), max(1, share))
        by_value = dict(stage)
        smooth = smoothed(grid, {v: e["objective"] for v, e in by_value.items()})
        for v, e in by_value.items():
            e.setdefault("smoothed", {})[coef] = smooth[v]
        value = choose(grid, {v: e["objective"] for v, e in by_value.items()}, smooth)
        best_point = by_value[value]
        if coef == "lines_beta":
            state["lines_beta"] = value
        else:
            state["params"][coef] = value
        spent_before = len(curve)
    record = {
        "split": "validation",
        "objective": "mean normalized score" + (" (2·target + control)/3" if controls else ""),
        "selection": SELECTION,
        "grids": {c: list(g) for c, g in plan},
        "budget": budget,
        "evaluations": len(curve),
        "curve": curve,
        "chosen": {"params": best_point["params"], "lines_beta": best_point["lines_beta"]},
        "objective_value": best_point["objective"],
    }
    return replace(spec, params=dict(best_point["params"]), lines_beta=best_point["lines_beta"]), record


def kappa_grid(density: float) -> tuple[float, ...]:
    """κ candidates for ``density``: ``KAPPA_RULE / d`` times ``KAPPA_FACTORS``, 3 significant digits."""
    return tuple(float(f"{KAPPA_RULE / density * f:.3g}") for f in KAPPA_FACTORS)


def _gain(cand: float, base: float, source: float, source_base: float) -> float:
    """``(cand − base) / (source − source_base)``: the share of the source's gain the candidate keeps.

    ``base`` is the candidate's base model, ``source_base`` the source's (the
    same model except for a port). Without a gain: ``cand / source``.
    """
    if source - source_base > 1e-9:
        return (cand - base) / (source - source_base)
    return cand / source if source else float("nan")


class _GainSearch:
    """Scores candidates (patch digests on ``cand_ckpt``) by mean gain kept on the validation split.

    ``pairs``: (suite the source is scored with, suite the candidates are
    scored with) — the same suite, or the source's suite and its port.
    """

    def __init__(self, reg: Repository, source: str, src_ckpt: Any, cand_ckpt: Any,
                 pairs: list[tuple[Any, Any]], eval_device: str | None) -> None:

        for a, b in pairs:
            for s in (a, b):
                if not s.split("validation"):
                    raise InvalidArgument(f"suite {s.digest[:19]}… has no validation rows; --search selects on them")
        self.reg, self.ckpt, self.pairs, self.dev = reg, cand_ckpt, pairs, eval_device
        score = lambda ck, jobs: [r["metrics"]["score"] for r in score_compositions(  # noqa: E731
            reg, ck, jobs, split="validation", device=eval_device, batch_size=None)]
        self.source = score(src_ckpt, [([source], a) for a, _ in pairs])
        self.source_base = score(src_ckpt, [([], a) for a, _ in pairs])
        self.base = score(cand_ckpt, [([], b) for _, b in pairs])
        self._score = score
        self.curve: list[dict[str, Any]] = []

    def __call__(self, coef: str, value: float, digest: str) -> float:
        got = self._score(self.ckpt, [([digest], b) for _, b in self.pairs])
        gains = [_gain(c, b, s, sb) for c, b, s, sb in zip(got, self.base, self.source, self.source_base, strict=True)]
        obj = sum(gains) / len(gains)
        self.curve.append({"coefficient": coef, "value": value, "params": {coef: value}, "scores": got,
                           "target_gain": gains, "objective": obj})
        return obj

    def record(self, grid: tuple[float, ...], budget: int, coef: str) -> dict[str, Any]:
        pts = {p["value"]: p["objective"] for p in self.curve}
        smooth = smoothed(grid, pts)
        for p in self.curve:
            p["smoothed"] = {coef: smooth[p["value"]]}
        value = choose(grid, pts, smooth)
        best = next(p for p in self.curve if p["value"] == value)
        return {
            "split": "validation",
            "objective": "mean gain kept, (candidate − base) / (source − base)",
            "selection": SELECTION,
            # no suite digests: they change with the test rows, which must not change the record
            "suites": len(self.pairs),
            "base_scores": self.base,
            "source_scores": self.source,
            "source_base_scores": self.source_base,
            "grids": {coef: list(grid)},
            "budget": budget,
            "evaluations": len(self.curve),
            "curve": self.curve,
            "chosen": {coef: best["value"]},
            "objective_value": best["objective"],
        }


def _source_suites(reg: Repository, digest: str) -> list[str]:
    found = records.suites(reg.store, digest, "target")
    if not found:
        raise NotFound("--search needs eval suites attached to the patch (`patchctl eval attach`)")
    return found


def search_compress(reg: Repository, ref: str, spec: CompressSpec) -> tuple[float, dict[str, Any]]:
    """Choose κ (ternary, ``scale="std"``) on the validation split within ``spec.budget`` candidates;
    return ``(kappa, search record)``."""

    digest = reg.resolve(ref)
    fp = reg.manifest(digest).fingerprint
    suites = [load_suite(reg, s) for s in _source_suites(reg, digest)]
    ckpt = resolve_base(reg, fp, None)
    plan_source(reg, ref, spec.lora_delta)  # a bad request (sparse source, ...) fails here, before any evaluation
    gs = _GainSearch(reg, digest, ckpt, ckpt, [(s, s) for s in suites], spec.eval_device)
    grid = kappa_grid(spec.d)

    def evaluate(kappa: float) -> float:
        cand = compress(reg, ref, None, replace(spec, kappa=kappa), move_ref=False)
        return gs("kappa", kappa, cand.digest)

    _bracket(grid, evaluate, spec.budget)
    rec = gs.record(grid, spec.budget, "kappa")
    return float(rec["chosen"]["kappa"]), rec


def density_for_size(reg: Repository, ref: str, spec: CompressSpec, *, steps: int = 14) -> tuple[float, dict[str, Any]]:
    """The largest density (3 significant digits) whose stored size is at most ``spec.max_size``.

    Bisection over ``log10(d)`` in ``[1e-5, 1]`` on measured sizes
    (:func:`patchctl.registry.ops.compressing.stored_size`, nothing written);
    returns the density and a record of the sizes tried.
    """
    import math


    max_bytes = spec.max_size
    if max_bytes is None:
        raise InvalidArgument("density_for_size needs --max-size")
    tried: list[dict[str, Any]] = []
    cache: dict[float, int] = {}

    def size(d: float) -> int:
        if d not in cache:
            cache[d] = stored_size(reg, ref, replace(spec, density=d))
            tried.append({"density": d, "stored_bytes": cache[d]})
        return cache[d]

    def sig3_down(d: float) -> float:
        e = math.floor(math.log10(d)) - 2
        return math.floor(d / 10**e) * 10**e

    if size(1.0) <= max_bytes:
        best = 1.0
    else:
        lo, hi = -5.0, 0.0
        if size(1e-5) > max_bytes:
            raise InvalidArgument(f"no density fits {max_bytes} bytes: even d = 1e-05 takes {cache[1e-5]} bytes")
        for _ in range(steps):
            mid = (lo + hi) / 2
            if size(10**mid) <= max_bytes:
                lo = mid
            else:
                hi = mid
        best = float(f"{sig3_down(10**lo):.3g}")
        while size(best) > max_bytes:  # rounding went up by a hair: step down one unit in the last digit
            e = math.floor(math.log10(best)) - 2
            best = float(f"{best - 10**e:.3g}")
    return best, {"max_bytes": max_bytes, "density": best, "stored_bytes": cache[best], "tried": tried}


def search_port(reg: Repository, ref: str, to: str | os.PathLike[str], spec: PortSpec) -> tuple[float, dict[str, Any]]:
    """Choose the port's λ on the validation split of the patch's suites (ported to ``to``)."""

    digest = reg.resolve(ref)
    src_suites = _source_suites(reg, digest)
    # checks (same base, architecture, names, ...) before any evaluation
    probe = port(reg, ref, to, spec, dry_run=True)
    new = Checkpoint(to)
    old = Checkpoint(probe.from_path)
    ported = port_suites(reg, src_suites, new, probe.to_base)
    pairs = [(load_suite(reg, a), load_suite(reg, b)) for a, b in zip(src_suites, ported, strict=True)]
    gs = _GainSearch(reg, digest, old, new, pairs, spec.eval_device)

    def evaluate(lam: float) -> float:
        cand = port(reg, ref, to, replace(spec, lam=lam), move_ref=False)
        assert cand.digest is not None
        return gs("lambda", lam, cand.digest)

    _bracket(PORT_LAMBDA_GRID, evaluate, spec.budget)
    rec = gs.record(PORT_LAMBDA_GRID, spec.budget, "lambda")
    rec["objective"] = "mean gain recovered, (new base + λ·τ − new base) / (old base + τ − old base)"
    return float(rec["chosen"]["lambda"]), rec
