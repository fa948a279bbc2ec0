"""One layer's memory in the form attention reads it, and the retrieval settings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from extended_mind.retrieval.scan import KeyScan

if TYPE_CHECKING:
    from extended_mind.parallel.group import LayerShard
    from extended_mind.retrieval.index import IndexSettings, LayerIndex


@dataclass
class LayerMemory:
    """One layer's memory in the form attention reads it: keys already rotated by the position policy."""

    keys: torch.Tensor  # (H, N, D)
    values: torch.Tensor  # (H, N, D)
    inv_norms: torch.Tensor  # (H, N) 1/|key|, for cosine ranking
    index: LayerIndex | None = None  # approximate search (retrieval/index.py); None: exact
    scan: KeyScan | None = None  # compact copy of `keys` scanned to shortlist candidates (in cell order with an index)
    index_settings: IndexSettings | None = None
    # Slots (block memory): keys/values are the S tokens every query reads, keys rotated to their slot positions;
    # slot_tokens (S,) are their indices in the memory (for citations); query rows at positions before slot_end
    # (the prompt's head, which precedes the slots) read none of them.
    slot_tokens: torch.Tensor | None = None
    slot_end: int = 0
    value_norms: torch.Tensor | None = None  # slots: (H, S) float |value|, for citations weighed by p * |v|
    heads: torch.Tensor | None = None  # (query heads,) bool: token retrieval only in these heads (None: all)
    positions: torch.Tensor | None = None  # (N,) long: each memory's position, for ALiBi biases (attention/alibi.py)
    # Sharded memory (parallel/group.py): keys/values/index hold this rank's tokens; retrieval merges every rank's
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
