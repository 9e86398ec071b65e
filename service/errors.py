"""One error hierarchy for the API: each error maps to a status, a stable code and a message a
person can act on, rendered as ``{"error": {"code", "message", "param"}}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install_body_limit(app: FastAPI, max_bytes: int) -> None:
    """Refuse a request whose declared length is over the limit before its body is read (an upload
    is otherwise spooled whole before the route sees it; a body without a length is still stopped by
    the upload route's own count, once spooled)."""

    @app.middleware("http")
    async def refuse_oversized(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            return JSONResponse(
                error_body(
                    "payload_too_large",
                    f"The request body ({int(length)} bytes) is larger than this deployment accepts "
                    "(DPFT_MAX_UPLOAD_BYTES).",
                ),
                status_code=413,
            )
        return await call_next(request)
