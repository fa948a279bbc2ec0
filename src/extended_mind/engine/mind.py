"""`ExtendedMind`: a model with memory attention, and the user-facing API around it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.patching import patch_model
from extended_mind.attention.session import Session
from extended_mind.base.documents import Document, load_documents
from extended_mind.base.errors import ExtendedMindError, PromptTooLongError
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.loading import load_model
from extended_mind.base.prompting import DEFAULT_MEMORY_AT, EncodedPrompt, encode, leading_special
from extended_mind.engine.batching import BatchRow, generate_batch
from extended_mind.engine.compiled import CompiledStep, compile_requested
from extended_mind.engine.decoding import GenerationResult
from extended_mind.engine.fast_step import FastStep, fast_step
from extended_mind.engine.generation import TokenStream
from extended_mind.engine.heads import head_scores
from extended_mind.engine.memorize import encode_documents, memorize_encoded, memorize_sharded
from extended_mind.engine.options import (
    DEFAULT_POSITION_POLICY,
    DEFAULT_RETRIEVAL,
    DEFAULT_SCORING_CHUNK,
    DEFAULT_WINDOW,
    GenerationOptions,
    check_int,
)
from extended_mind.engine.reading import MemoryReader
from extended_mind.memory.memory import Memory
from extended_mind.memory.sharded import rank_loads, shard_memory
from extended_mind.parallel.group import ShardGroup, active_group
from extended_mind.retrieval.embedding import Embedder, TextEmbedder
from extended_mind.retrieval.index import DEFAULT_APPROX_THRESHOLD, IndexSettings
from extended_mind.retrieval.layer import RetrievalSettings

MemoryLike = Memory | str | Path  # a Memory, or the directory of a saved one


class ExtendedMind:
    """A causal LM whose attention layers can read from a memory of documents far larger than its window."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        source: str = "custom",
        shards: bool | None = None,
        compile: bool | None = None,
    ):
        """`shards`: shard memories over the initialised torch.distributed process group (parallel/group.py): None
        (default) when one of more than one rank is initialised, True to require it, False never. `compile`: decode
        steps that read no memory run a torch.compile'd forward (engine/compiled.py; None: `$EXTENDED_MIND_COMPILE`,
        off by default); otherwise they run natively where they can (engine/fast_step.py)."""
        self.model, self.tokenizer, self.source = model.eval(), tokenizer, source
        self.identity = ModelIdentity.of(model, tokenizer, source)
        self._head_scores: torch.Tensor | None = None
        self._embedder: TextEmbedder | None = None
        self.reader = MemoryReader(model, tokenizer, lambda: self.head_scores, lambda: self.embedder)
        if shards not in (None, True, False):
            raise ExtendedMindError(f"shards must be None, True or False, got {shards!r}")
        self.shards = shards
        if shards is True and self.shard_group is None:
            raise ExtendedMindError(
                "shards=True needs an initialised torch.distributed process group of more than one rank (start "
                "the program with torchrun --nproc-per-node N, or call torch.distributed.init_process_group)"
            )
        patch_model(model)
        self.compiled_step = CompiledStep(model) if compile_requested(compile) else None
        self.native_step: FastStep | None | bool = False  # False: looked for on first use; None: decode eagerly

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        shards: bool | None = None,
        compile: bool | None = None,
    ) -> ExtendedMind:
        """Load `model` (None: the embedded SmolLM2-135M-Instruct; or a local model directory or hub id). `dtype`:
        None or "auto" (on a CPU the fastest "int8" or "int4" decode weights that agree with float32's answers,
        measured once per CPU, else float32; bfloat16 on a GPU), or a precision by name (base/loading.py).
        `compile`: a compiled decode step for answers that read no memory (see `__init__`)."""
        return cls(*load_model(model, device=device, dtype=dtype), shards=shards, compile=compile)

    @property
    def decode_step(self) -> CompiledStep | FastStep | None:
        """The compiled step when asked for, else the native one where it applies and is not slower here
        (engine/fast_step.py; looked for on first use), else None: the eager forward."""
        if self.compiled_step is None and self.native_step is False:
            self.native_step = fast_step(self.model)
        return self.compiled_step or self.native_step

    @property
    def shard_group(self) -> ShardGroup | None:
        """The ranks memories are sharded over, or None (one process holds every memory)."""
        return None if self.shards is False else active_group()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weights(self) -> str:
        """The precision the weights run in: "float32", "bfloat16", "float16", "int8" or "int4" (float32 with int8
        or 4-bit decode weights; base/weights.py) or "bfloat16-int8"."""
        return getattr(self.model, "extended_mind_weights", None) or str(self.model.dtype).removeprefix("torch.")

    @property
    def context_window(self) -> int:
        c = self.model.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "max_seq_len", 2048))

    @property
    def head_scores(self) -> torch.Tensor:
        """Copy scores (layers, query heads) of the model's attention heads (engine/heads.py), calibrated once per model
        and cached on disk."""
        if self._head_scores is None:
            self._head_scores = head_scores(self.model, self.tokenizer, self.identity)
        return self._head_scores

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
        return shard_memory(memory, group) if (group := self.shard_group) is not None else memory

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
        options = GenerationOptions.of(position_policy=position_policy, index=index, search="approximate",
                                       approx_threshold=approx_threshold, retrieval=retrieval)  # fmt: skip
        if not only_above_threshold or (retrieval != "blocks" and memory.num_tokens >= approx_threshold):
            self.reader.prepare(self.as_memory(memory), options)
        return memory

    def calibrate(self, memory: Memory, **options: Any) -> Memory:
        """Compute block memory's relevance calibration for `options` now (144 selection passes: 16 s on one thread
        at 270k tokens), so the first question does not wait and `memory.save()` stores it. Returns the memory."""
        o, mem = GenerationOptions.of(**options), self.as_memory(memory)
        if o.retrieval == "blocks" and o.block_choice != "embedding" and mem is not None and mem.num_tokens:
            _, layers = self.reader.prepare(mem, o)
            self.reader.plan(mem, layers, 1, o, o.blocks, 0, o.block_relevance)
        return memory

    def prepare_to_save(self, memory: Memory) -> Memory:
        """The search indexes (where "auto" search uses them) and the calibration, now: `memory.save()` stores them."""
        self.build_index(memory, only_above_threshold=True)
        return self.calibrate(memory)

    def as_memory(self, memory: MemoryLike | list[MemoryLike] | None) -> Memory | None:
        """One memory for this model from a Memory, a saved memory's directory, or a list of them (merged)."""
        if memory is None:
            return None
        items = [memory] if isinstance(memory, (Memory, str, Path)) else list(memory)
        memories = [self.load_memory(m) if isinstance(m, (str, Path)) else m for m in items]
        for m in memories:
            if not isinstance(m, Memory):
                raise ExtendedMindError(f"memory must be a Memory (from memorize or load_memory), got "
                                        f"{type(m).__name__}")  # fmt: skip
            m.check_model(self.identity)
            self._shard(m)
        return Memory.merge(memories) if memories else None

    def memory_positions(self, memory: Memory | None, **options) -> int:
        """Positions a memory takes in front of (or inside) a prompt under generation `options`: the slots kept
        for block memory, or the prompt offset of the token retrieval's position policy."""
        return self.reader.positions_taken(memory, GenerationOptions.of(**options))

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

    def encode_prompt(self, prompt: str | list[int], chat: bool = True, answer_prefix: str = "") -> list[int]:
        """Token ids of `prompt`, in the chat template when `chat`, followed by `answer_prefix` (the start of the
        answer, which small models need to answer in the document's own words). A list of ints is taken as
        already tokenized and used as it is."""
        return encode(self.tokenizer, prompt, chat, answer_prefix, DEFAULT_MEMORY_AT).ids

    def options(self, **options) -> GenerationOptions:
        """Generation options checked against this model (its layers and vocabulary)."""
        o = GenerationOptions.of(**options)
        self.reader.check_layers(o.memory_layers)
        vocab = self.model.get_input_embeddings().weight.shape[0]  # (the output layer may be quantized)
        outside = [t for t, _ in o.logit_bias if not 0 <= t < vocab]
        if outside:
            raise ExtendedMindError(f"logit_bias token id {outside[0]} is outside the vocabulary (0..{vocab - 1})")
        return o

    def stream(
        self,
        prompt: str | list[int] | EncodedPrompt,
        memory: MemoryLike | list[MemoryLike] | None = None,
        **options,
    ) -> TokenStream:
        """Like `generate`, but returns an iterator of tokens as they are produced (`.result` once exhausted)."""
        o = self.options(**options)
        mem = self.as_memory(memory)
        offset, layers = self.reader.prepare(mem, o) if mem is not None else (0, {})
        encoded = prompt if isinstance(prompt, EncodedPrompt) else encode(self.tokenizer, prompt, o.chat,
                                                                            o.answer_prefix, o.memory_at)  # fmt: skip
        plan = None  # block memory: what the question reads
        if o.retrieval == "blocks":
            if mem is not None and o.topk > 0 and o.blocks > 0 and mem.num_tokens:
                encoded, plan = self.reader.question_plan(mem, layers, encoded, o, self.context_window)
                offset = plan.reserve
            else:
                layers = {}
        self._check_window(len(encoded.ids), offset, o.max_new_tokens)
        return TokenStream(self.model, self.tokenizer, encoded.ids, mem, layers, offset, o, plan, self.decode_step)

    def _check_window(self, prompt_tokens: int, offset: int, max_new_tokens: int) -> None:
        window = self.context_window
        if prompt_tokens > window:
            raise PromptTooLongError(f"prompt is {prompt_tokens} tokens, longer than the model's window of {window} "
                                     "tokens")  # fmt: skip
        if offset + prompt_tokens + max_new_tokens > window:
            raise PromptTooLongError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) starting at position {offset} "
                f"(after the memory's positions) exceed the model's window of {window} tokens; shorten the prompt, "
                "lower max_new_tokens, or use position_policy='zero'"
            )

    def logits(
        self,
        input_ids: torch.Tensor,
        memory: MemoryLike | list[MemoryLike] | None = None,
        chunk: int = DEFAULT_SCORING_CHUNK,
        **options,
    ) -> torch.Tensor:
        """Next-token logits (B, S, V) for every position of `input_ids` (B, S) with memory attention; for scoring
        (perplexity, answer log-probabilities). Options as in `generate` (those about reading memory apply).
        Positions start after the memory as in `generate`. Block memory reads its slots between the leading special
        tokens (at least the first token) and the rest, and takes the rows in chunks of `chunk`, each reading the
        blocks its own rows chose."""
        o = self.options(**options)
        check_int("chunk", chunk, 1)
        mem = self.as_memory(memory)
        offset, layers = self.reader.prepare(mem, o) if mem is not None else (0, {})
        input_ids = input_ids.to(self.device)
        if o.retrieval == "blocks":
            if mem is None or o.topk == 0 or o.blocks == 0 or not mem.num_tokens:
                layers = {}
            else:
                head = max(1, min(leading_special(self.tokenizer, row.tolist()) for row in input_ids))
                plan = self.reader.plan(mem, layers, head, o, o.blocks)
                return self.reader.block_logits(input_ids, plan, chunk)
        session = Session(layers=layers, settings=RetrievalSettings(o.topk, o.ranking, o.similarity_threshold))
        positions = torch.arange(offset, offset + input_ids.shape[1], device=self.device)[None].expand_as(input_ids)
        session.row_positions = positions
        with session.active(), torch.inference_mode():
            return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits

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
        for _ in stream:  # the stream keeps its result
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
