"""ASGI middleware that runs before any route: the bearer-key check and the request body size limit."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from extended_mind.server.config import ServerConfig
from extended_mind.server.errors import error_response

PUBLIC_PATHS = {"/", "/favicon.ico"}  # the page itself holds no data; it asks for the key and sends it with calls


class GuardMiddleware:
    """Bearer-key check (when a key is set) and the request body size limit, before any route runs."""

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.config.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.config.api_key.encode()
            ):
                why = "missing" if not given else "invalid"
                response = error_response(
                    401, f"{why} API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
                )
                return await response(scope, receive, send)
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")
            return await response(scope, receive, send)
        # a body sent without a length (chunked) is counted as it arrives: past the limit the route sees the client
        # leave, whatever it answers is dropped, and the client gets the same 413 as with a Content-Length
        seen, too_large, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            response = error_response(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")
            await response(scope, receive, send)
