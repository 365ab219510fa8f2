"""Refuse request bodies over a size limit before the route reads them (HTTP 413).

Pure ASGI, so it also stops bodies sent without a Content-Length (chunked): it stops reading at
the limit, so at most ``max_bytes`` are held. Artifact uploads stream to disk under their own,
larger limit and are let through.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Reads a request's whole body (at most ``max_bytes``) before the route sees it, then replays it.

    The route cannot be the one to find a body too large: FastAPI turns any error raised while it
    reads a body into a 400, so a chunked body (no Content-Length) over the limit would not be a 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_suffix: str = "/artifact") -> None:
        self.app, self.max_bytes, self.exempt_suffix = app, max_bytes, exempt_suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(self.exempt_suffix):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app hears it at its first read
                pending: list[Message] = [message]
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


MAX_ECHOED_INPUT = 1000  # characters of a request's input echoed back in one validation error


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity: the answer would fail to serialise
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def bounded_errors(errors: Sequence[dict]) -> list[dict]:
    """Validation errors fit to answer with: inputs echoed only when short, NaN and Infinity as text
    (a 422 for a NaN must not be a 500; a 422 for a large spec must not be larger still)."""
    bounded = []
    for error in errors:
        error = dict(error)
        if "input" in error:
            value = _finite(error["input"])
            try:
                short = len(json.dumps(value, default=str)) <= MAX_ECHOED_INPUT
            except (TypeError, ValueError, RecursionError):
                short = False
            if short:
                error["input"] = value
            else:
                error.pop("input")
        if "ctx" in error:
            error["ctx"] = {k: _finite(v) if not isinstance(v, Exception) else str(v) for k, v in error["ctx"].items()}
        bounded.append(error)
    return bounded
