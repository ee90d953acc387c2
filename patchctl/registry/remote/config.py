"""Configured remotes: ``remotes.json``, remote URLs, and ``REMOTE/NAME:TAG`` references.

A remote is named by a URL:

- ``http://host:port[/prefix]`` or ``https://…`` — a ``patchctl serve``
  (read-only: pull only); an optional bearer token is read from a file
  (:func:`patchctl.registry.remote.protocol.read_token_file`);
- a registry folder: ``/path``, ``./path`` or ``file:///path`` — pull and push;
- ``hf://org/repo[@revision]`` — a Hugging Face Hub model repo: pull a
  patchctl-layout or a PEFT adapter repo, push (see :mod:`patchctl.registry.remote.hub`);
- ``oci://HOST[:PORT]/NAMESPACE`` — a namespace of an OCI registry (TLS verified;
  plain HTTP only on a loopback host or with an explicit ``oci+http://``): pull
  and push, patch ``NAME`` is repository ``NAMESPACE/NAME`` (see
  :mod:`patchctl.registry.remote.oci_pull`, :mod:`~patchctl.registry.remote.oci_push`).

Configured remotes live in ``remotes.json`` in the registry folder
(``{"version": 1, "remotes": {NAME: {"url", "token_file"}}}``), written to
``tmp/`` and renamed into place under ``locks/remotes.lock``; ``config.json``
stays minimal. Remote names match :data:`REMOTE_NAME_RE`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from patchctl.errors import InvalidArgument, InvalidReference, NotFound
from patchctl.registry.remote.oci import check_transport, parse_oci
from patchctl.registry.remote.protocol import read_token_file
from patchctl.registry.store.folder import Store
from patchctl.registry.store.names import Ref, parse_ref

REMOTES_FILE = "remotes.json"
REMOTES_VERSION = 1
REMOTE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HF_FOLDER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")  # one part of hf://ORG/REPO/FOLDER


@dataclass(frozen=True)
class Remote:
    """A remote: a ``name`` (empty for a URL given inline), its ``url`` and optional ``token_file``."""

    name: str
    url: str
    token_file: str | None = None

    @property
    def kind(self) -> str:
        """``http``, ``folder``, ``hf`` or ``oci``."""
        return parse_url(self.url)[0]

    @property
    def label(self) -> str:
        return self.name or self.url

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "kind": self.kind, "token_file": self.token_file}


def parse_url(url: str) -> tuple[str, str]:
    """``(kind, normalized url)`` for a remote URL; raises :class:`InvalidArgument` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument("empty remote URL: use http(s)://HOST:PORT, a registry folder, or hf://ORG/REPO")
    url = url.strip()
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
            raise InvalidArgument(f"invalid HTTP remote {url!r}: expected http(s)://HOST[:PORT][/PREFIX], no credentials")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise InvalidArgument(f"invalid port in remote URL {url!r}") from None
        return "http", url.rstrip("/")
    if url.startswith("hf://"):
        path, _, rev = url[5:].partition("@")
        repo, sub = "/".join(path.split("/")[:2]), path.split("/")[2:]  # ORG/REPO, then a folder in the repo
        if (not HF_REPO_RE.fullmatch(repo) or ".." in path or (rev and not re.fullmatch(r"[\w.\-/]{1,200}", rev))
                or len(sub) > 8 or not all(HF_FOLDER_RE.fullmatch(p) for p in sub)):
            raise InvalidArgument(f"invalid Hub remote {url!r}: expected hf://ORG/REPO[/FOLDER][@REVISION]")
        return "hf", url
    if url.startswith(("oci://", "oci+http://")):
        return "oci", parse_oci(url).url(with_ref=False)
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument(f"file remote {url!r} names a host; use file:///ABSOLUTE/PATH")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidArgument(f"file remote {url!r} must be absolute: file:///ABSOLUTE/PATH")
        return "folder", Path(path).as_uri()
    if "://" in url:
        raise InvalidArgument(f"unknown remote scheme in {url!r}: use http(s)://, file://, hf:// or oci://")
    return "folder", Path(url).expanduser().resolve().as_uri()


def folder_path(url: str) -> Path:
    return Path(unquote(urlsplit(parse_url(url)[1]).path))


def _remotes_path(store: Store) -> Path:
    return store.root / REMOTES_FILE


def load_remotes(store: Store) -> dict[str, Remote]:
    p = _remotes_path(store)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise InvalidArgument(f"{p} is not valid JSON; fix or remove it") from None
    if not isinstance(doc, dict) or doc.get("version") != REMOTES_VERSION or not isinstance(doc.get("remotes"), dict):
        raise InvalidArgument(f"{p}: expected {{\"version\": {REMOTES_VERSION}, \"remotes\": {{...}}}}")
    out = {}
    for name, r in doc["remotes"].items():
        if not isinstance(r, dict) or not isinstance(r.get("url"), str):
            raise InvalidArgument(f"{p}: remote {name!r} has no url")
        out[name] = Remote(name, r["url"], r.get("token_file"))
    return out


def _save_remotes(store: Store, remotes: dict[str, Remote]) -> None:
    doc = {"version": REMOTES_VERSION,
           "remotes": {n: {"url": r.url, "token_file": r.token_file} for n, r in sorted(remotes.items())}}
    tmp = store.root / "tmp" / f"{REMOTES_FILE}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _remotes_path(store))


@contextlib.contextmanager
def _remotes_lock(store: Store) -> Iterator[None]:
    with open(store.root / "locks" / "remotes.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def add_remote(store: Store, name: str, url: str, token_file: str | os.PathLike[str] | None = None, *,
               insecure: bool = False) -> Remote:
    """Add remote ``name``; ``insecure`` consents to plain HTTP for an ``oci+http://`` URL (kept by its scheme)."""
    if not REMOTE_NAME_RE.fullmatch(name or ""):
        raise InvalidArgument(f"invalid remote name {name!r}: lowercase letters, digits, _ and -, at most 64")
    _, norm = parse_url(url)
    check_transport(url.strip(), insecure)
    tf = str(Path(token_file).expanduser().resolve()) if token_file is not None else None
    with _remotes_lock(store):
        remotes = load_remotes(store)
        if name in remotes:
            raise InvalidArgument(f"remote {name!r} already exists ({remotes[name].url}); `patchctl remote rm {name}` first")
        remotes[name] = Remote(name, norm, tf)
        _save_remotes(store, remotes)
    return remotes[name]


def remove_remote(store: Store, name: str) -> Remote:
    with _remotes_lock(store):
        remotes = load_remotes(store)
        if name not in remotes:
            raise NotFound(f"no remote named {name!r}; `patchctl remote ls` lists them")
        gone = remotes.pop(name)
        _save_remotes(store, remotes)
    return gone


def resolve_remote(store: Store, spec: str) -> Remote:
    """A configured remote by name, or an inline URL or folder path."""
    remotes = load_remotes(store)
    if spec in remotes:
        return remotes[spec]
    if REMOTE_NAME_RE.fullmatch(spec) and not Path(spec).exists():
        raise NotFound(f"no remote named {spec!r}; `patchctl remote add {spec} URL` or give a URL")
    return Remote("", parse_url(spec)[1])


def split_pull_ref(store: Store, ref: str, from_: str | None) -> tuple[Remote, Ref]:
    """``REMOTE/NAME[:TAG]`` → the remote and the ref.

    With ``from_`` (a remote name or URL) the whole string is ``NAME[:TAG]``. Otherwise a
    first component that names a configured remote is the remote; failing that, the only
    configured remote, if there is just one.
    """
    if from_ is not None:
        return resolve_remote(store, from_), parse_ref(ref)
    head, sep, rest = ref.partition("/")
    remotes = load_remotes(store)
    if sep and head in remotes:
        return remotes[head], parse_ref(rest)
    if len(remotes) == 1:  # the only remote needs no prefix
        return next(iter(remotes.values())), parse_ref(ref)
    raise InvalidReference(
        f"{ref!r} names no configured remote: write REMOTE/NAME:TAG "
        f"(remotes: {', '.join(sorted(remotes)) or 'none; `patchctl remote add`'}) or pass --from REMOTE"
    )


def read_token(remote: Remote) -> str | None:
    """The bearer token of ``remote`` (``None`` without a token file), by :func:`protocol.read_token_file`."""
    if remote.token_file is None:
        return None
    try:
        return read_token_file(remote.token_file)
    except (NotFound, InvalidArgument) as e:
        raise type(e)(f"remote {remote.label}: {e}") from None
