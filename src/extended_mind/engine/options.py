"""Generation options: defaults, allowed values and their checks."""

from __future__ import annotations

from extended_mind.base.errors import ExtendedMindError
from extended_mind.engine.blocks import (
    DEFAULT_MIN_RELEVANCE,
)

DEFAULT_TOPK = 10


MAX_TOPK = 1024  # the server's bound too (server/schemas.py uses it)


DEFAULT_RANKING = "logit"


DEFAULT_POSITION_POLICY = "stored"


RETRIEVAL_MODES = ("blocks", "tokens")


DEFAULT_RETRIEVAL = "blocks"


DEFAULT_BLOCKS = 8


DEFAULT_BLOCK_SIZE = 64


DEFAULT_BLOCK_GATE = 0.5


DEFAULT_BLOCK_RELEVANCE = DEFAULT_MIN_RELEVANCE


# How block memory chooses blocks: "heads", the retrieval heads' attention from the question (what to copy);
# "embedding", the blocks whose text is nearest the question's by a sentence embedding model (what is like it: the
# demonstrations of many-shot in-context learning), always the `blocks` nearest, with no relevance test.
BLOCK_CHOICES = ("heads", "embedding")


DEFAULT_BLOCK_CHOICE = "heads"


MEMORY_HEADS = ("retrieval", "all")


# Rows of `logits` input scored per chunk in block mode: each chunk reads the blocks its own rows chose.
DEFAULT_SCORING_CHUNK = 64


DEFAULT_STRIDE = 512


DEFAULT_WINDOW = 2048


DEFAULT_TOPK_STEP = 2


RANKINGS = ("logit", "cosine")


CITATION_WEIGHTINGS = ("attention_value", "attention")


SEARCH_MODES = ("auto", "exact", "approximate")


DEFAULT_SEARCH = "auto"


def check_generation_options(
    topk: object = DEFAULT_TOPK,
    max_new_tokens: object = 1,
    topk_step: object = DEFAULT_TOPK_STEP,
    blocks: object = DEFAULT_BLOCKS,
    block_size: object = DEFAULT_BLOCK_SIZE,
    block_gate: object = DEFAULT_BLOCK_GATE,
    block_relevance: object = DEFAULT_BLOCK_RELEVANCE,
    block_choice: object = DEFAULT_BLOCK_CHOICE,
) -> None:
    """The checks of generation options that need no model (the CLI runs them before loading one)."""
    check_int("topk", topk, 0)
    if topk > MAX_TOPK:  # type: ignore[operator]
        raise ExtendedMindError(
            f"topk must be at most {MAX_TOPK} (memory tokens each head ranks per query token: more only spreads "
            f"the retrieval heads' choice thin and costs memory per query), got {topk}"
        )
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("topk_step", topk_step, 0)
    check_block_options(blocks, block_size, block_gate)
    if isinstance(block_relevance, bool) or not isinstance(block_relevance, (int, float)) or not (
        0 <= block_relevance < float("inf")
    ):
        raise ExtendedMindError(f"block_relevance must be a finite number >= 0, got {block_relevance!r}")
    if block_choice not in BLOCK_CHOICES:
        raise ExtendedMindError(f"unknown block_choice {block_choice!r}; choose one of {BLOCK_CHOICES}")


def check_block_options(blocks: object, block_size: object, gate: object) -> None:
    check_int("blocks", blocks, 0)
    check_int("block_size", block_size, 1)
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1:
        raise ExtendedMindError(f"block_gate must be a number from 0 to 1, got {gate!r}")


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExtendedMindError(f"{name} must be an integer >= {minimum}, got {value!r}")
