"""Plugging memory attention into a model through transformers' attention interface."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from extended_mind.attention.alibi import is_alibi_module, patch_alibi_model
from extended_mind.attention.function import memory_attention
from extended_mind.attention.plain import BASE_ATTENTION_ATTR
from extended_mind.attention.session import Session, active_session
from extended_mind.base.errors import ExtendedMindError

ATTENTION_NAME = "extended_mind"


def _memory_mask(*args, **kwargs):
    # The memory path needs a real boolean mask, and the stock sdpa mask may return None for plain causal inputs.
    # Without memory in play, let it skip: sdpa's is_causal kernel is ~1.6x faster on long CPU prefills.
    session = active_session()
    memory_in_play = session is not None and (session.layers or session.rows is not None)
    if (
        memory_in_play or getattr(kwargs.get("config"), BASE_ATTENTION_ATTR, "sdpa") != "sdpa"
    ):  # eager needs a real mask
        kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return sdpa_mask(*args, **kwargs)


def _capture_position_embeddings(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    session = active_session()
    if session is None or (session.capture is None and session.selection is None):
        return
    pe = kwargs.get("position_embeddings")
    if pe is None and len(args) > 1:
        pe = args[1]
    if pe is not None:
        session.position_embeddings[module.layer_idx] = pe


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    mods = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]
    return sorted(mods, key=lambda m: m.layer_idx)


AttentionInterface.register(ATTENTION_NAME, memory_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _memory_mask)


def patch_model(model: PreTrainedModel) -> None:
    """Route the model's attention through `memory_attention`; unchanged behaviour while no session is active.
    Families that compute attention inline get their adapter (alibi.py); any other family that cannot carry memory
    attention is refused here, with the reason, rather than failing later inside a forward pass."""

    family = type(model).__name__
    modules = attention_modules(model)
    if not modules:
        raise ExtendedMindError(f"{family}: no self-attention layers with a layer index; this family is not supported")
    if all(is_alibi_module(m) for m in modules):
        patch_alibi_model(modules)
        return
    if model.config._attn_implementation == ATTENTION_NAME:
        return
    if not all(hasattr(m, "config") for m in modules) or not model._can_set_attn_implementation():
        raise ExtendedMindError(_inline_attention_error(family, len(modules), len(modules)))
    base = model.config._attn_implementation or "sdpa"
    for config in {id(c): c for c in [model.config, *(m.config for m in modules)]}.values():
        setattr(config, BASE_ATTENTION_ATTR, base)
    model.set_attn_implementation(ATTENTION_NAME)
    hooks = [m.register_forward_pre_hook(_capture_position_embeddings, with_kwargs=True) for m in modules]
    try:
        _check_family(model, len(modules))
    except ExtendedMindError:
        for hook in hooks:  # leave a refused model as it was
            hook.remove()
        model.set_attn_implementation(base)
        raise


def _inline_attention_error(family: str, inline: int, n_layers: int) -> str:
    return (
        f"{family}: {inline} of {n_layers} attention layers compute attention inline instead of through "
        "transformers' attention interface, and no adapter exists for them (supported: RoPE families that use the "
        "interface, and MPT); this family is not supported"
    )


def _check_family(model: PreTrainedModel, n_layers: int) -> None:
    """Two tokens through the model: every layer must reach `memory_attention` with rotary position embeddings."""
    family = type(model).__name__
    reached: set[int] = set()
    session = Session(capture=lambda layer, *_: reached.add(layer))
    device = next(model.parameters()).device
    try:
        with session.active(), torch.inference_mode():
            model.base_model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    except ExtendedMindError as e:
        raise ExtendedMindError(
            f"{family}: its attention gets no rotary position embeddings (memory attention supports rotary (RoPE) "
            "families and ALiBi through an adapter: MPT); this family is not supported"
        ) from e
    if len(reached) < n_layers:
        raise ExtendedMindError(_inline_attention_error(family, n_layers - len(reached), n_layers))
