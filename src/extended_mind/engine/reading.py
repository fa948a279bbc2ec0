"""How a prompt reads a memory: the memory layers prepared for attention, and for block memory the plan of which
blocks are read (chosen by the retrieval heads, or by a sentence embedding) and where their slots go."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.base.errors import ExtendedMindError, PromptTooLongError
from extended_mind.base.prompting import EncodedPrompt, encode, paragraph_break, with_tokens_at
from extended_mind.engine import prepared as prepared_store
from extended_mind.engine.block_layout import BlockLayout
from extended_mind.engine.blocks import BlockPlan, Relevance, select_blocks, slot_positions
from extended_mind.engine.calibration import (
    CALIBRATION_QUESTIONS,
    NEUTRAL_PROMPTS,
    block_prior,
    calibrate_relevance,
)
from extended_mind.engine.heads import retrieval_heads
from extended_mind.engine.layouts import resolve_breaks
from extended_mind.engine.memorize import sink_token_id
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.positions import prepare_layers, prompt_offset
from extended_mind.engine.words import asks_about, content_words, sentence_words
from extended_mind.memory.memory import Memory
from extended_mind.retrieval.embedding import TextEmbedder, text_vectors
from extended_mind.retrieval.index import IndexSettings
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

log = logging.getLogger(__name__)


class MemoryReader:
    """Prepares memories for one model: `head_scores` and `embedder` are called when first needed (calibrating the
    retrieval heads, loading the embedding model)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 head_scores: Callable[[], torch.Tensor], embedder: Callable[[], TextEmbedder]):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.head_scores, self.embedder = head_scores, embedder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layers(self, memory_layers: tuple[int, ...] | None) -> None:
        n_layers = self.model.config.num_hidden_layers
        bad = [x for x in memory_layers or () if not isinstance(x, int) or not 0 <= x < n_layers]
        if bad:
            raise ExtendedMindError(f"memory_layers {bad} out of range: the model has layers 0..{n_layers - 1}")

    def prepare(self, memory: Memory, o: GenerationOptions) -> tuple[int, dict[int, LayerMemory]]:
        """(first prompt position, memory layers prepared for attention). Block memory prepares the layers of the
        retrieval heads with unrotated keys (the "zero" policy: slots are rotated when chosen)."""
        # block memory's "auto" stays exact: its selection scans a few layers (8 of 30 on SmolLM2), measured within
        # 2x of no memory at a million tokens, while an index covers every layer (docs/measurements.md)
        approximate = o.search == "approximate" or (
            o.search == "auto" and o.retrieval != "blocks" and memory.num_tokens >= o.approx_threshold
        )
        settings = (o.index or IndexSettings()) if approximate and o.topk > 0 and memory.num_tokens else None
        layers = None if o.memory_layers is None else list(o.memory_layers)
        if o.retrieval == "blocks":  # keys of the layers whose heads choose blocks; slots are read from the memory
            selecting = None if o.memory_heads == "all" else sorted(retrieval_heads(self.head_scores()))
            return 0, prepare_layers(memory, "zero", self.device, self.model.dtype, selecting, settings,
                                     values=False)  # fmt: skip
        prepared = prepare_layers(memory, o.position_policy, self.device, self.model.dtype, layers, settings)
        if o.memory_heads == "retrieval":  # only the retrieval heads read memory; layers without any, none
            heads = retrieval_heads(self.head_scores())
            prepared = {i: replace(m, heads=heads[i]) for i, m in prepared.items() if i in heads}
        return prompt_offset(memory, o.position_policy), prepared

    def plan(self, memory: Memory, layers: dict[int, LayerMemory], insert: int, o: GenerationOptions,
             blocks: int, extra_blocks: int = 0, min_relevance: float | None = None,
             whole: bool = False) -> BlockPlan:  # fmt: skip
        """The block plan for a question (`min_relevance` given: blocks are read only when relevant, see
        `Relevance`), or for scoring a long input (None: every chunk reads the blocks most above the prior); with
        `whole`, every one of `blocks` blocks is read, with nothing to rank."""
        n_layers = self.model.config.num_hidden_layers
        if o.memory_heads == "all":
            heads = {i: torch.ones(self.model.config.num_attention_heads, dtype=torch.bool) for i in range(n_layers)}
        else:
            heads = retrieval_heads(self.head_scores())
        plan = BlockPlan(
            memory=memory,
            layers=layers,
            read_layers=list(range(n_layers)) if o.memory_layers is None else list(o.memory_layers),
            device=self.device,
            dtype=self.model.dtype,
            heads=heads,
            layout=BlockLayout.of(memory, o.block_size),
            blocks=blocks,
            gate=o.block_gate,
            settings=RetrievalSettings(o.topk, o.ranking, o.similarity_threshold),
            insert=insert,
            reserve=slot_positions(blocks + extra_blocks, o.block_size),
        )
        # the blocks' token ids: read again after the question, and quoted (a sharded memory too: every rank holds
        # every document's text)
        plan.token_ids = lambda chosen: plan.layout.token_ids(memory, self.tokenizer, chosen)
        # the calibrations are the memory's own (not the prompt's): computed once per memory and setting, kept with it
        setting = f"{o.block_size}-{o.topk}-{o.ranking}-{o.similarity_threshold}-{o.memory_heads}"
        if (whole or min_relevance is not None) and plan.layout.num_blocks <= blocks and not extra_blocks:
            plan.reserve = int(plan.layout.lengths.sum())  # a question's memory that fits the slots: its own length
        if whole:  # every block read: nothing to rank
            return plan
        if min_relevance is None:
            plan.prior = memory.cached(f"prior-{setting}",
                                       lambda: block_prior(self.model, plan, self._neutral_prompts()))  # fmt: skip
        else:
            plan.min_relevance = min_relevance
            plan.relevance = memory.cached(f"relevance-{setting}", lambda: self._relevance(plan, setting))
        return plan

    def question_plan(self, memory: Memory, layers: dict[int, LayerMemory], prompt: EncodedPrompt,
                      o: GenerationOptions, window: int) -> tuple[EncodedPrompt, BlockPlan]:  # fmt: skip
        """The prompt (with a sink token before the slots where it needs one) and the blocks it may read: as many as
        the window leaves room for after the prompt and the answer."""
        encoded = self.with_sink(prompt)
        sink_added = len(encoded.ids) > len(prompt.ids)
        extra = _retry_blocks(o)
        # the memory read whole when it fits the window: whole="fits" always, else a fallback ("unread") and a
        # layout "surer" tries
        whole = None
        if o.whole != "never" and not extra and o.block_choice == "heads":
            whole = self._read_whole(memory, layers, encoded, o, window, sink_added)
            if whole is not None and o.whole == "fits":
                return whole
        ids = encoded.ids
        breaks = resolve_breaks(o, retrying=bool(extra))

        def room_after(again: int) -> int:  # blocks that fit after the prompt, `again` tokens more, and the answer
            return (window - len(ids) - again - o.max_new_tokens) // o.block_size - extra

        again = 0  # block_break="question" asks the question again, after two blank lines: room for them too
        if breaks == "question":
            again = (encoded.asks_to or len(ids)) - encoded.asks_from + 2 * len(paragraph_break(self.tokenizer))
        room = room_after(again)
        if room < 1 and again and o.block_break == "auto":  # no room to ask a long question twice: "surer"
            breaks, again, room = "surer", 0, room_after(0)
        if room < 1 and len(ids) <= window:
            asked = f", +{again} to ask it again after the blocks" if again else ""
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens{asked}) + max_new_tokens ({o.max_new_tokens}) leave no room for a memory "
                f"block of {o.block_size} tokens (+{extra} for uncertainty retrieval) in the model's window of "
                f"{window} tokens; shorten the prompt, lower max_new_tokens or block_size"
            )
        plan = self.plan(memory, layers, encoded.memory_at, o, min(o.blocks, room), extra, o.block_relevance)
        plan.select_from, plan.select_to = encoded.asks_from, encoded.asks_to
        plan.sink_added = sink_added
        plan.breaks = breaks
        if plan.breaks != "never":
            plan.separator = tuple(paragraph_break(self.tokenizer))
        if plan.breaks == "question":
            if extra:
                raise ExtendedMindError(
                    "block_break='question' reads the chosen blocks' text again after the "
                    "question: not with uncertainty_threshold"
                )
        question = self.tokenizer.decode(ids[encoded.asks_from : encoded.asks_to], skip_special_tokens=True)
        words = content_words(question)
        if whole is not None:
            plan.read_whole = (whole[0].ids, whole[1])
            plan.asks_memory = asks_about(words, _memory_sentences(memory))
        if o.block_choice == "embedding":
            plan.similarity = self.block_similarity(memory, plan.layout, question)
        else:
            plan.outlier = o.block_outlier
            if o.block_words > 0:
                plan.question_words, plan.words_override = words, o.block_words
        return encoded, plan

    def _read_whole(self, memory: Memory, layers: dict[int, LayerMemory], encoded: EncodedPrompt,
                    o: GenerationOptions, window: int,
                    sink_added: bool) -> tuple[EncodedPrompt, BlockPlan] | None:  # fmt: skip
        """The prompt and plan that read `memory` whole, as its text pasted before the question with a blank line
        after it (cut as the tokenizer cuts one inside a text); None when it does not fit the window."""
        separator, total = paragraph_break(self.tokenizer), BlockLayout.of(memory, o.block_size).num_blocks
        if total > (window - len(encoded.ids) - len(separator) - o.max_new_tokens) // o.block_size:
            return None
        at = encoded.memory_at
        encoded = with_tokens_at(encoded, at, separator)
        plan = self.plan(memory, layers, at, o, total, whole=True)
        plan.select_from, plan.select_to = encoded.asks_from, encoded.asks_to
        plan.sink_added, plan.whole = sink_added, (at, len(separator))
        return encoded, plan

    def block_similarity(self, memory: Memory, layout: BlockLayout, question: str) -> torch.Tensor:
        """(blocks,) cosine similarity of every block's text to `question`; the blocks' vectors are computed once
        per memory, block size and embedding model, and kept with the memory."""
        embedder = self.embedder()
        vectors = memory.cached(f"embeddings-{layout.size}-{id(embedder)}",
                                lambda: text_vectors(embedder, layout.texts(memory)))  # fmt: skip
        return vectors @ text_vectors(embedder, [question])[0]

    def _relevance(self, plan: BlockPlan, setting: str) -> Relevance:
        """The memory's relevance calibration: the one it holds (saved with it), else the one kept in the cache
        directory for a large saved memory (engine/prepared.py), else computed now and held by the memory (a save
        writes it)."""
        prompts = self._calibration_prompts()
        memory = plan.memory
        if memory.shard is not None:  # each rank holds part of the documents: nothing to key it by here
            return calibrate_relevance(self.model, plan, prompts)
        key = prepared_store.relevance_key(memory, setting, [p.ids for p in prompts])
        held = memory.calibrations.get(key)
        if held is not None:
            try:
                return prepared_store.relevance_from_dict(held, plan.layout.num_blocks)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("the memory's saved calibration is unusable (%s): calibrating again", exc)
        keep = prepared_store.keepable(memory)
        relevance = prepared_store.load_relevance(key, plan.layout.num_blocks) if keep else None
        if relevance is None:
            relevance = calibrate_relevance(self.model, plan, prompts)
            if keep:
                prepared_store.store_relevance(key, relevance)
        memory.calibrations.pop(key, None)  # the latest last: a save keeps the latest few
        memory.calibrations[key] = prepared_store.relevance_to_dict(relevance)
        return relevance

    def _neutral_prompts(self) -> list[EncodedPrompt]:
        return [self.with_sink(encode(self.tokenizer, p, False, "", "question")) for p in NEUTRAL_PROMPTS]

    def _calibration_prompts(self) -> list[EncodedPrompt]:
        """CALIBRATION_QUESTIONS as users send them: in the chat template (when the model has one), bare, and as
        "Question: ...\nAnswer:"."""
        out = []
        for q in CALIBRATION_QUESTIONS:
            if getattr(self.tokenizer, "chat_template", None):
                out.append(encode(self.tokenizer, q, True, "", "question"))
            for text in (q, f"Question: {q}\nAnswer:"):
                out.append(self.with_sink(encode(self.tokenizer, text, False, "", "question")))
        return out

    def with_sink(self, prompt: EncodedPrompt) -> EncodedPrompt:
        """Block memory needs a token before its slots that holds the attention sink: a prompt whose memory would
        come first gets the one memorization starts documents with (BOS, else EOS)."""
        if prompt.memory_at > 0:
            return prompt
        sink = sink_token_id(self.tokenizer)
        if sink is None:
            first = min(1, len(prompt.ids))
            asks_to = None if prompt.asks_to is None else max(first + 1, prompt.asks_to)
            return replace(prompt, memory_at=first, asks_from=first, asks_to=asks_to)
        asks_to = None if prompt.asks_to is None else prompt.asks_to + 1
        return EncodedPrompt([sink, *prompt.ids], 1, prompt.asks_from + 1, asks_to)

    def block_logits(self, input_ids: torch.Tensor, plan: BlockPlan, chunk: int) -> torch.Tensor:
        """`ExtendedMind.logits` with block memory: a pass without memory chooses blocks per chunk of rows, then the
        head and every chunk go through the model in turn (a KV cache carries the text), each chunk reading its
        blocks."""
        b, n = input_ids.shape
        positions = torch.tensor(plan.positions(n), device=self.device)[None].expand(b, n)
        group = torch.full((n,), -1, dtype=torch.long)
        group[plan.insert :] = torch.arange(n - plan.insert) // chunk
        rows = [r.tolist() for r in input_ids]
        masses = select_blocks(self.model, rows, [positions[0].tolist()] * b, [plan] * b, [group] * b)
        cache = DynamicCache(config=self.model.config)
        session = Session(settings=plan.settings, rows=[{} for _ in range(b)], row_citations=[[] for _ in range(b)])
        out = []
        starts = [0, *range(plan.insert, n, chunk)]
        for c, start in enumerate(starts):
            end = plan.insert if c == 0 else min(start + chunk, n)
            if c > 0:
                session.rows = [plan.slots(plan.choose(m[c - 1])) for m in masses]
            session.row_positions = positions[:, start:end]
            with session.active(), torch.inference_mode():
                step = self.model(input_ids=input_ids[:, start:end], position_ids=positions[:, start:end],
                                  use_cache=True, **with_cache(self.model, cache))  # fmt: skip
            out.append(step.logits)
        return torch.cat(out, dim=1)

    def positions_taken(self, memory: Memory | None, o: GenerationOptions) -> int:
        """Positions a memory takes in front of (or inside) a prompt: the slots kept for block memory, or the
        prompt offset of the token retrieval's position policy."""
        if memory is None or memory.num_tokens == 0 or o.topk == 0:
            return 0
        if o.retrieval == "blocks":
            return slot_positions(o.blocks + _retry_blocks(o), o.block_size)
        return prompt_offset(memory, o.position_policy)


def _memory_sentences(memory: Memory) -> list[frozenset[str]]:
    """The content words of every sentence of `memory`'s documents (engine/words.py), computed once per memory."""
    return memory.cached("sentence-words", lambda: [w for d in memory.documents for w in sentence_words(d.text)])


def _retry_blocks(o: GenerationOptions) -> int:
    """Blocks kept in reserve for a step that uncertainty-triggered retrieval recomputes with more of them."""
    return o.topk_step if o.uncertainty_threshold is not None else 0
