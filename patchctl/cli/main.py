"""The ``patchctl`` command: composes the command modules; the one error boundary."""

from __future__ import annotations

import sys

import typer

from patchctl.cli import admin, evals, patches
from patchctl.cli import compress as compress_cli
from patchctl.cli import merge as merge_cli
from patchctl.cli import port as port_cli
from patchctl.cli import remote as remote_cli
from patchctl.errors import PatchctlError

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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a :class:`PatchctlError` becomes one line on stderr and its exit code."""
    import typer.main

    try:  # typer >= 0.20 vendors click as typer._click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click  # type: ignore[no-redef]

    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="patchctl", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except getattr(click, "NoArgsIsHelpError", ()) as e:  # bare `patchctl`: help, as typer prints it
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 2
    except click.UsageError as e:
        hint = f" (see `patchctl {e.ctx.info_name if e.ctx and e.ctx.parent else ''} --help`)".replace("  ", " ")
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except PatchctlError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
