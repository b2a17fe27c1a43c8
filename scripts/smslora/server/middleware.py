"""ASGI middleware: the API key, and the body size limit (declared AND actually read)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

# Paths anyone may fetch when an API key is set: the health check, the page and its files, the
# API docs (the schema is no secret; the docs' "Authorize" button sends the key to the API).
PUBLIC_PATHS = {"/", "/healthz", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
PUBLIC_PREFIXES = ("/static/",)
DRAIN_BYTES = 1 << 20  # read at most this much of a too-large body, so the client sees the 413


async def send_json(scope, receive, send, status: int, body: dict, headers: dict | None = None):
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key")
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self.allowed(scope):
                await send_json(scope, receive, send, 401,
                                {"error": "missing or wrong API key: send 'Authorization: Bearer "
                                          "KEY' or 'X-API-Key: KEY'"},
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
        too_big = {"error": f"request body over the limit of {self.limit} bytes"}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await send_json(scope, receive, send, 400, {"error": "bad Content-Length header"})
                return
            if size > self.limit:
                await send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to do
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                drained = 0  # read a bounded rest, so the client is not reset before the 413
                while more and drained < DRAIN_BYTES:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    drained += len(message.get("body", b""))
                    more = message.get("more_body", False)
                await send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
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
