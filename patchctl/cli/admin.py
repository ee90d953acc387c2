"""Registry maintenance: init, gc, fsck."""

from __future__ import annotations

from typing import Annotated

import typer

from patchctl.cli._common import (
    JsonOpt,
    RegistryOpt,
    console,
    emit_json,
    human_bytes,
    open_registry,
)

app = typer.Typer()


@app.command()
def init(registry: RegistryOpt = None) -> None:
    """Create an empty registry (other commands also create one on first use)."""
    with open_registry(registry) as reg:
        console.print(f"registry at {reg.path}")


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be deleted.")] = False,
    prune_history: Annotated[bool, typer.Option(help="Also delete what only ref history reaches.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete manifests and blobs that no ref (or its history) reaches."""
    with open_registry(registry, create=False) as reg:
        res = reg.gc(dry_run=dry_run, prune_history=prune_history)
    if json_out:
        emit_json(res)
    else:
        verb = "would delete" if dry_run else "deleted"
        console.print(f"{verb} {res['manifests']} manifests, {res['blobs']} blobs ({human_bytes(res['bytes'])})")


@app.command()
def fsck(
    rebuild_index: Annotated[bool, typer.Option("--rebuild-index", help="Rebuild index.sqlite from the files.")] = False,
    repair: Annotated[str | None, typer.Option("--repair", help="Fetch good copies of corrupt or missing objects from this remote (name, folder or http URL).")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every object's digest, every manifest's blobs, every ref and the index."""
    with open_registry(registry, create=False) as reg:
        res = reg.fsck(rebuild_index=rebuild_index, repair=repair)
    if json_out:
        emit_json(res)
    else:
        console.print(f"checked {res['blobs']} blobs, {res['manifests']} manifests")
        if res["rebuilt"]:
            r = res["rebuilt"]
            console.print(f"index rebuilt: {r['manifests']} manifests, {r['refs']} refs, {r['history']} history entries")
        if "repaired" in res:
            console.print(f"repaired {len(res['repaired'])} objects from {repair}"
                          + (f"; {len(res['unrepaired'])} could not be repaired" if res["unrepaired"] else ""))
        for p in res["problems"]:
            console.print(f"[red]problem[/] {p}")
        if res["ok"]:
            console.print("ok")
    if not res["ok"]:
        raise typer.Exit(1)
