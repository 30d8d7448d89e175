"""Every JSON request body is UTF-8 (lmq.core.utf8), checked as its bytes arrive, before FastAPI parses it.

FastAPI reads a JSON body with ``json.loads`` of its bytes, which takes UTF-16 and UTF-32 too. This
middleware hands the app the body as it comes, checking each piece; the first byte that cannot be
UTF-8 ends the request with a 415 that says so, whatever the route, and nothing runs.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lmq.core.utf8 import NotUtf8, Utf8Check


class BodyNotUtf8(HTTPException):
    """Raised from `receive`, so the route's body reading stops and FastAPI answers it."""

    def __init__(self, error: NotUtf8):
        super().__init__(415, detail=str(error))


def is_json(content_type: str | None) -> bool:
    """What FastAPI parses as JSON: application/json, application/*+json, and a body of no content type."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return not media or media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class Utf8Bodies:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_json(Headers(scope=scope).get("content-type")):
            return await self.app(scope, receive, send)
        check = Utf8Check("the request body")
        started = False

        async def checked_receive():
            message = await receive()
            if message["type"] == "http.request":
                try:
                    check.feed(message.get("body", b""), final=not message.get("more_body", False))
                except NotUtf8 as error:
                    raise BodyNotUtf8(error) from None
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, checked_receive, tracked_send)
        except BodyNotUtf8 as error:  # read outside a route's body parsing: answered here
            if started:
                raise
            await JSONResponse({"detail": error.detail}, status_code=415)(scope, receive, send)
