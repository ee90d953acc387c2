"""Commands on patches: push, ls, show, log, tag, rm, export, apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree

from patchctl.cli._common import (
    JsonOpt,
    Progress,
    RegistryOpt,
    console,
    emit_json,
    human_bytes,
    human_count,
    open_registry,
    short,
)

app = typer.Typer()


@app.command()
def push(
    src: Annotated[str, typer.Argument(help="PEFT adapter folder, fine-tuned model folder, or diff .safetensors file; with --to, the local NAME[:TAG] to publish.")],
    ref: Annotated[str | None, typer.Argument(help="NAME[:TAG] to store it under (tag defaults to latest).")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder (needed for fine-tunes and diffs; PEFT adapters default to their base_model_name_or_path).")] = None,
    base_name: Annotated[str | None, typer.Option(help="Record the base as NAME@REVISION.")] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Message kept in the ref history.")] = "",
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE user metadata (repeatable).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Storage dtype of an imported diff (default: the fine-tune's).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt inputs, loaded with torch.load(weights_only=True).")] = False,
    no_latest: Annotated[bool, typer.Option("--no-latest", help="Do not move NAME:latest.")] = False,
    eval_suites: Annotated[list[str] | None, typer.Option("--eval", help="Eval suite that judges this patch (repeatable).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Publish the local NAME[:TAG] (SRC) to a remote: a name from `patchctl remote ls`, a registry folder or hf://ORG/REPO.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import a patch into the registry (or, with --to, publish one to a remote)."""
    if to is not None:
        if ref is not None:
            raise typer.BadParameter("with --to, give only the NAME[:TAG] to publish")
        with open_registry(registry) as reg, Progress("push", not json_out) as prog:
            res = reg.publish(src, to, progress=prog)
        if json_out:
            emit_json(res)
        else:
            console.print(f"published [bold]{res['ref']}[/] {res['digest']} to {res['remote']}")
        return
    if ref is None:
        raise typer.BadParameter("missing NAME[:TAG] to store SRC under")
    metadata: dict[str, Any] = {}
    for kv in meta or []:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"--meta {kv!r}: expected KEY=VALUE")
        metadata[k] = v
    with open_registry(registry) as reg:
        digest = reg.push(src, ref, base=base, base_name=base_name, message=message, metadata=metadata,
                          dtype=dtype, trust_pickle=trust_pickle, move_latest=not no_latest, evals=eval_suites)
        info = reg.show(digest)
    if json_out:
        emit_json({"digest": digest, "refs": info["refs"], "kind": info["kind"], "stored_bytes": info["stored_bytes"]})
    else:
        console.print(f"pushed [bold]{ref}[/] {digest}  ({info['kind']}, {len(info['tensors'])} tensors, "
                      f"{human_bytes(info['stored_bytes'])})")


@app.command("ls")
def ls_(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """List every NAME:TAG in the registry."""
    with open_registry(registry) as reg:
        rows = reg.ls()
    if json_out:
        emit_json(rows)
        return
    t = Table("NAME:TAG", "DIGEST", "KIND", "BASE", "PARAMS", "SIZE", "UPDATED")
    for r in rows:
        t.add_row(f"{r['name']}:{r['tag']}", short(r["digest"]), r["kind"] or "?", r["base_name"] or "-",
                  human_count(r["params"]), human_bytes(r["stored_bytes"]), (r["updated"] or "")[:19])
    console.print(t)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME:TAG or digest.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a patch: kind, base, size, params, lineage, metadata."""
    with open_registry(registry) as reg:
        info = reg.show(ref)
    if json_out:
        emit_json(info)
        return
    console.print(f"[bold]{info['digest']}[/]  {', '.join(info['refs']) or '(no refs)'}")
    console.print(f"kind      {info['kind']}")
    b = info["base"]
    console.print(f"base      {b['name']}{'@' + b['revision'] if b.get('revision') else ''}  {b['fingerprint']}")
    console.print(f"tensors   {len(info['tensors'])}   params {human_count(info['num_params'])}   "
                  f"stored {human_bytes(info['stored_bytes'])}")
    if info["params"]:
        p = info["params"]
        if info["kind"] == "lora":
            keys = ("r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
            p = {k: p[k] for k in keys if p.get(k) not in (None, {}, False)}
        console.print("params    " + json.dumps(p, sort_keys=True)[:400])
    lin = info["lineage"]
    if lin["parents"] or lin["recipe"]:
        console.print("parents   " + (", ".join(short(p) for p in lin["parents"]) or "-"))
        recipe = dict(lin["recipe"] or {})
        sr = recipe.pop("search", None)
        console.print("recipe    " + json.dumps(recipe, sort_keys=True))
        if sr:
            from patchctl.cli.merge import _render_search

            _render_search(sr)
    comp = info["metadata"].get("compression") if info["kind"] == "sparse" else None
    if comp:
        from patchctl.cli.compress import report_lines

        for line in report_lines(comp):
            console.print("compress  " + line, soft_wrap=True, markup=False, highlight=False)
    meta = {k: v for k, v in info["metadata"].items() if not (comp and k == "compression")}
    if meta:
        console.print("metadata  " + json.dumps(meta, sort_keys=True))
    if info.get("suites"):
        console.print("suites    " + ", ".join(short(s) for s in info["suites"]))
    for v in info.get("validations", []):
        if v.get("type") == "merge-validation":
            console.print(f"validated {v['verdict']} (gate {v['gate']}, min normalized "
                          f"{v['min_normalized'] if v['min_normalized'] is None else round(v['min_normalized'], 3)}, {v['device']})")
        elif v.get("type") == "port-validation" and v["verdict"] == "unvalidated":
            console.print(f"validated unvalidated on the new base ({v.get('reason', '')})")
        elif v.get("type") == "port-validation":
            rec = v["min_recovered"]
            console.print(f"validated {v['verdict']} on the new base (gate {v['gate']}, least gain recovered "
                          f"{'-' if rec is None else f'{rec:.1%}'}, {v['split']}, {v['device']})")
        elif v.get("type") == "compress-validation":
            kept = ", ".join("-" if r["gain_kept"] is None else f"{r['gain_kept']:.1%}" for r in v["rows"])
            console.print(f"gain kept {kept} against the source ({v['split']}, {v['device']})")
        elif "metrics" in v:
            console.print(f"scored    suite {short(v['suite'])} {v['split']}: {v['metrics']['score']:.4f} ({v['device']})")
    if tensors:
        errs = (comp or {}).get("tensors") or {}
        t = Table("TENSOR", "DTYPE", "SHAPE", "ENCODING", "SIZE", *(["KEPT", "REL.ERR"] if errs else []))
        for name, e in sorted(info["tensors"].items()):
            extra = []
            if errs:
                from math import prod

                r, n = errs.get(name), prod(e["shape"])
                extra = [f"{r['nnz'] / n:.4f}" if r and n else "-", f"{r['rel_error']:.4f}" if r else "-"]
            t.add_row(name, e["dtype"], "×".join(map(str, e["shape"])), e["encoding"], human_bytes(e["size"]), *extra)
        console.print(t)


@app.command()
def log(
    ref: Annotated[str, typer.Argument(help="NAME[:TAG].")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a ref's history (every move) and the patch's lineage tree."""
    with open_registry(registry) as reg:
        doc = reg.log(ref)
    if json_out:
        emit_json(doc)
        return
    t = Table("#", "TIME", "OLD", "NEW", "USER", "MESSAGE", title=f"history of {doc['ref']}")
    for e in doc["history"]:
        t.add_row(str(e["seq"]), e["time"][:19], short(e["old"]), short(e["new"]) if e["new"] else "(removed)",
                  e["user"], e["message"])
    console.print(t)
    if doc["lineage"]:
        console.print(_tree(doc["lineage"]))


def _tree(node: dict[str, Any], tree: Tree | None = None) -> Tree:
    recipe = node.get("recipe") or {}
    label = f"{short(node['digest'])} {node.get('kind', '?')} {' '.join(node.get('refs', []))}"
    if recipe.get("op"):
        label += f"  [dim]{recipe['op']}{' ' + recipe['method'] if recipe.get('method') else ''}[/]"
    sub = tree.add(label) if tree is not None else Tree(label)
    for p in node.get("parents", []):
        _tree(p, sub)
    return sub


@app.command()
def tag(
    src: Annotated[str, typer.Argument(help="Existing NAME:TAG or digest.")],
    dst: Annotated[str, typer.Argument(help="NAME:TAG to point at it.")],
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    registry: RegistryOpt = None,
) -> None:
    """Point DST at the patch SRC names."""
    with open_registry(registry) as reg:
        digest = reg.tag(src, dst, message)
    console.print(f"{dst} -> {digest}")


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="NAME:TAG to remove (the patch stays until gc).")],
    registry: RegistryOpt = None,
) -> None:
    """Remove a ref (recorded in its history; `gc` frees space later)."""
    with open_registry(registry) as reg:
        digest = reg.rm(ref)
    console.print(f"removed {ref} (was {digest})")


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME:TAG or digest.")],
    out: Annotated[Path, typer.Argument(help="Output folder (peft) or .safetensors file (diff).")],
    format: Annotated[str, typer.Option("--format", "-f", help="peft | diff (default: peft for LoRA, else diff).")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="dtype of exported diff tensors.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Export a patch as a PEFT folder or a diff safetensors file."""
    with open_registry(registry) as reg:
        path = reg.export(ref, out, format, dtype)
    console.print(f"wrote {path}")


@app.command()
def apply(
    ref: Annotated[str, typer.Argument(help="NAME:TAG or digest.")],
    out: Annotated[Path, typer.Argument(help="Folder for the patched full model (HF layout).")],
    base: Annotated[Path, typer.Option(help="Base model folder; its fingerprint must match the patch's.")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write base + patch as a full model folder (sharded safetensors, config and tokenizer copied)."""
    with open_registry(registry) as reg, Progress("apply", not json_out) as prog:
        path = reg.apply(ref, base, out, progress=prog)
    if json_out:
        emit_json({"out": str(path)})
    else:
        console.print(f"wrote {path}")
