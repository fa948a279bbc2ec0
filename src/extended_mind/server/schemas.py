"""Request bodies. Field names follow OpenAI's API; the extended-mind fields (memory, topk, ...) are what the
OpenAI SDK sends as top-level extras through `extra_body`. An argument neither OpenAI's nor ours is refused with 400
naming it, as OpenAI's API does ("memroy" must not answer silently with no memory); OpenAI arguments this server does
not implement (penalties, top_p, tools, user, ...) are accepted and ignored, as OpenAI clients send them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from extended_mind.engine.options import MAX_TOPK
from extended_mind.retrieval.index import DEFAULT_APPROX_THRESHOLD

MEMORY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
MemoryName = Annotated[str, Field(pattern=MEMORY_NAME_PATTERN, description="letters, digits, '_', '.', '-'")]


class MemoryOptions(BaseModel):
    """How a request reads its memories (all optional; defaults as in the Python API)."""

    memory: MemoryName | list[MemoryName] | None = Field(
        default=None, description="name(s) of stored memories to attend to"
    )
    retrieval: Literal["blocks", "tokens"] | None = Field(
        default=None, description="blocks: retrieval heads choose memory blocks read as context; tokens: per-head top-k"
    )
    blocks: int | None = Field(default=None, ge=0, le=256, description="memory blocks read")
    block_size: int | None = Field(default=None, ge=1, le=1024, description="tokens per memory block")
    block_gate: float | None = Field(
        default=None, ge=0, le=1, description="read a block only if its score is this fraction of the best block's"
    )
    block_relevance: float | None = Field(
        default=None, ge=0, le=1000,
        description="read a block only if the question draws it this many spreads above what unrelated questions do",
    )
    block_choice: Literal["heads", "embedding"] | None = Field(
        default=None,
        description="heads: the retrieval heads choose blocks; embedding: the blocks nearest the question by a "
        "sentence embedding (examples like it, as for many-shot in-context learning)",
    )
    memory_heads: Literal["retrieval", "all"] | None = None
    memory_at: Literal["question", "answer"] | None = Field(
        default=None, description="where block memory is read: before the question or between question and answer"
    )
    topk: int | None = Field(
        default=None, ge=0, le=MAX_TOPK, description="memory tokens ranked per query head and token"
    )
    uncertainty_threshold: float | None = Field(
        default=None, ge=0, le=100, description="entropy (nats) above which a step is redone with more memories"
    )
    topk_step: int | None = Field(default=None, ge=0, le=1024)
    similarity_threshold: float | None = Field(default=None, ge=-1, le=1)
    position_policy: Literal["zero", "stored"] | None = None
    ranking: Literal["logit", "cosine"] | None = None
    search: Literal["auto", "exact", "approximate"] | None = Field(
        default=None,
        description=f"top-k search: approximate (IVF index) from {DEFAULT_APPROX_THRESHOLD:,} memory tokens when auto",
    )


class SamplingOptions(BaseModel):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 or absent: greedy")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=1024, description="token id -> bias in [-100, 100] added before each choice"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class _IgnoredOpenAIOptions(BaseModel):
    """OpenAI arguments accepted and not used (what the SDK, LangChain and others send)."""

    frequency_penalty: Any = None
    presence_penalty: Any = None
    top_p: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None


class ChatCompletionRequest(SamplingOptions, MemoryOptions, _IgnoredOpenAIOptions):
    model_config = ConfigDict(extra="forbid")

    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    prediction: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    answer_prefix: str | None = Field(
        default=None, max_length=2000, description="text the assistant's reply starts with (not repeated in the answer)"
    )
    logprobs: bool | None = Field(default=None, description="return each token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token (needs logprobs)")


class CompletionRequest(SamplingOptions, MemoryOptions, _IgnoredOpenAIOptions):
    model_config = ConfigDict(extra="forbid")

    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5, description="log-probabilities with this many alternatives")


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=256)


class DocumentsIn(BaseModel):
    """Documents to memorize: `documents` (texts or {text, id, name} objects) and/or one `text`."""

    model_config = ConfigDict(extra="forbid")

    documents: list[str | DocumentIn] | None = Field(default=None, max_length=10_000)
    text: str | None = None
    text_name: str | None = Field(default=None, min_length=1, max_length=256, description="the name of `text`")
    stream: bool = Field(default=False, description="answer with server-sent progress events")


class MemoryCreate(DocumentsIn):
    name: MemoryName
    storage: Literal["float32", "bfloat16", "float16", "int8"] | None = None


SamplingOptions.model_rebuild()
