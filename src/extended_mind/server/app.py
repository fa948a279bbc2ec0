"""The FastAPI app: OpenAI-compatible completions with memory attention, memory management, and the web page."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..chat import chat_prompt_ids
from ..citations import Citation
from ..documents import Document, decode_text
from ..generation import GeneratedToken, GenerationResult
from ..memory import Memory
from ..mind import ExtendedMind
from .config import ServerConfig
from .errors import APIError, as_api_error, error_body, error_response, install_error_handlers
from .library import MemoryLibrary, check_name, split_document_id
from .schemas import ChatCompletionRequest, CompletionRequest, DocumentsIn, MemoryCreate, MemoryOptions
from .worker import ModelWorker

STATIC = files("extended_mind.server") / "static"
PUBLIC_PATHS = {"/", "/favicon.ico"}  # the page itself holds no data; it asks for the key and sends it with calls
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def served_model_id(mind: ExtendedMind) -> str:
    """The name clients pass as `model`: the last part of the model's source path or hub id."""
    return str(mind.source).rstrip("/").split("/")[-1] or "model"


class GuardMiddleware:
    """Bearer-key check (when a key is set) and the request body size limit, before any route runs."""

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.config.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.config.api_key.encode()
            ):
                why = "missing" if not given else "invalid"
                response = error_response(
                    401, f"{why} API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
                )
                return await response(scope, receive, send)
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise APIError(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")
            return message

        await self.app(scope, limited_receive, send)


def citation_json(c: Citation) -> dict:
    memory, doc = split_document_id(c.doc)
    return {"memory": memory, "document": doc, "start": c.start, "end": c.end, "text": c.text, "weight": c.weight}


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def create_app(mind: ExtendedMind, config: ServerConfig) -> FastAPI:
    """The server for one loaded model; memories live in `config.memory_dir`."""
    library = MemoryLibrary(config.memory_dir, mind)
    worker = ModelWorker(config.max_queue)
    model_id = served_model_id(mind)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(
        title="extended-mind",
        version=__version__,
        description="OpenAI-compatible API with Extended Mind memory attention and token-level citations.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, config=config)
    app.state.library, app.state.worker, app.state.model_id = library, worker, model_id

    # ---------------------------------------------------------------- generation

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(
                404, f"model {name!r} is not served here; this server serves {model_id!r}", "model_not_found", "model"
            )

    def generation_options(req: ChatCompletionRequest | CompletionRequest) -> dict:
        max_tokens = req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens)
        if max_tokens > config.max_tokens:
            raise APIError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens}",
                "max_tokens_too_large",
                "max_tokens",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(len(s) > 256 for s in stop):
            raise APIError(400, "stop takes at most 4 strings of at most 256 characters", "invalid_value", "stop")
        opts: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": req.temperature or 0.0,
            "stop": stop,
            "seed": req.seed,
        }
        for name in (
            "topk",
            "uncertainty_threshold",
            "topk_step",
            "similarity_threshold",
            "position_policy",
            "ranking",
        ):
            value = getattr(req, name)
            if value is not None:
                opts[name] = value
        return opts

    def memory_names(req: MemoryOptions) -> list[str]:
        names = [req.memory] if isinstance(req.memory, str) else list(req.memory or [])
        if len(names) > config.max_memories_per_request:
            raise APIError(
                400, f"at most {config.max_memories_per_request} memories per request", "too_many_memories", "memory"
            )
        if len(set(names)) != len(names):
            raise APIError(400, "a memory is named twice", "invalid_value", "memory")
        for n in names:
            check_name(n)
            if not library.exists(n):
                raise APIError(404, f"no memory named {n!r}", "memory_not_found", "memory")
        return names

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

    def prompt_ids(req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            return chat_prompt_ids(mind.tokenizer, chat_messages(req))
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send exactly one prompt per request", "invalid_value", "prompt")
        return mind.encode_prompt(prompts[0], chat=False)

    def start(req: ChatCompletionRequest | CompletionRequest, names: list[str]):
        """On the model thread: the token stream for a request."""
        memory: Memory | None = library.view(names) if names else None
        if memory is not None and memory.num_tokens == 0:  # every document was removed
            memory = None
        return mind.stream(prompt_ids(req), memory=memory, **generation_options(req))

    def usage(result: GenerationResult) -> dict:
        n = len(result.tokens)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    def extras(result: GenerationResult) -> dict:
        return {
            "citations": [citation_json(c) for c in result.citations],
            "retrievals": [r.to_dict() for r in result.retrievals],
        }

    async def generate(req: ChatCompletionRequest | CompletionRequest, kind: str):
        check_model(req.model)
        names = memory_names(req)
        generation_options(req)  # validate before queueing
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())
        if not req.stream:

            def job() -> GenerationResult:
                stream = start(req, names)
                for _ in stream:
                    pass
                return stream.result

            result = await worker.run(job)
            if kind == "chat":
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
                obj = "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": now,
                "model": model_id,
                "choices": [choice],
                "usage": usage(result),
                **extras(result),
            }
        return StreamingResponse(
            stream_generation(req, names, kind, rid, now), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def stream_generation(
        req: ChatCompletionRequest | CompletionRequest, names: list[str], kind: str, rid: str, now: int
    ) -> AsyncIterator[bytes]:
        def job(emit: Callable[[Any], None], cancelled: Callable[[], bool]) -> None:
            stream = start(req, names)
            for token in stream:
                emit(token)
                if cancelled():
                    return
            emit(stream.result)

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(piece: str | None, finish: str | None, extra: dict | None = None) -> dict:
            if kind == "chat":
                delta = {} if piece is None else {"content": piece}
                if piece is not None and first:
                    delta = {"role": "assistant", **delta}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice], **(extra or {})}

        first = True
        try:
            async for item in worker.stream(job):
                if isinstance(item, GeneratedToken):
                    yield sse(chunk(item.text, None, {"token_citations": [citation_json(c) for c in item.citations]}))
                    first = False
                else:
                    result: GenerationResult = item
                    extra = extras(result)
                    if req.stream_options and req.stream_options.include_usage:
                        extra["usage"] = usage(result)
                    yield sse(chunk(None if kind == "chat" else "", result.finish_reason, extra))
        except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
            e = as_api_error(exc)
            yield sse(error_body(e.status, e.message, e.code, e.param))
        yield sse("[DONE]")

    @app.get("/v1/models", summary="The served model")
    async def list_models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "extended-mind"}],
        }

    @app.get("/v1/models/{model}", summary="One model")
    async def get_model(model: str) -> dict:
        check_model(model)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "extended-mind"}

    @app.post("/v1/chat/completions", summary="Chat completion with memory attention (OpenAI-compatible)")
    async def chat_completions(req: ChatCompletionRequest):
        return await generate(req, "chat")

    @app.post("/v1/completions", summary="Text completion with memory attention (OpenAI-compatible)")
    async def completions(req: CompletionRequest):
        return await generate(req, "text")

    # ---------------------------------------------------------------- memories

    def memory_json(name: str, memory: Memory, documents: bool = False) -> dict:
        info = memory.info()
        out = {
            "id": name,
            "object": "memory",
            "model": info["model"],
            "documents": info["documents"],
            "tokens": info["tokens"],
            "storage": info["storage"],
            "bytes": info["bytes"],
        }
        if documents:
            out["data"] = [
                {"id": s.document.id, "name": s.document.name, "chars": len(s.document.text), "tokens": s.num_tokens}
                for s in memory.segments
            ]
        return out

    async def read_documents(request: Request, model: type[DocumentsIn]) -> tuple[DocumentsIn, list[Document]]:
        """Documents from a JSON body, or from a multipart form (fields as in JSON, files in `files`)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = model.model_validate_json(await request.body())
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err.get("loc", ()))
                raise APIError(
                    400,
                    f"{err.get('msg')} ({where})" if where else err.get("msg", "invalid body"),
                    "invalid_value",
                    where or None,
                ) from None
            docs = [
                Document(d.id or "", d.text, d.name) if not isinstance(d, str) else Document("", d)
                for d in body.documents or []
            ]
            if body.text is not None:
                docs.append(Document("", body.text))
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1000, max_fields=1000)
            fields: dict[str, Any] = {}
            docs = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "files":
                        raise APIError(
                            400, f"unexpected file field {key!r}; send files as 'files'", "invalid_value", key
                        )
                    data = await value.read()
                    name = value.filename or f"upload{len(docs)}"
                    docs.append(Document(name, decode_text(data, name), name))
                elif key == "text":
                    if value.strip():
                        docs.append(Document("", value))
                elif key in model.model_fields:
                    fields[key] = value
                else:
                    raise APIError(400, f"unknown form field {key!r}", "invalid_value", key)
            try:
                body = model.model_validate(
                    {k: (v.lower() in ("1", "true", "yes") if k == "stream" else v) for k, v in fields.items()}
                )
            except ValidationError as exc:
                err = exc.errors()[0]
                raise APIError(
                    400, f"{err.get('msg')} ({'.'.join(str(x) for x in err.get('loc', ()))})", "invalid_value"
                ) from None
        else:
            raise APIError(415, "send documents as application/json or multipart/form-data", "unsupported_media_type")
        if not docs:
            raise APIError(400, "no documents given: send 'documents', 'text' or files", "invalid_value", "documents")
        for d in docs:
            if not d.text.strip():
                raise APIError(
                    400,
                    f"document {d.id or d.name or ''!r} is empty".replace(" '' ", " "),
                    "empty_document",
                    "documents",
                )
            if len(d.text) > config.max_document_chars:
                raise APIError(
                    413,
                    f"document {d.id or d.name or ''!r} has {len(d.text)} characters; the limit is "
                    f"{config.max_document_chars}",
                    "document_too_large",
                    "documents",
                )
        return body, docs

    def check_memory_size(docs: list[Document], existing: int) -> None:
        """Refuse before memorizing when the memory would pass its token limit (tokenizing is cheap)."""
        n = existing + sum(len(mind.tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
        if n > config.max_memory_tokens:
            raise APIError(
                413,
                f"the memory would hold {n} tokens; the limit is {config.max_memory_tokens}",
                "memory_too_large",
                "documents",
            )

    async def memorize_response(job: Callable[[Callable[[int, int], None]], dict], stream: bool, status: int):
        """Run a memorizing job; stream progress events when asked."""
        if not stream:
            result = await worker.run(lambda: job(lambda done, total: None))
            return JSONResponse(result, status_code=status)

        def streamed(emit: Callable[[Any], None], cancelled: Callable[[], bool]) -> None:
            last = [-1.0]

            def progress(done: int, total: int) -> None:
                if cancelled():
                    raise APIError(499, "client went away", "cancelled")  # stops memorization; nothing is saved
                share = done / max(total, 1)
                if share - last[0] >= 0.005 or done == total:
                    last[0] = share
                    emit({"object": "memory.progress", "done": done, "total": total})

            emit(job(progress))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for item in worker.stream(streamed):
                    yield sse(item)
            except Exception as exc:
                e = as_api_error(exc)
                yield sse(error_body(e.status, e.message, e.code, e.param))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS, status_code=status)

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/MemoryCreate"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "storage": {"type": "string"},
                            "stream": {"type": "boolean"},
                            "text": {"type": "string"},
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                        "required": ["name"],
                    }
                },
            },
        }
    }
    add_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/DocumentsIn"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "stream": {"type": "boolean"},
                            "text": {"type": "string"},
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                    }
                },
            },
        }
    }

    @app.post(
        "/v1/memories", status_code=201, summary="Memorize documents into a new named memory", openapi_extra=body_doc
    )
    async def create_memory(request: Request):
        body, docs = await read_documents(request, MemoryCreate)
        assert isinstance(body, MemoryCreate)
        name = check_name(body.name)
        if library.exists(name):
            raise APIError(
                409, f"a memory named {name!r} exists; add documents to it or delete it first", "memory_exists", "name"
            )

        def job(progress: Callable[[int, int], None]) -> dict:
            if library.exists(name):  # created by a request queued before this one
                raise APIError(409, f"a memory named {name!r} exists", "memory_exists", "name")
            check_memory_size(docs, 0)
            memory = mind.memorize(docs, storage=body.storage, progress=False, on_progress=progress)
            library.put(name, memory)
            return memory_json(name, memory, documents=True)

        return await memorize_response(job, body.stream, 201)

    @app.get("/v1/memories", summary="Stored memories")
    async def list_memories() -> dict:
        data = []
        for name in library.names():
            try:
                data.append(memory_json(name, library.get(name)))
            except Exception as exc:  # one unreadable memory must not hide the others
                data.append({"id": name, "object": "memory", "error": as_api_error(exc).message})
        return {"object": "list", "data": data}

    @app.get("/v1/memories/{name}", summary="One memory and its documents")
    async def get_memory(name: str) -> dict:
        return memory_json(check_name(name), library.get(name), documents=True)

    @app.delete("/v1/memories/{name}", summary="Delete a memory (from disk too)")
    async def delete_memory(name: str) -> dict:
        check_name(name)
        await worker.run(lambda: library.delete(name))
        return {"id": name, "object": "memory.deleted", "deleted": True}

    @app.post(
        "/v1/memories/{name}/documents",
        status_code=201,
        summary="Memorize more documents into a memory",
        openapi_extra=add_doc,
    )
    async def add_documents(name: str, request: Request):
        check_name(name)
        memory = library.get(name)
        body, docs = await read_documents(request, DocumentsIn)
        taken = {d.id for d in memory.documents}
        clash = sorted({d.id for d in docs if d.id} & taken)
        if clash:
            raise APIError(
                409,
                f"documents {clash} are already in memory {name!r}; delete them first",
                "document_exists",
                "documents",
            )

        def job(progress: Callable[[int, int], None]) -> dict:
            current = library.get(name)
            check_memory_size(docs, current.num_tokens)
            current.add(docs, mind=mind, on_progress=progress)
            library.saved(name)
            return memory_json(name, current, documents=True)

        return await memorize_response(job, body.stream, 201)

    @app.get("/v1/memories/{name}/documents/{doc_id:path}", summary="One document's text")
    async def get_document(name: str, doc_id: str) -> dict:
        memory = library.get(check_name(name))
        for s in memory.segments:
            if s.document.id == doc_id:
                d = s.document
                return {
                    "id": d.id,
                    "object": "memory.document",
                    "memory": name,
                    "name": d.name,
                    "text": d.text,
                    "tokens": s.num_tokens,
                }
        raise APIError(404, f"no document {doc_id!r} in memory {name!r}", "document_not_found", "doc_id")

    @app.delete("/v1/memories/{name}/documents/{doc_id:path}", summary="Remove a document from a memory")
    async def delete_document(name: str, doc_id: str) -> dict:
        memory = library.get(check_name(name))
        if doc_id not in memory:
            raise APIError(404, f"no document {doc_id!r} in memory {name!r}", "document_not_found", "doc_id")

        def job() -> None:
            library.get(name).remove(doc_id)
            library.saved(name)

        await worker.run(job)
        return {"id": doc_id, "object": "memory.document.deleted", "memory": name, "deleted": True}

    # ---------------------------------------------------------------- web page

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{asset}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        known = {"app.js": "text/javascript", "style.css": "text/css"}
        if asset not in known:
            raise APIError(404, f"no asset {asset!r}", "not_found")
        return FileResponse(str(STATIC / asset), media_type=known[asset])

    return app
