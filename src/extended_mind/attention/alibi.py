"""ALiBi families (MPT): memory attention for models that compute attention inline instead of through transformers'
attention interface.

MPT adds its ALiBi bias to the scores inside `MptAttention.forward`, so `memory_attention` is never reached. The
adapter replaces that forward on each attention module (no copied model file): it projects queries, keys and values
with the module's own weights, updates the cache, and hands them to `memory_attention` with

- the local ALiBi bias, written in MPT's form: key j gets slope * (position of j - position of the last key), which
  differs from the textbook -slope * (query - key distance) by a constant per query row (softmax ignores it). Key
  positions come from the prompt's position ids, so the gap that block memory leaves for its slots is honoured;
- `alibi`: the slopes and the last key's position, from which a memory token at position p gets the bias
  slope * (p - last key position): a memory is "far" exactly as a token at that position would be.

ALiBi has no rotation, so the rest of the library sees an identity rotation (cos 1, sin 0): memorization stores keys
as they are, and the position policies only decide the positions the bias is computed from. Under "zero" (the
reference's rule) every memory sits one position before the prompt's first token; under "stored" at its position
in its memorization window, the prompt following the largest.

Without an active session the module's original forward runs untouched."""

from __future__ import annotations

import types

import torch

from extended_mind.attention.function import memory_attention
from extended_mind.attention.session import active_session

_ORIGINAL_FORWARD = "_extended_mind_original_forward"


PLAIN_ATTENTION = "_extended_mind_plain_attention"


ALIBI_FAMILIES = ("MptAttention",)


def is_alibi_module(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ALIBI_FAMILIES


def mpt_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """(H,) MPT's ALiBi slopes, taken from the model family's own bias table (bias of distance 1 is -slope)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    return -build_mpt_alibi_tensor(num_heads, 2, device=device)[:, 0, 0]


def plain_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    local_bias: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, None]:
    """MPT's own attention arithmetic, step for step (scores, bias, mask, float softmax), so that a layer reading no
    memory gives the unmodified model's output bit for bit. attention_mask: bool, True = may attend."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if local_bias is not None:
        scores = scores + local_bias
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    weights = torch.nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), None


def _key_positions(cache, layer: int, old_len: int, new: torch.Tensor) -> torch.Tensor:
    """(B, Skv) positions of every key in the cache after adding the rows at positions `new` (B, s). Kept on the
    cache object itself and cut back to the cache's length first, so a cropped cache stays in step; keys put in a
    cache by other code (memorization's rebuilt context) are taken to be at 0, 1, ..."""
    if cache is None:
        return new
    store = cache.__dict__.setdefault("_extended_mind_key_positions", {})
    before = store.get(layer)
    if before is None or before.shape[1] < old_len or before.shape[0] != new.shape[0]:
        before = torch.arange(old_len, device=new.device).view(1, -1).expand(new.shape[0], -1)
    positions = torch.cat([before[:, :old_len].to(new.device), new], dim=1)
    store[layer] = positions
    return positions


def _mpt_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    session = active_session()
    if session is None:
        return getattr(self, _ORIGINAL_FORWARD)(hidden_states, position_bias, cache, attention_mask, **kwargs)
    b, s = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    old_len = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    positions = session.row_positions
    if positions is None or positions.shape != (b, s):
        positions = torch.arange(old_len, old_len + s, device=q.device).view(1, -1).expand(b, -1)
    key_pos = _key_positions(cache, self.layer_idx, old_len, positions.to(q.device))
    last = key_pos[:, -1]  # (B,)
    slopes = self.__dict__.setdefault("_extended_mind_slopes", mpt_slopes(self.n_heads, q.device))
    local_bias = (key_pos - last[:, None]).to(torch.int32)[:, None, None, :] * slopes.view(1, -1, 1, 1)  # (B,H,1,K)
    if session.capture is not None or session.selection is not None or session.observe is not None:
        ones = torch.ones(1, s, self.head_dim, device=q.device)  # identity rotation (ALiBi rotates nothing)
        session.position_embeddings[self.layer_idx] = (ones, torch.zeros_like(ones))
    mask = None if attention_mask is None else ~attention_mask  # MPT's mask: True = masked
    out, _ = memory_attention(self, q, k, v, mask, scaling=self.softmax_scale, dropout=self.attn_dropout_p,
                              local_bias=local_bias, alibi=(slopes, last))  # fmt: skip
    return self.out_proj(out.reshape(b, s, -1)), None


def patch_alibi_model(modules: list[torch.nn.Module]) -> None:
    """Route each MPT attention module through `memory_attention` (idempotent)."""
    for m in modules:
        if _ORIGINAL_FORWARD in m.__dict__:
            continue
        setattr(m, _ORIGINAL_FORWARD, m.forward)
        setattr(m, PLAIN_ATTENTION, plain_attention)
        m.forward = types.MethodType(_mpt_forward, m)
