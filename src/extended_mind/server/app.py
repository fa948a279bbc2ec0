"""The FastAPI app: OpenAI-compatible completions with memory attention, memory management, and the web page."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse

from extended_mind.base.version import __version__
from extended_mind.engine.mind import ExtendedMind
from extended_mind.server.config import ServerConfig
from extended_mind.server.errors import APIError, install_error_handlers
from extended_mind.server.guard import GuardMiddleware
from extended_mind.server.library import MemoryLibrary
from extended_mind.server.ops import MetricsMiddleware, ServerMetrics, TokenServing
from extended_mind.server.routes import router
from extended_mind.server.scheduler import BatchScheduler
from extended_mind.server.serving_completions import ChatServing, CompletionServing, served_model_id
from extended_mind.server.serving_memories import MemoryServing
from extended_mind.server.sharded import Mirror, open_memories
from extended_mind.server.worker import ModelWorker

log = logging.getLogger(__name__)
STATIC = files("extended_mind.server") / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def create_app(mind: ExtendedMind | Callable[[], ExtendedMind], config: ServerConfig) -> FastAPI:
    """The server for one model; memories live in `config.memory_dir`. `mind` may be a function that loads the
    model: the server then answers at once, `/health` says 503 until the model is loaded, and other routes 503."""
    worker = ModelWorker(config.max_queue)
    metrics = ServerMetrics(worker)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not app.state.ready and not app.state.loading:
            app.state.loading = True
            threading.Thread(target=load, name="extended-mind-load", daemon=True).start()
        yield
        worker.shutdown()
        if app.state.mirror is not None:  # sharded: the follower ranks stop too
            app.state.mirror.send("stop")

    app = FastAPI(
        title="extended-mind",
        version=__version__,
        description="OpenAI-compatible API with Extended Mind memory attention and token-level citations.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, config=config)
    app.add_middleware(MetricsMiddleware, metrics=metrics, state=app.state)  # outermost: counts refusals too
    app.state.ready, app.state.loading, app.state.load_error, app.state.metrics = False, False, None, metrics
    app.state.mirror = None
    app.include_router(router)

    def install(loaded: ExtendedMind) -> None:
        mirror = None
        if loaded.shard_group is not None:  # under torchrun: the other ranks follow this one (sharded.py)
            mirror = app.state.mirror = Mirror(loaded.shard_group)
        library = MemoryLibrary(config.memory_dir, loaded)
        if mirror is not None:
            open_memories(library)
        app.state.library, app.state.worker, app.state.model_id = library, worker, served_model_id(loaded)
        metrics.library = library
        scheduler = BatchScheduler(worker, loaded.model, loaded.tokenizer, config.max_batch, metrics.batch.set, mirror,
                                   config.prefill_chunk)  # fmt: skip
        app.state.completions = CompletionServing(loaded, library, scheduler, config, metrics, mirror)
        app.state.chat = ChatServing(loaded, library, scheduler, config, metrics, mirror)
        app.state.memories = MemoryServing(loaded, library, worker, config)
        app.state.tokens = TokenServing(loaded)
        app.state.ready = True

    def load() -> None:
        try:
            install(mind())
        except Exception as exc:  # reported by /health and every route's 503, not a dead server
            app.state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("the model failed to load: %s", app.state.load_error)

    if isinstance(mind, ExtendedMind):
        install(mind)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{asset}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        if asset not in ASSETS:
            raise APIError(404, f"no asset {asset!r}", "not_found")
        return FileResponse(str(STATIC / asset), media_type=ASSETS[asset])

    return app
