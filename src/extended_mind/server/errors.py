"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status that fits."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from extended_mind.base.errors import (
    DocumentError,
    ExtendedMindError,
    MemoryConflictError,
    MemoryFileError,
    MemoryMismatchError,
    PromptTooLongError,
)

log = logging.getLogger("extended_mind.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


class APIError(Exception):
    """An error answered to the client as it is."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


_ABSOLUTE_PATH = re.compile(r"(?:/[^/\s:'\",()]+)+/([^/\s:'\",()]+)")  # -> its last part


def as_api_error(exc: Exception) -> APIError:
    """The client-facing form of an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), "context_length_exceeded")
    if isinstance(exc, MemoryConflictError):  # another process saved it since the server opened it
        return APIError(409, str(exc), "memory_changed")
    if isinstance(exc, MemoryFileError):  # file names only: the server's own paths are not the client's business
        detail = _ABSOLUTE_PATH.sub(r"\1", str(exc))
        return APIError(500, f"a stored memory is damaged: {detail}", "memory_corrupt")
    if isinstance(exc, (DocumentError, MemoryMismatchError, ExtendedMindError)):
        return APIError(400, str(exc), "invalid_value")
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error (see the server log)", "internal_error")


def validation_error(errors: list[dict]) -> APIError:
    """A 400 naming the first problem pydantic found (request models and the memory routes' own parsing)."""
    if not errors:
        return APIError(400, "invalid request", "invalid_value")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"request body is not valid JSON: {detail}", "invalid_value")
    if tuple(first.get("loc", ())) in (("body",), ()):
        return APIError(400, "request body must be a JSON object (send it with Content-Type: application/json)",
                        "invalid_value")  # fmt: skip
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden" and len(loc) == 1:  # OpenAI's answer to an argument it does not know
        return APIError(400, f"Unrecognized request argument supplied: {param}", "unrecognized_argument", param)
    where = f" ({param})" if param else ""
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return APIError(400, f"{first.get('msg', 'invalid value')}{where}{more}", "invalid_value", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(ExtendedMindError)
    async def _library_error(_: Request, exc: ExtendedMindError) -> JSONResponse:
        e = as_api_error(exc)
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        e = validation_error(exc.errors())
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        e = as_api_error(exc)
        return error_response(e.status, e.message, e.code, e.param)
