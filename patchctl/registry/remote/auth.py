"""Credentials for OCI registries, found the way registry clients find them, and the challenge flow.

Where a user and password for ``HOST[:PORT]`` come from, first hit wins:

1. ``PATCHCTL_REGISTRY_USER`` and ``PATCHCTL_REGISTRY_PASSWORD`` (both set);
2. ``patchctl login HOST`` — stored in the registry folder's
   ``credentials.json`` (mode 0600, written to ``tmp/`` and renamed; one
   ``{"version": 1, "auths": {HOST: {"auth": base64(user:password)}}}``,
   the docker ``auths`` shape), so a login is per registry folder and never
   touches a file docker or a credential store owns;
3. the docker config (``$DOCKER_CONFIG/config.json``, else
   ``~/.docker/config.json``): ``credHelpers[HOST]`` or ``credsStore`` by
   running ``docker-credential-<helper> get`` where it is on ``PATH``, then
   ``auths[HOST]`` (``auth``, or ``username``/``password``; an ``identitytoken``
   is used as a refresh token at the token endpoint);
4. none: anonymous.

A request answered 401 carries a ``WWW-Authenticate`` challenge: ``Basic``
→ the request is sent again with the credentials; ``Bearer realm=…,
service=…, scope=…`` → a token is fetched from the realm for the scope
(with the credentials as Basic auth when there are some) and the request is
sent again with it; a token is cached per scope and fetched again on the
next 401. Secrets never appear in messages, ``repr`` or ``remote ls``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchctl.errors import InvalidArgument, NotFound

CREDENTIALS_FILE = "credentials.json"
CREDENTIALS_VERSION = 1
USER_ENV, PASSWORD_ENV = "PATCHCTL_REGISTRY_USER", "PATCHCTL_REGISTRY_PASSWORD"
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A user and a secret (a password, or a refresh token when ``username`` is ``<token>``)."""

    username: str
    password: str = field(repr=False)
    origin: str = ""  # where they came from, for messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, origin={self.origin!r})"


def _host_keys(host: str) -> list[str]:
    """How a docker config file may spell ``host``."""
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys.append("https://index.docker.io/v1/")
    return keys


def docker_config_path() -> Path:
    d = os.environ.get("DOCKER_CONFIG")
    return (Path(d) if d else Path.home() / ".docker") / "config.json"


def _run_helper(helper: str, host: str) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        return None
    for key in (host, f"https://{host}"):
        try:
            out = subprocess.run([exe, "get"], input=key, capture_output=True, text=True, timeout=HELPER_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0:
            try:
                doc = json.loads(out.stdout)
                return Credentials(str(doc["Username"]), str(doc["Secret"]), f"docker-credential-{helper}")
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _from_auth_entry(entry: Any, origin: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, pw = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if sep:
            return Credentials(user, pw, origin)
    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        return Credentials("<token>", entry["identitytoken"], origin)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], origin)
    return None


def _docker_credentials(host: str) -> Credentials | None:
    p = docker_config_path()
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
    for key in _host_keys(host):
        if isinstance(helpers.get(key), str):
            got = _run_helper(helpers[key], host)
            if got is not None:
                return got
    auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
    for key in _host_keys(host):
        got = _from_auth_entry(auths.get(key), str(p))
        if got is not None:
            return got
    if isinstance(doc.get("credsStore"), str):
        return _run_helper(doc["credsStore"], host)
    return None


def _load_stored(root: Path) -> dict[str, Any]:
    p = root / CREDENTIALS_FILE
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise InvalidArgument(f"{p} is not valid JSON; remove it and `patchctl login` again") from None
    if not isinstance(doc, dict) or doc.get("version") != CREDENTIALS_VERSION or not isinstance(doc.get("auths"), dict):
        raise InvalidArgument(f"{p}: expected {{\"version\": {CREDENTIALS_VERSION}, \"auths\": {{...}}}}")
    return dict(doc["auths"])


def find_credentials(host: str, root: Path | None) -> Credentials | None:
    """The credentials for ``host`` (``HOST[:PORT]``), by the order in the module docstring."""
    user, pw = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and pw is not None:
        return Credentials(user, pw, f"${USER_ENV}")
    if root is not None:
        got = _from_auth_entry(_load_stored(root).get(host), f"`patchctl login {host}`")
        if got is not None:
            return got
    return _docker_credentials(host)


def store_login(root: Path, host: str, creds: Credentials) -> Path:
    """Keep ``creds`` for ``host`` in ``root/credentials.json`` (0600, atomic rename)."""
    auths = _load_stored(root)
    auths[host] = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode("ascii")}
    _write(root, auths)
    return root / CREDENTIALS_FILE


def forget_login(root: Path, host: str) -> bool:
    auths = _load_stored(root)
    if host not in auths:
        return False
    del auths[host]
    _write(root, auths)
    return True


def _write(root: Path, auths: dict[str, Any]) -> None:
    tmp = root / "tmp" / f"{CREDENTIALS_FILE}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(json.dumps({"version": CREDENTIALS_VERSION, "auths": dict(sorted(auths.items()))}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, root / CREDENTIALS_FILE)


_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Bearer realm="…",service="…",scope="…"`` → ``("bearer", {params})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        params[m.group(1).lower()] = m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3)
        pos = m.end()
    return scheme.lower(), params


def read_password(stream: Any, host: str) -> str:
    """The password on ``stream`` (``--password-stdin``): one line, its newline stripped."""
    pw = stream.read(65537)
    if len(pw) > 65536:
        raise InvalidArgument("the password on stdin is longer than 64 KiB")
    pw = pw.rstrip("\r\n")
    if not pw:
        raise NotFound(f"no password on stdin for {host}: `echo \"$TOKEN\" | patchctl login {host} -u USER --password-stdin`")
    return str(pw)


__all__ = [
    "CREDENTIALS_FILE",
    "Credentials",
    "docker_config_path",
    "find_credentials",
    "forget_login",
    "parse_challenge",
    "read_password",
    "store_login",
]
