"""HTTP plumbing: OpenAI-shaped error responses and a request-body limit enforced before parsing."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=error_body(status, message, kind))


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 before the app reads or parses it.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as it
    arrives and refused as soon as it passes the limit, so memory stays bounded by the limit.
    """

    def __init__(self, app: Any, max_bytes: int, on_refuse: Callable[[str, int], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(scope, send, 400, "invalid Content-Length header")
                return
            if size > self.max_bytes:
                await self._too_large(scope, send, size)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(scope, send, total)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        await self._refuse(scope, send, 413, f"request body of {size}+ bytes; the limit is {self.max_bytes} bytes "
                           "(fix: send a shorter prompt, or start the server with a larger --max-body-bytes)")

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(scope.get("path", ""), status)
        payload = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


__all__ = ["BodyLimit", "error_body", "error_response"]
