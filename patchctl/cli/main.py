"""The ``patchctl`` command: composes the command modules; the one error boundary.

The everyday read and ref commands (``ls``, ``show``, ``log``, ``tag``, ``rm``,
``remote ls``) take a fast path: :func:`main` recognises their argv shapes and
serves them without typer (whose pydantic path alone costs ~0.1 s of imports),
rich or torch, printing exactly what the typer commands print (both call the
same ``print_*`` functions of :mod:`patchctl.cli._common`). Anything else —
``--help``, an unknown flag, a missing argument — goes through typer.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from patchctl.cli._common import safe
from patchctl.errors import PatchctlError, PatchctlWarning

if TYPE_CHECKING:
    import typer

    app: typer.Typer


def _build_app() -> typer.Typer:
    import typer

    from patchctl.cli import admin, evals, patches
    from patchctl.cli import compress as compress_cli
    from patchctl.cli import inspect as inspect_cli
    from patchctl.cli import merge as merge_cli
    from patchctl.cli import port as port_cli
    from patchctl.cli import remote as remote_cli

    app = typer.Typer(
        name="patchctl",
        help="A registry and toolchain for model patches: LoRA adapters and weight diffs.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.add_typer(admin.app)
    app.add_typer(patches.app)
    app.add_typer(evals.app)
    app.add_typer(merge_cli.app)
    app.add_typer(compress_cli.app)
    app.add_typer(port_cli.app)
    app.add_typer(remote_cli.app)
    app.add_typer(inspect_cli.app)
    return app


def __getattr__(name: str) -> Any:
    """``app``, the typer application, built on first use (the fast path never needs it)."""
    if name == "app":
        globals()["app"] = value = _build_app()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the fast path ----------------------------------------------------------------------
# command words -> (positional count, the flags it takes besides --registry/-R, --json)
_FAST: dict[tuple[str, ...], tuple[int, frozenset[str]]] = {
    ("ls",): (0, frozenset({"--wide"})),
    ("show",): (1, frozenset({"--wide", "--tensors"})),
    ("log",): (1, frozenset({"--wide"})),
    ("tag",): (2, frozenset({"--message", "-m"})),
    ("rm",): (1, frozenset()),
    ("remote", "ls"): (0, frozenset({"--wide"})),
}
_VALUED = frozenset({"--registry", "-R", "--message", "-m"})
_NO_JSON = frozenset({("tag",), ("rm",)})


def parse_fast(args: list[str]) -> tuple[tuple[str, ...], list[str], dict[str, Any]] | None:
    """``(command, positionals, options)`` when ``args`` is a plain everyday command, else None."""
    words = tuple(args[:2]) if args[:2] == ["remote", "ls"] else tuple(args[:1])
    spec = _FAST.get(words)
    if spec is None:
        return None
    npos, flags = spec
    allowed = flags | {"--registry", "-R"} | (set() if words in _NO_JSON else {"--json"})
    pos: list[str] = []
    opts: dict[str, Any] = {}
    rest = args[len(words):]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("--") and "=" in a:
            a, value = a.split("=", 1)
            if a not in _VALUED or a not in allowed:
                return None
            opts[a.lstrip("-")] = value
        elif a.startswith("-") and a != "-":
            if a not in allowed:
                return None  # --help, an unknown flag, "--": typer says what it says
            if a in _VALUED:
                if i + 1 >= len(rest):
                    return None
                i += 1
                opts[a.lstrip("-")] = rest[i]
            else:
                opts[a.lstrip("-")] = True
        else:
            pos.append(a)
        i += 1
    if len(pos) != npos:
        return None
    opts["registry"] = opts.pop("R", opts.get("registry"))
    opts["message"] = opts.pop("m", opts.get("message", ""))
    return words, pos, opts


def _fast(args: list[str]) -> int | None:
    """Run an everyday command without typer; None when ``args`` is not one (typer runs it)."""
    parsed = parse_fast(args)
    if parsed is None:
        return None
    words, pos, o = parsed
    from pathlib import Path

    from patchctl.cli import _common as c

    wide, as_json = bool(o.get("wide")), bool(o.get("json"))
    with c.open_registry(Path(o["registry"]) if o.get("registry") is not None else None) as reg:
        if words == ("ls",):
            rows = reg.ls()
            c.emit_json(rows) if as_json else c.print_ls(rows, wide)
        elif words == ("show",):
            info = reg.show(pos[0])
            if as_json:
                c.emit_json(info)
            else:
                inspected = reg.inspection(info["digest"])
                if c.show_needs_commands(info, inspected):
                    return None  # its merge search, compression or inspect lines: typer's show renders them
                c.print_show(info, inspected, bool(o.get("tensors")), wide)
        elif words == ("log",):
            doc = reg.log(pos[0])
            c.emit_json(doc) if as_json else c.print_log(doc, wide)
        elif words == ("tag",):
            c.echo(f"{pos[1]} -> {reg.tag(pos[0], pos[1], o['message'])}")
        elif words == ("rm",):
            c.echo(f"removed {pos[0]} (was {reg.rm(pos[0])})")
        else:
            rows = reg.remotes()
            c.emit_json(rows) if as_json else c.print_remotes(rows, wide)
    return 0


# -- the error boundary ---------------------------------------------------------------------
def _run_typer(args: list[str]) -> int:
    import typer.main

    try:  # typer >= 0.20 vendors click as typer._click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click  # type: ignore[no-redef]

    try:
        rv = typer.main.get_command(__getattr__("app")).main(args=args, prog_name="patchctl",
                                                             standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # typer turns Ctrl-C into a silent Exit(130); no command returns 130 itself
            raise KeyboardInterrupt
        return code
    except getattr(click, "NoArgsIsHelpError", ()) as e:  # bare `patchctl`: help, as typer prints it
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 2
    except click.UsageError as e:
        hint = f" (see `patchctl {e.ctx.info_name if e.ctx and e.ctx.parent else ''} --help`)".replace("  ", " ")
        print(f"error: {safe(e.format_message())}{hint}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        print(f"error: {safe(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except typer.Abort as e:  # end of input at a prompt
        raise KeyboardInterrupt from e
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Each :class:`PatchctlWarning` raised meanwhile: one ``warning: ...`` line on stderr."""
    saved = warnings.showwarning

    def show(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if not issubclass(category, PatchctlWarning):
            return saved(message, category, *rest, **kw)
        print(f"warning: {safe(str(message).splitlines()[0])}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", PatchctlWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = saved


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a :class:`PatchctlError` becomes one line on stderr and its exit code; Ctrl-C exits 130."""
    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        with _one_line_warnings():
            rv = _fast(args)
            rv = rv if rv is not None else _run_typer(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then one more case below
        return rv
    except PatchctlError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {safe(msg)}", file=sys.stderr)  # messages quote names, files and remotes' answers
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `patchctl ls | head`: the reader is gone; stop quietly, as typer's path does
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
