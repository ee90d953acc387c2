"""Eval suites and validation: `eval push`, `eval attach`, `eval ls`, `validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from patchctl.cli._common import JsonOpt, RegistryOpt, console, emit_json, open_registry, short

app = typer.Typer()
eval_app = typer.Typer(help="Eval suites: labelled data stored in the registry like patches.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _list_arg(value: str | None) -> list[str] | None:
    if value is None:
        return None
    p = Path(value)
    if p.suffix == ".json" and p.is_file():
        data = json.loads(p.read_text())
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise typer.BadParameter(f"{value}: expected a JSON list of strings")
        return data
    return [x.strip() for x in value.split(",")]


@eval_app.command("push")
def eval_push(
    data: Annotated[Path, typer.Argument(help="JSONL rows (see docs/design.md for each task's fields).")],
    ref: Annotated[str, typer.Argument(help="NAME[:TAG] for the suite.")],
    task: Annotated[str, typer.Option(help="classification | lm-loss | multiple-choice | exact-match | python:module:function")],
    base: Annotated[Path, typer.Option(help="Base model folder the suite is for.")],
    labels: Annotated[str | None, typer.Option(help="Class names, comma-separated or a .json list (classification).")] = None,
    prompts: Annotated[str | None, typer.Option(help="One prompt per class (comma-separated or .json list): the head is 20 × their normalized base embeddings.")] = None,
    head: Annotated[Path | None, typer.Option(help="A .safetensors file with a float tensor 'head' [classes, hidden].")] = None,
    max_len: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    control: Annotated[bool, typer.Option("--control", help="Declare it the base's control suite (forgetting check).")] = False,
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Store an eval suite."""
    with open_registry(registry) as reg:
        digest = reg.eval_push(data, ref, task=task, base=base, labels=_list_arg(labels), prompts=_list_arg(prompts),
                               head=head, max_len=max_len, control=control, message=message)
    if json_out:
        emit_json({"digest": digest})
    else:
        console.print(f"pushed suite {ref} {digest}{' (control)' if control else ''}")


@eval_app.command("attach")
def eval_attach(
    ref: Annotated[str, typer.Argument(help="The patch (NAME:TAG or digest).")],
    suites: Annotated[list[str], typer.Argument(help="Suites that judge it.")],
    registry: RegistryOpt = None,
) -> None:
    """Declare the suites a patch is judged by (used by validate and merge)."""
    with open_registry(registry) as reg:
        for s in suites:
            added = reg.eval_attach(ref, s)
            console.print(f"{'attached' if added else 'already attached'} {s} to {ref}")


@app.command()
def validate(
    refs: Annotated[list[str], typer.Argument(help="Patches to compose on the base (their deltas add up).")],
    base: Annotated[Path | None, typer.Option(help="Base folder (default: where the base was pushed from).")] = None,
    suite: Annotated[list[str] | None, typer.Option("--suite", help="Suites to run (default: attached ones + the base's control).")] = None,
    split: Annotated[str, typer.Option(help="Which rows to score.")] = "test",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compose base + patches, run the eval suites, record the results."""
    with open_registry(registry) as reg:
        res = reg.validate(refs, base=base, suites=suite, split=split, device=device, batch_size=batch_size)
    if json_out:
        emit_json(res)
        return
    t = Table("SUITE", "TASK", "SPLIT", "SCORE", "N", "DEVICE", "WALL s")
    for r in res:
        m = r["metrics"]
        t.add_row(short(r["suite"]), r["task"], r["split"], f"{m['score']:.4f}", str(m.get("n", "")), r["device"],
                  f"{r['wall_s']:.1f}")
    console.print(t)


def render_merge_validation(v: dict[str, Any]) -> None:
    t = Table("ROLE", "SUITE", "TASK", "ALONE", "MERGED", "NORMALIZED", title=f"validation ({v['device']}, gate {v['gate']})")
    for r in v["rows"]:
        who = "control (base)" if r["role"] == "control" else f"target {short(r['constituent'])}"
        t.add_row(who, short(r["suite"]), r["task"], f"{r['alone']:.4f}", f"{r['merged']:.4f}", f"{r['normalized']:.3f}")
    console.print(t)
    color = {"pass": "green", "fail": "red"}.get(v["verdict"], "yellow")
    console.print(f"verdict: {v['verdict']}" + (f" (min normalized {v['min_normalized']:.3f})" if v["min_normalized"] is not None else ""),
                  style=color)
