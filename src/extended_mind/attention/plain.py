"""The model's own attention implementation, called where no memory is read."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

BASE_ATTENTION_ATTR = "_extended_mind_base_attention"


def _base_attention(module: torch.nn.Module) -> Callable:
    name = getattr(module.config, BASE_ATTENTION_ATTR, "sdpa")
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def call_base(module, query, key, value, attention_mask, **kwargs):
    plain = getattr(module, "_extended_mind_plain_attention", None)  # families with an adapter (attention/alibi.py)
    if plain is not None:
        return plain(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("local_bias", None)
    kwargs.pop("alibi", None)
    base = _base_attention(module)
    if attention_mask is not None and attention_mask.dtype == torch.bool and base.__name__ == "eager_attention_forward":
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    return base(module, query, key, value, attention_mask, **kwargs)
