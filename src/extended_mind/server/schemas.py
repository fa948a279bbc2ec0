"""Request bodies. Field names follow OpenAI's API; the extended-mind fields (memory, topk, ...) are what the
OpenAI SDK sends as top-level extras through `extra_body`. An argument neither OpenAI's nor ours is refused with 400
naming it, as OpenAI's API does ("memroy" must not answer silently with no memory); OpenAI arguments this server does
not implement (penalties, top_p, tools, user, ...) are accepted and ignored, as OpenAI clients send them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from extended_mind.engine.options import shared_options

MEMORY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
MemoryName = Annotated[str, Field(pattern=MEMORY_NAME_PATTERN, description="letters, digits, '_', '.', '-'")]


def _memory_option_fields() -> dict[str, Any]:
    """The request fields of the options that say how a question reads memory (engine/options.py declares them:
    bounds, choices, help); absent means the Python API's default."""
    out: dict[str, Any] = {}
    for name, _, meta in shared_options():
        kind = Literal[meta["choices"]] if meta["choices"] else meta["kind"]
        out[name] = (kind | None, Field(default=None, ge=meta["minimum"], le=meta["request_maximum"],
                                          description=meta["help"]))
    return out


class _Memories(BaseModel):
    memory: MemoryName | list[MemoryName] | None = Field(
        default=None, description="name(s) of stored memories to attend to"
    )


MemoryOptions = create_model(
    "MemoryOptions", __base__=_Memories, __doc__="How a request reads its memories (all optional; defaults as in the "
    "Python API).", **_memory_option_fields()
)  # fmt: skip
# passed on to generation as they are (memory_at is used where the prompt is encoded)
MEMORY_OPTIONS = tuple(name for name, _, _ in shared_options() if name != "memory_at")


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
