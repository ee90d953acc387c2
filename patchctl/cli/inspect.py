"""The ``inspect`` and ``localize`` commands: patch diagnostics (norms, ranks, intruders, interference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchctl.cli._common import (
    Column,
    JsonOpt,
    RegistryOpt,
    WideOpt,
    echo,
    emit_json,
    open_registry,
    out_width,
    render_table,
    short,
)

app = typer.Typer()


def _f(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


@app.command()
def inspect(
    refs: Annotated[list[str], typer.Argument(help="One patch (diagnostics) or two or more (their interference), NAME:TAG or digest.")],
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: the one the registry saw for the patch's base).")] = None,
    k: Annotated[int, typer.Option("-k", help="Intruder dimensions: how many top singular vectors of W_base + ΔW to check.")] = 10,
    eps: Annotated[float, typer.Option(help="Intruder dimensions: a top vector whose largest |cos| to every base singular vector is below this is an intruder.")] = 0.5,
    svd: Annotated[str, typer.Option(help="auto (exact SVD when the smaller side is ≤ 512, else randomized torch.svd_lowrank) | exact | lowrank.")] = "auto",
    density: Annotated[float, typer.Option(help="Two or more patches: the top fraction of entries (by |x|) whose signs and supports are compared (TIES: 0.2).")] = 0.2,
    device: Annotated[str | None, typer.Option(help="Device for the math (default: cuda when present, else cpu).")] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="One patch: list every tensor.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Diagnostics of a patch (‖Δ‖, ‖Δ‖/‖W‖, density, ranks, intruder dimensions) or of the interference of several."""
    with open_registry(registry) as reg:
        if len(refs) == 1:
            doc = reg.inspect(refs[0], base=base, k=k, eps=eps, svd=svd, device=device)
        else:
            doc = reg.interference(refs, density=density, base=base, device=device)
    if json_out:
        emit_json(doc)
    elif len(refs) == 1:
        render_inspect(refs[0], doc, tensors, wide)
    else:
        render_interference(doc, wide)


def summary_line(doc: dict[str, Any]) -> str:
    """One line of an inspect record (``show`` prints it)."""
    s = doc.get("summary") or {}
    p = doc.get("params") or {}
    ranks = sorted(t["effective_rank"] for t in (doc.get("tensors") or {}).values() if "effective_rank" in t)
    med = ranks[len(ranks) // 2] if ranks else None
    return (f"‖Δ‖ {_f(s.get('norm'))}, ‖Δ‖/‖W‖ {_f(s.get('rel_norm'), '.3g')}, density {_f(s.get('density'))}, "
            f"median effective rank {_f(med, '.3g')}, intruders {s.get('intruders', 0)}"
            f" in {s.get('matrices', 0)} matrices "
            f"(k={p.get('k')}, ε={p.get('eps')})")


def render_inspect(ref: str, doc: dict[str, Any], tensors: bool = False, wide: bool = False) -> None:
    svd = ", ".join(f"{n} {m}" for m, n in sorted(doc.get("svd", {}).items())) or "no matrices"
    state = "cached record" if doc.get("cached") else f"computed in {doc.get('wall_s', 0):.1f} s on {doc.get('device')}"
    echo(f"{ref} {short(doc['patch'], wide)} ({doc['kind']}): {state}; SVD: {svd}")
    echo(summary_line(doc))
    cols = [Column("LAYER"), Column("TENSORS", right=True), Column("‖Δ‖", right=True),
            Column("‖Δ‖/‖W‖", right=True), Column("DENSITY", right=True), Column("INTRUDERS", right=True)]
    rows = [[name, str(r["tensors"]), _f(r["norm"]), _f(r["rel_norm"], ".3g"), _f(r["density"]),
             f"{r['intruders']}/{r['matrices']}"] for name, r in doc["layers"].items()]
    echo(render_table(cols, rows, out_width(wide)).rstrip("\n"))
    if tensors:
        cols = [Column("TENSOR"), Column("SHAPE", drop=3), Column("‖Δ‖/‖W‖", right=True),
                Column("DENSITY", right=True, drop=4), Column("STABLE R.", right=True),
                Column("EFF. R.", right=True), Column("σ₁", right=True, drop=2), Column("SVD", drop=1),
                Column("INTRUDERS", right=True)]
        rows = []
        for name, r in doc["tensors"].items():
            intr = r.get("intruders")
            rows.append([name, "×".join(map(str, r["shape"])), _f(r["rel_norm"], ".3g"), _f(r["density"]),
                         _f(r.get("stable_rank"), ".3g"), _f(r.get("effective_rank"), ".3g"),
                         _f((r.get("top_sv") or [None])[0]), r.get("svd", "-"),
                         "-" if intr is None else (",".join(map(str, intr["indices"])) or "none")])
        echo(render_table(cols, rows, out_width(wide)).rstrip("\n"))


def render_interference(doc: dict[str, Any], wide: bool = False) -> None:
    cols = [Column("A"), Column("B"), Column("COSINE", right=True),
            Column(f"SIGN CONFLICT (top {doc['density']:g})", right=True), Column("JACCARD", right=True),
            Column("OVERLAP", right=True, drop=1)]
    rows = [[p["a"], p["b"], f"{p['cosine']:.4f}", f"{p['sign_conflict']:.3f}", f"{p['jaccard']:.3f}",
             f"{p['overlap']:,}"] for p in doc["pairs"]]
    echo(render_table(cols, rows, out_width(wide)).rstrip("\n"))
    for p in doc["pairs"]:
        if p["high_conflict"]:
            echo(f"warning: {p['a']} and {p['b']} disagree in sign on {p['sign_conflict']:.0%} of their shared "
                 f"top entries (> {doc['high_conflict_threshold']:.0%}): merge them with ties (sign election)")
    if doc.get("skipped"):
        echo(f"skipped (replaced tensors, no base known): {', '.join(doc['skipped'])}")


@app.command()
def localize(
    ref: Annotated[str, typer.Argument(help="The patch (NAME:TAG or digest): a diff or a LoRA.")],
    suite: Annotated[list[str] | None, typer.Option("--suite", help="Eval suite to score on (repeatable; default: the suites attached to the patch).")] = None,
    device: Annotated[str | None, typer.Option(help="Device for the evaluations (default: cuda when present, else cpu).")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Skill localization: gain kept by the patch's top 1e-4 … 100 % entries (validation, reported on test)."""
    with open_registry(registry) as reg:
        doc = reg.localize(ref, suites=suite, device=device)
    if json_out:
        emit_json(doc)
        return
    cols = [Column("DENSITY"), Column("KEPT ENTRIES", right=True), Column("VALIDATION GAIN KEPT", right=True),
            Column("TEST GAIN KEPT", right=True)]
    rows = [[f"{p['density']:g}", "all" if p["nnz"] is None else f"{p['nnz']:,}",
             _f(p["validation"]["mean_gain_kept"], ".1%"), _f(p["test"]["mean_gain_kept"], ".1%")]
            for p in doc["curve"]]
    echo(render_table(cols, rows, out_width(wide)).rstrip("\n"))
    c = doc["chosen"]
    if c is None:
        echo(f"no density keeps {doc['keep']:.0%} of the gain on validation")
    else:
        echo(f"smallest density keeping ≥ {doc['keep']:.0%} of the gain: {c['density']:g} "
             f"(validation {_f(c['validation_gain_kept'], '.1%')}, test {_f(c['test_gain_kept'], '.1%')})")
