"""Shared CLI pieces: options, opening the registry, rendering.

Everything here that the everyday commands need (opening the registry, plain
tables, digests) imports neither typer nor rich: ``patchctl ls`` and friends
run through :func:`patchctl.cli.main.main`'s fast path without them. The typer
option types and the rich consoles are made on first use (module ``__getattr__``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

if TYPE_CHECKING:
    import typer
    from rich.console import Console

    from patchctl.registry.registry import Registry

    RegistryOpt = Annotated[Path | None, typer.Option()]
    JsonOpt = Annotated[bool, typer.Option()]
    WideOpt = Annotated[bool, typer.Option()]
    MessageOpt = Annotated[str, typer.Option()]
    NoValidateOpt = Annotated[bool, typer.Option()]
    EvalDeviceOpt = Annotated[str | None, typer.Option()]
    console: Console
    err_console: Console


def __getattr__(name: str) -> Any:
    """The typer option types and rich consoles, built on first use (they cost ~50 ms of imports)."""
    if name in ("RegistryOpt", "JsonOpt", "WideOpt", "MessageOpt", "NoValidateOpt", "EvalDeviceOpt"):
        import typer

        value: Any = {
            "RegistryOpt": Annotated[
                Path | None,
                typer.Option("--registry", "-R", help="Registry folder (default: $PATCHCTL_HOME, else ~/.patchctl).",
                             envvar="PATCHCTL_HOME", show_envvar=False),
            ],
            "JsonOpt": Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")],
            "WideOpt": Annotated[bool, typer.Option("--wide", help="Show every column and full digests, whatever the width.")],
            # the options every derived-patch command (compress, merge, port) shares
            "MessageOpt": Annotated[str, typer.Option("--message", "-m", help="Message kept in the ref history.")],
            "NoValidateOpt": Annotated[bool, typer.Option("--no-validate", help="Record the result as unvalidated instead of running its suites.")],
            "EvalDeviceOpt": Annotated[str | None, typer.Option(help="Device for validation (default: cuda when present, else cpu).")],
        }[name]
    elif name in ("console", "err_console"):
        from rich.console import Console

        class SafeConsole(Console):
            """A console that never interprets what it prints: no rich markup (names from files and
            peers may hold ``[link=…]``), and control characters shown as escapes, in tables too."""

            def render_str(self, text: str, **kw: Any) -> Any:
                return super().render_str(safe(text, keep_newlines=True), **kw)

        value = SafeConsole(stderr=name == "err_console", markup=False, highlight=False)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


_BIDI = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F, 0x061C}


def _escape_char(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def safe(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control character (C0, DEL, C1, bidi overrides) written as an escape.

    Whatever a terminal shows that came from a file or a peer (a base name, a tensor
    name, a message, a remote's error) goes through this, so an escape sequence in a
    pulled manifest cannot retitle, recolour or rewrite the user's terminal. Tabs
    stay; newlines stay only with ``keep_newlines`` (multi-line text patchctl wrote).
    """
    if text.isascii() and text.isprintable():
        return text
    out = []
    for c in text:
        n = ord(c)
        if (c == "\n" and keep_newlines) or c == "\t":
            out.append(c)
        elif n < 0x20 or 0x7F <= n < 0xA0 or n in _BIDI:
            out.append(_escape_char(c))
        else:
            out.append(c)
    return "".join(out)


def open_registry(path: Path | None, create: bool = True) -> Registry:
    from patchctl.registry.registry import Registry

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


SHORT_HEX = 12


def short(digest: str | None, wide: bool = False) -> str:
    """A digest as ``sha256:`` + its first 12 hex digits (every ref-taking command accepts it); whole if ``wide``."""
    if not digest:
        return "-"
    return digest if wide else digest[: len("sha256:") + SHORT_HEX]


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
                         TransferSpeedColumn(), console=__getattr__("err_console"), transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


# -- plain tables -------------------------------------------------------------------
# Human tables never cut the key column (NAME:TAG, a tensor name): when a table is
# wider than the output, shrinkable columns are shortened with "…" first, then
# droppable columns go (in their order), and a key that is still too long gets a
# line of its own with the row's other cells under it. `--wide` keeps everything.


@dataclass
class Column:
    header: str
    drop: int = 0  # 0: always shown; otherwise dropped in increasing order when the table is too wide
    shrink: int = 0  # > 0: may be shortened with "…" down to this many characters
    right: bool = False


def out_width(wide: bool = False) -> int | None:
    """The width tables fit: ``$COLUMNS``, else the terminal's; None (no limit) with ``--wide`` or in a pipe."""
    if wide:
        return None
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(n - 1, 0)] + "…"


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None,
                 title: str | None = None) -> str:
    """A plain, aligned table (two spaces between columns); column 0 is the key and is never cut."""
    rows = [[safe(str(c)) for c in r] for r in rows]  # cells come from manifests, logs, peers
    cols = list(range(len(columns)))
    widths = [max([len(columns[i].header), *(len(r[i]) for r in rows)]) for i in cols]
    gap = 2

    least = [min(widths[i], max(columns[i].shrink, len(columns[i].header))) if columns[i].shrink else widths[i]
             for i in range(len(columns))]

    def total(keep: list[int], w: list[int]) -> int:
        return sum(w[i] for i in keep) + gap * (len(keep) - 1)

    if width is not None:
        for i in sorted((i for i in cols if columns[i].drop), key=lambda i: columns[i].drop):
            if total(cols, least) <= width:
                break
            cols.remove(i)
        for i in sorted((i for i in cols if columns[i].shrink), key=lambda i: -widths[i]):
            over = total(cols, widths) - width
            if over > 0:
                widths[i] = max(least[i], widths[i] - over)
    key_width = widths[0]
    if width is not None and len(cols) > 1 and total(cols, widths) > width:
        key_width = max(len(columns[0].header), width - (total(cols, widths) - widths[0]))

    def line(cells: list[str], key: str | None) -> str:
        parts = [key if key is not None else ""]
        parts[0] = parts[0].ljust(key_width)
        for i, c in zip(cols[1:], cells, strict=True):
            c = _cut(c, widths[i])
            parts.append(c.rjust(widths[i]) if columns[i].right else c.ljust(widths[i]))
        return (" " * gap).join(parts).rstrip()

    lines = [safe(title)] if title else []
    lines.append(line([columns[i].header for i in cols[1:]], columns[0].header))
    for r in rows:
        rest = [r[i] for i in cols[1:]]
        if len(r[0]) > key_width and len(cols) > 1:
            lines.append(r[0])
            lines.append(line(rest, ""))
        else:
            lines.append(line(rest, r[0]))
    return "\n".join(lines) + "\n"


def render_tree(label: str, children: Sequence[Any], child: Any) -> str:
    """An indented tree (``├──``/``└──``); ``child(node) -> (label, children)``."""
    lines = [safe(label)]

    def walk(nodes: Sequence[Any], prefix: str) -> None:
        for k, node in enumerate(nodes):
            last = k == len(nodes) - 1
            lab, kids = child(node)
            lines.append(prefix + ("└── " if last else "├── ") + safe(lab))
            walk(kids, prefix + ("    " if last else "│   "))

    walk(children, "")
    return "\n".join(lines) + "\n"


def echo(text: str = "") -> None:
    """Print human output as is (no markup, no wrapping: names are never cut; control characters escaped)."""
    sys.stdout.write(safe(text, keep_newlines=True) + "\n")


# -- the everyday commands' human output (shared by the typer commands and main's fast path) --


def print_ls(rows: Sequence[dict[str, Any]], wide: bool = False) -> None:
    cols = [Column("NAME:TAG"), Column("DIGEST"), Column("KIND", drop=4), Column("BASE", drop=3, shrink=12),
            Column("PARAMS", drop=2, right=True), Column("SIZE", drop=5, right=True), Column("UPDATED", drop=1)]
    body = [(f"{r['name']}:{r['tag']}", short(r["digest"], wide), r["kind"] or "?", r["base_name"] or "-",
             human_count(r["params"]), human_bytes(r["stored_bytes"]), (r["updated"] or "")[:19]) for r in rows]
    sys.stdout.write(render_table(cols, body, out_width(wide)))


def show_needs_commands(info: dict[str, Any], inspected: dict[str, Any] | None) -> bool:
    """Whether ``show`` of ``info`` needs renderers that live in other command modules (and import typer)."""
    comp = info["metadata"].get("compression") if info["kind"] == "sparse" else None
    return bool(inspected or comp or (info["lineage"]["recipe"] or {}).get("search"))


def _side_file_line(f: dict[str, Any], wide: bool) -> str:
    """What a diff patch does to one of the base's side files (a ``show`` line)."""
    if "json_patch" in f:
        ops = f["json_patch"]
        listed = ", ".join(f"{op['op']} {op['path']}" for op in ops[:4]) + (" …" if len(ops) > 4 else "")
        return f"{len(ops)} change{'s' if len(ops) != 1 else ''} to the base's: {listed}"
    if f.get("removed"):
        return "removed (the fine-tune has none)"
    return f"the fine-tune's, {human_bytes(f['size'])} {short(f['digest'], wide)}"


def print_show(info: dict[str, Any], inspected: dict[str, Any] | None, tensors: bool = False,
               wide: bool = False, *, render_search: Callable[[Any], None] | None = None,
               report_lines: Callable[[Any], list[str]] | None = None,
               summary_line: Callable[[Any], str] | None = None) -> None:
    """``show``'s human output. The merge search, compression report and inspect summary are rendered by
    the functions passed in (from cli/merge, cli/compress, cli/inspect); without them, see
    :func:`show_needs_commands`."""
    echo(f"{info['digest']}  {', '.join(info['refs']) or '(no refs)'}")
    echo(f"kind      {info['kind']}")
    b = info["base"]
    echo(f"base      {b['name']}{'@' + b['revision'] if b.get('revision') else ''}  {b['fingerprint']}")
    echo(f"tensors   {len(info['tensors'])}   params {human_count(info['num_params'])}   "
         f"stored {human_bytes(info['stored_bytes'])}")
    if info["params"]:
        p = info["params"]
        if info["kind"] == "lora":
            keys = ("r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
            p = {k: p[k] for k in keys if p.get(k) not in (None, {}, False)}
        echo("params    " + json.dumps(p, sort_keys=True)[:400])
    lin = info["lineage"]
    if lin["parents"] or lin["recipe"]:
        echo("parents   " + (", ".join(short(p, wide) for p in lin["parents"]) or "-"))
        recipe = dict(lin["recipe"] or {})
        sr = recipe.pop("search", None)
        echo("recipe    " + json.dumps(recipe, sort_keys=True))
        if sr and render_search is not None:
            sys.stdout.flush()
            render_search(sr)
    comp = info["metadata"].get("compression") if info["kind"] == "sparse" else None
    if comp and report_lines is not None:
        for line in report_lines(comp):
            echo("compress  " + line)
    meta = {k: v for k, v in info["metadata"].items() if not (comp and k == "compression")}
    if meta:
        echo("metadata  " + json.dumps(meta, sort_keys=True))
    for name, f in sorted(info.get("side_files", {}).items()):  # a fine-tune's config.json/tokenizer changes
        echo(f"file      {name}: {_side_file_line(f, wide)}")
    if inspected and summary_line is not None:
        echo("inspect   " + summary_line(inspected))
    if info.get("suites"):
        echo("suites    " + ", ".join(short(s, wide) for s in info["suites"]))
    for v in info.get("validations", []):
        if v.get("type") == "merge-validation":
            echo(f"validated {v['verdict']} (gate {v['gate']}, min normalized "
                 f"{v['min_normalized'] if v['min_normalized'] is None else round(v['min_normalized'], 3)}, {v['device']})")
        elif v.get("type") == "port-validation" and v["verdict"] == "unvalidated":
            echo(f"validated unvalidated on the new base ({v.get('reason', '')})")
        elif v.get("type") == "port-validation":
            rec = v["min_recovered"]
            echo(f"validated {v['verdict']} on the new base (gate {v['gate']}, least gain recovered "
                 f"{'-' if rec is None else f'{rec:.1%}'}, {v['split']}, {v['device']})")
        elif v.get("type") == "compress-validation":
            kept = ", ".join("-" if r["gain_kept"] is None else f"{r['gain_kept']:.1%}" for r in v["rows"])
            echo(f"gain kept {kept} against the source ({v['split']}, {v['device']})")
        elif "metrics" in v:
            echo(f"scored    suite {short(v['suite'], wide)} {v['split']}: {v['metrics']['score']:.4f} ({v['device']})")
    if tensors:
        errs = (comp or {}).get("tensors") or {}
        cols = [Column("TENSOR"), Column("DTYPE", drop=2), Column("SHAPE"), Column("ENCODING", drop=1),
                Column("SIZE", right=True)]
        if errs:
            cols += [Column("KEPT", drop=3, right=True), Column("REL.ERR", drop=4, right=True)]
        body = []
        for name, e in sorted(info["tensors"].items()):
            extra = []
            if errs:
                from math import prod

                r, n = errs.get(name), prod(e["shape"])
                extra = [f"{r['nnz'] / n:.4f}" if r and n else "-", f"{r['rel_error']:.4f}" if r else "-"]
            body.append([name, e["dtype"], "×".join(map(str, e["shape"])), e["encoding"], human_bytes(e["size"]), *extra])
        sys.stdout.write(render_table(cols, body, out_width(wide)))


def print_log(doc: dict[str, Any], wide: bool = False) -> None:
    cols = [Column("#", right=True), Column("TIME", drop=2), Column("OLD"), Column("NEW"), Column("USER", drop=1),
            Column("MESSAGE", shrink=16)]
    body = [(str(e["seq"]), e["time"][:19], short(e["old"], wide), short(e["new"], wide) if e["new"] else "(removed)",
             e["user"], e["message"]) for e in doc["history"]]
    sys.stdout.write(render_table(cols, body, out_width(wide), title=f"history of {doc['ref']}"))
    if doc["lineage"]:

        def label(node: dict[str, Any]) -> str:
            recipe = node.get("recipe") or {}
            text = f"{short(node['digest'], wide)} {node.get('kind', '?')} {' '.join(node.get('refs', []))}".rstrip()
            if recipe.get("op"):
                text += f"  {recipe['op']}{' ' + recipe['method'] if recipe.get('method') else ''}"
            return text

        root = doc["lineage"]
        sys.stdout.write(render_tree(label(root), root.get("parents", []),
                                     lambda n: (label(n), n.get("parents", []))))


def print_remotes(rows: Sequence[dict[str, Any]], wide: bool = False) -> None:
    cols = [Column("NAME"), Column("KIND", drop=2), Column("URL"), Column("TOKEN FILE", drop=1)]
    body = [(r["name"], r["kind"], r["url"], r["token_file"] or "-") for r in rows]
    sys.stdout.write(render_table(cols, body, out_width(wide)))
