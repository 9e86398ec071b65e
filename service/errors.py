"""One error hierarchy for the API: each error maps to a status, a stable code and a message a
person can act on, rendered as ``{"error": {"code", "message", "param"}}``."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, details: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(APIError):
    status_code = 401
    code = "unauthorized"


class NotFound(APIError):
    status_code = 404
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(APIError):
    status_code = 503
    code = "service_unavailable"


def error_body(code: str, message: str, param: str | None = None, details: list[str] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "param": param}
    if details:
        error["details"] = details
    return {"error": error}


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.param, exc.details), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        if param:
            message = f"{param}: {message}"
        return JSONResponse(error_body("invalid_request", message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}.get(
            exc.status_code, "error"
        )
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(DataError)
    async def _out_of_range(_request: Request, exc: DataError) -> JSONResponse:
        logger.warning("value refused by the database: %s", exc.orig)
        return JSONResponse(
            error_body("invalid_request", "A value in the request is out of the range this API stores."),
            status_code=422,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        logger.warning("database unavailable: %s", exc)
        return JSONResponse(
            error_body("service_unavailable", "The database is unreachable right now; retry in a few seconds."),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "The server hit an unexpected error; it has been logged."),
            status_code=500,
        )


class _BodyOverLimit(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 before it is stored.

    A declared Content-Length over the limit is refused before anything is read; a body without
    one (chunked) is counted as it streams in and cut off at the limit, so an oversized upload is
    never spooled whole. Pure ASGI, because only the raw `receive` sees the body while it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, size: str) -> JSONResponse:
        return JSONResponse(
            error_body(
                "payload_too_large",
                f"The request body ({size}) is larger than this deployment accepts "
                f"({self.max_bytes} bytes, set by DPFT_MAX_UPLOAD_BYTES).",
            ),
            status_code=413,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal(f"{int(declared)} bytes")(scope, receive, send)
            return
        received = 0
        over = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyOverLimit
            return message

        async def send_unless_over(message: Message) -> None:
            if not over:  # the app's own answer to a body cut short is replaced by the 413 below
                await send(message)

        with contextlib.suppress(_BodyOverLimit):
            await self.app(scope, counted_receive, send_unless_over)
        if over:
            await self._refusal(f"over {self.max_bytes} bytes")(scope, receive, send)
