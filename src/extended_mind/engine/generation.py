"""Generation of one answer as a stream of tokens, with memory attention, citations per token and
uncertainty-triggered retrieval (a step whose next-token entropy is too high is recomputed with more memories).
Each step is decoding.py's, as in batched generation (batching.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.session import Session
from extended_mind.base.kv_cache import new_cache
from extended_mind.engine.blocks import BlockPlan, select_blocks
from extended_mind.engine.compiled import CompiledStep
from extended_mind.engine.decoding import (
    Answer,
    GeneratedToken,
    GenerationResult,
    Retrieval,
    entropy,
    record_weights,
    row_forward,
    stop_token_ids,
)
from extended_mind.engine.fast_step import FastStep
from extended_mind.engine.layouts import Trial, settle_layout
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.quoting import Quotes
from extended_mind.memory.citations import Passage
from extended_mind.memory.memory import Memory
from extended_mind.parallel.group import ShardGroup
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings


@dataclass
class _Reading:
    """How this stream reads memory: the prompt's positions, the layers read with k memories (k: top-k for token
    retrieval, blocks for block memory), k normally and on an uncertain step."""

    positions: list[int]
    layers_for: Callable[[int], dict[int, LayerMemory]]
    base_k: int
    step_k: int
    blocks: bool  # block memory: k picks the layers (slots); token retrieval: k is the top-k
    group: ShardGroup | None
    blocks_read: int | None = None
    passages: list[Passage] = field(default_factory=list)
    trial: Trial | None = None  # the kept layout's first greedy steps (engine/layouts.py)
    quotes: Quotes | None = None  # what the answer goes on quoting (engine/quoting.py)

    @property
    def uses_memory(self) -> bool:
        return bool(self.layers_for(self.base_k)) and self.base_k > 0


class TokenStream:
    """Iterate for `GeneratedToken`s as they are produced; `.result` holds the full result once exhausted."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        memory: Memory | None,
        layers: dict[int, LayerMemory],
        offset: int,
        settings: GenerationOptions,
        plan: BlockPlan | None = None,
        step: CompiledStep | FastStep | None = None,
    ):
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.step = step  # a one-token forward for the steps it applies to (compiled.py, fast_step.py), or None
        self.prompt_ids, self.layers, self.offset, self.settings = prompt_ids, layers, offset, settings
        self.plan = plan  # block memory: the slots are chosen when the stream starts
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.result: GenerationResult | None = None
        self._iter = self._run()

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> GeneratedToken:
        return next(self._iter)

    def _reading(self) -> _Reading:
        """Block memory: one pass over the prompt without memory chooses the blocks read (none: the plain model,
        with its own prompt and positions). Token retrieval: the prepared layers, from the prompt's offset."""
        s, plan = self.settings, self.plan
        group = getattr(self.memory, "shard", None) if self.layers or plan is not None else None
        if plan is None:
            layers = self.layers
            return _Reading(list(range(self.offset, self.offset + len(self.prompt_ids))), lambda k: layers, s.topk,
                            s.topk_step, False, group)  # fmt: skip
        positions = plan.positions(len(self.prompt_ids))
        mass = None  # blocks chosen by their similarity to the question need no pass
        if plan.needs_pass:
            mass = select_blocks(self.model, [self.prompt_ids], [positions], [plan])[0]
        chosen = plan.choose(mass)
        if not chosen.numel() and plan.unread is not None:  # whole="unread": no block drawn, the memory fits
            self.prompt_ids, plan = plan.unread
            self.plan, positions, chosen = plan, plan.positions(len(self.prompt_ids)), plan.choose(None)
        if not chosen.numel():
            self.prompt_ids = plan.plain(self.prompt_ids)
            return _Reading(list(range(len(self.prompt_ids))), lambda k: {}, 0, 0, True, None, blocks_read=0)
        slot_sets = {plan.blocks: plan.slots(chosen)}
        quotes = Quotes.of(plan, chosen, self.tokenizer, self.stop_ids, s.quote_threshold, s.max_new_tokens)
        settled = settle_layout(self.model, plan, self.prompt_ids, slot_sets[plan.blocks], s, self.stop_ids,
                                self.step, group, quotes)  # fmt: skip
        if settled.plan is not plan:  # the memory read whole was the surer layout, or the blocks read again
            plan, chosen = settled.plan, settled.chosen
            self.plan, slot_sets = plan, {plan.blocks: settled.layers}
        self.prompt_ids, positions = settled.prompt_ids, plan.positions(len(settled.prompt_ids))

        def layers_for(k: int) -> dict[int, LayerMemory]:  # k: blocks read
            if k not in slot_sets:
                slot_sets[k] = plan.slots(plan.choose(mass, k))
            return slot_sets[k]

        return _Reading(positions, layers_for, plan.blocks, s.topk_step, True, group, int(chosen.numel()),
                        plan.layout.passages(plan.memory, chosen), settled.trial, settled.quotes)  # fmt: skip

    def _run(self) -> Iterator[GeneratedToken]:
        s = self.settings
        device = next(self.model.parameters()).device
        reading = self._reading()
        session = Session(settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
                          citation_weighting=s.citation_weighting)  # fmt: skip
        n_heads = self.model.config.num_attention_heads
        answer = Answer(s, self.memory, len(self.prompt_ids), reading.group, reading.blocks_read, reading.passages,
                        reading.quotes)  # fmt: skip
        retry_on = reading.uses_memory and s.uncertainty_threshold is not None and reading.step_k > 0

        def fresh_cache() -> DynamicCache:
            cache = new_cache(self.model.config)
            if s.uncertainty_threshold is not None and hasattr(cache, "activate_past_recording"):
                cache.activate_past_recording()  # sliding-window layers can only be cropped when recording
            return cache

        def forward(ids: list[int], pos: list[int], k: int, cache: DynamicCache):
            session.layers = reading.layers_for(k)
            session.record_citations = bool(session.layers)
            session.settings = RetrievalSettings(s.topk if reading.blocks else k, s.ranking, s.similarity_threshold)
            session.citation_records = []
            with session.active(), torch.inference_mode():
                logits = row_forward(self.model, self.step, session, cache, ids, pos, device)
            return logits, record_weights(session.citation_records, n_heads)

        stop_ids = self.stop_ids
        last_input, last_positions = self.prompt_ids, reading.positions
        # a greedy answer's first steps are the layout trial's: go on from its cache (no retry can change them)
        trial = reading.trial if s.temperature <= 0 and not retry_on else None
        if trial is not None:
            cache, (logits, read) = trial.cache, (trial.logits[0], trial.reads[0])
        else:
            cache = fresh_cache()
            logits, read = forward(last_input, last_positions, reading.base_k, cache)
        position = last_positions[-1] + 1
        for step in range(s.max_new_tokens):
            k, h = reading.base_k, entropy(logits)
            retry = retry_on and h > s.uncertainty_threshold
            if reading.group is not None and s.uncertainty_threshold is not None:
                retry = bool(reading.group.agree([int(retry)], "agreeing on uncertainty retrieval")[0])
            if retry:
                k = reading.base_k + reading.step_k
                if step == 0:
                    cache = fresh_cache()
                else:
                    cache.crop(-1)
                logits, read = forward(last_input, last_positions, k, cache)
                answer.retrievals.append(Retrieval(step, h, reading.base_k, k, entropy(logits)))
                h = answer.retrievals[-1].new_entropy
            token = answer.add(answer.choose(logits), logits, read, self.tokenizer, stop_ids, h, k)
            if token is not None:
                yield token
            if answer.done:
                break
            last_input, last_positions = [token.id], [position]
            if trial is not None and step + 1 < len(trial.tokens):  # the trial fed this token already
                logits, read = trial.logits[step + 1], trial.reads[step + 1]
            else:
                logits, read = forward(last_input, last_positions, reading.base_k, cache)
            position += 1
        self.result = answer.result()
