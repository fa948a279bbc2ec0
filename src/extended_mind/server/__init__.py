"""OpenAI-compatible HTTP server with named, persistent memories and a web page (`extended-mind serve`)."""

from extended_mind.server.app import create_app
from extended_mind.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
