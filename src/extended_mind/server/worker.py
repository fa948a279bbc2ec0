"""One thread owns the model: every generation and memorization is queued to it and runs alone, so requests never
share attention state (the memory session lives in a context variable of that thread) and the CPU is not split
between requests. Async endpoints await results, or receive streamed items through an asyncio queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from extended_mind.server.errors import APIError

T = TypeVar("T")
END = object()  # the last item of a channel


class Channel:
    """Items handed from the model thread to one async consumer: `emit` runs on the model thread, `items()` in the
    event loop. `stop` is set once the consumer leaves early (client disconnected) or the event loop is gone;
    `on_end` runs when the end or an exception is emitted."""

    def __init__(self, on_end: Callable[[], None] | None = None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.on_end = on_end

    def emit(self, item: Any) -> None:
        if self.on_end is not None and (item is END or isinstance(item, BaseException)):
            self.on_end()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.stop.set()

    async def items(self) -> AsyncIterator[Any]:
        """The emitted items up to the end; an emitted exception is raised here."""
        try:
            while True:
                item = await self.queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()


class ModelWorker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._queued = 0  # jobs submitted and not started
        self._lock = threading.Lock()

    def _submit(self, fn: Callable[[], Any]):
        def started() -> Any:
            with self._lock:
                self._queued -= 1
            return fn()

        with self._lock:
            if self._executor is None:  # started on first use, again after a shutdown (app lifespans can repeat)
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extended-mind-model")
            self._queued += 1
            return self._executor.submit(started)

    def submit(self, fn: Callable[[], Any]) -> None:
        """Queue `fn` on the model thread (the batch scheduler's loop)."""
        self._submit(fn)

    def others_waiting(self) -> bool:
        """Whether jobs are queued behind the one running (the batch loop then lets them run)."""
        with self._lock:
            return self._queued > 0

    def admit(self) -> None:
        """Count a request in (429 when the queue is full); `finished` counts it out."""
        self._admit()

    def finished(self) -> None:
        self._done()

    def _admit(self) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {self._pending} requests are waiting for the model; retry later",
                    "server_busy",
                )
            self._pending += 1

    @property
    def pending(self) -> int:
        """Requests admitted and not finished (waiting for the model or running on it)."""
        return self._pending

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread and return its result (exceptions propagate)."""
        self._admit()

        def job() -> T:
            try:
                return fn()
            finally:
                self._done()

        return await asyncio.wrap_future(self._submit(job))

    async def stream(self, job: Callable[[Callable[[Any], None], Callable[[], bool]], None]) -> AsyncIterator[Any]:
        """Run `job(emit, cancelled)` on the model thread, yielding each item it emits as it comes. When the
        consumer stops early (client disconnected), `cancelled()` turns true; the job should then return."""
        self._admit()
        channel = Channel()

        def run() -> None:
            try:
                job(channel.emit, channel.stop.is_set)
                channel.emit(END)
            except BaseException as exc:  # handed to the consumer, which raises it
                channel.emit(exc)
            finally:
                self._done()

        self._submit(run)
        async for item in channel.items():
            yield item

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
