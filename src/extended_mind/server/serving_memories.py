"""Memory routes: create named memories from JSON or uploaded files (with streamed progress), list, show, delete,
and add, read or remove single documents. Everything that memorizes or edits runs on the model worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
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


class MemoryServing:
    """The memory API (routes in routes.py): named memories created from JSON or uploaded files (with streamed
    progress), listed, shown and deleted; single documents added, read or removed. Everything that memorizes or
    edits runs on the model worker."""

    def __init__(self, mind: ExtendedMind, library: MemoryLibrary, worker: ModelWorker, config: ServerConfig):
        self.mind, self.library, self.worker, self.config = mind, library, worker, config

    def memory_json(self, name: str, memory: Memory, documents: bool = False) -> dict:
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

    async def read_documents(self, request: Request, model: type[DocumentsIn]) -> tuple[DocumentsIn, list[Document]]:
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
            form = await request.form(max_files=1000, max_fields=1000, max_part_size=self.config.max_body_bytes)
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
            if len(d.text) > self.config.max_document_chars:
                raise APIError(
                    413,
                    f"document {d.id or d.name or ''!r} has {len(d.text)} characters; the limit is "
                    f"{self.config.max_document_chars}",
                    "document_too_large",
                    "documents",
                )
        return body, docs

    def check_memory_size(self, docs: list[Document], existing: int) -> None:
        """Refuse before memorizing when the memory would pass its token limit (tokenizing is cheap)."""
        n = existing + sum(len(self.mind.tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
        if n > self.config.max_memory_tokens:
            raise APIError(
                413,
                f"the memory would hold {n} tokens; the limit is {self.config.max_memory_tokens}",
                "memory_too_large",
                "documents",
            )

    async def memorize_response(self, job: Callable[[Callable[[int, int], None]], dict], stream: bool, status: int):
        """Run a memorizing job; stream progress events when asked."""
        if not stream:
            result = await self.worker.run(lambda: job(lambda done, total: None))
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

        events = event_stream(self.worker.stream(streamed))
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS, status_code=status)


    async def create(self, request: Request):
        self.library.check_writable()
        body, docs = await self.read_documents(request, MemoryCreate)
        assert isinstance(body, MemoryCreate)
        name = check_name(body.name)
        if self.library.exists(name):
            raise APIError(
                409, f"a memory named {name!r} exists; add documents to it or delete it first", "memory_exists", "name"
            )

        def job(progress: Callable[[int, int], None]) -> dict:
            if self.library.exists(name):  # created by a request queued before this one
                raise APIError(409, f"a memory named {name!r} exists", "memory_exists", "name")
            self.check_memory_size(docs, 0)
            memory = self.mind.memorize(docs, storage=body.storage, progress=False, on_progress=progress)
            self.mind.prepare_to_save(memory)  # saved with it: the first question does not wait
            self.library.put(name, memory)
            return self.memory_json(name, memory, documents=True)

        return await self.memorize_response(job, body.stream, 201)

    async def list_all(self) -> dict:
        data = []
        for name in self.library.names():
            try:
                data.append(self.memory_json(name, self.library.get(name)))
            except Exception as exc:  # one unreadable memory must not hide the others
                data.append({"id": name, "object": "memory", "error": as_api_error(exc).message})
        return {"object": "list", "data": data}

    async def get(self, name: str) -> dict:
        return self.memory_json(check_name(name), self.library.get(name), documents=True)

    async def delete(self, name: str) -> dict:
        self.library.check_writable()
        check_name(name)
        await self.worker.run(lambda: self.library.delete(name))
        return {"id": name, "object": "memory.deleted", "deleted": True}

    async def add_documents(self, name: str, request: Request):
        self.library.check_writable()
        check_name(name)
        memory = self.library.get(name)
        body, docs = await self.read_documents(request, DocumentsIn)
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
            current = self.library.get(name)
            self.check_memory_size(docs, current.num_tokens)
            self.mind.add(current, docs, on_progress=progress)
            self.mind.prepare_to_save(current)
            self.library.saved(name)
            return self.memory_json(name, current, documents=True)

        return await self.memorize_response(job, body.stream, 201)

    async def get_document(self, name: str, doc_id: str) -> dict:
        memory = self.library.get(check_name(name))
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

    async def delete_document(self, name: str, doc_id: str) -> dict:
        self.library.check_writable()
        self.library.get(check_name(name))  # an unknown memory answers 404 before waiting for the model thread

        def job() -> None:
            current = self.library.get(name)
            if doc_id not in current:  # checked here, on the model thread: a delete that ran first is seen
                raise no_document(name, doc_id)
            current.remove(doc_id)
            self.library.saved(name)

        await self.worker.run(job)
        return {"id": doc_id, "object": "memory.document.deleted", "memory": name, "deleted": True}


def documents_body(json_schema: str, fields: dict[str, str], required: list[str]) -> dict:
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
