"""One memorized document's tensors (a segment) and the rotary tables a memory was made with."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from extended_mind.base.documents import Document
from extended_mind.base.errors import ExtendedMindError
from extended_mind.memory.files import CheckedTensors, StoredFile
from extended_mind.memory.mapped import tensor_sizes
from extended_mind.memory.precision import decode, encode


@dataclass
class Segment:
    """The memory tokens of one document. Tensors (n tokens, H KV heads, D head dim):
      keys.{l} / values.{l}: (H, n, D) in the segment's storage precision (pre-RoPE keys);
      key_scales.{l} / value_scales.{l}: (H, n) float32, int8 storage only;
      positions: (n,) int32, the token's position inside its memorization window;
      spans: (n, 2) int32, character [start, end) in the document.
    Loaded segments read their tensors from disk on first use (`load` is set by the store)."""

    document: Document
    num_tokens: int
    stride: int
    window: int
    storage: str
    _tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    load: Callable[[], Mapping[str, torch.Tensor]] | None = field(default=None, repr=False)
    file: StoredFile | None = field(default=None, repr=False)  # where this segment is saved, if it is
    # Sharded memories (parallel/group.py): the rank that holds this document's keys and values. On the other ranks
    # the segment is `remote`: it keeps only positions and spans (for positions and citations), never keys/values.
    rank: int | None = None
    remote: bool = False
    # what the document was memorized after: "sink" (the sink token alone) or "chat" (the chat template's head)
    context: str = "sink"

    @classmethod
    def build(
        cls,
        document: Document,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        positions: torch.Tensor,
        spans: torch.Tensor,
        stride: int,
        window: int,
        storage: str,
        context: str = "sink",
    ) -> Segment:
        tensors = {"positions": positions.to(torch.int32).cpu(), "spans": spans.to(torch.int32).cpu()}
        for layer, (k, v) in enumerate(zip(keys, values)):
            for name, x in (("keys", k), ("values", v)):
                data, scale = encode(x.detach().cpu(), storage)
                tensors[f"{name}.{layer}"] = data.contiguous()
                if scale is not None:
                    tensors[f"{name[:-1]}_scales.{layer}"] = scale.contiguous()
        return cls(document, int(positions.shape[0]), stride, window, storage, tensors, context=context)

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        if self._tensors is None:
            assert self.load is not None
            self._tensors = self.load()
        return self._tensors

    @property
    def is_open(self) -> bool:
        """Whether the tensors are in memory (built here, or read since loading)."""
        return self._tensors is not None

    def hold_positions_only(self, positions: torch.Tensor, spans: torch.Tensor) -> None:
        """Make this a remote segment of a sharded memory: positions and spans only, no keys or values."""
        self._tensors, self.remote = {"positions": positions, "spans": spans}, True

    def read_through(self, document: Document) -> Segment:
        """A segment for `document` that reads this one's tensors when first used (and is not saved anywhere)."""
        return replace(self, document=document, _tensors=None, load=lambda: self.tensors, file=None)

    def layer(self, kind: str, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Keys or values (`kind`) of one layer, (H, n, D), as float (int8 storage is dequantized); with `rows`
        (indices into this document's tokens) only those rows are decoded."""
        if self.remote:
            raise ExtendedMindError(
                f"the keys and values of document {self.document.id!r} are held by rank {self.rank} of the sharded "
                "memory, not by this process"
            )
        data, scale = self.tensors[f"{kind}.{layer}"], self.tensors.get(f"{kind[:-1]}_scales.{layer}")
        if rows is not None:
            data, scale = data[:, rows], scale[:, rows] if scale is not None else None
        return decode(data, scale)

    def astype(self, storage: str, num_layers: int) -> Segment:
        if storage == self.storage:
            return self
        if self.remote:
            raise ExtendedMindError(f"cannot convert document {self.document.id!r}: it is held by rank {self.rank}")
        return Segment.build(
            self.document,
            [self.layer("keys", i) for i in range(num_layers)],
            [self.layer("values", i) for i in range(num_layers)],
            self.tensors["positions"],
            self.tensors["spans"],
            self.stride,
            self.window,
            storage,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (and their scales); for a saved document not yet used, from its file's header
        (reading and checking the whole file only to count it would cost as much as loading it)."""
        skip = ("positions", "spans")
        if isinstance(self._tensors, CheckedTensors):  # mapped: iterating its values would hash every tensor
            return sum(size for n, size in self._tensors.sizes.items() if n not in skip)
        if self._tensors is None and self.file is not None:
            try:
                return sum(size for n, size in tensor_sizes(self.file.path).items() if n not in skip)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable: loading it below names the problem
        return sum(t.numel() * t.element_size() for n, t in self.tensors.items() if n not in skip)


@dataclass
class RopeTables:
    """The model's rotary tables, cos/sin (P positions, R rotary dims), stored once per distinct table (Gemma 3 has
    two); layer_rope[l] picks layer l's table. kv_shapes[l] = (KV heads, key dim, value dim) of layer l."""

    cos: list[torch.Tensor]
    sin: list[torch.Tensor]
    layer_rope: list[int]
    kv_shapes: list[tuple[int, int, int]]

    @property
    def length(self) -> int:
        return min(int(c.shape[0]) for c in self.cos)


def concat(parts: list[torch.Tensor], empty_shape: tuple[int, ...], dim: int = 0) -> torch.Tensor:
    if not parts:
        return torch.zeros(empty_shape, dtype=torch.int32 if len(empty_shape) < 3 else torch.float32)
    if len({p.dtype for p in parts}) > 1:  # documents stored in different precisions
        parts = [p.float() for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


@lru_cache(maxsize=4096)
def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def longest_rope(tables: list[RopeTables]) -> RopeTables:
    """Rotary tables of one model agree on their common prefix; the longest covers every stored position."""
    return max(tables, key=lambda r: r.length)
