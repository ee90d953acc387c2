"""The OCI distribution client: one registry repository's distribution API, with auth and retries.

:class:`OciClient` speaks the distribution API over :mod:`http.client` (one
keep-alive connection per thread), answers auth challenges
(:mod:`patchctl.registry.remote.auth`) and retries transport errors and 5xx
with backoff. Reads: manifests (capped, checked against their digest) and blobs
(``Range``, redirects to storage). Writes: blob ``HEAD``, cross-repository
mount, uploads — monolithic (``POST`` + ``PUT ?digest=``) or chunked
(``PATCH`` with ``Content-Range``; the session's offset read back to resume) —
and manifests. :func:`login` checks credentials and keeps them. Pushing is
:mod:`~patchctl.registry.remote.oci_push`, pulling :mod:`~patchctl.registry.remote.oci_pull`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchctl.errors import DigestMismatch, InvalidPatch, NotFound, PatchctlError, RemoteError
from patchctl.registry.remote import oci
from patchctl.registry.remote.auth import Credentials, find_credentials, parse_challenge
from patchctl.registry.remote.limits import shutdown
from patchctl.registry.store.folder import CHUNK

RETRIES = 3
BACKOFF = 0.5  # seconds, doubled per attempt
MAX_ERROR_BODY = 65536
USER_AGENT = "patchctl"
Body = Callable[[], Any] | bytes | None


class _Slice:
    """``length`` bytes of an open file from ``offset``, as a request body (``read`` only)."""

    def __init__(self, f: Any, offset: int, length: int, counter: Callable[[int], None] | None):
        self.f, self.left, self.counter = f, length, counter
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data: bytes = self.f.read(n) if n > 0 else b""
        self.left -= len(data)
        if self.counter is not None and data:
            self.counter(len(data))
        return data


class OciClient:
    """One registry repository's distribution API, with auth and retries."""

    def __init__(self, ref: oci.OciRef, creds: Credentials | None, *, timeout: float = 60.0):
        self.ref, self.creds, self.timeout = ref, creds, timeout
        self.label = ref.url(with_ref=False)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._basic = False
        self.requests: dict[str, int] = {}
        self.subject_accepted = False

    # -- transport --------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host = urllib.parse.urlsplit(self.ref.base_url)
            if self.ref.scheme == "https":
                conn = http.client.HTTPSConnection(host.hostname or "", host.port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(host.hostname or "", host.port, timeout=self.timeout)
            conn.blocksize = CHUNK
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()

    def abort(self) -> None:
        """Make every blocked read on this client's connections return (a pull's watch stopped it)."""
        with self._lock:
            conns = list(self._conns)
        shutdown(conns)

    def _auth_header(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self.creds is not None:
            return {"Authorization": self.creds.basic()}
        return {}

    def _target(self, path: str) -> str:
        """A path or an absolute URL on this registry (an upload ``Location``) → the request target."""
        if path.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(path)
            if parts.netloc.lower() != self.ref.host:
                raise RemoteError(f"{self.label} sent an upload location on another host ({parts.netloc})")
            return parts.path + (f"?{parts.query}" if parts.query else "")
        return path

    def request(self, method: str, path: str, *, scope: str, what: str, headers: dict[str, str] | None = None,
                body: Body = None, ok: tuple[int, ...] = (200,), stream: bool = False,
                idempotent: bool = True) -> http.client.HTTPResponse:
        """Send a request, answering one auth challenge and retrying transport errors and 5xx with backoff.

        The body is read (and the response returned closed) unless ``stream``; a
        status outside ``ok`` raises the translated error.
        """
        target = self._target(path)
        authed = False
        attempt = 0
        while True:
            reused = getattr(self._local, "conn", None) is not None
            conn = self._connection()
            hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {}),
                    **self._auth_header(scope)}
            data = body() if callable(body) else body
            with self._lock:
                self.requests[method] = self.requests.get(method, 0) + 1
            try:
                conn.request(method, target, body=data, headers=hdrs)
                resp = conn.getresponse()
            except ssl.SSLError as e:  # not transient: the host does not speak (trusted) TLS
                self._drop()
                hint = ("the registry speaks no TLS on that port: for a registry without TLS write "
                        f"oci+http://{self.ref.host}/... and add --insecure"
                        if "WRONG_VERSION_NUMBER" in str(e) or "record layer" in str(e)
                        else "its certificate is not trusted here (add its CA to the system's trust store)")
                raise RemoteError(f"cannot {what} on {self.label}: TLS failed ({e.reason or type(e).__name__}); "
                                  f"{hint}") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                if reused and attempt == 0:  # a stale keep-alive connection: once more, free
                    attempt = -1
                elif attempt >= RETRIES - 1 or not idempotent:
                    raise RemoteError(f"cannot {what} on {self.label}: {type(e).__name__}: {e} "
                                      f"({attempt + 1} attempts)") from None
                else:
                    time.sleep(BACKOFF * 2 ** attempt)
                attempt += 1
                continue
            if resp.status == 401 and not authed:
                resp.read(MAX_ERROR_BODY)
                self._answer(resp.getheader("WWW-Authenticate") or "", scope, what)
                authed = True
                continue
            if resp.status >= 500 and idempotent and attempt < RETRIES - 1:
                resp.read(MAX_ERROR_BODY)
                time.sleep(BACKOFF * 2 ** attempt)
                attempt += 1
                continue
            if resp.status not in ok:
                self._fail(resp, what, scope)
            if not stream and method != "HEAD":
                resp.read()
            return resp

    def _answer(self, challenge: str, scope: str, what: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.creds is None:
                raise RemoteError(self._denied(401, what))
            self._basic = True
        elif scheme == "bearer" and params.get("realm"):
            self._tokens[scope] = self._fetch_token(params, scope, what)
        else:
            raise RemoteError(f"{self.label} refused to {what} (401) with no usable challenge "
                              f"({scheme or 'none'})")

    def _fetch_token(self, params: dict[str, str], scope: str, what: str) -> str:
        realm = params["realm"]
        if not realm.startswith("https://") and not (realm.startswith("http://") and self.ref.scheme == "http"):
            raise RemoteError(f"{self.label} sent a token realm that is not https ({realm!r}); refusing to send "
                              "credentials there")
        scopes = [s for s in scope.split(" ") if s]
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in scopes]
        headers = {"User-Agent": USER_AGENT}
        data = None
        if self.creds is not None and self.creds.username == "<token>":  # docker's identitytoken: OAuth2 refresh
            data = urllib.parse.urlencode([("grant_type", "refresh_token"), ("refresh_token", self.creds.password),
                                           ("client_id", USER_AGENT), *query]).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif self.creds is not None:
            headers["Authorization"] = self.creds.basic()
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url if data is None else realm, data=data, headers=headers)
        ctx = ssl.create_default_context() if realm.startswith("https://") else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=ctx) as r:  # noqa: S310 - http(s) only
                doc = json.loads(r.read(MAX_ERROR_BODY))
        except urllib.error.HTTPError as e:
            e.close()  # the error holds the response and its socket
            if e.code in (401, 403):
                raise RemoteError(self._denied(e.code, what)) from None
            raise RemoteError(f"token endpoint of {self.label} answered {e.code} to {what}") from None
        except (OSError, ValueError) as e:
            raise RemoteError(f"cannot get a token from {self.label}'s token endpoint: {type(e).__name__}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise RemoteError(f"the token endpoint of {self.label} answered without a token")
        return token

    def _denied(self, status: int, what: str) -> str:
        if status == 401:
            if self.creds is None:
                return (f"{self.label} refused to {what} (401 unauthorized): log in with "
                        f"`patchctl login {self.ref.host} -u USER --password-stdin`")
            return (f"{self.label} refused to {what} (401 unauthorized): wrong user or password for "
                    f"{self.creds.username!r} (from {self.creds.origin}); `patchctl login {self.ref.host}` again")
        who = f"{self.creds.username!r}" if self.creds else "anonymous"
        return f"{self.label} refused to {what} (403 denied): {who} has no permission for that repository"

    def _fail(self, resp: http.client.HTTPResponse, what: str, scope: str) -> None:
        raw = resp.read(MAX_ERROR_BODY) if resp.status != 416 else b""
        self._drop()
        code = msg = ""
        with contextlib.suppress(Exception):
            err = json.loads(raw)["errors"][0]
            code, msg = str(err.get("code", "")), str(err.get("message", ""))[:200]
        detail = f"{code}: {msg}" if code else f"HTTP {resp.status}"
        if resp.status in (401, 403):
            raise RemoteError(self._denied(resp.status, what))
        if resp.status == 404 or code in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"):
            raise NotFound(f"cannot {what}: not on {self.label} ({detail})")
        raise RemoteError(f"{self.label} answered {resp.status} to {what} ({detail})")

    # -- reads ------------------------------------------------------------------------------
    def _path(self, kind: str, reference: str, repo: str | None = None) -> str:
        return f"/v2/{repo or self.ref.path}/{kind}/{reference}"

    @property
    def pull_scope(self) -> str:
        return f"repository:{self.ref.path}:pull"

    @property
    def push_scope(self) -> str:
        return f"repository:{self.ref.path}:pull,push"

    def ping(self, scope: str = "") -> None:
        """``GET /v2/`` (answering its challenge: a login check)."""
        self.request("GET", "/v2/", scope=scope or self.pull_scope, what="log in")

    def get_manifest(self, reference: str) -> tuple[bytes, str | None, str]:
        """``(bytes, content type, digest)`` of a manifest; capped and checked against its digest."""
        what = f"get {self.ref.path}:{reference}" if not reference.startswith("sha256:") else \
            f"get {self.ref.path}@{reference}"
        resp = self.request("GET", self._path("manifests", reference), scope=self.pull_scope, what=what,
                            headers={"Accept": oci.ACCEPT}, stream=True)
        where = f"{self.label}/{self.ref.path}:{reference}"
        length = resp.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > oci.MAX_OCI_MANIFEST_BYTES):
            self._drop()
            raise InvalidPatch(f"{where}: the OCI manifest is larger than the {oci.MAX_OCI_MANIFEST_BYTES >> 20} "
                               "MiB cap; refused before fetching any blob")
        try:
            data = resp.read(oci.MAX_OCI_MANIFEST_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise RemoteError(f"cannot {what} from {self.label}: {type(e).__name__}") from None
        if len(data) > oci.MAX_OCI_MANIFEST_BYTES:
            self._drop()
            raise InvalidPatch(f"{where}: the OCI manifest is larger than the {oci.MAX_OCI_MANIFEST_BYTES >> 20} "
                               "MiB cap; refused before fetching any blob")
        if not resp.isclosed():
            resp.read()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        announced = resp.getheader("Docker-Content-Digest")
        if reference.startswith("sha256:") and reference != digest or announced not in (None, digest):
            raise DigestMismatch(f"{where}: the manifest bytes hash to {digest}, not the "
                                 f"{reference if reference.startswith('sha256:') else announced} announced")
        return data, (resp.getheader("Content-Type") or "").split(";")[0].strip() or None, digest

    def open_blob(self, digest: str, offset: int = 0) -> http.client.HTTPResponse:
        """A streaming response for ``digest`` from ``offset`` (206) or from 0 (200)."""
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        resp = self.request("GET", self._path("blobs", digest), scope=self.pull_scope, what=f"get blob {digest}",
                            headers=headers, ok=(200, 206, 307, 302, 303), stream=True)
        for _ in range(3):  # storage backends answer with a redirect to signed URLs
            if resp.status not in (302, 303, 307):
                return resp
            location = resp.getheader("Location") or ""
            resp.read()
            release(resp)
            if not location.startswith(("https://", "http://")):
                location = urllib.parse.urljoin(self.ref.base_url + self._path("blobs", digest), location)
            resp = self._follow(location, headers)
        raise RemoteError(f"{self.label} redirected blob {digest} too many times")

    def _follow(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" and not (parts.scheme == "http" and self.ref.scheme == "http"):
            raise RemoteError(f"{self.label} redirected a blob to a non-https URL")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kw: dict[str, Any] = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        conn = cls(parts.hostname or "", parts.port, timeout=self.timeout, **kw)  # type: ignore[arg-type]
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": USER_AGENT, **headers})  # no Authorization to another host
        resp = conn.getresponse()
        resp._patchctl_conn = conn  # type: ignore[attr-defined]  # closed by release()
        if resp.status not in (200, 206, 302, 303, 307):
            release(resp)
            raise RemoteError(f"the blob storage of {self.label} answered {resp.status}")
        return resp

    def get_small_blob(self, digest: str, size: int, cap: int, what: str) -> bytes:
        """A blob read whole into memory (``size`` ≤ ``cap``), checked against its digest."""
        if size > cap:
            raise InvalidPatch(f"{what} on {self.label} is {size} bytes, over the {cap} byte cap")
        resp = self.open_blob(digest)
        try:
            data = resp.read(cap + 1)
        finally:
            if not resp.isclosed():
                self._drop()
            release(resp)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatch(f"{what} from {self.label} does not hash to {digest} ({len(data)} bytes, "
                                 f"{size} expected); nothing was stored")
        return data

    # -- writes -----------------------------------------------------------------------------
    def has_blob(self, digest: str, repo: str | None = None) -> bool:
        scope = self.push_scope if repo is None else f"repository:{repo}:pull"
        resp = self.request("HEAD", self._path("blobs", digest, repo), scope=scope, what=f"check blob {digest}",
                            ok=(200, 404))
        return resp.status == 200

    def mount(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False (and the session the registry opened cancelled) when it did not."""
        scope = f"{self.push_scope} repository:{from_repo}:pull"
        q = urllib.parse.urlencode({"mount": digest, "from": from_repo})
        resp = self.request("POST", f"/v2/{self.ref.path}/blobs/uploads/?{q}", scope=scope,
                            what=f"mount blob {digest} from {from_repo}", ok=(201, 202), idempotent=False)
        if resp.status == 201:
            return True
        location = resp.getheader("Location")
        if location:
            with contextlib.suppress(PatchctlError):
                self.request("DELETE", location, scope=self.push_scope, what="cancel an upload", ok=(204, 404, 200))
        return False

    def start_upload(self) -> str:
        resp = self.request("POST", f"/v2/{self.ref.path}/blobs/uploads/", scope=self.push_scope,
                            what="start a blob upload", ok=(202,), idempotent=False,
                            headers={"Content-Length": "0"})
        return self._location(resp)

    def _location(self, resp: http.client.HTTPResponse) -> str:
        location = resp.getheader("Location")
        if not location:
            raise RemoteError(f"{self.label} gave no upload Location")
        if not location.startswith(("http://", "https://")):
            location = urllib.parse.urljoin(self.ref.base_url + f"/v2/{self.ref.path}/blobs/uploads/", location)
        return location

    def upload_offset(self, location: str) -> tuple[str, int] | None:
        """Where an upload session stands: ``(location, bytes received)``; None if it is gone."""
        try:
            resp = self.request("GET", location, scope=self.push_scope, what="resume an upload", ok=(204, 200))
        except NotFound:
            return None
        except RemoteError:
            return None
        m = re.fullmatch(r"(?:bytes=)?0-(\d+)", resp.getheader("Range") or "")
        new = self._location(resp) if resp.getheader("Location") else location
        return new, (int(m.group(1)) + 1 if m else 0)

    def patch_chunk(self, location: str, f: Any, offset: int, length: int,
                    counter: Callable[[int], None] | None) -> str:
        resp = self.request("PATCH", location, scope=self.push_scope, what="upload a chunk", ok=(202, 204),
                            idempotent=False, body=lambda: _Slice(f, offset, length, counter),
                            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length),
                                     "Content-Range": f"{offset}-{offset + length - 1}"})
        return self._location(resp)

    def finish_upload(self, location: str, digest: str, f: Any = None, offset: int = 0, length: int = 0,
                      counter: Callable[[int], None] | None = None) -> None:
        sep = "&" if "?" in location else "?"
        body: Body = (lambda: _Slice(f, offset, length, counter)) if f is not None and length else None
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        resp = self.request("PUT", f"{location}{sep}{urllib.parse.urlencode({'digest': digest})}",
                            scope=self.push_scope, what=f"upload blob {digest}", ok=(201, 204), idempotent=False,
                            body=body, headers=headers)
        got = resp.getheader("Docker-Content-Digest")
        if got not in (None, digest):
            raise DigestMismatch(f"{self.label} stored blob {digest} as {got}")

    def put_manifest(self, reference: str, data: bytes, media_type: str = oci.OCI_MANIFEST) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        resp = self.request("PUT", self._path("manifests", reference), scope=self.push_scope,
                            what=f"put manifest {self.ref.path}:{reference}", ok=(201, 200, 204), body=data,
                            headers={"Content-Type": media_type})
        got = resp.getheader("Docker-Content-Digest")
        if got not in (None, digest):
            raise DigestMismatch(f"{self.label} stored manifest {digest} as {got}")
        self.subject_accepted = resp.getheader("OCI-Subject") is not None  # the registry indexes referrers
        return digest

    def get_optional(self, path: str, what: str, cap: int) -> bytes | None:
        """A small JSON document (an index), or None on 404."""
        resp = self.request("GET", path, scope=self.pull_scope, what=what, ok=(200, 404), stream=True,
                            headers={"Accept": oci.OCI_INDEX})
        data = resp.read(cap + 1)
        if not resp.isclosed():
            self._drop()
        if resp.status == 404:
            return None
        if len(data) > cap:
            raise InvalidPatch(f"{self.label}: {what} answered more than {cap} bytes")
        return data


def release(resp: http.client.HTTPResponse) -> None:
    """Close the one-off connection of a redirected blob response (none for the registry's own)."""
    conn = getattr(resp, "_patchctl_conn", None)
    if conn is not None:
        conn.close()


def open_client(ref: oci.OciRef, root: Path | None) -> OciClient:
    return OciClient(ref, find_credentials(ref.host, root))



def login(root: Path, host: str, creds: Credentials, *, insecure: bool = False) -> dict[str, Any]:
    """Check ``creds`` against ``host`` (``GET /v2/`` through its challenge), then keep them.

    TLS is verified unless ``host`` is a loopback host; ``insecure`` speaks plain HTTP to another host.
    """
    from patchctl.registry.remote.auth import store_login

    url = f"oci+http://{host}" if insecure and not oci.is_loopback(host) else f"oci://{host}"
    oci.check_transport(url, insecure)
    ref = oci.parse_oci(url)
    client = OciClient(ref, creds)
    try:
        client.request("GET", "/v2/", scope="", what="log in")  # the challenge checks the credentials
    finally:
        client.close()
    path = store_login(root, ref.host, creds)
    return {"host": ref.host, "username": creds.username, "stored": str(path)}


__all__ = ["OciClient", "login", "open_client", "release"]
