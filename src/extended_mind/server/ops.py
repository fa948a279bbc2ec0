"""Operations endpoints, as vLLM and the llama.cpp server name them: `/health` (200 when the model is ready, 503
while it loads or after it failed to load), Prometheus `/metrics` (prometheus_client's own exposition), and
`/tokenize` / `/detokenize` (the bodies of both servers are accepted)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from extended_mind.engine.decoding import GeneratedToken
from extended_mind.server.errors import APIError, error_response

if TYPE_CHECKING:
    from extended_mind.engine.mind import ExtendedMind
    from extended_mind.server.library import MemoryLibrary
    from extended_mind.server.worker import ModelWorker

ALWAYS_OPEN = {"/health", "/metrics"}  # answered while the model loads
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self, worker: ModelWorker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("extended_mind_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.tokens = Counter("extended_mind_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("extended_mind_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.per_token = Histogram("extended_mind_time_per_output_token_seconds", "time between generated tokens",
                                   buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch = Gauge("extended_mind_batch_size", "generations decoding together right now", registry=r)
        queue = Gauge("extended_mind_queue_depth", "requests waiting for or running on the model", registry=r)
        queue.set_function(lambda: worker.pending)
        self.library: MemoryLibrary | None = None
        r.register(_MemoryCollector(self))

    async def timed(self, items: AsyncIterator, arrived: float) -> AsyncIterator:
        """Pass a request's items through, observing time to first token (from `arrived`), gaps and counts."""
        last = None
        async for item in items:
            if isinstance(item, GeneratedToken):
                now = time.perf_counter()
                if last is None:
                    self.ttft.observe(now - arrived)
                else:
                    self.per_token.observe(now - last)
                last = now
                self.tokens.inc()
            yield item


class _MemoryCollector:
    """Sizes of the memories the server has open, read at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        tokens = GaugeMetricFamily("extended_mind_memory_tokens", "tokens in each open memory", labels=["memory"])
        size = GaugeMetricFamily("extended_mind_memory_bytes", "bytes of each open memory", labels=["memory"])
        library = self.metrics.library
        for name, memory in (library.open_memories() if library is not None else {}).items():
            tokens.add_metric([name], memory.num_tokens)
            size.add_metric([name], memory.nbytes)
        yield tokens
        yield size


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, and answers 503 while the model is not ready."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, state):
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not self.state.ready and scope["path"] not in ALWAYS_OPEN:
                why = "the model failed to load" if self.state.load_error else "the model is loading; retry shortly"
                return await error_response(503, why, "not_ready")(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


def health(state: Any) -> JSONResponse | dict:
    """200 when the model is ready; 503 while it loads or when loading failed (with the error)."""
    if state.ready:
        return {"status": "ok"}
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


def prometheus(metrics: ServerMetrics) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


class TokenizeRequest(BaseModel):
    """vLLM's body ({"prompt", "add_special_tokens"}) or llama.cpp's ({"content", "add_special"})."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(default=None, max_length=4_000_000)
    content: str | None = Field(default=None, max_length=4_000_000)
    add_special_tokens: bool | None = None
    add_special: bool | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int] = Field(max_length=1_000_000)


class TokenServing:
    """/tokenize and /detokenize with the served model's tokenizer (vLLM's and llama.cpp's bodies)."""

    def __init__(self, mind: ExtendedMind):
        self.mind, self.vocab = mind, len(mind.tokenizer)

    def tokenize(self, req: TokenizeRequest) -> dict:
        text = req.prompt if req.prompt is not None else req.content
        if text is None:
            raise APIError(400, "send the text as 'prompt' (or 'content')", "invalid_value", "prompt")
        special = req.add_special_tokens if req.add_special_tokens is not None else bool(req.add_special)
        ids = self.mind.tokenizer(text, add_special_tokens=special)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.mind.context_window}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        bad = [t for t in req.tokens if not 0 <= t < self.vocab]
        if bad:
            raise APIError(400, f"token ids outside the vocabulary (0..{self.vocab - 1}): {bad[:5]}", "invalid_value",
                           "tokens")  # fmt: skip
        text = self.mind.tokenizer.decode(req.tokens)
        return {"prompt": text, "content": text}
