"""Continuous batching for the server: generation requests join the running batch (engine/batching.py) at the next
decode step and leave it when they finish or their client goes away.

The batch loop runs as a job on the model thread (worker.py), so it never overlaps memory operations: when one is
queued, the loop stops admitting rows, lets the running ones finish, and returns; the waiting requests start a new
loop after it. A request whose retrieval settings differ from the running batch's waits until the batch drains (in
arrival order); one with uncertainty-triggered retrieval (single steps recomputed) runs alone."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extended_mind.engine.batching import BatchRow, DecodeBatch, retrieval_key
from extended_mind.engine.decoding import GenerationResult
from extended_mind.engine.generation import TokenStream
from extended_mind.server.worker import END, Channel, ModelWorker

if TYPE_CHECKING:
    from extended_mind.server.sharded import Mirror


@dataclass
class _Request:
    make_stream: Callable[[], TokenStream]  # runs on the model thread: validation errors surface there
    emit: Callable[[Any], None]
    stop: threading.Event  # set when the consumer is gone
    stream: TokenStream | None = None


class BatchScheduler:
    def __init__(
        self,
        worker: ModelWorker,
        model,
        tokenizer,
        max_batch: int,
        on_batch: Callable[[int], None],
        mirror: Mirror | None = None,
        prefill_chunk: int | None = None,
    ):
        self.worker, self.model, self.tokenizer, self.max_batch = worker, model, tokenizer, max_batch
        self.prefill_chunk = prefill_chunk  # long prompts joining a running batch: prefilled a chunk per step
        self.mirror = mirror  # sharded serving: the followers do what this loop does (sharded.py)
        self.on_batch = on_batch  # told the batch size after every step (metrics)
        self._waiting: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._looping = False

    async def stream(self, make_stream: Callable[[], TokenStream]) -> AsyncIterator[Any]:
        """Tokens (GeneratedToken) as they come, then the GenerationResult. Leaving early cancels the request."""
        self.worker.admit()
        channel = Channel(on_end=self.worker.finished)
        request = _Request(make_stream, channel.emit, channel.stop)
        with self._lock:
            self._waiting.append(request)
            start = not self._looping
            self._looping = True
        if start:
            self.worker.submit(self._loop)
        async for item in channel.items():
            yield item

    def _next_waiting(self, batch: DecodeBatch) -> tuple[_Request, TokenStream] | None:
        """The first waiting request, with its stream, if it can start now (None: it must wait, or none waits)."""
        with self._lock:
            if not self._waiting:
                return None
            request = self._waiting[0]
        if request.stop.is_set():  # gone before it started
            self._pop()
            self._announce("drop", getattr(request.stream, "mirror_id", None))
            request.emit(END)
            return self._next_waiting(batch)
        if request.stream is None:
            try:
                request.stream = request.make_stream()
            except Exception as exc:  # a refused request (prompt too long, bad option): its error, nobody else's
                self._pop()
                request.emit(exc)
                return self._next_waiting(batch)
        return (request, request.stream) if batch.compatible(request.stream.settings) else None

    def _pop(self) -> None:
        with self._lock:
            self._waiting.popleft()

    def _announce(self, op: str, *args: Any) -> None:
        if self.mirror is not None:
            self.mirror.send(op, *args)

    def _new_batch(self) -> DecodeBatch:
        self._announce("batch")
        return DecodeBatch(self.model, self.tokenizer, self.max_batch, self.prefill_chunk)

    def _loop(self) -> None:
        batch = self._new_batch()
        while True:
            if not self.worker.others_waiting():
                self._admit(batch)
            if len(batch):
                self.on_batch(len(batch))
                try:
                    self._announce("step")
                    batch.step()
                except Exception as exc:  # every request not yet answered gets the error; the loop goes on
                    for row in batch.rows:
                        if not row.reported:
                            row.sink(exc)
                    batch = self._new_batch()
                continue
            self.on_batch(0)
            with self._lock:
                if not self._waiting or self.worker.others_waiting():
                    self._looping = bool(self._waiting)
                    if self._looping:  # memory operations first, then a new loop for the waiting requests
                        self.worker.submit(self._loop)
                    return

    def _admit(self, batch: DecodeBatch) -> None:
        """Move the waiting requests that can start now into the batch, prefilled together (in arrival order: the
        first that cannot join stops the admission)."""
        joining: list[tuple[BatchRow, Any, Callable, Callable]] = []
        streams: list[TokenStream] = []
        key = batch.key
        while len(joining) < batch.room() and (ready := self._next_waiting(batch)) is not None:
            request, stream = ready
            s = stream.settings
            if s.uncertainty_threshold is not None:  # recomputes steps: alone, its own loop
                if joining or len(batch):
                    break
                self._pop()
                self._run_alone(request, stream)
                continue
            if joining and retrieval_key(s) != key:
                break
            self._pop()
            key = retrieval_key(s)
            row = BatchRow.of(stream)
            streams.append(stream)
            joining.append((row, s, self._sink(request), request.stop.is_set))
        if joining:
            try:
                self._announce("join", [getattr(r, "mirror_id", None) for r in streams])
                batch.join_many(joining)
            except Exception as exc:
                for _, _, sink, _ in joining:
                    sink(exc)

    @staticmethod
    def _sink(request: _Request) -> Callable[[Any], None]:
        def sink(item: Any) -> None:
            request.emit(item)  # an exception also ends the request
            if isinstance(item, GenerationResult):
                request.emit(END)

        return sink

    def _run_alone(self, request: _Request, stream: TokenStream) -> None:
        rid = getattr(stream, "mirror_id", None)
        while True:
            self._announce("next", rid)
            token = next(stream, None)
            if token is None:
                request.emit(stream.result)
                break
            request.emit(token)
            if request.stop.is_set():
                break
        self._announce("drop", rid)
        request.emit(END)
