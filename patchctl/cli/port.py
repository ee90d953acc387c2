"""The ``port`` command: re-anchor a patch on another version of its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from patchctl.cli._common import (
    EvalDeviceOpt,
    JsonOpt,
    MessageOpt,
    NoValidateOpt,
    Progress,
    RegistryOpt,
    console,
    emit_json,
    err_console,
    open_registry,
    short,
)

app = typer.Typer()
TOP = 10  # tensors shown, by patch mass


@app.command()
def port(
    ref: Annotated[str, typer.Argument(help="The patch to port (NAME:TAG or digest).")],
    to: Annotated[Path, typer.Option("--to", help="The new base model folder.")],
    from_base: Annotated[Path | None, typer.Option("--from", help="The patch's own base folder (to measure drift; default: where this registry last saw it).")] = None,
    to_name: Annotated[str | None, typer.Option(help="Record the new base as NAME@REVISION.")] = None,
    lam: Annotated[float, typer.Option("--lambda", help="λ: the ported delta is λ·τ (LoRA: lora_B scaled by λ).")] = 1.0,
    maps: Annotated[list[str] | None, typer.Option("--map", help="OLD_REGEX=NEW rename of old base tensor names (repeatable, applied in order).")] = None,
    as_ref: Annotated[str | None, typer.Option("--as", help="NAME:TAG for the ported patch (default NAME:TAG-on-<new fingerprint>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the diagnostics only; write nothing.")] = False,
    message: MessageOpt = "",
    gate: Annotated[float, typer.Option(help="Validation gate: least share of its gain the port must recover on every suite to move its tag.")] = 0.8,
    no_validate: NoValidateOpt = False,
    eval_device: EvalDeviceOpt = None,
    search: Annotated[bool, typer.Option("--search", help="Choose λ on the validation split of the patch's eval suites (ported along).")] = False,
    budget: Annotated[int, typer.Option(help="--search: most candidate ports to evaluate.")] = 6,
    force: Annotated[bool, typer.Option("--force", help="Move the tag even when the port fails its validation gate.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Port a patch to a new base version: reconcile names and vocabularies, report drift, write λ·τ."""
    from patchctl.registry.ops.porting import PortSpec

    spec = PortSpec(lam=lam, maps=tuple(maps or ()), from_base=from_base, to_name=to_name, gate=gate,
                    validate=not no_validate, search=search, budget=budget, eval_device=eval_device, force=force)
    with open_registry(registry) as reg, Progress("port", not json_out) as prog:
        report = reg.port(ref, to, spec=spec, as_ref=as_ref, dry_run=dry_run, message=message, progress=prog)
    if json_out:
        emit_json(report.to_json())
    else:
        _render(report.to_json())
    if report.validation and report.validation["verdict"] == "fail":
        raise typer.Exit(3)


def _render(r: dict[str, Any]) -> None:
    s = r["summary"]
    b = r["to_base"]
    console.print(f"port {short(r['source'])} ({r['source_kind']}) -> base {b['name']}"
                  f"{'@' + b['revision'] if b.get('revision') else ''} {short(r['to_fingerprint'])}"
                  f"  as {r['kind']} (λ = {r['lambda']:g})")
    console.print(f"vocab     {r['vocab']}" + (f"  (+{r['added_tokens']} tokens, -{len(r['dropped_tokens'])}: "
                  f"{', '.join(r['dropped_tokens'][:5])}{' …' if len(r['dropped_tokens']) > 5 else ''})"
                  if r["vocab"] == "tokens" else ""))
    console.print(f"renamed   {len(r['renamed'])} tensor(s)   reconciled mass {s['reconciled_share']:.2%}   "
                  f"unmatched mass {s['unmatched_share']:.2%}")
    console.print(f"drift     base {s['base_drift']:.4g}   mass-weighted {s['mean_drift']:.4g}   "
                  f"cos(drift, patch) {s['mean_cosine']:.3g}")
    t = Table("TENSOR (new base)", "MASS", "DRIFT", "COS", title=f"top {TOP} tensors by patch mass")
    total = sum(x["mass"] for x in r["tensors"]) or 1.0
    for x in sorted(r["tensors"], key=lambda x: -x["mass"])[:TOP]:
        t.add_row(x["name"], f"{x['mass'] / total:.1%}", _num(x["drift"]), _num(x["cosine"]))
    console.print(t)
    for side, names in (("only in the old base", r["old_only"]), ("only in the new base", r["new_only"])):
        if names:
            console.print(f"{side}: {len(names)} tensor(s), e.g. {', '.join(names[:3])}")
    for w in r["warnings"]:
        err_console.print(f"warning: {w}")
    verdict = s["verdict"]
    console.print(f"verdict   {verdict}" + "".join(f"\n  - {x}" for x in s["reasons"]))
    if r["dry_run"]:
        console.print(f"dry run: nothing written (would be {r['ref']})")
        return
    sr = (r.get("recipe_search") or {})
    if sr:
        from patchctl.cli.merge import _render_search

        _render_search(sr)
    v = r.get("validation") or {}
    for row in v.get("rows", []):
        rec = "n/a (no gain on the old base)" if row["recovered"] is None else f"{row['recovered']:.1%}"
        console.print(f"{v['split']} {row['task']} {row['suite'][:19]}…: old base {row['old_base']:.4f} → patched "
                      f"{row['old_patched']:.4f}; new base {row['new_base']:.4f} → ported {row['new_ported']:.4f}: "
                      f"gain recovered {rec}", soft_wrap=True, markup=False, highlight=False)
    if v:
        console.print(f"validation {v['verdict']}" + (f" ({v['reason']})" if v.get("reason") else
                      f" (gate {v['gate']:g})"))
    if r.get("moved"):
        console.print(f"ported {r['ref']} {r['digest']}")
    else:
        console.print(f"{r['ref']} was not moved: the port recovered less than the gate; "
                      f"it is kept as {r['digest']}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
