"""Every route of the server, in one place: each hands its request to the serving object of its API (set on
`app.state` once the model is loaded; until then MetricsMiddleware answers 503). The serving classes hold the
logic: serving_completions.py (completions, chat, models), serving_memories.py (memories), ops.py (health, metrics,
tokens)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from extended_mind.server.ops import DetokenizeRequest, TokenizeRequest, health, prometheus
from extended_mind.server.schemas import ChatCompletionRequest, CompletionRequest
from extended_mind.server.serving_memories import documents_body

router = APIRouter()


# ---- operations ----


@router.get("/health", summary="200 when the model is ready, 503 while it loads")
async def get_health(request: Request):
    return health(request.app.state)


@router.get("/metrics", summary="Prometheus metrics")
async def get_metrics(request: Request) -> Response:
    return prometheus(request.app.state.metrics)


@router.post("/tokenize", summary="Token ids of a text")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    return request.app.state.tokens.tokenize(req)


@router.post("/detokenize", summary="The text of token ids")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    return request.app.state.tokens.detokenize(req)


# ---- OpenAI-compatible generation ----


@router.get("/v1/models", summary="The served model")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [request.app.state.completions.model_card()]}


@router.get("/v1/models/{model}", summary="One model")
async def get_model(model: str, request: Request) -> dict:
    return request.app.state.completions.model_card(model)


@router.post("/v1/chat/completions", summary="Chat completion with memory attention (OpenAI-compatible)")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await request.app.state.chat.create(req, request)


@router.post("/v1/completions", summary="Text completion with memory attention (OpenAI-compatible)")
async def completions(req: CompletionRequest, request: Request):
    return await request.app.state.completions.create(req, request)


# ---- memories ----


@router.post("/v1/memories", status_code=201, summary="Memorize documents into a new named memory",
             openapi_extra=documents_body("MemoryCreate", {"name": "string", "storage": "string"}, ["name"]))
async def create_memory(request: Request):  # fmt: skip
    return await request.app.state.memories.create(request)


@router.get("/v1/memories", summary="Stored memories")
async def list_memories(request: Request) -> dict:
    return await request.app.state.memories.list_all()


@router.get("/v1/memories/{name}", summary="One memory and its documents")
async def get_memory(name: str, request: Request) -> dict:
    return await request.app.state.memories.get(name)


@router.delete("/v1/memories/{name}", summary="Delete a memory (from disk too)")
async def delete_memory(name: str, request: Request) -> dict:
    return await request.app.state.memories.delete(name)


@router.post("/v1/memories/{name}/documents", status_code=201, summary="Memorize more documents into a memory",
             openapi_extra=documents_body("DocumentsIn", {}, []))
async def add_documents(name: str, request: Request):  # fmt: skip
    return await request.app.state.memories.add_documents(name, request)


@router.get("/v1/memories/{name}/documents/{doc_id:path}", summary="One document's text")
async def get_document(name: str, doc_id: str, request: Request) -> dict:
    return await request.app.state.memories.get_document(name, doc_id)


@router.delete("/v1/memories/{name}/documents/{doc_id:path}", summary="Remove a document from a memory")
async def delete_document(name: str, doc_id: str, request: Request) -> dict:
    return await request.app.state.memories.delete_document(name, doc_id)
