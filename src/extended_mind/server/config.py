"""Server settings: where memories live, the API key, and the limits every request is checked against."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerConfig:
    memory_dir: Path
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024  # a whole request body, uploads included
    max_document_chars: int = 4_000_000  # one document (about 1M tokens of English)
    max_memory_tokens: int = 1_000_000  # one memory, all documents
    max_tokens: int = 1024  # generated tokens per request
    default_max_tokens: int = 256
    max_queue: int = 128  # requests waiting for the model; more get 429
    max_batch: int = 16  # generations decoded together (continuous batching)
    # prompt tokens prefilled per decode step when a long prompt joins a running batch (None: all at once, stalling
    # the running streams for the whole prompt)
    prefill_chunk: int | None = 256
    max_memories_per_request: int = 8


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
