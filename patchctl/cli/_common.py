"""Shared CLI pieces: options, opening the registry, rendering."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from patchctl.registry.registry import Registry

RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", "-R", help="Registry folder (default: $PATCHCTL_HOME, else ~/.patchctl).",
                 envvar="PATCHCTL_HOME", show_envvar=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]

console = Console()
err_console = Console(stderr=True)


def open_registry(path: Path | None, create: bool = True) -> Registry:
    return Registry(path, create=create)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``"2MiB"``, ``"1.5MB"``, ``"800k"``, ``"123456"`` → bytes; :class:`InvalidArgument` otherwise."""
    import re

    from patchctl.errors import InvalidArgument

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise InvalidArgument(f"cannot read size {text!r}: write e.g. 2MiB, 1.5MB, 800k or a byte count")
    n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise InvalidArgument(f"size must be positive, got {text!r}")
    return n


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def short(digest: str | None) -> str:
    return digest[7:19] if digest else "-"


class Progress:
    """A rich progress bar on a terminal; silent under --json or when not a TTY."""

    def __init__(self, label: str, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn
            from rich.progress import Progress as RP

            self._p = RP("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), console=err_console, transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
