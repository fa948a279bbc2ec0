"""Where memory tokens came from, found one document at a time: an answer that reads a few blocks of a cold
million-token memory then maps the character spans of those documents only, not every document's file (building
the flat view of all spans took 1.5 s of a cold first question at a million tokens)."""

from __future__ import annotations

from itertools import accumulate

import torch

from extended_mind.memory.memory import Memory


def document_starts(memory: Memory) -> torch.Tensor:
    """(D + 1,) long: the first memory token of every document, and the token count last."""

    def build() -> torch.Tensor:
        return torch.tensor([0, *accumulate(s.num_tokens for s in memory.segments)], dtype=torch.long)

    return memory.cached("document-starts", build)


def documents_of(memory: Memory, indices: torch.Tensor) -> torch.Tensor:
    """(len(indices),) long: the document of each memory token (`Memory.token_doc` without building it whole)."""
    return torch.searchsorted(document_starts(memory), indices.long(), right=True) - 1
