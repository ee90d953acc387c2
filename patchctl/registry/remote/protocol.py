"""The HTTP protocol between ``patchctl pull`` and ``patchctl serve``: the one definition both sides use.

The client (:class:`patchctl.registry.remote.sources.HttpSource`) builds its
request paths with :func:`v2_path` and reads its bearer token with
:func:`read_token_file`; the server (:mod:`patchctl.server.app`) routes the
same paths (:data:`MANIFEST_ROUTE` ...), answers with the same media types,
and reads its token with the same :func:`read_token_file`. So a token file is
accepted or refused identically on both ends, and a path one side builds is a
path the other routes.

Reads are OCI-distribution style::

    GET       /v2/                                   {} — API version check
    GET       /v2/_catalog[?n=&last=]                {"repositories": [names]}
    GET|HEAD  /v2/<name>/manifests/<tag|digest>      manifest bytes, Docker-Content-Digest
    GET|HEAD  /v2/<name>/blobs/<digest>              blob bytes, Range (206/416), immutable
    GET       /v2/<name>/tags/list[?n=&last=]        {"name", "tags"}

The token file rule
-------------------
A token travels as ``Authorization: Bearer <token>``: :mod:`http.client`
encodes header values as Latin-1 and refuses CR/LF in them, and the server
compares the header's bytes with the UTF-8 bytes of its token. The only tokens
that reach the server byte for byte are therefore *visible ASCII*, so that is
the rule, the stricter of the two the client and server used to have (the
server refused whitespace inside a token, the client did not; neither checked
the encoding):

- the file is read as bytes; surrounding whitespace (spaces, tabs, newlines)
  is stripped — ``echo TOKEN > FILE`` works;
- what is left must be one token: 1 to :data:`MAX_TOKEN_BYTES` characters,
  each visible ASCII (``!`` to ``~``): no space, tab or newline inside, no
  control character, no non-ASCII (a UTF-8 byte-order mark included);
- a regular file writable by *other* users is refused: anyone on the machine
  could replace the secret (``chmod o-w FILE``). Group-writable is allowed
  (``umask 002`` systems create files so), and so is a pipe (``<(pass show
  token)``), whose mode says nothing about who wrote it;
- a file larger than :data:`MAX_TOKEN_FILE_BYTES` is refused unread: it is
  not a token file.

An unreadable (or missing) file raises :class:`~patchctl.errors.NotFound`; a
file that breaks the rule raises :class:`~patchctl.errors.InvalidArgument`.
"""

from __future__ import annotations

import os
import stat as stat_mod
from urllib.parse import quote

from patchctl.errors import InvalidArgument, NotFound

#: ``Content-Type`` of a manifest (and the client's ``Accept``).
MANIFEST_MEDIA_TYPE = "application/vnd.patchctl.manifest.v1+json"
#: ``Content-Type`` of a blob.
BLOB_MEDIA_TYPE = "application/octet-stream"
#: The header naming the sha256 of the bytes sent (manifests and blobs).
DIGEST_HEADER = "Docker-Content-Digest"
#: Sent with ``GET /v2/``.
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}

#: The path kinds under ``/v2/<name>/``.
MANIFESTS = "manifests"
BLOBS = "blobs"

#: Server routes (Starlette templates: a name may contain ``/``).
V2_ROUTE = "/v2/"
CATALOG_ROUTE = "/v2/_catalog"
MANIFEST_ROUTE = "/v2/{name:path}/" + MANIFESTS + "/{reference}"
BLOB_ROUTE = "/v2/{name:path}/" + BLOBS + "/{digest}"
TAGS_ROUTE = "/v2/{name:path}/tags/list"

MAX_TOKEN_BYTES = 8192
MAX_TOKEN_FILE_BYTES = 65536


def v2_path(prefix: str, name: str, kind: str, reference: str) -> str:
    """The path of a manifest (``kind`` :data:`MANIFESTS`, ``reference`` a tag or digest) or a blob
    (:data:`BLOBS`, a digest) of patch ``name``, under a server mounted at ``prefix`` (``""`` or ``/x``)."""
    return f"{prefix}/v2/{quote(name, safe='/')}/{kind}/{quote(reference, safe=':')}"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path``, by the rule in the module docstring (client and server alike)."""
    where = f"token file {os.fspath(path)!r}"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat_mod.S_ISREG(st.st_mode) and st.st_mode & stat_mod.S_IWOTH:
                raise InvalidArgument(f"{where} is writable by other users, who could replace the token: "
                                      "`chmod o-w` it")
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as e:
        raise NotFound(f"cannot read {where}: {e.strerror}") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise InvalidArgument(f"{where} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token file")
    token = raw.strip(b" \t\r\n\x0b\x0c")
    if not token or len(token) > MAX_TOKEN_BYTES or any(not 0x21 <= b <= 0x7E for b in token):
        raise InvalidArgument(f"{where} must hold one token of 1 to {MAX_TOKEN_BYTES} visible ASCII characters "
                              "(no spaces, control or non-ASCII characters inside)")
    return token.decode("ascii")


__all__ = [
    "API_VERSION_HEADER",
    "BLOBS",
    "BLOB_MEDIA_TYPE",
    "BLOB_ROUTE",
    "CATALOG_ROUTE",
    "DIGEST_HEADER",
    "MANIFESTS",
    "MANIFEST_MEDIA_TYPE",
    "MANIFEST_ROUTE",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_FILE_BYTES",
    "TAGS_ROUTE",
    "V2_ROUTE",
    "read_token_file",
    "v2_path",
]
