"""Memory attention, plugged into transformers through its attention interface.

Every attention layer of a patched model calls `memory_attention`. With no active session (or top-k 0, or a layer
without memory) it hands over to the model's own attention implementation unchanged. Otherwise, by what the
session holds:
- token retrieval: each query head retrieves its top-k memory keys and attends to them and to its local context in
  one softmax (the original EMT); the first token of a sequence, the model's attention sink, reads no memory;
- slots (block memory, engine/blocks.py): every head attends to the same few memory blocks, placed as context before the
  prompt, and to its local context in one softmax;
- block selection: the retrieval heads (engine/heads.py) score memory tokens, and the layer attends normally;
- memorization: the layer's new keys (rotation undone) and values are recorded, and the layer attends normally.

Per-call state travels in a context variable because `model.forward` cannot take extra arguments through every
model family.
"""

from __future__ import annotations

import torch

from extended_mind.attention.plain import call_base
from extended_mind.attention.session import Session, active_session
from extended_mind.attention.slot_step import attend_slot_step, plain_slot_step, slot_citation
from extended_mind.base.errors import ExtendedMindError
from extended_mind.base.rope import invert_rope
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.search import retrieve


def memory_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, Hq, Sq, D) after RoPE; key/value (B, H, Skv, D) including the cache. Returns (B, Sq, Hq, D)."""
    session = active_session()
    layer = getattr(module, "layer_idx", None)
    if session is not None and session.observe is not None:
        session.observe(layer, query, key)
    if session is not None and session.selection is not None:
        _add_to_selection(module, query, session, scaling)
        return call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if session is not None and session.capture is not None:
        pe = session.position_embeddings.get(layer)
        if pe is None:
            raise ExtendedMindError(
                f"layer {layer} got no rotary position embeddings; this model family is not supported"
            )
        s_new = query.shape[2]
        session.capture(layer, key[:, :, -s_new:], value[:, :, -s_new:], pe[0], pe[1])
    if session is not None and session.rows is not None:  # a batch whose prompts each have their own memory
        plain = [r for r, row_layers in enumerate(session.rows) if _reads_nothing(row_layers.get(layer), session)]
        if len(plain) == len(session.rows):
            return call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        outs: list[torch.Tensor | None] = [None] * len(session.rows)
        if len(plain) > 1 and "alibi" not in kwargs:  # rows reading no memory here: one call for all of them
            rows = torch.tensor(plain, device=query.device)
            mask = attention_mask.index_select(0, rows) if attention_mask is not None else None
            q, k, v = (t.index_select(0, rows) for t in (query, key, value))
            out, _ = call_base(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)
            for i, r in enumerate(plain):
                outs[r] = out[i : i + 1]
        for r, row_layers in enumerate(session.rows):
            if outs[r] is not None:
                continue
            mask = attention_mask[r : r + 1] if attention_mask is not None else None
            pos = session.row_positions[r : r + 1] if session.row_positions is not None else None
            outs[r], _ = _attend(module, query[r : r + 1], key[r : r + 1], value[r : r + 1], mask,
                                 row_layers.get(layer), session, session.row_citations[r], scaling, dropout, pos,
                                 **_row_kwargs(kwargs, r))  # fmt: skip
        return torch.cat(outs, dim=0), None
    mem = session.layers.get(layer) if session is not None else None
    records = session.citation_records if session is not None else None
    pos = session.row_positions if session is not None else None
    return _attend(module, query, key, value, attention_mask, mem, session, records, scaling, dropout, pos, **kwargs)


def _reads_nothing(mem: LayerMemory | None, session: Session) -> bool:
    """Whether a layer with memory `mem` attends as the plain model (the test `_attend` starts with)."""
    return mem is None or session.settings is None or session.settings.topk <= 0 or mem.num_keys == 0


def _row_kwargs(kwargs: dict, r: int) -> dict:
    """The per-row part of an adapter's extras (attention/alibi.py) for batch row r."""
    if "alibi" not in kwargs:
        return kwargs
    slopes, last = kwargs["alibi"]
    bias = kwargs["local_bias"]
    return {**kwargs, "alibi": (slopes, last[r : r + 1]), "local_bias": bias[r : r + 1] if bias.shape[0] > 1 else bias}


def _add_to_selection(module: torch.nn.Module, query: torch.Tensor, session: Session, scaling: float | None) -> None:
    selections = session.selection
    layer = module.layer_idx
    if not any(s is not None and layer in s.heads for s in selections):
        return
    pe = session.position_embeddings.get(layer)
    if pe is None:
        raise ExtendedMindError(f"layer {layer} got no rotary position embeddings; this model family is not supported")
    cos, sin = pe
    q_pre = invert_rope(query.float(), cos[:, None].float(), sin[:, None].float())  # (B, Hq, Sq, D)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    for r, selection in enumerate(selections):
        if selection is not None:
            selection.add(layer, q_pre[r : r + 1], scaling)


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mem: LayerMemory | None,
    session: Session | None,
    records: list | None,
    scaling: float | None,
    dropout: float,
    positions: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the local context and, when `mem` is given, its top-k memories (or its slots); citation
    records of the last query position go to `records`. `positions` (B, Sq): the query rows' positions."""
    if _reads_nothing(mem, session):
        return call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if plain_slot_step(module, query, attention_mask, mem, positions, session, kwargs):
        weighting = session.citation_weighting if session.record_citations else None
        out, record = attend_slot_step(query, key, value, attention_mask, mem,
                                       query.shape[-1] ** -0.5 if scaling is None else scaling, weighting)  # fmt: skip
        if record is not None:
            records.append(record)
        return out, None
    if _slots_by_sdpa(mem, query, attention_mask, kwargs):
        return _attend_slots(module, query, key, value, attention_mask, mem, session, records, scaling, dropout,
                             positions, **kwargs)  # fmt: skip

    b, hq, sq, d = query.shape
    h, skv = key.shape[1], key.shape[2]
    g = hq // h
    scaling = d**-0.5 if scaling is None else scaling
    qg = query.reshape(b, h, g * sq, d)  # query head h*g + j -> kv head h (as repeat_kv), rows ordered (j, t)
    mem_logits, mem_idx, mem_values = _memory_logits(module, qg, g, mem, session, scaling, attention_mask, positions,
                                                     skv, kwargs)  # fmt: skip
    local_logits = _local_logits(qg, key, scaling, attention_mask, g, kwargs)
    k = mem_logits.shape[-1]
    probs = torch.softmax(torch.cat([mem_logits.view(b, h, g, sq, k), local_logits], dim=-1), dim=-1)
    p_mem, p_local = probs[..., :k], probs[..., k:]

    out = torch.matmul(p_local.reshape(b, h, g * sq, skv).to(value.dtype), value)  # (B, H, g*sq, D)
    if mem.slot_tokens is not None:
        out = out + torch.matmul(p_mem.reshape(b, h, g * sq, k).to(mem.values.dtype), mem.values).to(out.dtype)
    else:
        out = out + torch.matmul(p_mem.reshape(b, h, g * sq, 1, k).to(mem_values.dtype), mem_values).squeeze(-2).to(
            out.dtype
        )
    if session.record_citations:
        records.append(_citation_record(mem, mem_idx, mem_values, p_mem, session.citation_weighting))
    out = out.view(b, h, g, sq, d).reshape(b, hq, sq, d).transpose(1, 2).contiguous()
    return out, None


def _memory_logits(module: torch.nn.Module, qg: torch.Tensor, g: int, mem: LayerMemory, session: Session,
                   scaling: float, attention_mask: torch.Tensor | None, positions: torch.Tensor | None, skv: int,
                   kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Logits of the memories each query row reads (B, H, g*sq, k), float: its top-k (values returned too) or the
    slots; masked where a row reads none, biased under ALiBi, soft-capped like the local logits."""
    b, h, rows, _ = qg.shape  # rows: g query heads per KV head x sq query positions
    cdt = mem.keys.dtype
    slots = mem.slot_tokens is not None
    mem_values = None
    if slots:  # every row reads every slot
        mem_logits = torch.matmul(qg.to(cdt), mem.keys.transpose(1, 2)) * scaling  # (B, H, g*sq, S)
        mem_idx = mem.slot_tokens.to(qg.device).view(1, 1, 1, -1).expand(b, h, rows, -1)
    else:
        mem_logits, mem_idx, mem_values = retrieve(qg.to(cdt), mem, session.settings, scaling)  # (B, H, g*sq, k)
    sq = rows // g
    if not slots and mem.heads is not None:
        reads = mem.heads.to(qg.device).view(1, h, g, 1).expand(b, h, g, sq).reshape(b, h, rows, 1)
        mem_logits = mem_logits.masked_fill(~reads, float("-inf"))
    mem_logits = mem_logits.float()
    k = mem_logits.shape[-1]
    no_memory = _rows_without_memory(mem, attention_mask, positions, b, sq, skv)
    if no_memory is not None:
        mem_logits = mem_logits.view(b, h, g, sq, k).masked_fill(no_memory, float("-inf")).view(b, h, rows, k)
    far = _slots_out_of_window(module, mem, positions, mem_logits.device) if slots else None
    if far is not None:
        mem_logits = mem_logits.view(b, h, g, sq, k).masked_fill(far.view(b, 1, 1, sq, k), float("-inf"))
        mem_logits = mem_logits.view(b, h, rows, k)
    alibi = kwargs.get("alibi")
    if alibi is not None:  # ALiBi (attention/alibi.py): a memory at position p is biased as a local key at p would be
        slopes, last = alibi
        if slots:
            mem_pos = torch.arange(mem.slot_end - k, mem.slot_end, device=mem_logits.device).view(1, 1, 1, 1, k)
        else:
            mem_pos = mem.positions.to(mem_idx.device)[mem_idx].view(b, h, g, sq, k)
        bias = (mem_pos - last.to(mem_logits.device).view(-1, 1, 1, 1, 1)).float() * slopes.view(1, h, g, 1, 1)
        mem_logits = (mem_logits.view(b, h, g, sq, k) + bias).view(b, h, rows, k)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        mem_logits = torch.tanh(mem_logits / softcap) * softcap
    return mem_logits, mem_idx, mem_values


def _local_logits(qg: torch.Tensor, key: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None, g: int,
                  kwargs: dict) -> torch.Tensor:  # fmt: skip
    """Logits of the local context (B, H, g, sq, Skv), float: soft-capped, biased (ALiBi adapters), masked."""
    b, h, rows, _ = qg.shape
    skv = key.shape[2]
    sq = rows // g
    local_logits = torch.matmul(qg, key.transpose(-1, -2)).float() * scaling  # (B, H, g*sq, Skv)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        local_logits = torch.tanh(local_logits / softcap) * softcap
    local_logits = local_logits.view(b, h, g, sq, skv)
    local_bias = kwargs.get("local_bias")
    if local_bias is not None:  # (B or 1, Hq, 1 or Sq, Skv)
        local_logits = local_logits + local_bias.float().view(local_bias.shape[0], h, g, -1, skv)
    if attention_mask is not None:
        mask = attention_mask[:, :, -sq:, -skv:].unsqueeze(1)  # (B, 1, 1, Sq, Skv)
        if mask.dtype == torch.bool:
            local_logits = local_logits.masked_fill(~mask, float("-inf"))
        else:
            local_logits = local_logits + mask.float()
    return local_logits


def _citation_record(mem: LayerMemory, mem_idx: torch.Tensor, mem_values: torch.Tensor | None, p_mem: torch.Tensor,
                     weighting: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(memory indices, weights) of the first row's last query position: (Hq, k) each, or for slots (S,) summed over
    heads (every head reads the same slots; `mem.slot_tokens` is one tensor shared by the layers, which
    `record_weights` sums densely). What memory token j adds to the output is p_j * v_j: under "attention_value"
    citations weigh p_j * |v_j|, so that tokens that soak up attention but carry near-empty values (sink-like
    tokens) are not cited."""
    b, h, g, sq, k = p_mem.shape
    hq = h * g
    if mem.slot_tokens is not None:
        return slot_citation(mem, p_mem[0, :, :, -1], weighting)  # (H, g, S): the last position's probabilities
    last_idx = mem_idx.view(b, h, g, sq, k)[0, :, :, -1].reshape(hq, k)
    last_p = p_mem[0, :, :, -1].reshape(hq, k)
    if weighting == "attention_value":
        norms = mem_values[0].view(h, g, sq, k, -1)[:, :, -1].reshape(hq, k, -1).float().norm(dim=-1)
        last_p = last_p * norms
    return last_idx.detach(), last_p.detach()


def _slots_by_sdpa(mem: LayerMemory, query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether slots can be read by one fused attention call over [slots; local keys] (several prompt rows, a
    boolean mask, nothing that sdpa cannot express: softcapping, ALiBi or other biases)."""
    return (
        mem.slot_tokens is not None and query.shape[2] > 1 and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and not any(kwargs.get(x) is not None for x in ("softcap", "alibi", "local_bias"))
    )  # fmt: skip


def _attend_slots(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    mem: LayerMemory,
    session: Session,
    records: list | None,
    scaling: float | None,
    dropout: float,
    positions: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Slots read as context before the local keys, in one `scaled_dot_product_attention` call: the same softmax
    as `_attend`'s joint one (same masks), about 3x faster for a prompt (SmolLM2, 500 rows, 512 slot tokens).
    Citations need only the last row's probabilities: that row goes through `_attend` as well."""
    b, hq, sq, d = query.shape
    skv, s = key.shape[2], mem.keys.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    visible = torch.ones((b, 1, sq, s), dtype=torch.bool, device=query.device)
    no_memory = _rows_without_memory(mem, attention_mask, positions, b, sq, skv)
    if no_memory is not None:
        visible = visible & ~no_memory.view(b, 1, sq, 1).to(query.device)
    far = _slots_out_of_window(module, mem, positions, query.device)
    if far is not None:
        visible = visible & ~far.view(b, 1, sq, s)
    keys = torch.cat([mem.keys.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)
    values = torch.cat([mem.values.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
    mask = torch.cat([visible, attention_mask[:, :, -sq:, -skv:].expand(b, 1, sq, skv)], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)  # fmt: skip
    if session.record_citations:
        last = positions[:, -1:] if positions is not None else None
        _attend(module, query[:, :, -1:], key, value, attention_mask[:, :, -1:], mem, session, records, scaling,
                dropout, last, **kwargs)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _slots_out_of_window(
    module: torch.nn.Module, mem: LayerMemory, positions: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """(B, Sq, S) bool: the slots each query row must not read in a sliding-window layer, or None. Such a layer
    sees a slot only within its window, as it would see a pasted passage: without this, rows far past the slots read
    them at distances the layer never saw (Gemma 3 perplexity 378 vs 19)."""
    window = getattr(module, "sliding_window", None)
    if not window or positions is None:
        return None
    s = mem.keys.shape[1]
    slot_pos = torch.arange(mem.slot_end - s, mem.slot_end, device=device)
    return (positions.to(device).unsqueeze(-1) - slot_pos) >= window


def _rows_without_memory(
    mem: LayerMemory, attention_mask: torch.Tensor | None, positions: torch.Tensor | None, b: int, sq: int, skv: int
) -> torch.Tensor | None:
    """(B, 1, 1, Sq, 1) bool: query rows that must not read memory, or None.

    Slots: rows placed before the slots (the prompt's head). Token retrieval: a row that sees only itself, i.e. the
    first token of a sequence (also after left padding): models park much attention on that token (the attention
    sink, 28-66% in SmolLM2's layers 12-29), and once it reads memory its state changes and later layers lose the
    sink (perplexity of an 8k article with the rest in memory: 43.2 when it reads memory, 18.4 when it does not)."""
    if mem.slot_tokens is not None:
        if positions is None or mem.slot_end <= 0:
            return None
        if positions.device.type == "cpu" and int(positions.min()) >= mem.slot_end:  # every row after the slots
            return None  # (every decode step): no mask to build, in every layer
    visible = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        visible = attention_mask[:, :, -sq:, -skv:].sum(-1).view(b, 1, 1, sq, 1)
    if mem.slot_tokens is not None:
        before = (positions.to(mem.keys.device) < mem.slot_end).view(b, 1, 1, sq, 1)
        return before if visible is None else before & (visible > 0)  # padding rows keep memory: no all -inf row
    return None if visible is None else visible == 1
