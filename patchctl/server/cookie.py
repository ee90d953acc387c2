"""How a browser passes the server's token: once as ``?token=``, then an HttpOnly cookie.

A browser cannot add ``Authorization: Bearer`` to a link it follows, so:

1. ``GET /any/page?token=T`` with the right ``T`` answers ``303`` to the same
   URL without ``token`` and sets ``patchctl_token=T; HttpOnly;
   SameSite=Strict; Path=/`` (no script can read it, no other site's page
   can make the browser send it). A wrong ``T`` sets nothing: the request
   goes on and the :class:`~patchctl.server.guard.Guard` answers ``401``.
2. A request with that cookie and no ``Authorization`` header gets
   ``Authorization: Bearer <cookie>`` added before the Guard, which checks it
   exactly as it checks any client's header (constant-time compare).

The token appears once in the browser's history and in the address bar;
``patchctl serve`` logs no URLs unless ``--access-log``. The server is
read-only, so the cookie grants reads only.
"""

from __future__ import annotations

import hmac
import re
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "patchctl_token"
_COOKIE_SAFE = re.compile(r"[!#-+\--:<-\[\]-~]+")  # RFC 6265 cookie-octet


class TokenCookie:
    """``?token=`` → cookie, cookie → ``Authorization`` header, in front of the Guard (``app``)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        if "token=" in query:
            pairs = parse_qsl(query, keep_blank_values=True)
            sent = [v for k, v in pairs if k == "token"]
            if (len(sent) == 1 and _COOKIE_SAFE.fullmatch(self.token)
                    and hmac.compare_digest(sent[0].encode(), self.token.encode())):
                rest = urlencode([(k, v) for k, v in pairs if k != "token"])
                location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                await send({"type": "http.response.start", "status": 303, "headers": [
                    (b"location", location.encode("utf-8")), (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
                    (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        headers = scope["headers"]
        if not any(k == b"authorization" for k, _ in headers):
            value = _cookie(headers)
            if value is not None:
                scope = {**scope, "headers": [*headers, (b"authorization", b"Bearer " + value.encode("latin-1"))]}
        await self.app(scope, receive, send)


def _cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k == b"cookie":
            c: SimpleCookie = SimpleCookie()
            try:
                c.load(v.decode("latin-1"))
            except CookieError:  # a malformed Cookie header: as if there were none
                continue
            if COOKIE in c:
                return c[COOKIE].value
    return None


__all__ = ["COOKIE", "TokenCookie"]
