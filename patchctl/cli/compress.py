"""The ``compress`` command: a patch → a sparse patch (ComPEFT ternary, pruned values, DARE)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from patchctl.cli._common import (
    EvalDeviceOpt,
    JsonOpt,
    MessageOpt,
    Progress,
    RegistryOpt,
    console,
    emit_json,
    err_console,
    human_bytes,
    open_registry,
    parse_size,
)

app = typer.Typer()


@app.command()
def compress(
    ref: Annotated[str, typer.Argument(help="Patch to compress (NAME:TAG or digest): a diff or a LoRA.")],
    density: Annotated[float | None, typer.Option(help="Fraction of entries kept, in (0, 1], e.g. 0.1 (or --max-size).")] = None,
    mode: Annotated[str, typer.Option(help="ternary (ComPEFT: ±α per kept entry) | values (kept entries keep their value) | dare (random keep, rescaled).")] = "ternary",
    scale: Annotated[str, typer.Option(help="Ternary α: std (κ·std of the whole patch, ComPEFT) | mean (mean kept |x| per tensor).")] = "std",
    kappa: Annotated[float | None, typer.Option(help="κ for --scale std (α = κ·std). Default: 0.4/density, the calibrated κ·d ≈ 0.4 (κ = 4 at d = 0.1; κ = 1, ComPEFT's default, keeps about half the gain).")] = None,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Threshold (and std) per tensor instead of over the whole patch.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random keep mask.")] = 0,
    values_dtype: Annotated[str, typer.Option(help="dtype of kept values (values, dare): float16 | bfloat16 | float32.")] = "float16",
    lora_delta: Annotated[bool, typer.Option("--lora-delta", help="LoRA: compress ΔW = B·A·scaling (a sparse diff). The default for a LoRA.")] = False,
    factors: Annotated[bool, typer.Option("--factors", help="LoRA: compress the A/B factors instead of ΔW, as ComPEFT does (loses most of the update: the loss is measured and shown).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Tag the result even when it lost most of the update.")] = False,
    as_ref: Annotated[str | None, typer.Option("--as", help="NAME:TAG for the result (default: NAME:TAG-d<density>, plus -values/-dare).")] = None,
    message: MessageOpt = "",
    no_latest: Annotated[bool, typer.Option("--no-latest", help="Do not move NAME:latest.")] = False,
    max_size: Annotated[str | None, typer.Option(help="Choose the largest density whose stored size fits, e.g. 2MiB.")] = None,
    search: Annotated[bool, typer.Option("--search", help="Choose κ on the validation split of the patch's eval suites; report test gain kept.")] = False,
    budget: Annotated[int, typer.Option(help="--search: most candidates to evaluate.")] = 6,
    eval_device: EvalDeviceOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compress a patch into a new sparse patch (with lineage, recipe and a size/error report)."""
    from patchctl.errors import InvalidArgument
    from patchctl.registry.ops.compressing import CompressSpec

    if factors and lora_delta:
        raise InvalidArgument("--factors and --lora-delta exclude each other: give one")
    spec = CompressSpec(density=density, mode=mode, scale=scale, kappa=kappa, per_tensor=per_tensor, seed=seed,
                        values_dtype=values_dtype, lora_delta=False if factors else (True if lora_delta else None),
                        search=search, budget=budget, force=force,
                        max_size=parse_size(max_size) if max_size is not None else None, eval_device=eval_device)
    with open_registry(registry) as reg, Progress("compress", not json_out) as prog:
        res = reg.compress(ref, as_ref, spec=spec, message=message, move_latest=not no_latest, progress=prog)
    rep = res.report
    if json_out:
        emit_json({"digest": res.digest, "ref": res.ref, "held": res.held, "kind": res.manifest.kind, "source": res.source,
                   "device": res.device, "recipe": res.recipe, "parents": list(res.manifest.parents),
                   "report": {k: v for k, v in rep.items() if k not in ("tensors", "delta_rel_errors")},
                   "validation": res.validation})
        if res.held:
            raise typer.Exit(3)
        return
    target = res.ref if res.ref else "(not tagged)"
    console.print(f"compressed {ref} → {target} {res.digest}  ({len(res.manifest.tensors)} tensors, "
                  f"on {res.device})", soft_wrap=True)
    for line in report_lines(rep):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    shown = {k: v for k, v in res.recipe.items() if k != "search"}
    console.print("recipe " + json.dumps(shown, sort_keys=True), soft_wrap=True, markup=False, highlight=False)
    if res.recipe.get("search"):
        from patchctl.cli.merge import _render_search

        _render_search(res.recipe["search"])
    if res.validation:
        render_gain(res.validation)
    if res.held:
        err_console.print(f"not tagged: {res.held}, so it lost most of the update; it is kept as {res.digest} "
                          "(`patchctl gc` collects it). --force tags it anyway", soft_wrap=True, markup=False,
                          highlight=False)
        raise typer.Exit(3)


def render_gain(v: dict[str, Any]) -> None:
    """A compress-validation record: gain kept per suite on its split."""
    for r in v["rows"]:
        kept = "n/a (the source does not beat the base)" if r["gain_kept"] is None else f"{r['gain_kept']:.1%}"
        console.print(f"{v['split']} {r['task']} {r['suite'][:19]}…: base {r['base']:.4f}, source {r['source']:.4f}, "
                      f"compressed {r['derived']:.4f}: gain kept {kept}", soft_wrap=True, markup=False,
                      highlight=False)


def report_lines(rep: dict[str, Any]) -> list[str]:
    """The compression report of a sparse manifest, as `show` and `compress` print it."""
    if not rep:
        return []
    lines = [f"{rep['mode']}, density {rep['density']:g}: kept {rep['nnz']:,} of {rep['numel']:,} "
             f"({rep['kept']:.4g})"]
    over = (rep["bits_per_param"] / rep["bound_bits_per_param"] - 1) * 100 if rep["bound_bits_per_param"] else 0.0
    lines.append(f"stored {human_bytes(rep['stored_bytes'])} vs {human_bytes(rep['dense_fp16_bytes'])} dense fp16: "
                 f"{rep['ratio_fp16']:.1f}× smaller; {rep['bits_per_param']:.4f} bits/param, "
                 f"random-support bound {rep['bound_bits_per_param']:.4f} ({over:+.1f} %)")
    err = f"relative L2 error {rep['rel_error']:.4f}"
    per = rep.get("tensors") or {}
    if per:
        worst = max(per.items(), key=lambda kv: kv[1]["rel_error"])
        err += f" (worst tensor {worst[0]} {worst[1]['rel_error']:.4f})"
    if rep.get("delta_rel_error") is not None:
        err += f"; on ΔW {rep['delta_rel_error']:.4f}"
    lines.append(err)
    if rep.get("direction_kept") is not None:
        lines.append(f"direction kept: cosine {rep['direction_kept']:.4f} with "
                     + ("ΔW = B·A·scaling" if rep.get("delta_rel_error") is not None else "the update"))
    if (rep.get("delta_rel_error") or 0.0) >= 0.5:
        lines.append(f"warning: the sparse A/B factors lose most of the update (ΔW error {rep['delta_rel_error']:.2f}); "
                     "without --factors, compress compresses ΔW = B·A·scaling itself and keeps far more of the gain")
    if rep.get("uncompressed"):
        lines.append(f"kept as stored (not deltas): {', '.join(rep['uncompressed'])}")
    return lines
