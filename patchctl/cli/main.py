"""The ``patchctl`` command: composes the command modules; the one error boundary."""

from __future__ import annotations

import sys

import typer

from ..errors import PatchctlError
from . import admin, patches

app = typer.Typer(
    name="patchctl",
    help="A registry and toolchain for model patches: LoRA adapters and weight diffs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(admin.app)
app.add_typer(patches.app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a :class:`PatchctlError` becomes one line on stderr and its exit code."""
    try:
        app(args=argv, prog_name="patchctl", standalone_mode=True)
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
