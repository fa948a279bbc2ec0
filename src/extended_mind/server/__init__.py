"""OpenAI-compatible HTTP server with named, persistent memories and a web page (`extended-mind serve`)."""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
