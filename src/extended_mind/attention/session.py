"""The state of one forward pass (retrieval, block selection, capture), carried in a context variable
because `model.forward` cannot take extra arguments through every model family."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings
from extended_mind.retrieval.selection import BlockSelection

_active: ContextVar[Session | None] = ContextVar("extended_mind_session", default=None)


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
    # Calibration (engine/heads.py): called with (layer, query, key) after RoPE; the layer attends normally.
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    # (row_positions, its smallest position) of the current pass: read once, not by every layer
    _first: tuple[torch.Tensor | None, int] = field(default=(None, 0), init=False, repr=False)

    def first_position(self, positions: torch.Tensor) -> int:
        """The smallest of `positions` (a CPU tensor), read once per forward pass when they are this pass's
        `row_positions`: every layer asks, and a read costs more than the decode row's slot attention saves."""
        if positions is not self.row_positions:
            return int(positions.min())
        if self._first[0] is not positions:
            self._first = (positions, int(positions.min()))
        return self._first[1]

    @contextmanager
    def active(self) -> Iterator[Session]:
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)


_in_plain_step = False  # set while engine/compiled.py runs its compiled step (dynamo guards on this global)


def active_session() -> Session | None:
    """The session of the forward pass running in this context, if any. None inside our compiled decode step
    (engine/compiled.py), which runs only where no memory is read: a context variable cannot be traced. A model
    compiled by its user still sees its session (dynamo breaks the graph here)."""
    if _in_plain_step and torch.compiler.is_compiling():
        return None
    return _active.get()


@contextmanager
def plain_step() -> Iterator[None]:
    """Mark a compiled forward that reads no memory (see `active_session`)."""
    global _in_plain_step
    _in_plain_step = True
    try:
        yield
    finally:
        _in_plain_step = False
