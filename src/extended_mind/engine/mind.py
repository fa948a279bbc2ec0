"""`ExtendedMind`: a model with memory attention, and the user-facing API around it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.patching import patch_model
from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.base.documents import Document, load_documents
from extended_mind.base.errors import ExtendedMindError, PromptTooLongError
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.loading import load_model
from extended_mind.base.prompting import DEFAULT_MEMORY_AT, MEMORY_AT, EncodedPrompt, encode, leading_special
from extended_mind.engine.batching import BatchRow, generate_batch
from extended_mind.engine.blocks import (
    CALIBRATION_QUESTIONS,
    NEUTRAL_PROMPTS,
    BlockLayout,
    BlockPlan,
    block_prior,
    calibrate_relevance,
    select_blocks,
    slot_positions,
)
from extended_mind.engine.generation import DecodeSettings, GenerationResult, TokenStream
from extended_mind.engine.heads import head_scores, retrieval_heads
from extended_mind.engine.memorize import encode_documents, memorize_encoded, memorize_sharded, sink_token_id
from extended_mind.engine.options import (
    CITATION_WEIGHTINGS,
    DEFAULT_BLOCK_CHOICE,
    DEFAULT_BLOCK_GATE,
    DEFAULT_BLOCK_RELEVANCE,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BLOCKS,
    DEFAULT_POSITION_POLICY,
    DEFAULT_RANKING,
    DEFAULT_RETRIEVAL,
    DEFAULT_SCORING_CHUNK,
    DEFAULT_SEARCH,
    DEFAULT_TOPK,
    DEFAULT_TOPK_STEP,
    DEFAULT_WINDOW,
    MEMORY_HEADS,
    RANKINGS,
    RETRIEVAL_MODES,
    SEARCH_MODES,
    check_block_options,
    check_generation_options,
    check_int,
)
from extended_mind.engine.positions import POSITION_POLICIES, prepare_layers, prompt_offset
from extended_mind.memory.memory import Memory
from extended_mind.memory.sharded import rank_loads, shard_memory
from extended_mind.parallel.group import ShardGroup, active_group
from extended_mind.retrieval.embedding import Embedder, TextEmbedder, text_vectors
from extended_mind.retrieval.index import DEFAULT_APPROX_THRESHOLD, IndexSettings
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

MemoryLike = Memory | str | Path  # a Memory, or the directory of a saved one


class ExtendedMind:
    """A causal LM whose attention layers can read from a memory of documents far larger than its window."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        source: str = "custom",
        shards: bool | None = None,
    ):
        """`shards`: shard memories over the initialised torch.distributed process group (parallel/group.py): None
        (default) when one of more than one rank is initialised, True to require it, False never."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.identity = ModelIdentity.of(model, tokenizer, source)
        self._head_scores: torch.Tensor | None = None
        self._embedder: TextEmbedder | None = None
        if shards not in (None, True, False):
            raise ExtendedMindError(f"shards must be None, True or False, got {shards!r}")
        self.shards = shards
        if shards is True and self.shard_group is None:
            raise ExtendedMindError(
                "shards=True needs an initialised torch.distributed process group of more than one rank (start "
                "the program with torchrun --nproc-per-node N, or call torch.distributed.init_process_group)"
            )
        patch_model(model)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        shards: bool | None = None,
    ) -> ExtendedMind:
        """Load `model` (None: the embedded SmolLM2-135M-Instruct; or a local model directory or hub id)."""
        return cls(*load_model(model, device=device, dtype=dtype), shards=shards)

    @property
    def shard_group(self) -> ShardGroup | None:
        """The ranks memories are sharded over, or None (one process holds every memory)."""
        return None if self.shards is False else active_group()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_window(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "max_seq_len", 2048))

    @property
    def head_scores(self) -> torch.Tensor:
        """Copy scores (layers, query heads) of the model's attention heads (engine/heads.py), calibrated once per model
        and cached on disk."""
        if self._head_scores is None:
            self._head_scores = head_scores(self.model, self.tokenizer, self.identity)
        return self._head_scores

    # ---- memory ----

    def memorize(
        self,
        documents: str | Path | Document | list[str | Path | Document],
        ids: list[str] | None = None,
        stride: int | None = None,
        window: int | None = None,
        progress: bool | None = None,
        storage: str | None = None,
        taken: set[str] | frozenset = frozenset(),
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Memory:
        """Run documents (texts or text-file paths) through the model once and keep every token's keys/values.

        Each token is memorized with up to `window` tokens of context (default: 2048, or half the model's context
        window if that is smaller), taking `stride` new tokens at a time (default: window / 4). Keys and values are
        kept in `storage` precision: float32, bfloat16, float16 or int8 (default: the model's dtype). A progress bar
        shows for inputs longer than two windows unless `progress` says otherwise. Ids default to file names, else
        doc0, doc1, ...; `taken` lists ids that must not be used (those already in a memory). `on_progress(done, total)`
        receives token counts as memorization proceeds."""
        docs = load_documents(documents, ids, taken)
        window = window if window is not None else min(DEFAULT_WINDOW, self.context_window // 2)
        stride = stride if stride is not None else max(1, window // 4)
        if window > self.context_window:
            raise ExtendedMindError(f"window {window} exceeds the model's context window {self.context_window}")
        return self._memorize_documents(docs, stride, window, storage, progress, on_progress)

    def _memorize_documents(
        self,
        docs: list[Document],
        stride: int,
        window: int,
        storage: str | None,
        progress: bool | None,
        on_progress: Callable[[int, int], None] | None,
        loads: list[int] | None = None,
        owners: list[int] | None = None,
    ) -> Memory:
        """Memorize loaded documents. Under a process group the memory is sharded and each document memorized only
        by the rank that will hold it: the least loaded (`loads`: tokens per rank so far), or `owners`."""

        def memorize_here(picked: list[Document]) -> Memory:
            return memorize_encoded(self.model, picked, encode_documents(self.tokenizer, picked), stride=stride,
                                    window=window, identity=self.identity, storage=storage, progress=progress,
                                    on_progress=on_progress)  # fmt: skip

        group = self.shard_group
        if group is None:
            return memorize_here(docs)
        segments, rope = memorize_sharded(group, docs, memorize_here, loads or [0] * group.world, owners)
        memory = Memory(self.identity, segments, rope, stride, window, segments[0].storage)
        memory.shard = group
        return memory

    def add(
        self,
        memory: Memory,
        documents: str | Path | Document | list[str | Path | Document],
        ids: list[str] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Memory:
        """Memorize `documents` with the settings `memory` was built with (stride, window, storage) and append them
        to it: an online knowledge update, no retraining. Ids must be new; default ids skip the ones in use.
        Returns `memory`."""
        memory.check_model(self.identity)
        self._shard(memory)
        docs = load_documents(documents, ids, {d.id for d in memory.documents})
        loads = rank_loads(memory, memory.shard.world) if memory.shard is not None else None
        new = self._memorize_documents(docs, memory.stride, memory.window, memory.storage, None, on_progress, loads)
        return memory.add(new)

    def replace(self, memory: Memory, doc_id: str, document: str | Path | Document) -> Memory:
        """Memorize a new version of document `doc_id` and put it in its place in `memory`. Returns `memory`."""
        memory.check_model(self.identity)
        i = memory.index_of(doc_id)  # an unknown id fails here, before memorizing, naming the documents there are
        self._shard(memory)
        owner = [memory.segments[i].rank] if memory.shard is not None else None  # its rank memorizes the new text
        docs = load_documents(document, [doc_id])
        new = self._memorize_documents(docs, memory.stride, memory.window, memory.storage, None, None, owners=owner)
        return memory.replace(doc_id, new)

    def load_memory(self, path: str | Path) -> Memory:
        """Open a saved memory for this model (refused when another model or tokenizer built it). Under a process
        group, it is opened sharded: this rank reads only its documents' tensor files."""
        memory = Memory.load(path)
        memory.check_model(self.identity)
        return self._shard(memory)

    def _shard(self, memory: Memory) -> Memory:
        group = self.shard_group
        return shard_memory(memory, group) if group is not None else memory

    def build_index(
        self,
        memory: Memory,
        position_policy: str = DEFAULT_POSITION_POLICY,
        index: IndexSettings | None = None,
        only_above_threshold: bool = False,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        retrieval: str = DEFAULT_RETRIEVAL,
    ) -> Memory:
        """Build the approximate-search indexes of `memory` now (for `retrieval`; token retrieval's for
        `position_policy`), so that the first question does not wait for them and `memory.save()` stores them.
        With `only_above_threshold`, only when `search="auto"` would use them (token retrieval over a memory of
        `approx_threshold` tokens or more; block memory's auto search is exact). Returns the memory."""
        if not only_above_threshold or (retrieval != "blocks" and memory.num_tokens >= approx_threshold):
            self._retrieval(memory, DEFAULT_TOPK, DEFAULT_RANKING, position_policy, None, "approximate", 0, index,
                            retrieval=retrieval)  # fmt: skip
        return memory

    def as_memory(self, memory: MemoryLike | list[MemoryLike] | None) -> Memory | None:
        if memory is None:
            return None
        items = [memory] if isinstance(memory, (Memory, str, Path)) else list(memory)
        memories = [self.load_memory(m) if isinstance(m, (str, Path)) else m for m in items]
        if not memories:
            return None
        for m in memories:
            if not isinstance(m, Memory):
                raise ExtendedMindError(
                    f"memory must be a Memory (from memorize or load_memory), got {type(m).__name__}"
                )
            m.check_model(self.identity)
            self._shard(m)
        return Memory.merge(memories)

    def _retrieval(
        self,
        memory: MemoryLike | list[MemoryLike] | None,
        topk: int,
        ranking: str,
        position_policy: str,
        memory_layers: list[int] | None,
        search: str = DEFAULT_SEARCH,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        index: IndexSettings | None = None,
        retrieval: str = "tokens",
        memory_heads: str | None = None,
    ) -> tuple[Memory | None, int, dict[int, LayerMemory]]:
        """Validate the retrieval options; return (memory, first prompt position, prepared memory layers). Block
        memory prepares every layer with unrotated keys (the "zero" policy: slots are rotated when chosen)."""
        if retrieval not in RETRIEVAL_MODES:
            raise ExtendedMindError(f"unknown retrieval {retrieval!r}; choose one of {RETRIEVAL_MODES}")
        if memory_heads is not None and memory_heads not in MEMORY_HEADS:
            raise ExtendedMindError(f"unknown memory_heads {memory_heads!r}; choose one of {MEMORY_HEADS}")
        if search not in SEARCH_MODES:
            raise ExtendedMindError(f"unknown search {search!r}; choose one of {SEARCH_MODES}")
        check_int("approx_threshold", approx_threshold, 0)
        if index is not None and not isinstance(index, IndexSettings):
            raise ExtendedMindError(f"index must be an IndexSettings, got {type(index).__name__}")
        check_int("topk", topk, 0)
        if ranking not in RANKINGS:
            raise ExtendedMindError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
        if position_policy not in POSITION_POLICIES:
            raise ExtendedMindError(f"unknown position policy {position_policy!r}; choose one of {POSITION_POLICIES}")
        n_layers = self.model.config.num_hidden_layers
        if memory_layers is not None:
            bad = [x for x in memory_layers if not isinstance(x, int) or not 0 <= x < n_layers]
            if bad:
                raise ExtendedMindError(f"memory_layers {bad} out of range: the model has layers 0..{n_layers - 1}")
        mem = self.as_memory(memory)
        if mem is None:
            return None, 0, {}
        # block memory's "auto" stays exact: its selection scans a few layers (8 of 30 on SmolLM2), measured within
        # 2x of no memory at a million tokens, while an index covers every layer (docs/measurements.md)
        approximate = search == "approximate" or (
            search == "auto" and retrieval != "blocks" and mem.num_tokens >= approx_threshold
        )
        settings = (index or IndexSettings()) if approximate and topk > 0 and mem.num_tokens else None
        if retrieval == "blocks":  # keys of the layers whose heads choose blocks; slots are read from the memory
            selecting = None if memory_heads == "all" else sorted(retrieval_heads(self.head_scores))
            return mem, 0, prepare_layers(mem, "zero", self.device, self.model.dtype, selecting, settings,
                                          values=False)  # fmt: skip
        layers = prepare_layers(mem, position_policy, self.device, self.model.dtype, memory_layers, settings)
        if memory_heads == "retrieval":  # only the retrieval heads read memory; layers without any, none
            heads = retrieval_heads(self.head_scores)
            layers = {i: replace(m, heads=heads[i]) for i, m in layers.items() if i in heads}
        return mem, prompt_offset(mem, position_policy), layers

    def memory_positions(self, memory: Memory | None, **options) -> int:
        """Positions a memory takes in front of (or inside) a prompt under generation `options`: the slots kept
        for block memory, or the prompt offset of the token retrieval's position policy."""
        if memory is None or memory.num_tokens == 0 or options.get("topk", DEFAULT_TOPK) == 0:
            return 0
        if options.get("retrieval", DEFAULT_RETRIEVAL) == "blocks":
            blocks = options.get("blocks", DEFAULT_BLOCKS)
            if options.get("uncertainty_threshold") is not None:
                blocks += options.get("topk_step", DEFAULT_TOPK_STEP)
            return slot_positions(blocks, options.get("block_size", DEFAULT_BLOCK_SIZE))
        return prompt_offset(memory, options.get("position_policy", DEFAULT_POSITION_POLICY))

    def _block_plan(
        self,
        memory: Memory,
        layers: dict[int, LayerMemory],
        insert: int,
        topk: int,
        ranking: str,
        similarity_threshold: float | None,
        memory_layers: list[int] | None,
        blocks: int,
        block_size: int,
        block_gate: float,
        memory_heads: str | None,
        extra_blocks: int = 0,
        min_relevance: float | None = None,
    ) -> BlockPlan:
        """The block plan for a question (`min_relevance` given: blocks are read only when relevant, see
        `Relevance`), or for scoring a long input (None: every chunk reads the blocks most above the prior)."""
        n_layers = self.model.config.num_hidden_layers
        if memory_heads == "all":
            heads = {i: torch.ones(self.model.config.num_attention_heads, dtype=torch.bool) for i in range(n_layers)}
        else:
            heads = retrieval_heads(self.head_scores)
        plan = BlockPlan(
            memory=memory,
            layers=layers,
            read_layers=list(range(n_layers)) if memory_layers is None else list(memory_layers),
            device=self.device,
            dtype=self.model.dtype,
            heads=heads,
            layout=BlockLayout.of(memory, block_size),
            blocks=blocks,
            gate=block_gate,
            settings=RetrievalSettings(topk, ranking, similarity_threshold),
            insert=insert,
            reserve=slot_positions(blocks + extra_blocks, block_size),
        )
        # the calibrations are the memory's own (not the prompt's): computed once per memory and setting, kept with it
        setting = f"{block_size}-{topk}-{ranking}-{similarity_threshold}-{memory_heads}"
        if min_relevance is None:
            plan.prior = memory.cached(
                f"prior-{setting}", lambda: block_prior(self.model, plan, self._neutral_prompts())
            )
        else:
            plan.min_relevance = min_relevance
            if plan.layout.num_blocks <= blocks and not extra_blocks:  # fits the slots: only its own length
                plan.reserve = int(plan.layout.lengths.sum())
            plan.relevance = memory.cached(
                f"relevance-{setting}", lambda: calibrate_relevance(self.model, plan, self._calibration_prompts())
            )
        return plan

    @property
    def embedder(self) -> TextEmbedder:
        """The sentence embedding model of `block_choice="embedding"` (all-MiniLM-L6-v2, loaded on first use; set
        another object with the same `embed` to use your own)."""
        if self._embedder is None:
            self._embedder = Embedder(device=self.device)
        return self._embedder

    @embedder.setter
    def embedder(self, embedder: TextEmbedder) -> None:
        self._embedder = embedder

    def _block_similarity(self, memory: Memory, layout: BlockLayout, question: str) -> torch.Tensor:
        """(blocks,) cosine similarity of every block's text to `question`; the blocks' vectors are computed once
        per memory, block size and embedding model, and kept with the memory."""
        embedder = self.embedder
        vectors = memory.cached(f"embeddings-{layout.size}-{id(embedder)}",
                              lambda: text_vectors(embedder, layout.texts(memory)))  # fmt: skip
        return vectors @ text_vectors(embedder, [question])[0]

    # ---- generation ----

    def encode_prompt(self, prompt: str | list[int], chat: bool = True, answer_prefix: str = "") -> list[int]:
        """Token ids of `prompt`, in the chat template when `chat`, followed by `answer_prefix` (the start of the
        answer, which small models need to answer in the document's own words). A list of ints is taken as
        already tokenized and used as it is."""
        return encode(self.tokenizer, prompt, chat, answer_prefix, DEFAULT_MEMORY_AT).ids

    def _neutral_prompts(self) -> list[EncodedPrompt]:
        return [self._with_sink(encode(self.tokenizer, p, False, "", "question")) for p in NEUTRAL_PROMPTS]

    def _calibration_prompts(self) -> list[EncodedPrompt]:
        """CALIBRATION_QUESTIONS as users send them: in the chat template (when the model has one), bare, and as
        "Question: ...\nAnswer:"."""
        out = []
        for q in CALIBRATION_QUESTIONS:
            if getattr(self.tokenizer, "chat_template", None):
                out.append(encode(self.tokenizer, q, True, "", "question"))
            for text in (q, f"Question: {q}\nAnswer:"):
                out.append(self._with_sink(encode(self.tokenizer, text, False, "", "question")))
        return out

    def _with_sink(self, prompt: EncodedPrompt) -> EncodedPrompt:
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

    def stream(
        self,
        prompt: str | list[int] | EncodedPrompt,
        memory: MemoryLike | list[MemoryLike] | None = None,
        topk: int = DEFAULT_TOPK,
        max_new_tokens: int = 128,
        chat: bool = True,
        answer_prefix: str = "",
        ranking: str = DEFAULT_RANKING,
        similarity_threshold: float | None = None,
        position_policy: str = DEFAULT_POSITION_POLICY,
        memory_layers: list[int] | None = None,
        uncertainty_threshold: float | None = None,
        topk_step: int = DEFAULT_TOPK_STEP,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        citation_weighting: str = "attention_value",
        search: str = DEFAULT_SEARCH,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        index: IndexSettings | None = None,
        retrieval: str = DEFAULT_RETRIEVAL,
        blocks: int = DEFAULT_BLOCKS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        block_gate: float = DEFAULT_BLOCK_GATE,
        block_relevance: float = DEFAULT_BLOCK_RELEVANCE,
        block_choice: str = DEFAULT_BLOCK_CHOICE,
        memory_heads: str | None = None,
        memory_at: str = DEFAULT_MEMORY_AT,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int = 0,
    ) -> TokenStream:
        """Like `generate`, but returns an iterator of tokens as they are produced (`.result` once exhausted)."""
        check_generation_options(topk=topk, max_new_tokens=max_new_tokens, topk_step=topk_step, blocks=blocks,
                                 block_size=block_size, block_gate=block_gate, block_relevance=block_relevance,
                                 block_choice=block_choice)  # fmt: skip
        if citation_weighting not in CITATION_WEIGHTINGS:
            raise ExtendedMindError(
                f"unknown citation weighting {citation_weighting!r}; choose one of {CITATION_WEIGHTINGS}"
            )
        if temperature < 0:
            raise ExtendedMindError(f"temperature must be >= 0, got {temperature}")
        bias = self._check_logit_bias(logit_bias)
        check_int("top_logprobs", top_logprobs, 0)
        mem, offset, layers = self._retrieval(
            memory, topk, ranking, position_policy, memory_layers, search, approx_threshold, index, retrieval,
            memory_heads,
        )  # fmt: skip
        if memory_at not in MEMORY_AT:
            raise ExtendedMindError(f"unknown memory_at {memory_at!r}; choose one of {MEMORY_AT}")
        encoded = prompt if isinstance(prompt, EncodedPrompt) else encode(self.tokenizer, prompt, chat, answer_prefix,
                                                                            memory_at)  # fmt: skip
        ids = encoded.ids
        plan = None
        if retrieval == "blocks" and mem is not None and topk > 0 and blocks > 0 and mem.num_tokens:
            encoded = self._with_sink(encoded)
            sink_added = len(encoded.ids) > len(ids)
            ids = encoded.ids
            extra = topk_step if uncertainty_threshold is not None else 0
            # as many blocks as the window leaves room for (the prompt and the answer come first)
            room = (self.context_window - len(ids) - max_new_tokens) // block_size - extra
            if room < 1 and len(ids) <= self.context_window:
                raise PromptTooLongError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) leave no room for a memory block "
                    f"of {block_size} tokens (+{extra} for uncertainty retrieval) in the model's window of "
                    f"{self.context_window} tokens; shorten the prompt, lower max_new_tokens or block_size"
                )
            blocks = min(blocks, room)
            plan = self._block_plan(mem, layers, encoded.memory_at, topk, ranking, similarity_threshold, memory_layers,
                                    blocks, block_size, block_gate, memory_heads, extra, block_relevance)  # fmt: skip
            plan.select_from, plan.select_to, plan.sink_added = encoded.asks_from, encoded.asks_to, sink_added
            if block_choice == "embedding":
                question = self.tokenizer.decode(ids[encoded.asks_from : encoded.asks_to], skip_special_tokens=True)
                plan.similarity = self._block_similarity(mem, plan.layout, question)
            offset = plan.reserve
        if retrieval == "blocks" and plan is None:
            layers = {}
        window = self.context_window
        if len(ids) > window:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens, longer than the model's window of {window} tokens")
        if offset + len(ids) + max_new_tokens > window:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) starting at position {offset} "
                f"(after the memory's positions) exceed the model's window of {window} tokens; shorten the prompt, "
                "lower max_new_tokens, or use position_policy='zero'"
            )
        settings = DecodeSettings(
            topk=topk,
            ranking=ranking,
            similarity_threshold=similarity_threshold,
            max_new_tokens=max_new_tokens,
            uncertainty_threshold=uncertainty_threshold,
            topk_step=topk_step,
            temperature=temperature,
            seed=seed,
            stop=tuple(x for x in (stop or []) if x),
            citation_weighting=citation_weighting,
            logit_bias=bias,
            top_logprobs=top_logprobs,
        )
        return TokenStream(self.model, self.tokenizer, ids, mem, layers, offset, settings, plan)

    def _check_logit_bias(self, logit_bias: dict[int, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's rules: token ids of this vocabulary (ints, or their strings as JSON sends them), biases in
        [-100, 100]."""
        if not logit_bias:
            return ()
        if not isinstance(logit_bias, dict):
            raise ExtendedMindError(f"logit_bias must map token ids to biases, got {type(logit_bias).__name__}")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        out = []
        for token, value in logit_bias.items():
            try:
                tid, bias = int(token), float(value)
            except (TypeError, ValueError):
                raise ExtendedMindError(f"logit_bias entries are token id: number, got {token!r}: {value!r}") from None
            if not 0 <= tid < vocab:
                raise ExtendedMindError(f"logit_bias token id {tid} is outside the vocabulary (0..{vocab - 1})")
            if not -100 <= bias <= 100:
                raise ExtendedMindError(f"logit_bias values must be in [-100, 100], got {bias} for token {tid}")
            out.append((tid, bias))
        return tuple(out)

    def logits(
        self,
        input_ids: torch.Tensor,
        memory: MemoryLike | list[MemoryLike] | None = None,
        topk: int = DEFAULT_TOPK,
        ranking: str = DEFAULT_RANKING,
        similarity_threshold: float | None = None,
        position_policy: str = DEFAULT_POSITION_POLICY,
        memory_layers: list[int] | None = None,
        search: str = DEFAULT_SEARCH,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        index: IndexSettings | None = None,
        retrieval: str = DEFAULT_RETRIEVAL,
        blocks: int = DEFAULT_BLOCKS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        block_gate: float = DEFAULT_BLOCK_GATE,
        memory_heads: str | None = None,
        chunk: int = DEFAULT_SCORING_CHUNK,
    ) -> torch.Tensor:
        """Next-token logits (B, S, V) for every position of `input_ids` (B, S) with memory attention; for scoring
        (perplexity, answer log-probabilities). Positions start after the memory as in `generate`. Block memory
        reads its slots between the leading special tokens (at least the first token) and the rest, and takes
        the rows in chunks of `chunk`, each reading the blocks its own rows chose."""
        check_block_options(blocks, block_size, block_gate)
        check_int("chunk", chunk, 1)
        mem, offset, layers = self._retrieval(
            memory, topk, ranking, position_policy, memory_layers, search, approx_threshold, index, retrieval,
            memory_heads,
        )  # fmt: skip
        input_ids = input_ids.to(self.device)
        if retrieval == "blocks":
            if mem is None or topk == 0 or blocks == 0 or not mem.num_tokens:
                layers = {}
            else:
                head = max(1, min(leading_special(self.tokenizer, row.tolist()) for row in input_ids))
                plan = self._block_plan(mem, layers, head, topk, ranking, similarity_threshold, memory_layers,
                                        blocks, block_size, block_gate, memory_heads)  # fmt: skip
                return self._block_logits(input_ids, plan, chunk)
        session = Session(layers=layers, settings=RetrievalSettings(topk, ranking, similarity_threshold))
        positions = torch.arange(offset, offset + input_ids.shape[1], device=self.device)[None].expand_as(input_ids)
        session.row_positions = positions
        with session.active(), torch.inference_mode():
            return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits

    def _block_logits(self, input_ids: torch.Tensor, plan: BlockPlan, chunk: int) -> torch.Tensor:
        """`logits` with block memory: a pass without memory chooses blocks per chunk of rows, then the head and
        every chunk go through the model in turn (a KV cache carries the text), each chunk reading its blocks."""
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

    def generate(
        self, prompt: str | list[int] | EncodedPrompt, memory: MemoryLike | list[MemoryLike] | None = None, **options
    ) -> GenerationResult:
        """Answer `prompt` with memory attention over `memory`; returns text, tokens, citations and retrievals.

        Options (defaults in parentheses): topk (10), max_new_tokens (128), chat (True), answer_prefix ("": text
        the answer starts with; the result's text excludes it), ranking ("logit"),
        similarity_threshold (None), position_policy ("stored"), memory_layers (None: all), uncertainty_threshold
        (None: off), topk_step (2), temperature (0: greedy), seed (None), stop (None: strings that end the answer),
        citation_weighting ("attention_value": attention probability x value norm; "attention": probability alone),
        search ("auto": approximate from approx_threshold memory tokens (1,048,576) on, else exact; "exact";
        "approximate"), index (IndexSettings: IVF cells, nprobe, candidates re-ranked per retrieved key), logit_bias
        (None: token id -> bias in [-100, 100] added to the logits before each choice, as in OpenAI's API),
        top_logprobs (0: the most likely alternatives reported with each token's log-probability).
        """
        stream = self.stream(prompt, memory=memory, **options)
        for _ in stream:
            pass
        return stream.result

    def generate_batch(
        self,
        prompts: list[str | list[int]],
        memories: list[MemoryLike | list[MemoryLike] | None] | None = None,
        **options,
    ) -> list[GenerationResult]:
        """Answer several prompts in one batch, prompt i reading memories[i] (None: no memory; default: none for
        all). The dense layers run batched; retrieval runs per prompt. Options as in `generate`, the same for
        every prompt, except uncertainty-triggered retrieval, which is not batched."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ExtendedMindError("prompts must be a non-empty list")
        memories = list(memories) if memories is not None else [None] * len(prompts)
        if len(memories) != len(prompts):
            raise ExtendedMindError(f"got {len(memories)} memories for {len(prompts)} prompts")
        if options.get("uncertainty_threshold") is not None:
            raise ExtendedMindError("uncertainty-triggered retrieval is not batched: call generate per prompt")
        streams = [self.stream(p, memory=m, **options) for p, m in zip(prompts, memories)]  # validates, prepares
        rows = [BatchRow.of(t) for t in streams]
        return generate_batch(self.model, self.tokenizer, rows, streams[0].settings)
