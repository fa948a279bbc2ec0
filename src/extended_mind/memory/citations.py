"""Citations: memory attention weights mapped back to readable spans of the memorized documents."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from extended_mind.memory.memory import Memory
from extended_mind.memory.provenance import document_starts, documents_of

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


_MAX_SPAN_CHARS = 400


_CONTEXT_CHARS = 120

_POWER = 3  # an answer's citation weights: the cubic mean over its tokens (cite_answer)

_DOC_SHIFT = 32  # a (document, sentence) key: document << 32 | sentence within it


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


def _token_sentences(memory: Memory, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(character spans (len, 2) long, (document << 32 | sentence) keys (len,)) of memory tokens `indices`. Kept
    for the whole memory in two flat tensors, each document filled the first time one of its tokens is cited: a
    cold million-token memory reads the spans of the documents an answer cites, not of all of them, and a decode
    step costs two gathers."""
    n = memory.num_tokens
    spans, keys = memory.cached(
        "sentence-keys", lambda: (torch.zeros(n, 2, dtype=torch.int32), torch.full((n,), -1, dtype=torch.long))
    )
    found = keys[indices]
    if bool((found < 0).any()):
        starts = document_starts(memory)
        for d in torch.unique(documents_of(memory, indices[found < 0])).tolist():
            lo, hi = int(starts[d]), int(starts[d + 1])
            doc_spans = memory.segments[d].tensors["spans"]
            sentence_starts = torch.tensor(_sentences(memory.segments[d].document.text)[0], dtype=torch.long)
            sentence = torch.searchsorted(sentence_starts, doc_spans[:, 0].long(), right=True) - 1
            spans[lo:hi] = doc_spans
            keys[lo:hi] = (d << _DOC_SHIFT) + sentence.clamp_min(0)
        found = keys[indices]
    return spans[indices].long(), found


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
    spans, key = _token_sentences(memory, indices)
    sentence, group = torch.unique(key, return_inverse=True)
    total = torch.zeros(len(sentence)).scatter_add_(0, group, weights)
    return _spans(memory, spans, sentence, group, total, max_spans, min_share)


def cite_answer(
    memory: Memory, indices: list[torch.Tensor], weights: list[torch.Tensor], max_spans: int = 5, min_share: float = 0.1
) -> list[Citation]:
    """Citations of a whole answer from what each of its tokens read (`indices[t]`, `weights[t]`).

    A sentence's weight is the cubic mean, over the answer's tokens, of the weight each token gave it (0 where a
    token did not read it). The plain mean ranks first a sentence every token reads a little: some memory tokens
    (function words such as " the" early in a passage) draw attention from every query the way the start of a
    sequence does, and over a long answer (a key, then the model's own "Remember it. ...") that outweighs the
    sentence the key's digits were copied from. The cube ranks first the sentences some tokens read strongly; a
    sentence read evenly keeps its mean, and a one-token answer cites as that token does. (Power 3 against 1, 2, 4,
    6 and the maximum: docs/evaluation.md "Citations of a whole answer".)
    """
    n = len(indices)
    if n == 0 or all(len(i) == 0 for i in indices):
        return []
    idx = torch.cat([i.reshape(-1) for i in indices]).cpu().long()
    w = torch.cat([x.reshape(-1) for x in weights]).cpu().float()
    row = torch.repeat_interleave(torch.arange(n), torch.tensor([i.numel() for i in indices]))
    spans, key = _token_sentences(memory, idx)
    sentence, group = torch.unique(key, return_inverse=True)
    # each token's weight per sentence (sparse: the pairs that occur), then the cubes summed per sentence
    pair, inverse = torch.unique(group * n + row, return_inverse=True)
    per_token = torch.zeros(len(pair), dtype=torch.float64).scatter_add_(0, inverse, w.double())
    cubes = torch.zeros(len(sentence), dtype=torch.float64).scatter_add_(0, pair // n, per_token.pow(_POWER))
    return _spans(memory, spans, sentence, group, (cubes / n).pow(1 / _POWER).float(), max_spans, min_share)


def _spans(memory: Memory, spans: torch.Tensor, sentence: torch.Tensor, group: torch.Tensor, total: torch.Tensor,
           max_spans: int, min_share: float) -> list[Citation]:  # fmt: skip
    """The `max_spans` sentences with the largest `total` (at least `min_share` of the largest), as readable spans;
    `spans` and `group` are the cited memory tokens' character spans and sentence numbers."""
    lo_tok = torch.full((len(sentence),), torch.iinfo(torch.long).max).scatter_reduce_(0, group, spans[:, 0], "amin")
    hi_tok = torch.zeros(len(sentence), dtype=torch.long).scatter_reduce_(0, group, spans[:, 1], "amax")
    order = torch.argsort(total, descending=True, stable=True)[:max_spans].tolist()
    top = float(total[order[0]])
    out = []
    for g in order:
        w = float(total[g])
        if w < min_share * top:
            break
        d, i = int(sentence[g]) >> _DOC_SHIFT, int(sentence[g]) & ((1 << _DOC_SHIFT) - 1)
        s, e = int(lo_tok[g]), int(hi_tok[g])
        text = memory.documents[d].text
        starts, ends = _sentences(text)
        lo, hi = (starts[i], ends[i]) if starts else (0, len(text))
        if hi - lo > _MAX_SPAN_CHARS:  # a run-on "sentence": keep the cited tokens with some context
            lo, hi = max(lo, s - _CONTEXT_CHARS), min(hi, e + _CONTEXT_CHARS)
        out.append(Citation(doc=memory.documents[d].id, start=lo, end=hi, text=text[lo:hi].strip(), weight=round(w, 6)))
    return out
