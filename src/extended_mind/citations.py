"""Citations: memory attention weights mapped back to readable spans of the memorized documents."""

from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from .memory import Memory

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


def cite(
    memory: Memory, indices: torch.Tensor, weights: torch.Tensor, max_spans: int = 5, min_share: float = 0.1
) -> list[Citation]:
    """Group weighted memory tokens into sentence spans, strongest first.

    A span keeps the sum of its tokens' weights; spans under `min_share` of the strongest are dropped.
    """
    if len(indices) == 0:
        return []
    indices, weights = indices.cpu(), weights.cpu().float()
    docs = memory.token_doc[indices].tolist()
    spans = memory.token_spans[indices].tolist()
    groups: dict[tuple[int, int], list] = {}
    for d, (s, e), w in zip(docs, spans, weights.tolist()):
        starts, ends = _sentences(memory.documents[d].text)
        i = max(0, bisect.bisect_right(starts, s) - 1)
        g = groups.setdefault((d, i), [0.0, s, e])
        g[0] += w
        g[1], g[2] = min(g[1], s), max(g[2], e)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    top = ranked[0][1][0]
    out = []
    for (d, i), (w, s, e) in ranked[:max_spans]:
        if w < min_share * top:
            break
        text = memory.documents[d].text
        starts, ends = _sentences(text)
        lo, hi = starts[i], ends[i]
        if hi - lo > _MAX_SPAN_CHARS:  # a run-on "sentence": keep the cited tokens with some context
            lo, hi = max(lo, s - _CONTEXT_CHARS), min(hi, e + _CONTEXT_CHARS)
        out.append(Citation(doc=memory.documents[d].id, start=lo, end=hi, text=text[lo:hi].strip(), weight=round(w, 6)))
    return out
