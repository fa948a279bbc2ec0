"""Memory attention, plugged into transformers through its attention interface.

Every attention layer of a patched model calls `memory_attention`. With no active session (or top-k 0, or a layer
without memory) it hands over to the model's own attention implementation unchanged. Otherwise, by what the
session holds:
- token retrieval: each query head retrieves its top-k memory keys and attends to them and to its local context in
  one softmax (the original EMT); the first token of a sequence, the model's attention sink, reads no memory;
- slots (block memory, blocks.py): every head attends to the same few memory blocks, placed as context before the
  prompt, and to its local context in one softmax;
- block selection: the retrieval heads (heads.py) score memory tokens, and the layer attends normally;
- memorization: the layer's new keys (rotation undone) and values are recorded, and the layer attends normally.

Per-call state travels in a context variable because `model.forward` cannot take extra arguments through every
model family.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .distributed import pack, unpack
from .errors import ExtendedMindError
from .rope import invert_rope
from .scan import KeyScan, fast_topk, shortlist_size

if TYPE_CHECKING:
    from .distributed import LayerShard
    from .index import IndexSettings, LayerIndex

ATTENTION_NAME = "extended_mind"
_BASE_ATTR = "_extended_mind_base_attention"
# Bound on the (query rows x memory tokens) score block computed at once per KV head, to cap temporary memory.
_SCORE_BLOCK = 1 << 24

_active: ContextVar[Session | None] = ContextVar("extended_mind_session", default=None)


@dataclass
class LayerMemory:
    """One layer's memory in the form attention reads it: keys already rotated by the position policy."""

    keys: torch.Tensor  # (H, N, D)
    values: torch.Tensor  # (H, N, D)
    inv_norms: torch.Tensor  # (H, N) 1/|key|, for cosine ranking
    index: LayerIndex | None = None  # approximate search (index.py); None: exact
    scan: KeyScan | None = None  # compact copy of `keys` scanned to shortlist candidates (in cell order with an index)
    index_settings: IndexSettings | None = None
    # Slots (block memory): keys/values are the S tokens every query reads, keys rotated to their slot positions;
    # slot_tokens (S,) are their indices in the memory (for citations); query rows at positions before slot_end
    # (the prompt's head, which precedes the slots) read none of them.
    slot_tokens: torch.Tensor | None = None
    slot_end: int = 0
    heads: torch.Tensor | None = None  # (query heads,) bool: token retrieval only in these heads (None: all)
    positions: torch.Tensor | None = None  # (N,) long: each memory's position, for ALiBi biases (alibi.py)
    # Sharded memory (distributed.py): keys/values/index hold this rank's tokens; retrieval merges every rank's
    # top-k, and indices (memory indices, positions) are global
    shard: LayerShard | None = None

    def head(self, i: int) -> LayerMemory:
        """This memory for KV head i alone (views, no copy): for queries of that head only."""
        return replace(self, keys=self.keys[i : i + 1], values=self.values[i : i + 1],
                       inv_norms=self.inv_norms[i : i + 1], index=self.index.head(i) if self.index else None,
                       scan=self.scan.head(i) if self.scan else None, heads=None)  # fmt: skip

    @property
    def num_keys(self) -> int:
        """Memory tokens this layer reads from, over all ranks."""
        return self.shard.total if self.shard is not None else int(self.keys.shape[1])


@dataclass
class RetrievalSettings:
    topk: int
    ranking: str = "logit"  # "logit" (q·k) or "cosine"
    similarity_threshold: float | None = None  # drop retrieved memories with cosine <= this


@dataclass
class BlockSelection:
    """What the retrieval heads point at in one forward pass without memory: per query-row group, the attention
    mass (softmax over each head's top-k memory tokens) each memory block receives, summed over heads and rows."""

    heads: dict[int, torch.Tensor]  # layer -> (query heads,) bool: the retrieval heads
    layers: dict[int, LayerMemory]  # the memory of those layers, keys unrotated ("zero" policy)
    block_of: torch.Tensor  # (N,) long: the block of every memory token
    num_blocks: int
    row_group: torch.Tensor  # (Sq,) long: the group each query row adds to, -1 for none
    groups: int
    settings: RetrievalSettings
    mass: torch.Tensor | None = None  # (groups, num_blocks), filled by the forward pass

    def add(self, layer: int, q_pre: torch.Tensor, scaling: float) -> None:
        """q_pre (1, Hq, Sq, D): this layer's queries with the rotation undone (blocks are ranked by content)."""
        heads, mem = self.heads.get(layer), self.layers.get(layer)
        if heads is None or mem is None or mem.num_keys == 0:
            return
        counted_rows = (self.row_group >= 0).nonzero().view(-1)
        if len(counted_rows) == 0:
            return
        if len(counted_rows) < q_pre.shape[2]:  # only rows that count are scored (not the prompt's head)
            q_pre = q_pre.index_select(2, counted_rows.to(q_pre.device))
        row_group = self.row_group[counted_rows]
        _, hq, sq, d = q_pre.shape
        h = mem.keys.shape[0]
        g = hq // h
        chosen = heads.view(h, g)
        flats, weights = [], []
        for kv in range(h):  # only the retrieval heads' queries are scored: a third of all heads in SmolLM2
            js = chosen[kv].nonzero().view(-1).to(q_pre.device)
            if len(js) == 0:
                continue
            q = q_pre[0].index_select(0, kv * g + js).reshape(1, 1, len(js) * sq, d)
            logits, idx, _ = retrieve(q, mem.head(kv), self.settings, scaling, values=False)
            weight = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0).view(len(js), sq, -1)  # all masked: 0
            group = row_group.to(weight.device).view(1, sq, 1).expand_as(weight)
            flats.append((group * self.num_blocks + self.block_of.to(idx.device)[idx.view(len(js), sq, -1)]).view(-1))
            weights.append(weight.reshape(-1))
        if not flats:
            return
        mass = torch.zeros(self.groups * self.num_blocks, device=weights[0].device)
        mass.index_add_(0, torch.cat(flats), torch.cat(weights))
        mass = mass.view(self.groups, self.num_blocks).cpu()
        self.mass = mass if self.mass is None else self.mass + mass


@dataclass
class Session:
    """State of one forward pass: retrieval from memory, or capture for memorization."""

    layers: dict[int, LayerMemory] = field(default_factory=dict)
    settings: RetrievalSettings | None = None
    record_citations: bool = False
    citation_weighting: str = "attention_value"  # or "attention": the probability alone
    # Filled during a forward pass: per memory layer, (indices, weights) of the last query position, (Hq, k).
    citation_records: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Batches with a memory per prompt: per row, its layers (empty: no memory) and its citation records.
    rows: list[dict[int, LayerMemory]] | None = None
    row_citations: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    capture: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    position_embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Block selection per batch row (None: that row selects nothing); the layers attend without memory.
    selection: list[BlockSelection | None] | None = None
    # (B, Sq) position of every query row of the current forward pass: slots are hidden from rows before them.
    row_positions: torch.Tensor | None = None
    # Calibration (heads.py): called with (layer, query, key) after RoPE; the layer attends normally.
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    @contextmanager
    def active(self) -> Iterator[Session]:
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)


def _memory_mask(*args, **kwargs):
    # The memory path needs a real boolean mask, and the stock sdpa mask may return None for plain causal inputs.
    # Without memory in play, let it skip: sdpa's is_causal kernel is ~1.6x faster on long CPU prefills.
    session = _active.get()
    memory_in_play = session is not None and (session.layers or session.rows is not None)
    if memory_in_play or getattr(kwargs.get("config"), _BASE_ATTR, "sdpa") != "sdpa":  # eager needs a real mask
        kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return sdpa_mask(*args, **kwargs)


def _base_attention(module: torch.nn.Module) -> Callable:
    name = getattr(module.config, _BASE_ATTR, "sdpa")
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _call_base(module, query, key, value, attention_mask, **kwargs):
    plain = getattr(module, "_extended_mind_plain_attention", None)  # families with an adapter (alibi.py)
    if plain is not None:
        return plain(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("local_bias", None)
    kwargs.pop("alibi", None)
    base = _base_attention(module)
    if attention_mask is not None and attention_mask.dtype == torch.bool and base.__name__ == "eager_attention_forward":
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    return base(module, query, key, value, attention_mask, **kwargs)


def retrieve(
    q: torch.Tensor, mem: LayerMemory, settings: RetrievalSettings, scaling: float, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k memory logits, memory indices (both (B, H, R, k)) and, with `values`, the values of those memories
    (B, H, R, k, Dv) for grouped queries q (B, H, R, D); over every rank's tokens when the memory is sharded."""
    if mem.shard is not None:
        return _retrieve_sharded(q, mem, settings, scaling, values)
    logits, idx = _retrieve(q, mem, settings, scaling)
    return logits, idx, gather_rows(mem.values, idx) if values else None


def _retrieve_sharded(
    q: torch.Tensor, mem: LayerMemory, settings: RetrievalSettings, scaling: float, values: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`retrieve` over a sharded memory: every rank takes its local top-k by the ranking (raw q.k, not yet masked
    or scaled), the ranks exchange them in one all_gather, and each merges them with the ranking, mask and order
    `_select` applies to the whole memory, so the result is the unsharded one."""
    shard = mem.shard
    b, h, r, _ = q.shape
    k = min(settings.topk, shard.total)
    cosine = settings.ranking == "cosine"
    if mem.keys.shape[1]:
        raw, idx = _retrieve(q, mem, RetrievalSettings(settings.topk, settings.ranking, None), 1.0)
    else:
        raw, idx = q.new_zeros(b, h, r, 0), torch.zeros(b, h, r, 0, dtype=torch.long, device=q.device)
    inv = gather_rows(mem.inv_norms, idx).to(raw.dtype)
    key = raw * inv if cosine else raw  # the very product _select ranks by
    gidx = shard.local_to_global.to(idx.device)[idx]
    vals = gather_rows(mem.values, idx) if values else None
    pad = k - raw.shape[-1]
    if pad > 0:  # every rank sends k per row; padding never wins a place (there are k real ones in all)
        key = torch.nn.functional.pad(key, (0, pad), value=float("-inf"))
        raw, inv = (torch.nn.functional.pad(x, (0, pad)) for x in (raw, inv))
        gidx = torch.nn.functional.pad(gidx, (0, pad), value=-1)
        if vals is not None:
            vals = torch.nn.functional.pad(vals, (0, 0, 0, pad))
    parts = [key, raw, inv, gidx] + ([vals] if vals is not None else [])
    like = [(p.shape, p.dtype) for p in parts]
    gathered = [unpack(buf, like) for buf in shard.group.all_gather(pack(parts), "exchanging retrieved memories")]
    key, raw, inv, gidx = (torch.cat([g[i] for g in gathered], dim=-1) for i in range(4))
    pos = key.topk(k, dim=-1).indices  # sorted, as _select's top-k
    raw, inv, gidx = raw.gather(-1, pos), inv.gather(-1, pos), gidx.gather(-1, pos)
    if settings.similarity_threshold is not None:
        raw = _similarity_mask(q, raw, inv, settings.similarity_threshold)
    if vals is not None:
        vals = torch.cat([g[4] for g in gathered], dim=-2)
        vals = vals.gather(-2, pos.unsqueeze(-1).expand(*pos.shape, vals.shape[-1]))
    return raw * scaling, gidx, vals


def _retrieve(
    q: torch.Tensor, mem: LayerMemory, settings: RetrievalSettings, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k memory logits and indices for grouped queries q (B, H, R, D): both (B, H, R, k).

    Exact search scans every key in blocks. With a `scan` (int8 or bfloat16 copy of the keys: fewer bytes to read)
    the scan only shortlists candidates, which are then scored exactly with the full-precision keys; with an index,
    only the index's candidates are scored. Either way the returned logits are exact."""
    k = min(settings.topk, mem.keys.shape[1])
    b, h, rows, _ = q.shape
    if mem.index is not None:
        from .index import approximate_candidates

        scores, cand = approximate_candidates(q, mem.keys, mem.index, k, mem.index_settings, mem.scan)
        return _select(q, scores, cand, mem, settings, scaling, k)
    n = mem.keys.shape[1]
    cosine = settings.ranking == "cosine"
    # Only a full (rows x N) score block needs bounding: the kernel's shortlist never materializes one.
    fused = mem.scan is not None and mem.scan.packed is not None and not cosine
    step = rows if fused else max(1, _SCORE_BLOCK // max(1, n * h))
    logits, indices = [], []
    for r0 in range(0, rows, step):
        qc = q[:, :, r0 : r0 + step]
        if mem.scan is None:
            scores = torch.matmul(qc, mem.keys.transpose(1, 2))  # (B, H, r, N) = q.k, all keys
            raw, idx = _select(qc, scores, None, mem, settings, scaling, k)
        else:
            size = shortlist_size(k, n)
            if cosine:
                cand = fast_topk(mem.scan.scores(qc, mem.inv_norms), size)
            else:
                cand = mem.scan.shortlist(qc, size)
            raw, idx = _select(qc, exact_scores(qc, mem.keys, cand), cand, mem, settings, scaling, k)
        logits.append(raw)
        indices.append(idx)
    if len(logits) == 1:
        return logits[0], indices[0]
    return torch.cat(logits, dim=2), torch.cat(indices, dim=2)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head rows of x (H, N, ...) at indices idx (B, H, ...) -> (B, H, ..., *x.shape[2:]).

    One index_select over a flat (H*N) view: several times faster than advanced indexing x[heads, idx] on a CPU."""
    h, n = x.shape[:2]
    offsets = (torch.arange(h, device=idx.device) * n).view(1, h, *([1] * (idx.dim() - 2)))
    flat = x.reshape(h * n, *x.shape[2:]).index_select(0, (idx + offsets).reshape(-1))
    return flat.view(*idx.shape, *x.shape[2:])


def exact_scores(q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """q . key for candidate keys: q (B, H, R, D), keys (H, N, D), cand (B, H, R, C) -> (B, H, R, C)."""
    # multiply-and-sum: for a few dozen candidates per row, much cheaper than a batch of tiny matmuls; keys kept in
    # a narrower dtype than the queries (block selection, positions.prepare_layers) are upcast, only these rows
    dt = torch.promote_types(q.dtype, keys.dtype)
    return (gather_rows(keys, cand).to(dt) * q.to(dt).unsqueeze(-2)).sum(-1)


def _select(
    q: torch.Tensor,
    scores: torch.Tensor,
    cand: torch.Tensor | None,
    mem: LayerMemory,
    settings: RetrievalSettings,
    scaling: float,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of `scores` (B, H, R, M: q.k of memory keys `cand`, or of all keys when cand is None) by the
    ranking, with the similarity mask applied: scaled logits and memory indices, both (B, H, R, k)."""
    cosine = settings.ranking == "cosine"
    inv_norms = None
    if cosine or settings.similarity_threshold is not None:
        if cand is None:
            inv_norms = mem.inv_norms[None, :, None, :].expand(q.shape[0], -1, q.shape[2], -1)
        else:
            inv_norms = gather_rows(mem.inv_norms, cand)
    pos = fast_topk(scores * inv_norms if cosine else scores, k)
    raw = scores.gather(-1, pos)
    idx = pos if cand is None else cand.gather(-1, pos)
    if inv_norms is not None and settings.similarity_threshold is not None:
        raw = _similarity_mask(q, raw, inv_norms.gather(-1, pos), settings.similarity_threshold)
    return raw * scaling, idx


def _similarity_mask(q: torch.Tensor, raw: torch.Tensor, inv_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Raw scores q.k (B, H, R, k) with the memories whose cosine similarity is <= threshold set to -inf;
    `inv_norms` are those keys' 1/|k|."""
    cos = raw / (q.norm(dim=-1, keepdim=True) * (1.0 / inv_norms)).clamp_min(1e-12)
    return raw.masked_fill(cos <= threshold, float("-inf"))


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
    session = _active.get()
    layer = getattr(module, "layer_idx", None)
    if session is not None and session.observe is not None:
        session.observe(layer, query, key)
    if session is not None and session.selection is not None:
        _add_to_selection(module, query, session, scaling)
        return _call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
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
            return _call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        outs: list[torch.Tensor | None] = [None] * len(session.rows)
        if len(plain) > 1 and "alibi" not in kwargs:  # rows reading no memory here: one call for all of them
            rows = torch.tensor(plain, device=query.device)
            mask = attention_mask.index_select(0, rows) if attention_mask is not None else None
            q, k, v = (t.index_select(0, rows) for t in (query, key, value))
            out, _ = _call_base(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)
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
    """The per-row part of an adapter's extras (alibi.py) for batch row r."""
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
        return _call_base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if _slots_by_sdpa(mem, query, attention_mask, kwargs):
        return _attend_slots(module, query, key, value, attention_mask, mem, session, records, scaling, dropout,
                             positions, **kwargs)  # fmt: skip

    b, hq, sq, d = query.shape
    h, skv = key.shape[1], key.shape[2]
    g = hq // h
    scaling = d**-0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    cdt = mem.keys.dtype
    qg = query.reshape(b, h, g * sq, d)  # query head h*g + j -> kv head h (as repeat_kv), rows ordered (j, t)

    slots = mem.slot_tokens is not None
    if slots:  # every row reads every slot
        mem_logits = torch.matmul(qg.to(cdt), mem.keys.transpose(1, 2)) * scaling  # (B, H, g*sq, S)
        mem_idx = mem.slot_tokens.to(query.device).view(1, 1, 1, -1).expand(b, h, g * sq, -1)
    else:
        mem_logits, mem_idx, mem_values = retrieve(qg.to(cdt), mem, session.settings, scaling)  # (B, H, g*sq, k)
        if mem.heads is not None:
            reads = mem.heads.to(query.device).view(1, h, g, 1).expand(b, h, g, sq).reshape(b, h, g * sq, 1)
            mem_logits = mem_logits.masked_fill(~reads, float("-inf"))
    local_logits = torch.matmul(qg, key.transpose(-1, -2)).float() * scaling  # (B, H, g*sq, Skv)
    mem_logits = mem_logits.float()
    k = mem_logits.shape[-1]
    no_memory = _rows_without_memory(mem, attention_mask, positions, b, sq, skv)
    if no_memory is not None:
        mem_logits = mem_logits.view(b, h, g, sq, k).masked_fill(no_memory, float("-inf")).view(b, h, g * sq, k)
    far = _slots_out_of_window(module, mem, positions, mem_logits.device) if slots else None
    if far is not None:
        mem_logits = mem_logits.view(b, h, g, sq, k).masked_fill(far.view(b, 1, 1, sq, k), float("-inf"))
        mem_logits = mem_logits.view(b, h, g * sq, k)
    alibi = kwargs.get("alibi")
    if alibi is not None:  # ALiBi (alibi.py): a memory at position p is biased as a local key at p would be
        slopes, last = alibi
        if slots:
            mem_pos = torch.arange(mem.slot_end - k, mem.slot_end, device=mem_logits.device).view(1, 1, 1, 1, k)
        else:
            mem_pos = mem.positions.to(mem_idx.device)[mem_idx].view(b, h, g, sq, k)
        bias = (mem_pos - last.to(mem_logits.device).view(-1, 1, 1, 1, 1)).float() * slopes.view(1, h, g, 1, 1)
        mem_logits = (mem_logits.view(b, h, g, sq, k) + bias).view(b, h, g * sq, k)
    if softcap is not None:
        local_logits = torch.tanh(local_logits / softcap) * softcap
        mem_logits = torch.tanh(mem_logits / softcap) * softcap
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
    joint = torch.cat([mem_logits.view(b, h, g, sq, k), local_logits], dim=-1)
    probs = torch.softmax(joint, dim=-1)
    p_mem, p_local = probs[..., :k], probs[..., k:]

    out = torch.matmul(p_local.reshape(b, h, g * sq, skv).to(value.dtype), value)  # (B, H, g*sq, D)
    if slots:
        out = out + torch.matmul(p_mem.reshape(b, h, g * sq, k).to(mem.values.dtype), mem.values).to(out.dtype)
    else:
        out = out + torch.matmul(p_mem.reshape(b, h, g * sq, 1, k).to(mem_values.dtype), mem_values).squeeze(-2).to(
            out.dtype
        )

    if session.record_citations:
        # What memory token j adds to the output is p_j * v_j: weigh citations by p_j * |v_j|, so that tokens
        # that soak up attention but carry near-empty values (sink-like tokens) are not cited.
        last_idx = mem_idx.view(b, h, g, sq, k)[0, :, :, -1].reshape(hq, k)
        last_p = p_mem[0, :, :, -1].reshape(hq, k)
        if session.citation_weighting == "attention_value":
            if slots:
                norms = mem.values.float().norm(dim=-1).repeat_interleave(g, dim=0)  # (Hq, S)
            else:
                norms = mem_values[0].view(h, g, sq, k, -1)[:, :, -1].reshape(hq, k, -1).float().norm(dim=-1)
            last_p = last_p * norms
        records.append((last_idx.detach(), last_p.detach()))

    out = out.view(b, h, g, sq, d).reshape(b, hq, sq, d).transpose(1, 2).contiguous()
    return out, None


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
    visible = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        visible = attention_mask[:, :, -sq:, -skv:].sum(-1).view(b, 1, 1, sq, 1)
    if mem.slot_tokens is not None:
        if positions is None or mem.slot_end <= 0:
            return None
        before = (positions.to(mem.keys.device) < mem.slot_end).view(b, 1, 1, sq, 1)
        return before if visible is None else before & (visible > 0)  # padding rows keep memory: no all -inf row
    return None if visible is None else visible == 1


def _capture_position_embeddings(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    session = _active.get()
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
    from .alibi import is_alibi_module, patch_alibi_model

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
        setattr(config, _BASE_ATTR, base)
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
