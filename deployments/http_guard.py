"""What every HTTP application of the project does before its routes: a bounded
request body, and an answer for every failure that names no internals.

`BodyLimit` counts the bytes as they arrive, so a chunked upload (no
Content-Length) is cut at the limit too, before JSON parsing and before any
authentication work. `internal_error` turns an exception nobody expected into a
500 whose body carries an error id to find the traceback in the log, never the
exception's text (which may name hosts, users or SQL).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("ray.serve")


def require_api_key(request: Request) -> None:
    """With `settings.api_key` set, every route but /health asks for it in X-API-Key."""
    from configs.settings import get_settings

    key = get_settings().api_key
    if key is None:
        return
    given = request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise HTTPException(status_code=401, detail="missing or wrong X-API-Key header")


Authorized = Depends(require_api_key)


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing lets it through as a 413
    (it turns any other exception raised while reading into a 400)."""

    def __init__(self, limit: int, announced: int | None = None) -> None:
        size = f"request body of {announced} bytes" if announced is not None else "request body"
        super().__init__(status_code=413, detail=f"{size} is over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: at most `limit()` bytes of request body, whether announced by
    Content-Length or streamed."""

    def __init__(self, app: Any, limit: Callable[[], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _answer(send, 400, "content-length: must be a whole number of bytes")
                return
            if int(length) > limit:
                await _answer(send, 413, BodyTooLarge(limit, int(length)).detail)
                return
        received = 0
        started = False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:  # read outside FastAPI's body parsing (e.g. by Gradio)
            if not started:
                await _answer(send, 413, exc.detail)


async def _answer(send: Callable, status: int, detail: str) -> None:
    response = JSONResponse(status_code=status, content={"detail": detail})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A 500 that names no internals; the traceback goes to the log under an error id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={
        "detail": f"internal error {error_id}: the service log has the details"})


def guard(app: Any, limit: Callable[[], int]) -> None:
    """Bounded bodies and opaque 500s for a FastAPI application."""
    app.add_middleware(BodyLimit, limit=limit)
    app.add_exception_handler(Exception, internal_error)
