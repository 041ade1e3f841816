"""Errors over HTTP: the OpenAI-shaped error body, the one table from domain errors to statuses,
and the exception handlers that use it.

Routes raise domain errors (:mod:`lifecycle_agent.errors`, :mod:`.tenancy`, :mod:`.service`);
:data:`ERROR_TABLE` says which status, OpenAI error type and code each one gets. A route raises
:class:`ApiError` itself only to add what the table cannot know: the request field an error is
about (``param``), or a message worded for that route (:func:`http_error` builds one from the
table with those overrides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AgentExistsError,
    AgentNotFoundError,
    ContextFormatError,
    ModelCallError,
    StoreLockedError,
    StoreReadOnlyError,
    TaskFormatError,
    VersionNotFoundError,
)
from ..store import check_agent_id
from . import schemas as s
from .service import ModelTimeoutError
from .tenancy import (
    AgentIdError,
    AlreadyRatedError,
    CompletionNotFoundError,
    EpisodeNotFoundError,
    UpdateConflictError,
    UpdateFailedError,
    UpdateTimedOutError,
)

log = logging.getLogger("lifecycle_agent.server")


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type_: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, context_version: Optional[int] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.context_version, self.headers = context_version, headers

    def response(self) -> JSONResponse:
        detail = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.context_version is not None:
            detail["context_version"] = self.context_version
        return JSONResponse({"error": detail}, status_code=self.status, headers=self.headers)


def bad(message: str, param: Optional[str] = None) -> ApiError:
    """A 400: the request is not acceptable as sent."""
    return ApiError(400, message, "invalid_request_error", param=param)


# ---------------------------------------------------------------------------------------- the table


def _no_agent(exc: Exception, request: Request) -> str:
    # worded from the id the request named: an agent deleted while the request waited (for the
    # agent's lock, or the model) reads the same as one that never existed
    public_id = getattr(request.state, "agent_id", None)
    return "no such agent; GET /v1/agents lists yours" if public_id is None else \
        f"no agent {public_id!r}; GET /v1/agents lists yours"


def _read_only(exc: Exception, request: Request) -> str:
    log.error("%s", exc)  # the operator must act: say why in the log
    return "the server's database is read-only; nothing was stored (the operator must fix its permissions)"


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of domain error reads over HTTP."""

    status: int
    type: str
    code: Optional[str] = None
    param: Optional[str] = None
    """The request field such an error is always about, if any."""
    message: Callable[[Exception, Request], str] = lambda exc, request: str(exc)
    headers: Optional[dict] = None


#: Domain error class -> how it reads over HTTP. An error takes the entry of the nearest class
#: in its MRO; one with no entry is a 500.
ERROR_TABLE: dict[type[Exception], ErrorKind] = {
    AgentIdError: ErrorKind(400, "invalid_request_error", param="agent_id"),
    ContextFormatError: ErrorKind(400, "invalid_request_error"),
    TaskFormatError: ErrorKind(400, "invalid_request_error", param="messages"),
    AgentNotFoundError: ErrorKind(404, "not_found_error", "agent_not_found", message=_no_agent),
    VersionNotFoundError: ErrorKind(404, "not_found_error", "version_not_found"),
    EpisodeNotFoundError: ErrorKind(404, "not_found_error", "episode_not_found"),
    CompletionNotFoundError: ErrorKind(404, "not_found_error", "completion_not_found", param="completion_id"),
    AgentExistsError: ErrorKind(409, "conflict_error", "agent_exists", param="agent_id"),
    AlreadyRatedError: ErrorKind(409, "conflict_error", "already_rated"),
    UpdateConflictError: ErrorKind(409, "conflict_error", "context_conflict"),
    UpdateFailedError: ErrorKind(502, "model_error"),
    UpdateTimedOutError: ErrorKind(504, "model_timeout"),
    ModelCallError: ErrorKind(502, "model_error", message=lambda exc, r: f"model call failed: {exc}; nothing was stored"),
    ModelTimeoutError: ErrorKind(504, "model_timeout", message=lambda exc, r: f"{exc}; nothing was stored, retry the request"),
    StoreLockedError: ErrorKind(503, "server_error", headers={"retry-after": "1"},
                                message=lambda exc, r: "the database is busy (locked by another writer); retry shortly"),
    StoreReadOnlyError: ErrorKind(503, "server_error", message=_read_only),
}


def error_kind(exc: BaseException) -> Optional[ErrorKind]:
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return None


def http_error(exc: Exception, request: Request, *, message: Optional[str] = None,
               param: Optional[str] = None) -> ApiError:
    """The table's ApiError for ``exc``, with a route's own message or ``param`` in place of the table's."""
    kind = error_kind(exc)
    if kind is None:
        raise TypeError(f"{type(exc).__name__} has no entry in ERROR_TABLE") from exc
    return ApiError(kind.status, message if message is not None else kind.message(exc, request), kind.type,
                    code=kind.code, param=param if param is not None else kind.param,
                    context_version=getattr(exc, "context_version", None),
                    headers=dict(kind.headers) if kind.headers else None)


# ---------------------------------------------------------------------------------------- handlers


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    async def domain_error(request: Request, exc: Exception):
        return http_error(exc, request).response()

    async def validation_error(request: Request, exc: RequestValidationError):
        return validation_response(exc.errors())

    async def http_exception(request: Request, exc: StarletteHTTPException):
        path, headers = request.url.path, getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; list every method served there
            allowed = sorted({m for r in request.app.state.api_routes if r.path_regex.match(path) for m in r.methods})
            headers = {"allow": ", ".join(allowed)}
            return ApiError(405, f"method {request.method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                            "invalid_request_error", headers=headers).response()
        if exc.status_code == 404:
            return ApiError(404, f"no route {path}; see /docs", "not_found_error").response()
        type_ = "request_too_large" if exc.status_code == 413 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_, headers=headers).response()

    async def unexpected(request: Request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id")
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
        return ApiError(500, f"internal server error; the server log has the details (request id {request_id})",
                        "server_error").response()

    app.add_exception_handler(ApiError, api_error)
    for cls in ERROR_TABLE:
        app.add_exception_handler(cls, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, unexpected)


def _is_union_tag(part: str) -> bool:
    """Pydantic names the member of a union that failed in the error location
    (``function-after[no_delimiters(), constrained-str]``, ``list[TextPart]``); a field name never looks so."""
    return any(c in part for c in "[](), ") or part == "constrained-str"


def validation_response(errors: list[dict]) -> JSONResponse:
    """A 400 for FastAPI's validation errors: the first problem, where it is, and how many more."""
    # our own validators (reserved delimiters, unknown prompt sets) say more than the type
    # errors of the other members of a union: report theirs first
    ours = [e for e in errors if e.get("type") == "value_error"]
    first = ours[0] if ours else errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if not _is_union_tag(str(p))]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return bad(f"request body is not valid JSON ({why}); send a JSON object").response()
    if loc == ["body"] and first.get("type") == "missing":
        return bad("request body is missing; send a JSON object with content-type application/json").response()
    if loc == ["body"] and first.get("type") in ("model_attributes_type", "dict_type"):
        return bad("request body must be a JSON object (send content-type: application/json)").response()
    where = loc[0] if loc and loc[0] in ("query", "path", "header") else None
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    param = ""
    for p in parts:
        param += f"[{p}]" if p.isdigit() else (f".{p}" if param else p)
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "string_pattern_mismatch" and parts and parts[-1] in ("agent_id", "model", "model_id"):
        try:
            check_agent_id(first.get("input"))
        except ValueError as exc:
            message = str(exc)
    prefix = f"{where} parameter " if where else ""
    # a failed union reports each member's error, at the same place or one inside it: count
    # only the places apart from this one
    here = tuple(loc)
    places = {tuple(str(p) for p in e.get("loc", ()) if not _is_union_tag(str(p))) for e in errors}
    others = sum(1 for place in places if place[:len(here)] != here and here[:len(place)] != place)
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return bad(f"{prefix}{param or 'body'}: {message}{more}", param=param or None).response()


# ---------------------------------------------------------------------------------------- documented errors


#: The errors every API route may answer (the OpenAPI document lists them).
ERROR_RESPONSES = {
    400: {"model": s.ErrorResponse, "description": "Malformed JSON, wrong types, unknown fields or values not allowed."},
    401: {"model": s.ErrorResponse, "description": "Missing or invalid API key."},
    403: {"model": s.ErrorResponse, "description": "Local-only mode and the client is not on loopback."},
    404: {"model": s.ErrorResponse, "description": "No such agent (for this API key), version, completion or episode."},
    503: {"model": s.ErrorResponse, "description": "The database is locked by another process; retry after "
                                                   "`Retry-After` seconds. Nothing was changed."},
}
BODY_ERRORS = {413: {"model": s.ErrorResponse, "description": "Request body over the size limit."}}
CONFLICT = {409: {"model": s.ErrorResponse, "description": "Conflict; `error.context_version` holds the current version."}}
MODEL_ERRORS = {
    502: {"model": s.ErrorResponse, "description": "The model call failed."},
    504: {"model": s.ErrorResponse, "description": "The model did not answer within the server's model timeout."},
}
