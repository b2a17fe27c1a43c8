"""ASGI middleware: who may call (Host, Origin, the API key), how much they may send (the body
limit, declared AND actually read), and the security headers of every answer.

A request refused before its body was read has the body drained first (up to DRAIN_BYTES), so
that a client still sending it reads the answer instead of a reset connection."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress

from fastapi.responses import JSONResponse

# Paths anyone may fetch when an API key is set: the health check, the page and its files, the
# API docs (the schema is no secret; the docs' "Authorize" button sends the key to the API).
PUBLIC_PATHS = {"/", "/healthz", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
PUBLIC_PREFIXES = ("/static/",)
DRAIN_BYTES = 4 << 20  # read at most this much of a refused body, so the client sees the answer
DRAIN_IDLE_S = 1.0     # and stop waiting for the rest after this long without any of it

# The page runs only its own script and style and talks only to this server; no page may frame
# it. The API docs (/docs) load Swagger UI from a CDN and are left without a CSP.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
NO_CSP_PATHS = ("/docs", "/docs/oauth2-redirect")


def header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value
    return None


async def send_json(scope, receive, send, status: int, body: dict, headers: dict | None = None):
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


async def drain(scope, receive) -> None:
    """Read and drop what the client sends of its body (bounded in bytes and in waiting). Not
    for `Expect: 100-continue`: that client waits for the answer before sending a body."""
    if (header(scope, b"expect") or b"").lower() == b"100-continue":
        return
    read = 0
    while read <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def refuse(scope, receive, send, status: int, error: str, headers: dict | None = None):
    """Answer {"error": ...} without calling the app, after draining the body; then close."""
    await drain(scope, receive)
    await send_json(scope, receive, send, status, {"error": error},
                    {**(headers or {}), "Connection": "close"})


def host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_address(name: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return True
    return False


class HostOriginMiddleware:
    """Refuse requests a web page could have sent behind the user's back.

    Host: DNS rebinding points a name the attacker owns at this server, so a page from that name
    counts as same-origin; its requests carry that name as Host. Only IP addresses, localhost
    and the names given with --allow-host are accepted. Origin (sent by browsers on cross-origin
    requests and on every POST): it must be this server itself, or one given with
    --allow-origin."""

    def __init__(self, app, allow_host=(), allow_origin=()):
        self.app, self.hosts, self.origins = app, set(allow_host), set(allow_origin)

    def host_ok(self, host: str) -> bool:
        name = host_name(host)
        return (bool(name) and (is_address(name) or name == "localhost" or name in self.hosts)
                or "*" in self.hosts)

    def origin_ok(self, origin: str, host: str) -> bool:
        scheme, _, authority = origin.partition("://")
        return (scheme in ("http", "https") and authority == host) or origin in self.origins \
            or "*" in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = (header(scope, b"host") or b"").decode("latin-1").strip().lower()
        origin = header(scope, b"origin")
        if not self.host_ok(host):
            await refuse(scope, receive, send, 400,
                         f"Host '{host[:100]}' does not name this server; start it with "
                         f"--allow-host {host_name(host)[:100] or 'NAME'} to accept that name")
            return
        if origin is not None:
            origin_text = origin.decode("latin-1").strip().lower()
            if not self.origin_ok(origin_text, host):
                await refuse(scope, receive, send, 403,
                             f"cross-origin request from '{origin_text[:100]}' refused; start "
                             "the server with --allow-origin ORIGIN to let a site's pages call it")
                return
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """nosniff, no framing, no referrer on every answer; the page's Content-Security-Policy."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(SECURITY_HEADERS)
        if scope.get("path") not in NO_CSP_PATHS:
            extra.append((b"content-security-policy", PAGE_CSP.encode()))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in extra if h[0] not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def allowed(self, scope) -> bool:
        auth = header(scope, b"authorization") or b""
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else header(scope, b"x-api-key")
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self.allowed(scope):
                await refuse(scope, receive, send, 401, "missing or wrong API key: send "
                             "'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                             {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reject a body over `limit` bytes with 413: by its Content-Length before reading it, and by
    what was actually read (a chunked body has no Content-Length). The app gets the body replayed,
    then the client's own receive channel (which tells when the client disconnects)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body over the limit of {self.limit} bytes"
        declared = header(scope, b"content-length")
        if declared is not None:
            size = int(declared) if declared.strip().isdigit() else -1
            if size < 0:
                await refuse(scope, receive, send, 400, "bad Content-Length header")
                return
            if size > self.limit:
                await refuse(scope, receive, send, 413, too_big)
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to do
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                if more:
                    await drain(scope, receive)
                await send_json(scope, receive, send, 413, {"error": too_big},
                                {"Connection": "close"})
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def wait_for_disconnect(receive):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
