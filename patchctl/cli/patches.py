"""Commands on patches: push, ls, show, log, tag, rm, export, apply."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchctl.cli._common import (
    JsonOpt,
    Progress,
    RegistryOpt,
    WideOpt,
    echo,
    emit_json,
    human_bytes,
    open_registry,
    print_log,
    print_ls,
    print_show,
)
from patchctl.registry.store.names import parse_ref

app = typer.Typer()


@app.command()
def push(
    src: Annotated[str, typer.Argument(help="PEFT adapter folder, fine-tuned model folder, or diff .safetensors file; with --to, the local NAME[:TAG] to publish.")],
    ref: Annotated[str | None, typer.Argument(help="NAME[:TAG] to store it under (tag defaults to latest).")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder (needed for fine-tunes and diffs; PEFT adapters default to their base_model_name_or_path).")] = None,
    base_name: Annotated[str | None, typer.Option(help="Record the base as NAME@REVISION.")] = None,
    force_base: Annotated[bool, typer.Option("--force-base", help="Accept --base although the adapter's config names another base.")] = False,
    message: Annotated[str, typer.Option("--message", "-m", help="Message kept in the ref history.")] = "",
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE user metadata (repeatable).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Storage dtype of an imported diff (default: the fine-tune's).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow a PEFT adapter_model.bin or a .bin/.pt diff file, loaded with torch.load(weights_only=True) (model folders must be safetensors).")] = False,
    no_latest: Annotated[bool, typer.Option("--no-latest", help="Do not move NAME:latest.")] = False,
    eval_suites: Annotated[list[str] | None, typer.Option("--eval", help="Eval suite that judges this patch (repeatable).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Publish the local NAME[:TAG] (SRC) to a remote: a name from `patchctl remote ls`, a registry folder, hf://ORG/REPO, oci://HOST/NAMESPACE or oci://HOST/REPOSITORY:TAG.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain HTTP to an explicit oci+http:// registry that is not on loopback (never turns off TLS checks).")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import a patch into the registry (or, with --to, publish one to a remote)."""
    if insecure and to is None:
        raise typer.BadParameter("--insecure goes with --to oci+http://...", param_hint="--insecure")
    if to is not None:
        if ref is not None:
            raise typer.BadParameter("with --to, give only the NAME[:TAG] to publish")
        with open_registry(registry) as reg, Progress("push", not json_out) as prog:
            res = reg.publish(src, to, progress=prog, insecure=insecure)
        if json_out:
            emit_json(res)
        else:
            echo(f"published {res['ref']} {res['digest']} to {res['remote']}")
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
                          dtype=dtype, trust_pickle=trust_pickle, move_latest=not no_latest, evals=eval_suites,
                          force_base=force_base)
        info = reg.show(digest)
    if json_out:
        emit_json({"digest": digest, "refs": info["refs"], "kind": info["kind"], "stored_bytes": info["stored_bytes"]})
    else:
        echo(f"pushed {parse_ref(ref)} {digest}  ({info['kind']}, {len(info['tensors'])} tensors, "
             f"{human_bytes(info['stored_bytes'])})")


@app.command("ls")
def ls_(registry: RegistryOpt = None, json_out: JsonOpt = False, wide: WideOpt = False) -> None:
    """List every NAME:TAG in the registry."""
    with open_registry(registry) as reg:
        rows = reg.ls()
    if json_out:
        emit_json(rows)
        return
    print_ls(rows, wide)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME:TAG, a digest or a unique digest prefix (sha256: and 4+ hex digits, as `ls` shows).")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Show a patch: kind, base, size, params, lineage, metadata, and a fine-tune's config/tokenizer changes."""
    with open_registry(registry) as reg:
        info = reg.show(ref)
        inspected = reg.inspection(info["digest"])
    if json_out:
        emit_json(info)
        return
    from patchctl.cli.compress import report_lines
    from patchctl.cli.inspect import summary_line
    from patchctl.cli.merge import _render_search

    print_show(info, inspected, tensors, wide, render_search=_render_search, report_lines=report_lines,
               summary_line=summary_line)


@app.command()
def log(
    ref: Annotated[str, typer.Argument(help="NAME[:TAG].")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Show a ref's history (every move) and the patch's lineage tree."""
    with open_registry(registry) as reg:
        doc = reg.log(ref)
    if json_out:
        emit_json(doc)
        return
    print_log(doc, wide)


@app.command()
def tag(
    src: Annotated[str, typer.Argument(help="Existing NAME:TAG, digest or unique digest prefix.")],
    dst: Annotated[str, typer.Argument(help="NAME:TAG to point at it.")],
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    registry: RegistryOpt = None,
) -> None:
    """Point DST at the patch SRC names."""
    with open_registry(registry) as reg:
        digest = reg.tag(src, dst, message)
    echo(f"{dst} -> {digest}")


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="NAME:TAG to remove (the patch stays until gc).")],
    registry: RegistryOpt = None,
) -> None:
    """Remove a ref (recorded in its history; `gc` frees space later)."""
    with open_registry(registry) as reg:
        digest = reg.rm(ref)
    echo(f"removed {ref} (was {digest})")


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME:TAG or digest.")],
    out: Annotated[Path, typer.Argument(help="Output folder (peft) or .safetensors file (diff).")],
    format: Annotated[str, typer.Option("--format", "-f", help="peft | diff (default: diff for a .safetensors OUT or a non-LoRA patch, else peft; a LoRA exports as diff as its dense ΔW).")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="dtype of exported diff tensors.")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="diff: add each tensor's exactness pins (NAME::pin_index, NAME::pin_values), so base + diff equals the fine-tune bit for bit.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Export a patch as a PEFT folder or a diff safetensors file (its __metadata__ says how to apply it)."""
    with open_registry(registry) as reg:
        path = reg.export(ref, out, format, dtype, exact)
    echo(f"wrote {path}")


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
        echo(f"wrote {path}")
