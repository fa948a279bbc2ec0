"""Serving the OpenAI-compatible APIs (routes in routes.py): /v1/models, /v1/completions and /v1/chat/completions
with memory attention; answers carry citations (per token while streaming, all of them at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from extended_mind.base.prompting import DEFAULT_MEMORY_AT, EncodedPrompt, encode, encode_messages
from extended_mind.engine.decoding import GeneratedToken, GenerationResult
from extended_mind.engine.mind import ExtendedMind
from extended_mind.memory.citations import Citation, Passage
from extended_mind.server.config import ServerConfig
from extended_mind.server.errors import APIError
from extended_mind.server.library import MemoryLibrary, check_name, split_document_id
from extended_mind.server.ops import ServerMetrics
from extended_mind.server.scheduler import BatchScheduler
from extended_mind.server.schemas import MEMORY_OPTIONS, ChatCompletionRequest, MemoryOptions
from extended_mind.server.streaming import SSE_HEADERS, event_stream

if TYPE_CHECKING:
    from extended_mind.server.sharded import Mirror


def served_model_id(mind: ExtendedMind) -> str:
    """The name clients pass as `model`: the last part of the model's source path or hub id."""
    return str(mind.source).rstrip("/").split("/")[-1] or "model"


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes) -> byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_ins, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_ins[chr(b)] = b
        else:
            stand_ins[chr(256 + extra)] = b
            extra += 1
    return stand_ins


def token_bytes(tokenizer, token: int) -> bytes:
    """The raw bytes of one token (OpenAI's `bytes`): a token can hold part of a UTF-8 character, which its
    decoded text shows as U+FFFD. Byte-level BPE (GPT-2, Llama 3, SmolLM2) and SentencePiece byte tokens are read
    exactly; other tokens fall back to their text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        alphabet = _byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([token]).encode("utf-8")


def citation_json(c: Citation) -> dict:
    memory, doc = split_document_id(c.doc)
    return {"memory": memory, "document": doc, "start": c.start, "end": c.end, "text": c.text, "weight": c.weight}


def passage_json(p: Passage) -> dict:
    memory, doc = split_document_id(p.doc)
    return {"memory": memory, "document": doc, "start": p.start, "end": p.end, "text": p.text}


class CompletionServing:
    """POST /v1/completions and the model routes: requests turned into generation options once, prompts encoded,
    streams started on the model thread (batched by the scheduler), answers in OpenAI's shape with citations.
    `ChatServing` changes only what differs for chat: the prompt, the choice and the log-probabilities."""

    kind, object_name, chunk_object, id_prefix = "text", "text_completion", "text_completion", "cmpl"

    def __init__(self, mind: ExtendedMind, library: MemoryLibrary, scheduler: BatchScheduler, config: ServerConfig,
                 metrics: ServerMetrics, mirror: Mirror | None = None):  # fmt: skip
        self.mind, self.library, self.scheduler, self.config = mind, library, scheduler, config
        self.metrics, self.mirror = metrics, mirror
        self.model_id = served_model_id(mind)
        self.created = int(time.time())

    # ---- the model ----

    def model_card(self, name: str | None = None) -> dict:
        if name is not None:
            self.check_model(name)
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "extended-mind"}

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           "model_not_found", "model")  # fmt: skip

    # ---- what differs between completions and chat ----

    def prompt(self, req: Any) -> EncodedPrompt:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send exactly one prompt per request", "invalid_value", "prompt")
        if not isinstance(prompts[0], str) or not prompts[0].strip():
            raise APIError(400, "prompt is empty", "invalid_value", "prompt")
        return encode(self.mind.tokenizer, prompts[0], False, "", req.memory_at or DEFAULT_MEMORY_AT)

    def alternatives(self, req: Any) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return req.logprobs

    def logprobs(self, tokens: list[GeneratedToken], offset: int = 0) -> dict:
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.text)
        return {
            "tokens": [self.token_text(t.id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_text(i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": offsets,
        }

    def choice(self, text: str | None, finish: str | None, logprobs: dict | None, first: bool = False,
               delta: bool = False) -> dict:  # fmt: skip
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

    # ---- shared ----

    def token_text(self, token: int) -> str:
        return self.mind.tokenizer.decode([token])

    def options(self, req: Any) -> dict[str, Any]:
        """The generation options of a request (checked here, before it is queued)."""
        config = self.config
        max_tokens = req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens)
        if max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens}",
                           "max_tokens_too_large", "max_tokens")  # fmt: skip
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(len(s) > 256 for s in stop):
            raise APIError(400, "stop takes at most 4 strings of at most 256 characters", "invalid_value", "stop")
        opts: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": req.temperature or 0.0, "stop": stop,
                                "seed": req.seed, "logit_bias": req.logit_bias,
                                "top_logprobs": self.alternatives(req) or 0}  # fmt: skip
        for name in MEMORY_OPTIONS:  # memory_at is used where the prompt is encoded
            value = getattr(req, name)
            if value is not None:
                opts[name] = value
        return opts

    def memory_names(self, req: MemoryOptions) -> list[str]:
        names = [req.memory] if isinstance(req.memory, str) else list(req.memory or [])
        limit = self.config.max_memories_per_request
        if len(names) > limit:
            raise APIError(400, f"at most {limit} memories per request", "too_many_memories", "memory")
        if len(set(names)) != len(names):
            raise APIError(400, "a memory is named twice", "invalid_value", "memory")
        for n in names:
            check_name(n)
            if not self.library.exists(n):
                raise APIError(404, f"no memory named {n!r}", "memory_not_found", "memory")
        return names

    def start(self, req: Any, names: list[str]):
        """On the model thread: the token stream for a request."""
        prompt, options = self.prompt(req), self.options(req)
        rid = None
        if self.mirror is not None:  # the followers open the same stream (sharded.py)
            rid = self.mirror.new_id()
            self.mirror.send("stream", rid, prompt, names, options)
        stream = self.mind.stream(prompt, memory=self.library.memory_for(names), **options)
        stream.mirror_id = rid
        return stream

    def response_logprobs(self, req: Any, tokens: list[GeneratedToken], offset: int = 0) -> dict | None:
        return None if self.alternatives(req) is None else self.logprobs(tokens, offset)

    async def create(self, req: Any, request: Request):
        """The answer to a request: one JSON object, or server-sent events when it asks to stream."""
        self.check_model(req.model)
        names = self.memory_names(req)
        self.options(req)  # validate before queueing
        rid = f"{self.id_prefix}-{uuid.uuid4().hex}"
        now, arrived = int(time.time()), time.perf_counter()
        if req.stream:
            return StreamingResponse(event_stream(self.chunks(req, names, rid, now, arrived)),
                                     media_type="text/event-stream", headers=SSE_HEADERS)  # fmt: skip
        answer = self.metrics.timed(self.scheduler.stream(lambda: self.start(req, names)), arrived)
        result = await _unless_client_leaves(request, _last(answer))
        assert isinstance(result, GenerationResult)
        choice = self.choice(result.text, result.finish_reason, self.response_logprobs(req, result.tokens))
        return {"id": rid, "object": self.object_name, "created": now, "model": self.model_id, "choices": [choice],
                "usage": usage(result), **extras(result)}  # fmt: skip

    async def chunks(self, req: Any, names: list[str], rid: str, now: int, arrived: float) -> AsyncIterator[dict]:
        def chunk(piece: str | None, finish: str | None, extra: dict | None = None, token=None) -> dict:
            logprobs = self.response_logprobs(req, [token], offset) if token is not None else None
            return {"id": rid, "object": self.chunk_object, "created": now, "model": self.model_id,
                    "choices": [self.choice(piece, finish, logprobs, first, delta=True)], **(extra or {})}  # fmt: skip

        first, offset = True, 0
        async for item in self.metrics.timed(self.scheduler.stream(lambda: self.start(req, names)), arrived):
            if isinstance(item, GeneratedToken):
                yield chunk(item.text, None, {"token_citations": [citation_json(c) for c in item.citations]}, item)
                first, offset = False, offset + len(item.text)
            else:
                extra = extras(item)
                if req.stream_options and req.stream_options.include_usage:
                    extra["usage"] = usage(item)
                yield chunk(None if self.kind == "chat" else "", item.finish_reason, extra)


class ChatServing(CompletionServing):
    """POST /v1/chat/completions: messages in the chat template (with an optional answer prefix)."""

    kind, object_name, chunk_object, id_prefix = "chat", "chat.completion", "chat.completion.chunk", "chatcmpl"

    def prompt(self, req: Any) -> EncodedPrompt:
        return encode_messages(self.mind.tokenizer, chat_messages(req), req.memory_at or DEFAULT_MEMORY_AT,
                               req.answer_prefix or "")  # fmt: skip

    def alternatives(self, req: Any) -> int | None:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None

    def logprobs(self, tokens: list[GeneratedToken], offset: int = 0) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {"token": self.token_text(token), "logprob": logprob,
                    "bytes": list(token_bytes(self.mind.tokenizer, token))}  # fmt: skip

        content = [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
                   for t in tokens]  # fmt: skip
        return {"content": content, "refusal": None}

    def choice(self, text: str | None, finish: str | None, logprobs: dict | None, first: bool = False,
               delta: bool = False) -> dict:  # fmt: skip
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": logprobs}  # fmt: skip
        content = {} if text is None else {"content": text}
        if text is not None and first:
            content = {"role": "assistant", **content}
        return {"index": 0, "delta": content, "finish_reason": finish, "logprobs": logprobs}


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's", "invalid_value", "messages")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise APIError(400, "no user message with text", "invalid_value", "messages")
    return out


def usage(result: GenerationResult) -> dict:
    n = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def extras(result: GenerationResult) -> dict:
    return {
        "citations": [citation_json(c) for c in result.citations],
        "retrievals": [r.to_dict() for r in result.retrievals],
        "blocks_read": result.blocks_read,  # block memory: 0 when no block was relevant to the question
        "passages": [passage_json(p) for p in result.passages],  # ... and the text of those it read
        "warnings": result.warnings,  # an empty answer says why
    }


async def _last(items: AsyncIterator[Any]) -> Any:
    last = None
    async for item in items:
        last = item
    return last


# how often a non-streamed request checks that its client is still there
DISCONNECT_POLL_S = 0.1


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; when the client disconnects first, `work` is cancelled (its request leaves the batch at the
    next step, as a streamed one does) and the request ends with 499."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client went away", "cancelled")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
