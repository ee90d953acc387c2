"""Choosing merge coefficients on validation data (``patchctl merge --search``).

The papers choose their scales on held-out data (Task Arithmetic's and TIES's
λ, LiNeS's β); this module does it for the user. Each candidate setting is
merged for real (:func:`patchctl.registry.merging.merge`, no ref moved) and
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

With a budget smaller than a grid, a 1-D bracketing (ternary) search over the
grid's indices replaces the full scan; the budget counts candidate merges
evaluated (cached candidates do not count twice). Everything is deterministic:
the same inputs, suites and search give the same curve, the same choice and,
since the search record is part of the recipe, the same digest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument, NotFound
from . import records

if TYPE_CHECKING:
    from .registry import Registry

LAMBDA_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
BETA_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)
DENSITY_GRID = (0.1, 0.2, 0.4, 0.7)
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "breadcrumbs")


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
    reg: Registry,
    inputs: list[str],
    *,
    method: str,
    weights: list[float] | None,
    params: dict[str, Any],
    lines: str | float | None,
    lines_beta: float | None,
    budget: int = 12,
    with_control: bool = False,
    base: str | os.PathLike[str] | None = None,
    eval_device: str | None = None,
    merge_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], float | None, dict[str, Any]]:
    """Return ``(params, lines_beta, search record)`` chosen on the validation split."""
    from .merging import merge
    from .suites import load_suite
    from .validation import resolve_base, score_compositions

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
    kw = dict(merge_kwargs or {})
    kw.pop("apply_to", None)

    def score_refs() -> dict[tuple[str, str], float]:
        jobs = [([c], suites[s]) for c, s in pairs] + [([], suites[s]) for s in controls]
        res = score_compositions(reg, ckpt, jobs, split="validation", device=eval_device, batch_size=None)
        return {(j[0][0] if j[0] else "base", j[1].digest): r["metrics"]["score"] for j, r in zip(jobs, res, strict=True)}

    alone = score_refs()
    curve: list[dict[str, Any]] = []
    state = {"params": dict(params), "lines_beta": lines_beta}
    cache: dict[str, float] = {}

    def evaluate(coef: str, value: float) -> float:
        cand = dict(state["params"])
        beta = state["lines_beta"]
        if coef == "lines_beta":
            beta = value
        else:
            cand[coef] = value
        key = repr((sorted(cand.items()), beta))
        if key in cache:
            return cache[key]
        res = merge(reg, inputs, None, method=method, weights=weights, params=cand, lines=lines, lines_beta=beta,
                    **kw)
        jobs = [([res.digest], suites[s]) for _, s in pairs] + [([res.digest], suites[s]) for s in controls]
        out = score_compositions(reg, ckpt, jobs, split="validation", device=eval_device, batch_size=None)
        target = [o["metrics"]["score"] / alone[(c, s)] for (c, s), o in zip(pairs, out, strict=False)]
        obj = sum(target) / len(target)
        ctrl = [o["metrics"]["score"] / alone[("base", s)] for s, o in zip(controls, out[len(pairs):], strict=True)]
        if ctrl:
            obj = (2 * obj + sum(ctrl) / len(ctrl)) / 3
        curve.append({"coefficient": coef, "value": value, "params": {k: float(v) for k, v in sorted(cand.items())},
                      "lines_beta": beta, "target_normalized": target, "control_normalized": ctrl,
                      "objective": obj})
        cache[key] = obj
        return obj

    plan: list[tuple[str, tuple[float, ...]]] = []
    if lines is not None:
        plan.append(("lines_beta", BETA_GRID))
    else:
        plan.append(("lambda", LAMBDA_GRID))
    if method in DENSITY_METHODS:
        plan.append(("density", DENSITY_GRID))
    spent_before = 0
    for i, (coef, grid) in enumerate(plan):
        share = (budget - spent_before) // (len(plan) - i)
        _bracket(grid, lambda v, c=coef: evaluate(c, v), max(1, share))
        best = max((p for p in curve if p["coefficient"] == coef), key=lambda p: p["objective"])
        if coef == "lines_beta":
            state["lines_beta"] = best["value"]
        else:
            state["params"][coef] = best["value"]
        spent_before = len(curve)
    best_point = max(curve, key=lambda p: p["objective"])
    record = {
        "split": "validation",
        "objective": "mean normalized score" + (" (2·target + control)/3" if controls else ""),
        "grids": {c: list(g) for c, g in plan},
        "budget": budget,
        "evaluations": len(curve),
        "curve": curve,
        "chosen": {"params": best_point["params"], "lines_beta": best_point["lines_beta"]},
        "objective_value": best_point["objective"],
    }
    return dict(best_point["params"]), best_point["lines_beta"], record
