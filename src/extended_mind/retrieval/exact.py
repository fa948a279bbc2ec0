"""Exact scores of memory keys: per-head row gathers and q.k of candidate keys."""

from __future__ import annotations

import torch

# Bound on the (query rows x memory tokens) score block computed at once per KV head, to cap temporary memory.
SCORE_BLOCK = 1 << 24
# On a GPU each block costs a handful of kernel launches: 16x larger blocks (1 GiB of float32 scores) keep a
# 500-token prompt over a million keys at tens of blocks per layer instead of hundreds.
GPU_SCORE_BLOCK = 1 << 28


def score_block(device: torch.device) -> int:
    """Score-block bound for scores computed on `device`."""
    return GPU_SCORE_BLOCK if device.type == "cuda" else SCORE_BLOCK


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
