"""Commands on remotes: serve, pull, and remote add / ls / rm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchctl.cli._common import (
    JsonOpt,
    Progress,
    RegistryOpt,
    WideOpt,
    console,
    emit_json,
    err_console,
    human_bytes,
    open_registry,
    print_remotes,
)

app = typer.Typer()
remote_app = typer.Typer(help="Manage remotes: registries to pull from and publish to (http(s)://, folders, hf://, oci://).",
                         no_args_is_help=True)
app.add_typer(remote_app, name="remote")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8080,
    token_file: Annotated[Path | None, typer.Option(help="File holding a bearer token that clients must send.")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    open_: Annotated[bool, typer.Option("--open", help="Print the registry browser's URL and open it where a browser exists.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Serve the registry read-only over HTTP: a registry browser at /, OCI-style /v2/ reads, a JSON /api/."""
    from patchctl.server.app import bind, read_token_file
    from patchctl.server.app import serve as run

    token = read_token_file(token_file) if token_file is not None else None
    sock = bind(host, port)  # a bad or busy port is one line, before anything says "serving"
    if host not in LOOPBACK and token is None:
        err_console.print(f"warning: serving {host} with no --token-file: anyone who can reach it can read every patch")
    err_console.print(f"serving {registry or '$PATCHCTL_HOME'} on http://{host}:{sock.getsockname()[1]} (read-only)")
    if open_:
        _open_browser(host, sock.getsockname()[1], token)
    run(registry, host=host, port=port, token=token, log_level="info" if access_log or port == 0 else "warning",
        access_log=access_log, sock=sock)


def _open_browser(host: str, port: int, token: str | None) -> None:
    """Print the browser's URL; open it a moment later (with ``?token=``, swapped by the server for a cookie)."""
    import threading
    import webbrowser

    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}/"
    console.print(f"registry browser: {url}" + ("  (first visit: append ?token=<the token>)" if token else ""))

    def _open() -> None:
        try:
            webbrowser.open(url + (f"?token={token}" if token else ""))
        except webbrowser.Error:
            pass  # no browser here: the printed URL is the way in

    timer = threading.Timer(1.0, _open)
    timer.daemon = True
    timer.start()


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="REMOTE/NAME[:TAG]; NAME[:TAG] with --from or when one remote is configured; or oci://HOST/REPOSITORY[:TAG].")],
    from_: Annotated[str | None, typer.Option("--from", help="Remote name, URL, registry folder, hf://ORG/REPO or hf://ORG/REPO/FOLDER.")] = None,
    subfolder: Annotated[str | None, typer.Option(help="hf:// only: the folder of the repo that holds the adapter (or the patchctl layout).")] = None,
    base: Annotated[str | None, typer.Option(help="hf:// PEFT adapters: the base model folder, or a model id in the local Hugging Face cache (default: the adapter's base_model_name_or_path).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="hf:// PEFT adapters: load an adapter_model.bin with torch.load(weights_only=True).")] = False,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Parallel blob downloads.")] = 4,
    max_manifest_bytes: Annotated[int, typer.Option(min=1, help="Refuse a manifest larger than this (bytes).")] = 4 << 20,
    max_blobs: Annotated[int, typer.Option(min=1, help="Refuse a patch of more blobs than this.")] = 100_000,
    max_blob_bytes: Annotated[int, typer.Option(min=1, help="Refuse a blob declared larger than this (bytes).")] = 64 << 30,
    timeout: Annotated[float, typer.Option(min=0.001, help="Give up when the download takes longer (seconds).")] = 6 * 3600.0,
    min_rate: Annotated[float, typer.Option(min=0, help="Give up when less than this arrives a second, over each --rate-window (bytes/s).")] = 1024.0,
    rate_window: Annotated[float, typer.Option(min=0.001, help="Seconds over which --min-rate is measured.")] = 60.0,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain HTTP to an explicit oci+http:// registry that is not on loopback (never turns off TLS checks).")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch a patch from a remote: verified, resumable, only the blobs that are missing.

    What the remote may make it cost is capped (raise the caps with the flags); a failed pull
    stores nothing and leaves nothing in tmp/.
    """
    from patchctl.registry.remote.limits import PullLimits

    limits = PullLimits(max_manifest_bytes=max_manifest_bytes, max_blobs=max_blobs, max_blob_bytes=max_blob_bytes,
                        deadline=timeout, min_rate=min_rate, rate_window=rate_window)
    with open_registry(registry) as reg, Progress("pull", not json_out) as prog:
        res = reg.pull(ref, from_, progress=prog, workers=workers, limits=limits, insecure=insecure,
                       subfolder=subfolder, base=base, trust_pickle=trust_pickle)
    if json_out:
        emit_json(res)
    elif "blobs_fetched" in res:
        console.print(f"pulled {res['ref']} {res['digest']} from {res['remote']}: "
                      f"{res['blobs_fetched']} blobs fetched ({human_bytes(res['bytes_transferred'])}), "
                      f"{res['blobs_skipped']} already here", soft_wrap=True)
    else:  # a PEFT adapter imported from the Hub
        console.print(f"imported {res['ref']} {res['digest']} from {res['source_ref']}: PEFT adapter, "
                      f"{res['tensors']} tensors ({human_bytes(res['bytes_read'])} read), base {res['base']}",
                      soft_wrap=True)


@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(help="Short name (lowercase letters, digits, _ -).")],
    url: Annotated[str, typer.Argument(help="http(s)://HOST:PORT, a registry folder (/path, file:///path), hf://ORG/REPO or oci://HOST[:PORT]/NAMESPACE.")],
    token_file: Annotated[Path | None, typer.Option(help="File with the bearer token for an HTTP remote.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain HTTP to an explicit oci+http:// registry that is not on loopback (never turns off TLS checks).")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a remote."""
    with open_registry(registry) as reg:
        r = reg.add_remote(name, url, token_file, insecure=insecure)
    if json_out:
        emit_json(r)
    else:
        console.print(f"added remote {r['name']} -> {r['url']} ({r['kind']})")


@remote_app.command("ls")
def remote_ls(registry: RegistryOpt = None, json_out: JsonOpt = False, wide: WideOpt = False) -> None:
    """List the remotes."""
    with open_registry(registry) as reg:
        rows = reg.remotes()
    if json_out:
        emit_json(rows)
        return
    print_remotes(rows, wide)


@remote_app.command("rm")
def remote_rm(
    name: Annotated[str, typer.Argument(help="The remote to remove.")],
    registry: RegistryOpt = None,
) -> None:
    """Remove a remote (nothing is deleted from it)."""
    with open_registry(registry) as reg:
        r = reg.remove_remote(name)
    console.print(f"removed remote {r['name']} ({r['url']})")


@app.command()
def login(
    host: Annotated[str, typer.Argument(help="Registry HOST[:PORT] (as in oci://HOST[:PORT]/NAMESPACE).")],
    username: Annotated[str, typer.Option("--username", "-u", help="User name.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password (or token) from stdin.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain HTTP to an explicit oci+http:// registry that is not on loopback (never turns off TLS checks).")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Log in to an OCI registry: check the password, keep it in the registry folder's credentials.json (0600)."""
    import sys

    from patchctl.registry.remote.auth import Credentials, read_password
    from patchctl.registry.remote.oci_http import login as do_login

    if not password_stdin:
        raise typer.BadParameter("give the password on stdin with --password-stdin (never as an argument)")
    password = read_password(sys.stdin, host)
    with open_registry(registry) as reg:
        res = do_login(reg.store.root, host, Credentials(username, password, f"`patchctl login {host}`"),
                       insecure=insecure)
    if json_out:
        emit_json(res)
    else:
        console.print(f"logged in to {res['host']} as {res['username']} (kept in {res['stored']})")


@app.command()
def logout(
    host: Annotated[str, typer.Argument(help="Registry HOST[:PORT].")],
    registry: RegistryOpt = None,
) -> None:
    """Forget the login `patchctl login` kept for HOST."""
    from patchctl.registry.remote.auth import forget_login

    with open_registry(registry) as reg:
        gone = forget_login(reg.store.root, host.lower())
    console.print(f"logged out of {host}" if gone else f"no login kept for {host}")
