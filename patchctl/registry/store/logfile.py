"""Self-checking append-only logs: ref logs (``refs/<name>/@<tag>``) and record logs (``records/*.jsonl``).

Each line is canonical JSON with a ``chain`` field: the hex sha256 of the
previous line's chain (for the first line, of nothing) followed by a newline
and the line's canonical JSON without ``chain``::

    chain_i = sha256(chain_{i-1} + "\\n" + canonical(entry_i))

So every line checks itself, and deleting, reordering or altering a line
breaks the chain of every line after it (git's reflog carries old and new;
restic verifies everything it reads). Reading is strict: a complete line
(ending in ``\\n``) that does not parse or whose chain does not match is
**damage** — :class:`~patchctl.errors.LogDamaged` names the file and the
line; it is never skipped, so a flipped bit cannot roll a tag back. Only a
torn *last* line (no newline: a crash in mid-append) is ignored, and the
next append cuts it off before writing (under the caller's lock).

Lines without ``chain`` — written by a patchctl from before chains, which may
still share the registry folder — are read as they are; the next chained
line covers their raw bytes (``chain_{i-1}`` of an unchained line is the
sha256 of its bytes), so only unchained lines at the very end are unchecked.
A flipped bit cannot turn a chained line into an accepted different entry:
it breaks the JSON or the checksum, or (inside the word ``chain`` itself)
leaves the entry's values as they were — and the next line then fails.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from patchctl.errors import LogDamaged
from patchctl.registry.formats import canonical

CHAIN = "chain"
GENESIS = ""


def _link(prev: str, body: bytes) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + body).hexdigest()


def seal(entry: dict[str, Any], prev: str) -> tuple[bytes, str]:
    """The line for ``entry`` after a line whose chain is ``prev``, and its chain."""
    body = canonical.dumps({k: v for k, v in entry.items() if k != CHAIN})
    chain = _link(prev, body)
    return canonical.dumps({**entry, CHAIN: chain}) + b"\n", chain


def parse(raw: bytes, where: str) -> Iterator[tuple[int, dict[str, Any], str]]:
    """``(line number, entry without chain, chain)`` for every complete line of ``raw``;
    :class:`LogDamaged` at the first line that is not what was written."""
    lines = raw.split(b"\n")
    prev = GENESIS
    for no, line in enumerate(lines[:-1], 1):  # the part after the last newline is a torn (or no) line
        try:
            e = json.loads(line)
            if not isinstance(e, dict):
                raise ValueError("not an object")
        except ValueError:
            raise LogDamaged(where, no, "not a log line (altered or overwritten)") from None
        if CHAIN in e:
            chain = e.pop(CHAIN)
            if not isinstance(chain, str) or _link(prev, canonical.dumps(e)) != chain:
                raise LogDamaged(where, no, "checksum does not match (the line, or one before it, was altered)")
        else:  # written by a patchctl from before chains (old and new may share a registry): the next link covers it
            chain = hashlib.sha256(line).hexdigest()
        prev = chain
        yield no, e, chain
    if lines[-1] and _checks(lines[-1], prev):
        raise LogDamaged(where, len(lines), "the last line lost its newline (a whole line that checks: altered, "
                                            "not torn)")


def _checks(tail: bytes, prev: str) -> bool:
    """Whether ``tail`` (after the last newline) is a whole chained line, perhaps with its newline flipped
    into another byte: a crash mid-append leaves a part of a line, which never checks."""
    for raw in (tail, tail[:-1]):
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get(CHAIN), str):
            chain = e.pop(CHAIN)
            if _link(prev, canonical.dumps(e)) == chain:
                return True
    return False


def last_chain(raw: bytes, where: str) -> str:
    """The chain to seal the next line with (checks the whole log on the way)."""
    chains = [chain for _, _, chain in parse(raw, where)]
    return chains[-1] if chains else GENESIS


def read(path: Path, where: str | None = None) -> list[dict[str, Any]]:
    """Every entry of the log at ``path`` (``[]`` when there is none); strict, see the module docstring."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return [e for _, e, _ in parse(raw, where or str(path))]


def append(path: Path, entry: dict[str, Any], where: str | None = None) -> bytes:
    """Append ``entry`` sealed onto the log's chain, with O_APPEND and fsync; returns the line.

    The caller holds the lock that serializes appends to ``path``. A torn last
    line is cut off first; a damaged log is not appended to (LogDamaged).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        if raw and not raw.endswith(b"\n"):  # a torn line from a crash in mid-append: never was an entry
            last_chain(raw, where or str(path))  # ... unless it checks (a flipped newline): LogDamaged, not cut
            cut = raw.rfind(b"\n") + 1
            os.ftruncate(fd, cut)
            raw = raw[:cut]
        line, _ = seal(entry, last_chain(raw, where or str(path)))
        os.write(fd, line)
        os.fsync(fd)
        return line
    finally:
        os.close(fd)


def rewrite(path: Path, entries: list[dict[str, Any]], tmp_dir: Path) -> None:
    """Replace the log at ``path`` by ``entries``, sealed anew (repair; caller holds the lock)."""
    prev, out = GENESIS, bytearray()
    for e in entries:
        line, prev = seal(e, prev)
        out += line
    tmp = tmp_dir / f"{path.name}.repair-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["CHAIN", "append", "last_chain", "parse", "read", "rewrite", "seal"]
