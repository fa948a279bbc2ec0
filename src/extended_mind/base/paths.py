"""Where extended-mind keeps what it caches: converted models, calibrations, measured choices."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EXTENDED_MIND_CACHE"


def cache_dir() -> Path:
    """Where converted models live: $EXTENDED_MIND_CACHE, else $XDG_CACHE_HOME/extended-mind, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "extended-mind"
