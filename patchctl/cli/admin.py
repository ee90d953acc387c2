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
    force: Annotated[bool, typer.Option("--force", help="Collect even while a ref or record log is damaged (what only that log kept is lost).")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete manifests and blobs that no ref (or its history) reaches; refuses while a log is damaged."""
    with open_registry(registry, create=False) as reg:
        res = reg.gc(dry_run=dry_run, prune_history=prune_history, force=force)
    if json_out:
        emit_json(res)
    else:
        verb = "would delete" if dry_run else "deleted"
        console.print(f"{verb} {res['manifests']} manifests, {res['blobs']} blobs ({human_bytes(res['bytes'])})")


@app.command()
def fsck(
    rebuild_index: Annotated[bool, typer.Option("--rebuild-index", help="Rebuild index.sqlite from the files.")] = False,
    repair: Annotated[str | None, typer.Option("--repair", help="Fetch good copies of corrupt or missing objects from this remote (name, folder or http URL).")] = None,
    repair_logs: Annotated[bool, typer.Option("--repair-logs", help="Restore damaged or cut-back ref-log lines from the index's copy of their history.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every object's digest, every manifest's blobs, every ref and record log line, and the index."""
    with open_registry(registry, create=False) as reg:
        res = reg.fsck(rebuild_index=rebuild_index, repair=repair, repair_logs=repair_logs)
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
        if "logs_repaired" in res:
            console.print(f"logs restored: {len(res['logs_repaired'])}"
                          + (f"; not restorable here: {', '.join(res['logs_unrepaired'])}" if res["logs_unrepaired"]
                             else ""), markup=False, highlight=False)
        for p in res["problems"]:
            console.print("problem " + p, markup=False, highlight=False, soft_wrap=True)
        if res["ok"]:
            console.print("ok")
    if not res["ok"]:
        raise typer.Exit(1)
