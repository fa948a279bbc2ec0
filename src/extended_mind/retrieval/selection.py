"""Block selection: the attention mass each memory block receives from the retrieval heads in a pass
without memory (blocks are then read by every layer, engine/blocks.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings
from extended_mind.retrieval.search import retrieve


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
