"""What a memory's blocks draw from questions that are not about them: the prior (neutral prompts), by which long
inputs rank blocks, and the relevance calibration (unrelated questions), by which a question reads a block only when
it draws that block far beyond what such questions do (blocks.Relevance). Both are computed once per memory and
setting (engine/reading.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedModel

from extended_mind.base.prompting import EncodedPrompt
from extended_mind.engine.blocks import BlockPlan, Relevance, select_blocks

# Prompts that ask nothing in particular: what the retrieval heads attend to in memory for them is the prior.
NEUTRAL_PROMPTS = ("The", "It is", "Tell me more.\nIt is", "What is it?\nIt is")


def block_shares(
    model: PreTrainedModel, plan: BlockPlan, prompts: list[EncodedPrompt], to_end: bool = False, batch: int = 16
) -> torch.Tensor:
    """(prompts that drew any mass, blocks) the share of the retrieval heads' mass each block gets per prompt, from
    the question's rows (`to_end`: every row from the question on)."""
    plans = [replace(plan, insert=p.memory_at, select_from=p.asks_from, select_to=None if to_end else p.asks_to,
                     prior=None, relevance=None) for p in prompts]  # fmt: skip
    positions = [plan.positions(len(p.ids)) for plan, p in zip(plans, prompts)]
    masses: list[torch.Tensor | None] = []
    for i in range(0, len(prompts), batch):
        masses += select_blocks(model, [p.ids for p in prompts[i : i + batch]], positions[i : i + batch],
                                plans[i : i + batch])  # fmt: skip
    shares = [m / m.sum() for m in masses if m is not None and float(m.sum()) > 0]
    return torch.stack(shares) if shares else torch.zeros(0, plan.layout.num_blocks)


def block_prior(model: PreTrainedModel, plan: BlockPlan, prompts: list[EncodedPrompt]) -> torch.Tensor:
    """(blocks,) the mean share of mass each block gets for `prompts` (questions that ask nothing); ranking is by
    content (rotation undone), so positions do not matter here."""
    shares = block_shares(model, plan, prompts, to_end=True)
    return shares.mean(0) if len(shares) else torch.zeros(plan.layout.num_blocks)


# Questions about nothing in particular, in the styles users send (facts of every kind, chit-chat, requests, code,
# arithmetic): what they draw from a memory calibrates the relevance test. Kept apart from bench/general.py's
# questions, which measure it. The second half (facts asked as "What is the X of Y?", "Who ...?") was added when the
# first half alone left lists that every fact question draws (a state's "State song:" line) looking relevant:
# 27 of 40 general questions read a list block in chat form; with both halves 12 (docs/evaluation.md). Of a pool of
# 48 such questions, either half did as well on the harness's probe; this half keeps the demo's block above the bar.
CALIBRATION_QUESTIONS = (
    "Who wrote Pride and Prejudice?", "How many wheels does a bicycle have?", "Can you give me a recipe for pancakes?",
    "Write a haiku about autumn.", "Translate 'good morning' into Spanish.", "Why do cats purr?", "What is 7 times 8?",
    "Tell me a joke.", "How do I reverse a list in Python?", "Summarize the plot of Cinderella.",
    "What should I eat for dinner tonight?", "Explain how a rainbow forms.", "Hi! How are you today?",
    "Which metal is liquid at room temperature?", "What does DNA stand for?", "Give me three tips for better sleep.",
    "Who composed the Four Seasons?", "How many strings does a violin have?", "What is the plural of mouse?",
    "What is the square root of 81?", "What is the speed of light?", "Suggest a name for a pet goldfish.",
    "How do you say thank you in Japanese?", "What are the primary colors?",
    "What does a thermometer measure?", "Who painted The Starry Night?", "What is the currency of Japan?",
    "Which bird is a symbol of peace?", "What is the main language spoken in Quebec?",
    "Who was the first emperor of Rome?", "What is the freezing point of mercury?", "Which continent is Kenya in?",
    "What is the hardest bone in the body?", "Who discovered gravity?", "What is the largest island in the world?",
    "How many minutes are in an hour?", "What is the opposite of up?", "What do caterpillars turn into?",
    "Which sea is the saltiest?", "What is the boiling point of milk?", "What is the national sport of Canada?",
    "Who composed the Moonlight Sonata?", "What is the speed of sound?", "How many teeth does an adult human have?",
    "What is the symbol for iron?", "Which country gave the Statue of Liberty to the United States?",
    "What is the biggest city in India?", "What fruit is dried to make raisins?",
)  # fmt: skip


# A spread is at least this fraction of the spread of all shares: a block no calibration question drew (the
# passkey sentence, a rare name) must not look relevant on a trace of mass
SPREAD_FLOOR = 0.3


def calibrate_relevance(model: PreTrainedModel, plan: BlockPlan, prompts: list[EncodedPrompt]) -> Relevance:
    """The relevance calibration of `plan`'s memory from `prompts` (CALIBRATION_QUESTIONS in every prompt form)."""
    shares = block_shares(model, plan, prompts)
    if len(shares) < 2:
        ones = torch.ones(plan.layout.num_blocks)
        return Relevance(torch.zeros_like(ones), ones)
    floor = SPREAD_FLOOR * float(shares.std())
    spread = (shares.std(0) ** 2 + floor**2).sqrt().clamp_min(1e-12)
    return Relevance(shares.mean(0), spread)
