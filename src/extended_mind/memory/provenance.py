"""Where memory tokens came from, read one document at a time: an answer that reads a few blocks of a cold
million-token memory then maps the character spans of those documents only, not every document's file (building
the flat view of all spans took 1.5 s of a cold first question at a million tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate

import torch

from extended_mind.memory.memory import Memory


def document_starts(memory: Memory) -> torch.Tensor:
    """(D + 1,) long: the first memory token of every document, and the token count last."""

    def build() -> torch.Tensor:
        return torch.tensor([0, *accumulate(s.num_tokens for s in memory.segments)], dtype=torch.long)

    return memory.cached("document-starts", build)


def by_document(memory: Memory, indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For every document among the memory tokens `indices`: (document, positions in `indices`, the tokens'
    indices inside that document)."""
    starts = document_starts(memory)
    indices = indices.long()
    docs = torch.searchsorted(starts, indices, right=True) - 1
    for d in torch.unique(docs).tolist():
        at = (docs == d).nonzero().squeeze(1)
        yield d, at, indices[at] - starts[d]


def spans_at(memory: Memory, indices: torch.Tensor) -> torch.Tensor:
    """(len(indices), 2) long: character [start, end) of each memory token in its document."""
    out = torch.zeros(len(indices), 2, dtype=torch.long)
    for d, at, local in by_document(memory, indices):
        out[at] = memory.segments[d].tensors["spans"][local].long()
    return out
