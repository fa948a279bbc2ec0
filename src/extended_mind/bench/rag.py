"""The RAG baseline: the document cut into chunks of about 500 model tokens, embedded with all-MiniLM-L6-v2, and
the chunks nearest the question pasted into the prompt (in document order)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from extended_mind.base.errors import ExtendedMindError
from extended_mind.retrieval.embedding import Embedder, TextEmbedder

__all__ = ["Embedder", "Retriever"]


class Retriever:
    """Chunks a document with the language model's tokenizer and finds the chunks nearest a query."""

    def __init__(self, embedder: TextEmbedder, tokenizer: PreTrainedTokenizerBase):
        self.embedder = embedder
        self.tokenizer = tokenizer
        self._cached: tuple[tuple, list[str], torch.Tensor, list[int]] | None = None

    def chunks(self, document: str, chunk_tokens: int | None, separator: str | None = None):
        """(texts, piece vectors, owner of each piece): the document cut every `chunk_tokens` tokens, or at every
        `separator` (whole units, such as demonstrations); embedded once per document."""
        key = (document, chunk_tokens, separator)
        if self._cached is None or self._cached[0] != key:
            if separator is not None:
                texts = [t for t in document.split(separator) if t.strip()]
            else:
                ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
                texts = [self.tokenizer.decode(ids[i : i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]
            vectors, owner = self.embedder.embed(texts)
            self._cached = (key, texts, vectors, owner)
        return self._cached[1], self._cached[2], self._cached[3]

    def retrieve(
        self, document: str, query: str, chunk_tokens: int = 500, top: int = 5, separator: str | None = None
    ) -> list[str]:
        """The `top` chunks (or `separator`-delimited units) most similar to `query` (a chunk scores its best
        piece), in document order."""
        if chunk_tokens < 1 or top < 1:
            raise ExtendedMindError(f"RAG needs chunk_tokens >= 1 and top >= 1, got {chunk_tokens} and {top}")
        texts, vectors, owner = self.chunks(document, chunk_tokens, separator)
        q, _ = self.embedder.embed([query])
        sims = (vectors @ q[0]).tolist()
        best = [-2.0] * len(texts)
        for piece, chunk in enumerate(owner):
            best[chunk] = max(best[chunk], sims[piece])
        chosen = sorted(range(len(texts)), key=lambda i: -best[i])[:top]
        return [texts[i] for i in sorted(chosen)]
