"""The ``merge`` command: combine patches on one base (task arithmetic, TIES, DARE, LiNeS...)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

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
    human_bytes,
    open_registry,
)

app = typer.Typer()


@app.command()
def merge(
    as_ref: Annotated[str, typer.Option("--as", help="NAME[:TAG] for the merged patch.")],
    inputs: Annotated[list[str] | None, typer.Argument(help="Patches to merge (NAME:TAG or digest), all on one base.")] = None,
    method: Annotated[str | None, typer.Option(help="task_arithmetic | linear | ties | dare_linear | dare_ties | magnitude_prune | breadcrumbs (default task_arithmetic).")] = None,
    weights: Annotated[str | None, typer.Option(help="One weight per patch, comma-separated (default 1 each).")] = None,
    density: Annotated[float | None, typer.Option(help="Fraction of entries kept (ties, dare_*, magnitude_prune, breadcrumbs).")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="λ: scale of the merged delta.")] = None,
    gamma: Annotated[float | None, typer.Option(help="Breadcrumbs: fraction of top-magnitude outliers dropped.")] = None,
    lines: Annotated[str | None, typer.Option(help="LiNeS layer scaling: 'auto' or ALPHA.")] = None,
    lines_beta: Annotated[float | None, typer.Option(help="LiNeS β (default 1 - α: the last block keeps its full update).")] = None,
    override: Annotated[list[str] | None, typer.Option("--override", help="Per-tensor parameters 'REGEX:key=val,key=val' (repeatable; later rules win).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype (default: float32 for LoRA inputs, else the inputs' common dtype).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
    seed: Annotated[int | None, typer.Option(help="Seed of DARE's random drops (default 0).")] = None,
    as_lora: Annotated[str | None, typer.Option(help="Store a LoRA: 'cat' (exact, LoRA inputs, linear methods) or 'svd' (with --rank).")] = None,
    rank: Annotated[int | None, typer.Option(help="Rank of the --as-lora svd factors.")] = None,
    apply: Annotated[Path | None, typer.Option("--apply", help="Also write base + merged patch as a full model folder here (needs --base): an export, "
                  "built beside OUT and renamed onto it when the patch is committed; its files are not fsynced (the patch's blobs are).")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder for --apply.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML/JSON file with the same settings (inputs, method, weights, params, overrides, lines, lines_beta, as_lora, rank, dtype, seed), "
                   "or a mergekit YAML (merge_method, base_model, models: folders are imported); flags override it.")] = None,
    emit_mergekit: Annotated[Path | None, typer.Option("--emit-mergekit", help="Also write the merge as a mergekit YAML here (models: the recipe's folders, "
                          "else each patch applied to the base in FILE's stem + .models/).")] = None,
    message: MessageOpt = "",
    gate: Annotated[float, typer.Option(help="Validation gate: lowest normalized score a merge needs to move its tag.")] = 0.9,
    no_validate: NoValidateOpt = False,
    eval_device: EvalDeviceOpt = None,
    search: Annotated[bool, typer.Option("--search", help="Choose λ (LiNeS β; density for TIES/DARE) on the suites' validation split.")] = False,
    budget: Annotated[int, typer.Option(help="--search: most candidate merges to evaluate.")] = 12,
    with_control: Annotated[bool, typer.Option("--with-control", help="--search: weigh the base's control suite in, (2·target + control)/3.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Move the tag even when the merge fails its gate or its SVD LoRA lost the update.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge patches on one base into a new patch (diff, or LoRA with --as-lora)."""
    from patchctl.errors import InvalidArgument
    from patchctl.registry.ops.merging import mergekit
    from patchctl.registry.ops.merging.spec import (
        MergeSpec,
        parse_override,
        parse_weights,
        read_recipe,
    )

    _quick_exit()

    options: dict[str, Any] = read_recipe(recipe) if recipe is not None else {}
    from_mergekit = "base_model" in options  # a mergekit recipe: its folders are imported, its base is the default --base
    base_model = options.pop("base_model", None)
    params: dict[str, Any] = dict(options.pop("params", None) or {})
    for key, value in (("density", density), ("lambda", lam), ("gamma", gamma)):
        if value is not None:
            if key == "lambda":
                params.pop("lam", None)
            params[key] = value
    flags: dict[str, Any] = {
        "inputs": inputs or None,
        "method": method,
        "weights": parse_weights(weights) if weights is not None else None,
        "overrides": [parse_override(o) for o in override] if override else None,
        "lines": lines,
        "lines_beta": lines_beta,
        "as_lora": as_lora,
        "rank": rank,
        "dtype": dtype,
        "seed": seed,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    ins = options.pop("inputs", None)
    if not ins:
        raise typer.BadParameter("give the patches to merge (or a --recipe with inputs)", param_hint="INPUTS")
    spec = MergeSpec(**options, params=params, device=device)  # the recipe's keys but inputs are its fields
    if emit_mergekit is not None and mergekit.emit_problems(spec):
        raise InvalidArgument("; ".join(mergekit.emit_problems(spec)))
    folders = [i if from_mergekit and i.startswith(os.sep) else None for i in ins]
    if apply is not None and base is None and base_model is not None:
        base = Path(base_model)
    with open_registry(registry) as reg, Progress("merge", not json_out) as prog:
        emit_base = None if emit_mergekit is None else mergekit.emit_base(
            reg, emit_mergekit, ins, folders=folders, base=base if base is not None else base_model)
        if any(folders):
            ins = mergekit.import_folders(reg, ins, base_model, spec=spec)
        res = reg.merge(ins, as_ref, spec=spec, apply_to=apply, base=base, message=message, progress=prog,
                        validate=not no_validate, gate=gate, eval_device=eval_device, search=search,
                        budget=budget, with_control=with_control, force=force)
        emitted = None if emit_base is None else mergekit.write_mergekit(
            reg, emit_mergekit, ins, res.recipe, folders=folders, base=emit_base)
    for w in res.warnings:
        err_console.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
    if json_out:
        emit_json({"digest": res.digest, "ref": as_ref, "kind": res.manifest.kind, "device": res.device,
                   "recipe": res.recipe, "parents": list(res.manifest.parents), "rel_error": res.rel_error,
                   "tensor_rel_errors": res.tensor_errors or None,
                   "applied": str(res.applied) if res.applied else None,
                   "validation": res.validation, "moved": res.moved, "held": res.held, "warnings": res.warnings,
                   "mergekit_recipe": str(emitted) if emitted is not None else None})
        _exit_on_failed_gate(res)
        return
    m = res.manifest
    console.print(f"merged {as_ref} {res.digest}  ({m.kind}, {len(m.tensors)} tensors, "
                  f"{human_bytes(m.stored_bytes)}, on {res.device})", soft_wrap=True)
    shown = {k: v for k, v in res.recipe.items() if k != "search"}
    console.print("recipe " + json.dumps(shown, sort_keys=True), soft_wrap=True, markup=False, highlight=False)
    sr = res.recipe.get("search")
    if sr:
        _render_search(sr)
    if res.rel_error is not None:
        worst = max(res.tensor_errors.items(), key=lambda kv: kv[1], default=None)
        tail = f"; worst {worst[0]} {worst[1]:.4g}" if worst else ""
        console.print(f"svd rank {res.recipe['output']['rank']}: relative error {res.rel_error:.4g}{tail}",
                      soft_wrap=True, markup=False)
    if res.applied is not None:
        console.print(f"wrote {res.applied}")
    if emitted is not None:
        console.print(f"wrote mergekit recipe {emitted}", soft_wrap=True, markup=False, highlight=False)
    v = res.validation or {}
    if v.get("rows"):
        from patchctl.cli.evals import render_merge_validation

        render_merge_validation(v)
    elif v:
        console.print(f"verdict: {v['verdict']} ({v.get('reason', '')})")
    if res.held:
        console.print(f"{as_ref} was not moved: {res.held}; it is kept as {res.digest} "
                      "(--force moves the tag anyway)", soft_wrap=True)
    _exit_on_failed_gate(res)


def _quick_exit() -> None:
    """At exit, freeze the objects left instead of collecting them: torch's ~10⁵ objects made the
    interpreter's final collection cost ~0.5 s after the work was done. (Run at exit only, so an
    in-process caller, like the tests' CLI runner, is unaffected until its own exit.)"""
    import atexit
    import gc

    atexit.register(gc.freeze)


def _render_search(sr: dict[str, Any]) -> None:
    """The search curve as a table with a bar per candidate (objective on the validation split)."""
    from rich.table import Table

    if sr.get("size"):
        z = sr["size"]
        console.print(f"size target {human_bytes(z['max_bytes'])}: density {z['density']:g} stores "
                      f"{human_bytes(z['stored_bytes'])} ({len(z['tried'])} sizes measured)")
    if not sr.get("curve"):
        return
    lo = min(p["objective"] for p in sr["curve"])
    hi = max(p["objective"] for p in sr["curve"])
    t = Table("COEFFICIENT", "VALUE", "OBJECTIVE (validation)", "SMOOTHED", "",
              title=f"search: {sr['evaluations']} of budget {sr['budget']}")
    chosen = sr["chosen"]
    for p in sr["curve"]:
        width = 1 + int(30 * (p["objective"] - lo) / (hi - lo)) if hi > lo else 30
        if "params" in chosen:  # a merge search: the chosen point has the chosen params and β
            picked = p["params"] == chosen["params"] and p.get("lines_beta") == chosen.get("lines_beta")
        else:
            picked = p["value"] == chosen.get(p["coefficient"])
        sm = (p.get("smoothed") or {}).get(p["coefficient"])
        t.add_row(p["coefficient"], f"{p['value']:g}", f"{p['objective']:.4f}", "-" if sm is None else f"{sm:.4f}",
                  "█" * width + (" ← chosen" if picked else ""))
    console.print(t)
    if sr.get("selection"):
        console.print(f"selection: {sr['selection']}")
    console.print(f"chosen: {sr['chosen']}")


def _exit_on_failed_gate(res: Any) -> None:
    if res.held or (res.validation and res.validation.get("verdict") == "fail"):
        raise typer.Exit(3)
