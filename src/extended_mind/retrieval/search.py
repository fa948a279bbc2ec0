"""Top-k retrieval from one layer's memory: exact, shortlisted by a scan, by an index, or over a
sharded memory (every rank's top-k merged, so the result equals the unsharded one)."""

from __future__ import annotations

import torch

from extended_mind.parallel.group import pack, unpack
from extended_mind.retrieval.exact import exact_scores, gather_rows, score_block
from extended_mind.retrieval.index import approximate_candidates
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings
from extended_mind.retrieval.scan import fast_topk, shortlist_size


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
        scores, cand = approximate_candidates(q, mem.keys, mem.index, k, mem.index_settings, mem.scan)
        return _select(q, scores, cand, mem, settings, scaling, k)
    n = mem.keys.shape[1]
    cosine = settings.ranking == "cosine"
    # Only a full (rows x N) score block needs bounding: the kernel's shortlist never materializes one.
    fused = mem.scan is not None and mem.scan.packed is not None and not cosine
    step = rows if fused else max(1, score_block(q.device) // max(1, n * h))
    logits, indices = [], []
    for r0 in range(0, rows, step):
        qc = q[:, :, r0 : r0 + step]
        if mem.scan is None and qc.dtype == mem.keys.dtype:
            scores = torch.matmul(qc, mem.keys.transpose(1, 2))  # (B, H, r, N) = q.k, all keys
            raw, idx = _select(qc, scores, None, mem, settings, scaling, k)
        elif mem.scan is None:  # keys narrower than the queries (a bfloat16 model's block selection): the keys
            # themselves are the scan, in their own dtype; the shortlist is then scored exactly, like any scan's
            scores = torch.matmul(qc.to(mem.keys.dtype), mem.keys.transpose(1, 2)).float()
            cand = fast_topk(scores * mem.inv_norms[:, None, :] if cosine else scores, shortlist_size(k, n))
            raw, idx = _select(qc, exact_scores(qc, mem.keys, cand), cand, mem, settings, scaling, k)
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
