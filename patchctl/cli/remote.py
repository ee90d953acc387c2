"""Commands on remotes: serve, pull, and remote add / ls / rm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from patchctl.cli._common import (
    JsonOpt,
    Progress,
    RegistryOpt,
    console,
    emit_json,
    err_console,
    human_bytes,
    open_registry,
)

app = typer.Typer()
remote_app = typer.Typer(help="Manage remotes: registries to pull from and publish to (http(s)://, folders, hf://).",
                         no_args_is_help=True)
app.add_typer(remote_app, name="remote")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8080,
    token_file: Annotated[Path | None, typer.Option(help="File holding a bearer token that clients must send.")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Serve the registry read-only over HTTP (OCI-style /v2/ reads and a JSON /api/)."""
    from patchctl.server.app import read_token_file
    from patchctl.server.app import serve as run

    token = read_token_file(token_file) if token_file is not None else None
    if host not in LOOPBACK and token is None:
        err_console.print(f"warning: serving {host} with no --token-file: anyone who can reach it can read every patch")
    err_console.print(f"serving {registry or '$PATCHCTL_HOME'} on http://{host}:{port} (read-only)")
    run(registry, host=host, port=port, token=token, log_level="info" if access_log or port == 0 else "warning",
        access_log=access_log)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="REMOTE/NAME[:TAG]; NAME[:TAG] with --from or when one remote is configured.")],
    from_: Annotated[str | None, typer.Option("--from", help="Remote name, URL, registry folder or hf://ORG/REPO.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Parallel blob downloads.")] = 4,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch a patch from a remote: verified, resumable, only the blobs that are missing."""
    with open_registry(registry) as reg, Progress("pull", not json_out) as prog:
        res = reg.pull(ref, from_, progress=prog, workers=workers)
    if json_out:
        emit_json(res)
    else:
        console.print(f"pulled [bold]{res['ref']}[/] {res['digest']} from {res['remote']}: "
                      f"{res['blobs_fetched']} blobs fetched ({human_bytes(res['bytes_transferred'])}), "
                      f"{res['blobs_skipped']} already here")


@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(help="Short name (lowercase letters, digits, _ -).")],
    url: Annotated[str, typer.Argument(help="http(s)://HOST:PORT, a registry folder (/path, file:///path) or hf://ORG/REPO.")],
    token_file: Annotated[Path | None, typer.Option(help="File with the bearer token for an HTTP remote.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a remote."""
    with open_registry(registry) as reg:
        r = reg.add_remote(name, url, token_file)
    if json_out:
        emit_json(r)
    else:
        console.print(f"added remote {r['name']} -> {r['url']} ({r['kind']})")


@remote_app.command("ls")
def remote_ls(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """List the remotes."""
    with open_registry(registry) as reg:
        rows = reg.remotes()
    if json_out:
        emit_json(rows)
        return
    t = Table("NAME", "KIND", "URL", "TOKEN FILE")
    for r in rows:
        t.add_row(r["name"], r["kind"], r["url"], r["token_file"] or "-")
    console.print(t)


@remote_app.command("rm")
def remote_rm(
    name: Annotated[str, typer.Argument(help="The remote to remove.")],
    registry: RegistryOpt = None,
) -> None:
    """Remove a remote (nothing is deleted from it)."""
    with open_registry(registry) as reg:
        r = reg.remove_remote(name)
    console.print(f"removed remote {r['name']} ({r['url']})")
