"""Differences between the transformers versions we support, in one place."""

from __future__ import annotations

import inspect
from functools import cache

import torch


@cache
def _cache_argument(forward_of: type) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    return "cache" if "cache" in inspect.signature(forward_of.forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache_object: object) -> dict[str, object]:
    """The keyword argument that hands `cache_object` (a transformers Cache) to `model`'s forward."""
    return {_cache_argument(type(model)): cache_object}
