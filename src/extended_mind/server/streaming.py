"""Server-sent events as OpenAI streams them: `data: <json>` blocks, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from extended_mind.server.errors import as_api_error, error_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def event_stream(items: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """`items` as events, then `[DONE]`. Headers are sent by then, so an error is reported inside the stream, as
    OpenAI does."""
    try:
        async for item in items:
            yield sse(item)
    except Exception as exc:
        e = as_api_error(exc)
        yield sse(error_body(e.status, e.message, e.code, e.param))
    yield sse("[DONE]")
