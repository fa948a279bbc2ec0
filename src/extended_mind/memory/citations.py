"""Citations: memory attention weights mapped back to readable spans of the memorized documents."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from extended_mind.memory.memory import Memory

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


_MAX_SPAN_CHARS = 400


_CONTEXT_CHARS = 120


@dataclass(frozen=True)
class Citation:
    """A cited span: characters [start, end) of document `doc`, and the attention weight it received."""

    doc: str
    start: int
    end: int
    text: str
    weight: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Passage:
    """A stretch of a memorized document that an answer read whole (block memory): characters [start, end) of
    document `doc`."""

    doc: str
    start: int
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=64)
def _sentences(text: str) -> tuple[list[int], list[int]]:
    starts, ends, pos = [], [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > pos:
            starts.append(pos)
            ends.append(m.start())
        pos = m.end()
    if pos < len(text):
        starts.append(pos)
        ends.append(len(text))
    return starts, ends


def sparse_sum(indices: list[torch.Tensor], weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum weights per memory token index: returns (unique indices, summed weights)."""
    if not indices:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    idx = torch.cat([i.reshape(-1) for i in indices]).long()
    w = torch.cat([x.reshape(-1) for x in weights]).float()
    uniq, inverse = torch.unique(idx, return_inverse=True)
    return uniq, torch.zeros(len(uniq), device=w.device).scatter_add_(0, inverse, w)


def token_sentences(memory: Memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sentence of every memory token: (token_sentence (N,) global sentence ids, sentence_doc (S,) document index,
    doc_first (D,) global id of each document's first sentence). Built once per memory content (a flat view)."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spans = memory.token_spans
        token_sentence = torch.empty(len(spans), dtype=torch.long)
        sentence_doc, doc_first, first, t0 = [], [], 0, 0
        for d, segment in enumerate(memory.segments):  # a document's tokens are contiguous, in segment order
            starts = _sentences(segment.document.text)[0]
            t1 = t0 + segment.num_tokens
            local = torch.searchsorted(torch.tensor(starts, dtype=torch.long), spans[t0:t1, 0].long(), right=True)
            token_sentence[t0:t1] = first + (local - 1).clamp_min(0)
            t0 = t1
            doc_first.append(first)
            sentence_doc += [d] * max(1, len(starts))
            first += max(1, len(starts))
        return token_sentence, torch.tensor(sentence_doc, dtype=torch.long), torch.tensor(doc_first, dtype=torch.long)

    return memory.cached("sentences", build)


def cite(
    memory: Memory, indices: torch.Tensor, weights: torch.Tensor, max_spans: int = 5, min_share: float = 0.1
) -> list[Citation]:
    """Group weighted memory tokens into sentence spans, strongest first.

    A span keeps the sum of its tokens' weights; spans under `min_share` of the strongest are dropped. Vectorized:
    it runs for every generated token, over the few thousand memory tokens all layers and heads retrieved.
    """
    if len(indices) == 0:
        return []
    indices, weights = indices.cpu().long(), weights.cpu().float()
    token_sentence, sentence_doc, doc_first = token_sentences(memory)
    sentence, group = torch.unique(token_sentence[indices], return_inverse=True)
    total = torch.zeros(len(sentence)).scatter_add_(0, group, weights)
    spans = memory.token_spans[indices].long()
    lo_tok = torch.full((len(sentence),), torch.iinfo(torch.long).max).scatter_reduce_(0, group, spans[:, 0], "amin")
    hi_tok = torch.zeros(len(sentence), dtype=torch.long).scatter_reduce_(0, group, spans[:, 1], "amax")
    order = torch.argsort(total, descending=True, stable=True)[:max_spans].tolist()
    top = float(total[order[0]])
    out = []
    for g in order:
        w = float(total[g])
        if w < min_share * top:
            break
        d = int(sentence_doc[sentence[g]])
        i = int(sentence[g] - doc_first[d])
        s, e = int(lo_tok[g]), int(hi_tok[g])
        text = memory.documents[d].text
        starts, ends = _sentences(text)
        lo, hi = (starts[i], ends[i]) if starts else (0, len(text))
        if hi - lo > _MAX_SPAN_CHARS:  # a run-on "sentence": keep the cited tokens with some context
            lo, hi = max(lo, s - _CONTEXT_CHARS), min(hi, e + _CONTEXT_CHARS)
        out.append(Citation(doc=memory.documents[d].id, start=lo, end=hi, text=text[lo:hi].strip(), weight=round(w, 6)))
    return out
