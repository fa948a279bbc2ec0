"""Retrieval heads: the few attention heads that copy tokens from their context, found by a short calibration.

The Retrieval Head paper (Wu et al. 2024) and DuoAttention found that a small fraction of heads do the copying
when a model reads a passage back. Block memory (engine/blocks.py) lets these heads, and only these, choose which memory
blocks the whole model reads.

Calibration: a sequence of random words is shown twice, with prose around and between the copies; while the model
reads the second copy (teacher-forced), a head scores a hit whenever its strongest attention lands on the token
of the first copy that comes next, i.e. the token being copied. A head's score is its hit rate (0-1). On
SmolLM2-135M 22 of 270 heads score at least 0.1, all in layers 17-24 (ten at 0.5 or more); the best of the
others scores 0.098. Scores are cached per model (architecture, weights sample and tokenizer) in the cache
directory, like the converted weights: calibration takes ~15 s for SmolLM2 on a CPU, a cached load ~1 ms.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib.resources import files
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.session import Session
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.paths import cache_dir

CALIBRATION_VERSION = 1


TRIALS = 8


WORDS = 48  # random words per copy


PROSE = 160  # prose tokens before and between the copies (the copy distance stays inside sliding windows of 512)


# A head is a retrieval head from this score on; if none reaches it (tiny random models), the best MIN_HEADS are.
HEAD_THRESHOLD = 0.1


MIN_HEADS = 2


def _word_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that decode to a space and a lower-case word: copying them cannot be guessed from grammar."""
    special = set(tokenizer.all_special_ids)
    words = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        text = tokenizer.decode([tid])
        if len(text) >= 4 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            words.append(tid)
    if len(words) < 4 * WORDS:  # byte-level or tiny vocabularies: any non-special token
        words = [t for t in range(len(tokenizer)) if t not in special]
    return words


def calibration_sequences(tokenizer: PreTrainedTokenizerBase, trials: int = TRIALS, seed: int = 0):
    """(ids, query rows, target rows) per trial: ids = [sink] prose W prose W; the query at the i-th token of the
    second W should attend to the (i+1)-th token of the first W."""
    text = (files("extended_mind") / "data" / "aardwolf.txt").read_text(encoding="utf-8")
    prose = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = _word_tokens(tokenizer)
    sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    for _ in range(trials):
        w = [rng.choice(words) for _ in range(WORDS)]
        a = rng.randrange(max(1, len(prose) - 2 * PROSE))
        before, between = prose[a : a + PROSE], prose[a + PROSE : a + 2 * PROSE]
        ids = ([sink] if sink is not None else []) + before + w + between + w
        first = len(ids) - 2 * len(w) - len(between)
        second = len(ids) - len(w)
        yield ids, torch.arange(second, second + len(w) - 1), torch.arange(first + 1, first + len(w))


def calibrate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trials: int = TRIALS) -> torch.Tensor:
    """Copy scores (layers, query heads): how often each head's top attention lands on the token being copied."""
    cfg = model.config
    hits = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    rows: dict[str, torch.Tensor] = {}
    total = 0

    def observe(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        # query (1, Hq, S, D) and key (1, H, S, D) after RoPE; the causal argmax of the query rows being scored
        g = query.shape[1] // key.shape[1]
        q = query[0, :, rows["q"]].float()  # (Hq, n, D)
        k = key[0].float().repeat_interleave(g, dim=0)  # (Hq, S, D)
        scores = torch.matmul(q, k.transpose(-1, -2))
        visible = torch.arange(k.shape[1], device=q.device)[None, :] <= rows["q"].to(q.device)[:, None]
        top = scores.masked_fill(~visible, float("-inf")).argmax(-1)
        hits[layer] += (top.cpu() == rows["t"]).float().sum(-1)

    device = next(model.parameters()).device
    session = Session(observe=observe)
    for ids, q_rows, t_rows in calibration_sequences(tokenizer, trials):
        rows["q"], rows["t"] = q_rows, t_rows
        with session.active(), torch.inference_mode():
            model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        total += len(q_rows)
    return hits / max(1, total)


def _cache_file(identity: ModelIdentity) -> Path:
    key = hashlib.sha256(
        json.dumps([identity.config_hash, identity.tokenizer_hash, identity.weights_sample, CALIBRATION_VERSION])
        .encode()
    ).hexdigest()[:20]
    return cache_dir() / "heads" / f"{key}.json"


def head_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, identity: ModelIdentity) -> torch.Tensor:
    """The model's copy scores (layers, query heads), from the cache or calibrated now and cached."""
    path = _cache_file(identity)
    try:
        data = json.loads(path.read_text())
        scores = torch.tensor(data["scores"], dtype=torch.float32)
        if tuple(scores.shape) == (model.config.num_hidden_layers, model.config.num_attention_heads):
            return scores
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: calibrate again
    scores = calibrate(model, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{random.randrange(1 << 30)}.tmp")
    tmp.write_text(json.dumps({"model": identity.source, "version": CALIBRATION_VERSION, "scores": scores.tolist()}))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return scores


def retrieval_heads(scores: torch.Tensor, threshold: float | None = None) -> dict[int, torch.Tensor]:
    """Layer -> (query heads,) bool mask of the heads scoring at least `threshold` (default HEAD_THRESHOLD; at
    least the MIN_HEADS best)."""
    threshold = HEAD_THRESHOLD if threshold is None else threshold
    floor = scores.flatten().sort(descending=True).values[min(MIN_HEADS, scores.numel()) - 1]
    chosen = scores >= min(threshold, float(floor))
    return {layer: chosen[layer] for layer in range(scores.shape[0]) if bool(chosen[layer].any())}
