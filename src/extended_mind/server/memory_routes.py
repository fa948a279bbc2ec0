"""Memory routes: create named memories from JSON or uploaded files (with streamed progress), list, show, delete,
and add, read or remove single documents. Everything that memorizes or edits runs on the model worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from extended_mind.base.documents import Document, decode_text
from extended_mind.engine.mind import ExtendedMind
from extended_mind.memory.memory import Memory
from extended_mind.server.config import ServerConfig
from extended_mind.server.errors import APIError, as_api_error, validation_error
from extended_mind.server.library import MemoryLibrary, check_name
from extended_mind.server.schemas import DocumentsIn, MemoryCreate
from extended_mind.server.streaming import SSE_HEADERS, event_stream
from extended_mind.server.worker import ModelWorker


def no_document(memory: str, doc_id: str) -> APIError:
    return APIError(404, f"no document {doc_id!r} in memory {memory!r}", "document_not_found", "doc_id")


def add_memory_routes(
    app: FastAPI, mind: ExtendedMind, library: MemoryLibrary, worker: ModelWorker, config: ServerConfig
) -> None:
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
        if "shards" in info:  # sharded (torchrun): each rank's documents and tokens
            out["shards"] = info["shards"]
        if documents:
            out["data"] = [
                {"id": s.document.id, "name": s.document.name, "chars": len(s.document.text), "tokens": s.num_tokens}
                for s in memory.segments
            ]
        return out

    async def read_documents(request: Request, model: type[DocumentsIn]) -> tuple[DocumentsIn, list[Document]]:
        """Documents from a JSON body, or from a multipart form (fields as in JSON, files in `files`)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        pasted: Document | None = None  # the document of the `text` field
        if ctype == "application/json":
            try:
                body = model.model_validate_json(await request.body())
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            docs = [
                Document(d.id or "", d.text, d.name) if not isinstance(d, str) else Document("", d)
                for d in body.documents or []
            ]
            if body.text is not None:
                docs.append(pasted := Document("", body.text))
        elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.form(max_files=1000, max_fields=1000, max_part_size=config.max_body_bytes)
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
                        docs.append(pasted := Document("", value))
                elif key in model.model_fields:
                    fields[key] = value
                else:
                    raise APIError(400, f"unknown form field {key!r}", "invalid_value", key)
            try:
                body = model.model_validate(
                    {k: (v.lower() in ("1", "true", "yes") if k == "stream" else v) for k, v in fields.items()}
                )
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
        else:
            raise APIError(
                415, "send documents as application/json or a form (multipart or urlencoded)", "unsupported_media_type"
            )
        if body.text_name is not None and pasted is not None:  # the pasted text gets the name the user gave it
            docs = [Document(body.text_name, d.text, body.text_name) if d is pasted else d for d in docs]
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

        events = event_stream(worker.stream(streamed))
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS, status_code=status)

    body_doc = _documents_body("MemoryCreate", {"name": "string", "storage": "string"}, required=["name"])
    add_doc = _documents_body("DocumentsIn", {}, required=[])

    @app.post(
        "/v1/memories", status_code=201, summary="Memorize documents into a new named memory", openapi_extra=body_doc
    )
    async def create_memory(request: Request):
        library.check_writable()
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
            mind.build_index(memory, only_above_threshold=True)  # saved with it: the first question does not wait
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
        library.check_writable()
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
        library.check_writable()
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
            mind.add(current, docs, on_progress=progress)
            mind.build_index(current, only_above_threshold=True)
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
        raise no_document(name, doc_id)

    @app.delete("/v1/memories/{name}/documents/{doc_id:path}", summary="Remove a document from a memory")
    async def delete_document(name: str, doc_id: str) -> dict:
        library.check_writable()
        library.get(check_name(name))  # an unknown memory answers 404 before waiting for the model thread

        def job() -> None:
            current = library.get(name)
            if doc_id not in current:  # checked here, on the model thread: a delete that ran first is seen
                raise no_document(name, doc_id)
            current.remove(doc_id)
            library.saved(name)

        await worker.run(job)
        return {"id": doc_id, "object": "memory.document.deleted", "memory": name, "deleted": True}


def _documents_body(json_schema: str, fields: dict[str, str], required: list[str]) -> dict:
    """OpenAPI request body of a route that takes documents as JSON (`json_schema`) or as a form with `fields`,
    pasted `text` and uploaded `files` (the routes parse the body themselves, so FastAPI cannot describe it)."""
    properties = {name: {"type": kind} for name, kind in fields.items()}
    properties |= {
        "stream": {"type": "boolean"},
        "text": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
    }
    form = {"type": "object", "properties": properties} | ({"required": required} if required else {})
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_schema}"}},
                "multipart/form-data": {"schema": form},
            },
        }
    }
