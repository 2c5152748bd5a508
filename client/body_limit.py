"""ASGI middleware that answers an oversized request body with 413 before anything parses it; used by the
reward SDK's app (`client.reward_app`) and by the services (`services.inference.app`), each with its own
error body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit"]


class BodyLimit:
    """A request body over `max_bytes` (declared in Content-Length, or counted while it streams in) is
    answered with `reject()` (the app's 413 in its own error shape) and never reaches the app; a body within
    the limit is read whole and replayed to the app.

    `drain_factor`: once over the limit, the rest of the body is read and dropped up to `drain_factor ×
    max_bytes`, so a client that is still writing sees the answer instead of a broken pipe; 0 stops reading
    at once (and reads nothing of a body whose declared length is over the limit)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, reject: Callable[[], Response], drain_factor: int = 64
    ) -> None:
        self.app, self.max_bytes, self.reject = app, max_bytes, reject
        self.drain_bytes = drain_factor * max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_big = declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        received, more = 0, True
        while more and (not too_big or received < self.drain_bytes):
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk, more = message.get("body", b""), message.get("more_body", False)
            received += len(chunk)
            too_big = too_big or received > self.max_bytes
            if not too_big:
                chunks.append(chunk)
        if too_big:
            return await self.reject()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
