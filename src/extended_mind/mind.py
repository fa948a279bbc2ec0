"""`ExtendedMind`: a model with memory attention, and the user-facing API around it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attention import LayerMemory, RetrievalSettings, Session, patch_model
from .batching import BatchRow, generate_batch
from .documents import Document, load_documents
from .errors import ExtendedMindError, PromptTooLongError
from .generation import DecodeSettings, GenerationResult, TokenStream
from .identity import ModelIdentity
from .index import DEFAULT_APPROX_THRESHOLD, IndexSettings
from .loading import load_model
from .memorize import encode_documents, memorize_encoded
from .memory import Memory
from .positions import POSITION_POLICIES, prepare_layers, prompt_offset

DEFAULT_TOPK = 10
DEFAULT_RANKING = "logit"
DEFAULT_POSITION_POLICY = "stored"
DEFAULT_STRIDE = 512
DEFAULT_WINDOW = 2048
DEFAULT_TOPK_STEP = 2
RANKINGS = ("logit", "cosine")
MemoryLike = Memory | str | Path  # a Memory, or the directory of a saved one
CITATION_WEIGHTINGS = ("attention_value", "attention")
SEARCH_MODES = ("auto", "exact", "approximate")
DEFAULT_SEARCH = "auto"


class ExtendedMind:
    """A causal LM whose attention layers can read from a memory of documents far larger than its window."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str = "custom"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.identity = ModelIdentity.of(model, tokenizer, source)
        patch_model(model)

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> ExtendedMind:
        """Load `model` (None: the embedded SmolLM2-135M-Instruct; or a local model directory or hub id)."""
        return cls(*load_model(model, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

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
        memory = memorize_encoded(
            self.model,
            docs,
            encode_documents(self.tokenizer, docs),
            stride=stride,
            window=window,
            identity=self.identity,
            storage=storage,
            progress=progress,
            on_progress=on_progress,
        )
        memory.mind = self
        return memory

    def load_memory(self, path: str | Path) -> Memory:
        """Open a saved memory for this model (refused when another model or tokenizer built it)."""
        memory = Memory.load(path)
        memory.check_model(self.identity)
        memory.mind = self
        return memory

    def build_index(
        self,
        memory: Memory,
        position_policy: str = DEFAULT_POSITION_POLICY,
        index: IndexSettings | None = None,
        only_above_threshold: bool = False,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    ) -> Memory:
        """Build the approximate-search indexes of `memory` now (for `position_policy`), so that the first question
        does not wait for them and `memory.save()` stores them. With `only_above_threshold`, only when the memory
        is large enough for `search="auto"` to use them. Returns the memory."""
        if not only_above_threshold or memory.num_tokens >= approx_threshold:
            self._retrieval(memory, DEFAULT_TOPK, DEFAULT_RANKING, position_policy, None, "approximate", 0, index)
        return memory

    def _as_memory(self, memory: MemoryLike | list[MemoryLike] | None) -> Memory | None:
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
    ) -> tuple[Memory | None, int, dict[int, LayerMemory]]:
        """Validate the retrieval options; return (memory, first prompt position, prepared memory layers)."""
        if search not in SEARCH_MODES:
            raise ExtendedMindError(f"unknown search {search!r}; choose one of {SEARCH_MODES}")
        _check_int("approx_threshold", approx_threshold, 0)
        if index is not None and not isinstance(index, IndexSettings):
            raise ExtendedMindError(f"index must be an IndexSettings, got {type(index).__name__}")
        _check_int("topk", topk, 0)
        if ranking not in RANKINGS:
            raise ExtendedMindError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
        if position_policy not in POSITION_POLICIES:
            raise ExtendedMindError(f"unknown position policy {position_policy!r}; choose one of {POSITION_POLICIES}")
        n_layers = self.model.config.num_hidden_layers
        if memory_layers is not None:
            bad = [x for x in memory_layers if not isinstance(x, int) or not 0 <= x < n_layers]
            if bad:
                raise ExtendedMindError(f"memory_layers {bad} out of range: the model has layers 0..{n_layers - 1}")
        mem = self._as_memory(memory)
        if mem is None:
            return None, 0, {}
        approximate = search == "approximate" or (search == "auto" and mem.num_tokens >= approx_threshold)
        settings = (index or IndexSettings()) if approximate and topk > 0 and mem.num_tokens else None
        layers = prepare_layers(mem, position_policy, self.device, self.model.dtype, memory_layers, settings)
        return mem, prompt_offset(mem, position_policy), layers

    # ---- generation ----

    def encode_prompt(self, prompt: str | list[int], chat: bool = True, answer_prefix: str = "") -> list[int]:
        """Token ids of `prompt`, in the chat template when `chat`, followed by `answer_prefix` (the start of the
        answer, which small models need to answer in the document's own words). A list of ints is taken as
        already tokenized and used as it is."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ExtendedMindError("prompt is empty")
        if chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]
        sep = " " if answer_prefix and not prompt.endswith((" ", "\n")) else ""
        return self.tokenizer(prompt + sep + answer_prefix if answer_prefix else prompt, add_special_tokens=True)[
            "input_ids"
        ]

    def stream(
        self,
        prompt: str | list[int],
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
    ) -> TokenStream:
        """Like `generate`, but returns an iterator of tokens as they are produced (`.result` once exhausted)."""
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("topk_step", topk_step, 0)
        if citation_weighting not in CITATION_WEIGHTINGS:
            raise ExtendedMindError(
                f"unknown citation weighting {citation_weighting!r}; choose one of {CITATION_WEIGHTINGS}"
            )
        if temperature < 0:
            raise ExtendedMindError(f"temperature must be >= 0, got {temperature}")
        mem, offset, layers = self._retrieval(
            memory, topk, ranking, position_policy, memory_layers, search, approx_threshold, index
        )
        ids = self.encode_prompt(prompt, chat, answer_prefix)
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
        )
        return TokenStream(self.model, self.tokenizer, ids, mem, layers, offset, settings)

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
    ) -> torch.Tensor:
        """Next-token logits (B, S, V) for every position of `input_ids` (B, S) with memory attention; for scoring
        (perplexity, answer log-probabilities). Positions start after the memory as in `generate`."""
        _, offset, layers = self._retrieval(
            memory, topk, ranking, position_policy, memory_layers, search, approx_threshold, index
        )
        session = Session(layers=layers, settings=RetrievalSettings(topk, ranking, similarity_threshold))
        input_ids = input_ids.to(self.device)
        positions = torch.arange(offset, offset + input_ids.shape[1], device=self.device)[None].expand_as(input_ids)
        with session.active(), torch.inference_mode():
            return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits

    def generate(
        self, prompt: str | list[int], memory: MemoryLike | list[MemoryLike] | None = None, **options
    ) -> GenerationResult:
        """Answer `prompt` with memory attention over `memory`; returns text, tokens, citations and retrievals.

        Options (defaults in parentheses): topk (10), max_new_tokens (128), chat (True), answer_prefix ("": text
        the answer starts with; the result's text excludes it), ranking ("logit"),
        similarity_threshold (None), position_policy ("stored"), memory_layers (None: all), uncertainty_threshold
        (None: off), topk_step (2), temperature (0: greedy), seed (None), stop (None: strings that end the answer),
        citation_weighting ("attention_value": attention probability x value norm; "attention": probability alone),
        search ("auto": approximate from approx_threshold memory tokens (1,048,576) on, else exact; "exact";
        "approximate"), index (IndexSettings: IVF cells, nprobe, candidates re-ranked per retrieved key).
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
        rows = [BatchRow(t.prompt_ids, t.memory, t.layers, t.offset) for t in streams]
        return generate_batch(self.model, self.tokenizer, rows, streams[0].settings)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExtendedMindError(f"{name} must be an integer >= {minimum}, got {value!r}")
