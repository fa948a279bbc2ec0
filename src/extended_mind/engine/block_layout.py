"""Memory tokens cut into blocks (block memory's unit of reading), and the text each block came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from extended_mind.base.errors import ExtendedMindError
from extended_mind.engine.memorize import encode_documents
from extended_mind.memory.citations import Passage
from extended_mind.memory.memory import Memory
from extended_mind.memory.provenance import document_starts


@dataclass(frozen=True)
class BlockLayout:
    """Memory tokens cut into blocks of `size` tokens, never across two documents."""

    size: int
    block_of: torch.Tensor  # (N,) long: block of every token
    starts: torch.Tensor  # (blocks,) long: first token of every block
    lengths: torch.Tensor  # (blocks,) long
    docs: torch.Tensor  # (blocks,) long: the document of every block

    @classmethod
    def of(cls, memory: Memory, size: int) -> BlockLayout:
        def build() -> BlockLayout:
            starts, lengths, docs = [], [], []
            offset = 0
            for d, seg in enumerate(memory.segments):
                for s in range(0, seg.num_tokens, size):
                    starts.append(offset + s)
                    lengths.append(min(size, seg.num_tokens - s))
                    docs.append(d)
                offset += seg.num_tokens
            starts_t, lengths_t = torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
            block_of = torch.repeat_interleave(torch.arange(len(starts)), lengths_t)
            return cls(size, block_of, starts_t, lengths_t, torch.tensor(docs, dtype=torch.long))

        return memory.cached(f"blocks-{size}", build)

    @property
    def num_blocks(self) -> int:
        return int(self.starts.shape[0])

    def texts(self, memory: Memory) -> list[str]:
        """The text of every block: the characters its tokens came from in their document."""
        return [self.text(memory, b) for b in range(self.num_blocks)]

    def span(self, memory: Memory, block: int) -> tuple[int, int, int]:
        """(document index, first character, end character) of the text one block's tokens came from."""
        d = int(self.docs[block])  # its own document's spans only (a cold memory maps no other file)
        start = int(self.starts[block]) - int(document_starts(memory)[d])
        spans = memory.segments[d].tensors["spans"]
        return d, int(spans[start, 0]), int(spans[start + int(self.lengths[block]) - 1, 1])

    def text(self, memory: Memory, block: int) -> str:
        """The text of one block."""
        doc, start, end = self.span(memory, block)
        return memory.segments[doc].document.text[start:end]

    def runs(self, blocks: torch.Tensor) -> list[list[int]]:
        """`blocks` (in document order) as runs of consecutive blocks of one document."""
        out: list[list[int]] = []
        for b in blocks.tolist():
            if out and out[-1][-1] == b - 1 and bool(self.docs[b] == self.docs[b - 1]):
                out[-1].append(b)
            else:
                out.append([b])
        return out

    def passages(self, memory: Memory, blocks: torch.Tensor) -> list[Passage]:
        """The text `blocks` (in document order) cover, consecutive blocks of one document joined into one passage."""
        out: list[Passage] = []
        for run in self.runs(blocks):
            d, start, _ = self.span(memory, run[0])
            end = self.span(memory, run[-1])[2]
            doc = memory.segments[d].document
            out.append(Passage(doc.id, start, end, doc.text[start:end]))
        return out

    def tokens(self, blocks: torch.Tensor) -> torch.Tensor:
        """Memory token indices of `blocks` (in the order given)."""
        if blocks.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        spans = zip(self.starts[blocks].tolist(), self.lengths[blocks].tolist())
        return torch.cat([torch.arange(s, s + n) for s, n in spans])

    def token_ids(self, memory: Memory, tokenizer: PreTrainedTokenizerBase, blocks: torch.Tensor) -> torch.Tensor:
        """The token ids of `blocks` (in the order given): a memory keeps keys and values, not ids, so each document
        is tokenized again as it was memorized (once per memory)."""
        parts = [torch.zeros(0, dtype=torch.long)]
        starts = document_starts(memory)
        for b in blocks.tolist():
            d = int(self.docs[b])
            ids = memory.cached(f"token-ids-{d}", lambda d=d: _memorized_ids(memory, tokenizer, d))
            first = int(self.starts[b]) - int(starts[d])
            parts.append(ids[first : first + int(self.lengths[b])])
        return torch.cat(parts)


def _memorized_ids(memory: Memory, tokenizer: PreTrainedTokenizerBase, d: int) -> torch.Tensor:
    segment = memory.segments[d]
    encoded = encode_documents(tokenizer, [segment.document])[0]
    ids = encoded.ids[encoded.keep]
    if ids.numel() != segment.num_tokens:
        raise ExtendedMindError(
            f"document {segment.document.id!r} tokenizes to {ids.numel()} tokens here but was memorized as "
            f"{segment.num_tokens}: it was memorized with another tokenizer or context; memorize it again"
        )
    return ids
