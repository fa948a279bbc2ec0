"""The FastAPI app: OpenAI-compatible completions with memory attention, memory management, and the web page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse

from .. import __version__
from ..mind import ExtendedMind
from .completions import add_completion_routes, served_model_id
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .guard import GuardMiddleware
from .library import MemoryLibrary
from .memory_routes import add_memory_routes
from .worker import ModelWorker

STATIC = files("extended_mind.server") / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def create_app(mind: ExtendedMind, config: ServerConfig) -> FastAPI:
    """The server for one loaded model; memories live in `config.memory_dir`."""
    library = MemoryLibrary(config.memory_dir, mind)
    worker = ModelWorker(config.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(
        title="extended-mind",
        version=__version__,
        description="OpenAI-compatible API with Extended Mind memory attention and token-level citations.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, config=config)
    app.state.library, app.state.worker, app.state.model_id = library, worker, served_model_id(mind)
    add_completion_routes(app, mind, library, worker, config)
    add_memory_routes(app, mind, library, worker, config)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{asset}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        if asset not in ASSETS:
            raise APIError(404, f"no asset {asset!r}", "not_found")
        return FileResponse(str(STATIC / asset), media_type=ASSETS[asset])

    return app
