"""The API's errors: one JSON shape (:class:`~seeright.service.api.protocol.ErrorResponse`), built here only."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from seeright.service.api.protocol import ErrorResponse
from seeright.service.requests import RequestError
from seeright.service.scheduler import QueueFull

KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large", 431: "request_too_large", 503: "overloaded"}


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.of(message, KINDS.get(status, "invalid_request_error"), param, status)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def overloaded(retry_after_s: int) -> JSONResponse:
    return error_response(503, "the server is at capacity; retry later", headers={"Retry-After": str(retry_after_s)})


def install_error_handlers(app: FastAPI) -> None:
    """Map validation errors, engine refusals, HTTP errors and a full queue to the error shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            param, message = "body", "body: malformed JSON"
        else:
            param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            message = f"{param}: {err.get('msg')}"
        request.app.state.metrics.requests.labels("400").inc()
        return error_response(400, message, param)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        request.app.state.metrics.requests.labels("400").inc()
        return error_response(400, str(exc), exc.field)

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        request.app.state.metrics.requests.labels("503").inc()
        return overloaded(request.app.state.settings.retry_after_s)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
