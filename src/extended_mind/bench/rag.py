"""The RAG baseline: the document cut into chunks of about 500 model tokens, embedded with all-MiniLM-L6-v2, and
the chunks nearest the question pasted into the prompt (in document order)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import ExtendedMindError
from .data import embedding_model_dir

EMBED_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; longer chunks are embedded in overlapping pieces


class Embedder:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalized (as the model card says)."""

    def __init__(self, path: Path | None = None, device: str | torch.device = "cpu"):
        path = path or embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device = torch.device(device)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch: int = 32) -> tuple[torch.Tensor, list[int]]:
        """Embeddings of every piece of every text, (P, 384), and for each piece the index of its text. A text
        longer than the model's 256 tokens is split into overlapping pieces instead of being truncated."""
        enc = self.tokenizer(
            texts, truncation=True, max_length=EMBED_MAX_TOKENS, stride=32, return_overflowing_tokens=True,
            padding=True, return_tensors="pt",
        )  # fmt: skip
        owner = enc.pop("overflow_to_sample_mapping").tolist()
        outs = []
        for i in range(0, len(owner), batch):
            part = {k: v[i : i + batch].to(self.device) for k, v in enc.items()}
            hidden = self.model(**part).last_hidden_state
            mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            outs.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(outs), owner


class Retriever:
    """Chunks a document with the language model's tokenizer and finds the chunks nearest a query."""

    def __init__(self, embedder: Embedder, tokenizer: PreTrainedTokenizerBase):
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
