"""YaRN RoPE scaling switched on for one call: the long-context baseline that needs no memory.

transformers applies YaRN inside the model's rotary module (inverse frequencies and the attention temperature
0.1 ln s + 1), built from `config.rope_parameters` at construction. YaRN is static there (it would change every
length), so it is swapped in only for inputs longer than the window and swapped back afterwards."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

from transformers import PreTrainedModel

from extended_mind.base.errors import ExtendedMindError


def yarn_factor(tokens: int, window: int) -> float:
    """The scaling factor needed for `tokens` positions, rounded up to a quarter (1.0: no scaling needed)."""
    return max(1.0, math.ceil(4 * tokens / window) / 4)


@contextmanager
def yarn_scaling(model: PreTrainedModel, factor: float) -> Iterator[None]:
    """Within the block, `model` uses YaRN with `factor` and accepts factor x its window in positions."""
    if factor <= 1.0:
        yield
        return
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    params = getattr(model.config, "rope_parameters", None)
    if rotary is None or not isinstance(params, dict) or "rope_theta" not in params:
        raise ExtendedMindError(f"YaRN scaling is not supported for {type(model).__name__} here")
    window = model.config.max_position_embeddings
    config = copy.deepcopy(model.config)
    config.rope_parameters = {
        **params, "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": window,
    }  # fmt: skip
    config.max_position_embeddings = int(window * factor)
    scaled = type(rotary)(config).to(rotary.inv_freq.device)
    inner.rotary_emb = scaled
    model.config.max_position_embeddings = config.max_position_embeddings  # lets longer prompts through
    try:
        yield
    finally:
        inner.rotary_emb = rotary
        model.config.max_position_embeddings = window
