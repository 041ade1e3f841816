"""The FastAPI application: OpenAI-compatible chat, feedback, and REST for agents and contexts.

Build it with :func:`create_app` (usable from Python, e.g. mounted in your own ASGI app or
driven by ``httpx.ASGITransport``); ``lifecycle-agent serve`` runs it under uvicorn.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Iterable, Literal, Optional

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..settings import AgentSettings
from ..errors import (
    AgentExistsError,
    AgentNotFoundError,
    ContextBudgetError,
    ContextFormatError,
    FeedbackConflictError,
    ModelCallError,
    StoreLockedError,
    StoreReadOnlyError,
    TaskFormatError,
    VersionNotFoundError,
)
from ..models.base import ChatModel
from ..store import AgentInfo, ContextVersion, EpisodeRow, Store, check_agent_id
from . import schemas as s
from .auth import LOCAL_TENANT, MAX_PUBLIC_ID_CHARS, KeyRing, Tenant, is_loopback
from .middleware import RequestGuard
from .service import AgentService, ModelTimeoutError

log = logging.getLogger("lifecycle_agent.server")

#: Default request body limit, bytes.
DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Default limit for one model call, seconds.
DEFAULT_MODEL_TIMEOUT_S = 120.0
#: Default time shutdown waits for running episodes, seconds.
DEFAULT_DRAIN_TIMEOUT_S = 60.0

AGENT_ID_PATH = Path(min_length=1, max_length=MAX_PUBLIC_ID_CHARS, pattern=s.AGENT_ID_PATTERN, description="The agent id.")
AgentIdPath = Annotated[str, AGENT_ID_PATH]


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


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


def _no_agent(public_id: str) -> ApiError:
    return ApiError(404, f"no agent {public_id!r}; GET /v1/agents lists yours", "not_found_error", code="agent_not_found")


_ERRORS = {
    400: {"model": s.ErrorResponse, "description": "Malformed JSON, wrong types, unknown fields or values not allowed."},
    401: {"model": s.ErrorResponse, "description": "Missing or invalid API key."},
    403: {"model": s.ErrorResponse, "description": "Local-only mode and the client is not on loopback."},
    404: {"model": s.ErrorResponse, "description": "No such agent (for this API key), version, completion or episode."},
    503: {"model": s.ErrorResponse, "description": "The database is locked by another process; retry after "
                                                   "`Retry-After` seconds. Nothing was changed."},
}
_BODY_ERRORS = {413: {"model": s.ErrorResponse, "description": "Request body over the size limit."}}
#: One server-sent event of a streamed completion (OpenAPI 3.0/3.1 give an event stream's
#: ``schema`` per event): its ``data`` is a ``chat.completion.chunk`` as JSON, or ``[DONE]``.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "A chat.completion.chunk object as JSON; the last event is `[DONE]`."},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
_CONFLICT = {409: {"model": s.ErrorResponse, "description": "Conflict; `error.context_version` holds the current version."}}
_MODEL_ERRORS = {
    502: {"model": s.ErrorResponse, "description": "The model call failed."},
    504: {"model": s.ErrorResponse, "description": "The model did not answer within the server's model timeout."},
}


# ---------------------------------------------------------------------------------------- the factory


def create_app(
    store_or_db: Store | str,
    model: Any = None,
    api_keys: Optional[Iterable[str]] = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_timeout_s: float = DEFAULT_MODEL_TIMEOUT_S,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
) -> FastAPI:
    """The server as an ASGI app.

    Args:
        store_or_db: an open :class:`Store` (left open at shutdown) or a database path
            (opened here, closed at shutdown).
        model: anything :func:`~lifecycle_agent.models.resolve_model` accepts; one model
            serves every agent (a local model batches concurrent requests). A model built
            here from a spec string is closed at shutdown.
        api_keys: the API keys; each key is a tenant that owns its agents. ``None`` or
            empty: local-only mode (no auth, loopback clients only).
        max_body_bytes: larger request bodies get 413.
        model_timeout_s: a model call that takes longer gets 504.
        drain_timeout_s: at shutdown, how long to wait for running episodes.
    """
    from ..models import resolve_model

    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    keyring = KeyRing(api_keys or ())
    owns_store = not isinstance(store_or_db, Store)
    store = Store(store_or_db) if owns_store else store_or_db
    owns_model = isinstance(model, str) or model is None
    chat_model: ChatModel = resolve_model(model)
    service = AgentService(store, chat_model, model_timeout_s=model_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving %s with model %s (%s)", store.path, chat_model.model_id,
                 "local-only mode" if keyring.local_only else f"{len(keyring)} API keys")
        released = store.release_dead_claims()  # feedback a killed server took but never turned into a version
        if released:
            log.warning("released %d feedback claim(s) whose update never landed (the server holding them died); "
                        "those completions can be rated again", released)
        yield
        left = await service.drain(drain_timeout_s)
        if left:
            log.warning("shutdown: %d episodes still running after %g s; they are abandoned", left, drain_timeout_s)
        service.close()
        if owns_model:
            chat_model.close()
        if owns_store:
            store.close()
        log.info("server stopped")

    app = FastAPI(
        title="lifecycle-agent",
        version=__version__,
        description=(
            "Persistent agents that rewrite their own context after every rated task. OpenAI-compatible: "
            "`model` is the agent id. Rate a completion with `POST /v1/agents/{agent_id}/feedback`."
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.keyring = keyring
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)
    _install_error_handlers(app)
    router = _routes(service, keyring)
    app.state.api_routes = router.routes
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


# ---------------------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
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

    @app.exception_handler(AgentNotFoundError)
    async def agent_gone(request: Request, exc: AgentNotFoundError):
        # an agent deleted while the request waited (for the agent's lock, or the model)
        public_id = getattr(request.state, "agent_id", None)
        if public_id is None:
            return ApiError(404, "no such agent; GET /v1/agents lists yours", "not_found_error",
                            code="agent_not_found").response()
        return _no_agent(public_id).response()

    @app.exception_handler(StoreLockedError)
    async def locked(request: Request, exc: StoreLockedError):
        return ApiError(503, "the database is busy (locked by another writer); retry shortly", "server_error",
                        headers={"retry-after": "1"}).response()

    @app.exception_handler(StoreReadOnlyError)
    async def read_only(request: Request, exc: StoreReadOnlyError):
        log.error("%s", exc)
        return ApiError(503, "the server's database is read-only; nothing was stored (the operator must fix "
                        "its permissions)", "server_error").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id")
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
        return ApiError(500, f"internal server error; the server log has the details (request id {request_id})",
                        "server_error").response()


def _is_union_tag(part: str) -> bool:
    """Pydantic names the member of a union that failed in the error location
    (``function-after[no_delimiters(), constrained-str]``, ``list[TextPart]``); a field name never looks so."""
    return any(c in part for c in "[](), ") or part == "constrained-str"


def _validation_response(errors: list[dict]) -> JSONResponse:
    # our own validators (reserved delimiters, unknown prompt sets) say more than the type
    # errors of the other members of a union: report theirs first
    ours = [e for e in errors if e.get("type") == "value_error"]
    first = ours[0] if ours else errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if not _is_union_tag(str(p))]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return _bad(f"request body is not valid JSON ({why}); send a JSON object").response()
    if loc == ["body"] and first.get("type") == "missing":
        return _bad("request body is missing; send a JSON object with content-type application/json").response()
    if loc == ["body"] and first.get("type") in ("model_attributes_type", "dict_type"):
        return _bad("request body must be a JSON object (send content-type: application/json)").response()
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
    return _bad(f"{prefix}{param or 'body'}: {message}{more}", param=param or None).response()


def _openapi(app: FastAPI) -> dict:
    """The generated document, with 400 (our error shape) in place of FastAPI's 422."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc


# ---------------------------------------------------------------------------------------- auth


_bearer = HTTPBearer(auto_error=False, description="An API key given to the server (--tenant-key).")


async def tenant_of(
    request: Request, credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)]
) -> Tenant:
    """The caller's tenant from its bearer key (every route but /healthz depends on it)."""
    keyring: KeyRing = request.app.state.keyring
    if keyring.local_only:
        client = request.client.host if request.client else None
        if not is_loopback(client):
            raise ApiError(403, "this server runs without API keys (local-only mode) and answers loopback "
                                "clients only", "permission_error")
        tenant = LOCAL_TENANT
    else:
        if credentials is None:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="missing_api_key", headers={"www-authenticate": "Bearer"})
        found = keyring.tenant(credentials.credentials)
        if found is None:
            raise ApiError(401, "invalid API key", "authentication_error", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
        tenant = found
    request.state.tenant = tenant.tag
    return tenant


TenantDep = Annotated[Tenant, Depends(tenant_of)]

_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def known_query_only(request: Request) -> None:
    """Refuse unknown query parameters (a typo such as ``?limt=5`` must not be silently ignored)."""
    if not request.query_params:
        return
    route = request.scope["route"]
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        names = _QUERY_NAMES[id(route)] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - names)
    if unknown:
        takes = f"it takes: {', '.join(sorted(names))}" if names else "it takes none"
        raise _bad(f"unknown query parameter {', '.join(map(repr, unknown))} for {request.url.path}; {takes}",
                   unknown[0])


# ---------------------------------------------------------------------------------------- views


def _agent_view(tenant: Tenant, info: AgentInfo) -> s.AgentResponse:
    return s.AgentResponse(
        agent_id=tenant.public_id(info.agent_id), created_at=info.created_at, context_version=info.head_version,
        settings=AgentSettings(**info.settings), forked_from=tenant.public_id(info.forked_from),
        forked_at_version=info.forked_at_version,
    )


def _context_view(tenant: Tenant, version: ContextVersion) -> dict[str, Any]:
    data = version.model_dump()
    data["agent_id"] = tenant.public_id(version.agent_id)
    return data


def _episode_view(tenant: Tenant, row: EpisodeRow) -> dict[str, Any]:
    data = row.model_dump(exclude={"turns", "completes_task"})
    data["agent_id"] = tenant.public_id(row.agent_id)
    data["completion_id"] = row.task_id if (row.task_id or "").startswith("chatcmpl-") else None
    return data


def _finish_reason(reason: Optional[str]) -> str:
    return "length" if reason in ("length", "max_tokens") else "stop"


# ---------------------------------------------------------------------------------------- routes


def _routes(service: AgentService, keyring: KeyRing) -> APIRouter:
    store = service.store
    db = service.db  # every store call goes through it: SQLite never runs on the event loop

    def refused(exc: ContextFormatError, param: str, ids: dict[str, str]) -> ApiError:
        """A context write the store refused (over the budget, say), told in the caller's agent ids."""
        message = str(exc)
        for sid, public_id in ids.items():
            message = message.replace(sid, public_id)
        return _bad(message, param)

    def stored_id(tenant: Tenant, public_id: str, param: str = "agent_id") -> str:
        try:
            return tenant.stored_id(public_id)
        except ValueError as exc:
            raise _bad(str(exc), param) from None

    def owned(request: Request, tenant: Tenant, public_id: str) -> tuple[str, AgentInfo]:
        """The stored id and row of one of the caller's agents; 404 for others' agents and unknown ids alike.

        Reads the store: call it through ``db``, like every function here that takes a ``sid``.
        """
        request.state.agent_id = public_id
        sid = stored_id(tenant, public_id)
        try:
            info = store.get_agent(sid)
        except AgentNotFoundError:
            raise _no_agent(public_id) from None
        if tenant.owner is not None and info.owner != tenant.owner:
            raise _no_agent(public_id)
        return sid, info

    def version_or_404(sid: str, public_id: str, version: int) -> ContextVersion:
        try:
            return store.get_version(sid, version)
        except VersionNotFoundError:
            head = store.head(sid).version
            raise ApiError(404, f"agent {public_id!r} has no context version {version} (versions 0..{head})",
                           "not_found_error", code="version_not_found") from None

    def head_version(sid: str) -> Optional[int]:
        try:
            return store.head(sid).version
        except AgentNotFoundError:
            return None

    router = APIRouter(responses=_ERRORS, dependencies=[Depends(known_query_only)])

    # ------------------------------------------------------------------ operational
    @router.get("/healthz", response_model=s.HealthResponse, tags=["operations"], responses={})
    async def healthz():
        """Liveness and load: no auth, no database access."""
        return {
            "status": "draining" if service.draining else "ok",
            "auth": "local-only" if keyring.local_only else "api-keys",
            "in_flight": service.in_flight,
            "agents_loaded": service.agents_loaded,
        }

    # ------------------------------------------------------------------ OpenAI-compatible
    @router.get("/v1/models", response_model=s.ModelList, tags=["openai"])
    async def list_models(tenant: TenantDep):
        """The caller's agents, as OpenAI models (``model`` in a chat completion is the agent id)."""
        infos = await db(store.list_agents, owner=tenant.owner)
        return {"object": "list", "data": [
            {"id": tenant.public_id(i.agent_id), "object": "model", "created": int(i.created_at), "owned_by": "lifecycle-agent"}
            for i in infos if tenant.public_id(i.agent_id)
        ]}

    @router.get("/v1/models/{model_id}", response_model=s.ModelObject, tags=["openai"])
    async def get_model(request: Request, tenant: TenantDep, model_id: AgentIdPath):
        _, info = await db(owned, request, tenant, model_id)
        return {"id": model_id, "object": "model", "created": int(info.created_at), "owned_by": "lifecycle-agent"}

    @router.post(
        "/v1/chat/completions", response_model=s.ChatCompletionResponse, tags=["openai"],
        responses={**_BODY_ERRORS, **_MODEL_ERRORS,
                   200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                         "description": "A completion, or with `stream: true` an SSE stream of chunks."}},
    )
    async def chat_completions(request: Request, tenant: TenantDep, body: s.ChatCompletionRequest):
        """A solve episode of agent ``model`` over ``messages``, with the agent's context as Hints.

        The reply's ``id`` is the completion id: rate it with ``POST /v1/agents/{model}/feedback``.
        With ``stream: true`` the finished reply is sent as SSE chunks (``data: {...}``, then
        ``data: [DONE]``).
        """
        request.state.agent_id = body.model
        sid = stored_id(tenant, body.model, "model")
        try:
            info = await db(store.get_agent, sid)
        except AgentNotFoundError:
            info = None
        if info is None or (tenant.owner is not None and info.owner != tenant.owner):
            raise ApiError(404, f"no agent {body.model!r} (the model field is the agent id; GET /v1/models lists yours)",
                           "not_found_error", param="model", code="model_not_found")
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        try:
            completion_id, episode, reply = await service.chat(
                sid, messages, temperature=body.temperature,
                max_new_tokens=body.max_completion_tokens or body.max_tokens,
            )
        except TaskFormatError as exc:
            raise _bad(str(exc), "messages") from None
        except ModelTimeoutError as exc:
            raise ApiError(504, f"{exc}; nothing was stored, retry the request", "model_timeout") from None
        except ModelCallError as exc:
            raise ApiError(502, f"model call failed: {exc}; nothing was stored", "model_error") from None
        except AgentNotFoundError:
            raise _no_agent(body.model) from None
        except sqlite3.IntegrityError:  # the agent was deleted while the model was answering
            raise _no_agent(body.model) from None
        created = int(time.time())
        usage = None
        if reply.prompt_tokens is not None and reply.completion_tokens is not None:
            usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                     "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        finish = _finish_reason(reply.finish_reason)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(completion_id, created, body.model, reply.text, finish, usage if include_usage else None,
                     episode.context_version),
                media_type="text/event-stream", headers={"cache-control": "no-cache"},
            )
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage, "system_fingerprint": None, "context_version": episode.context_version,
        })

    @router.post(
        "/v1/agents/{agent_id}/feedback", response_model=s.FeedbackResponse, tags=["agents"],
        responses={**_BODY_ERRORS, **_CONFLICT, **_MODEL_ERRORS},
    )
    async def feedback(request: Request, tenant: TenantDep, agent_id: AgentIdPath, body: s.FeedbackRequest):
        """Rate a completion: runs the agent's update episode and returns its context afterwards.

        Feedbacks for one agent are serialised: concurrent feedbacks all land, as successive
        context versions. A completion is rated once: a second rating gets 409.
        """

        def completion() -> tuple[str, Optional[EpisodeRow]]:
            sid, _ = owned(request, tenant, agent_id)
            return sid, service.find_completion(sid, body.completion_id)

        sid, row = await db(completion)
        if row is None:
            raise ApiError(404, f"agent {agent_id!r} has no completion {body.completion_id!r}", "not_found_error",
                           param="completion_id", code="completion_not_found")
        try:
            record, version, policy = await service.feedback(sid, row.episode_id, body.reward, body.feedback)
        except FeedbackConflictError:
            raise ApiError(409, f"completion {body.completion_id!r} was already rated; each completion takes one "
                                "feedback", "conflict_error", code="already_rated",
                           context_version=await db(head_version, sid)) from None
        except (KeyError, AgentNotFoundError):
            raise _no_agent(agent_id) from None
        if record.update_status in ("error", "conflict"):
            head = await db(head_version, sid)
        if record.update_status == "error":
            what = "timed out" if policy.timed_out else "failed"
            message = (f"the update episode {what} ({record.error}); the context stays at version {head} and the "
                       f"completion was not rated: send the feedback again to retry")
            raise ApiError(504 if policy.timed_out else 502, message,
                           "model_timeout" if policy.timed_out else "model_error", context_version=head)
        if record.update_status == "conflict":
            raise ApiError(409, f"the context of agent {agent_id!r} changed while the update ran (another server "
                                f"process writes to this database); the update was not applied and the completion was "
                                f"not rated: send the feedback again to retry",
                           "conflict_error", code="context_conflict", context_version=head)
        return JSONResponse({**_context_view(tenant, version), "completion_id": body.completion_id,
                             "update_status": record.update_status, "update_episode_id": record.update_episode_id,
                             "changed": record.new_context_version is not None})

    # ------------------------------------------------------------------ agents
    @router.post("/v1/agents", response_model=s.AgentResponse, status_code=201, tags=["agents"],
                 responses={**_BODY_ERRORS, **_CONFLICT})
    async def create_agent(request: Request, tenant: TenantDep, body: s.CreateAgentRequest):
        """Create an agent (its context version 0 is ``context``, empty by default)."""
        request.state.agent_id = body.agent_id
        sid = stored_id(tenant, body.agent_id)
        settings = AgentSettings(**body.model_dump(include={"context_budget", "budget_policy", "parse_policy",
                                                            "prompt_set", "on_failed_update"}, exclude_none=True))
        try:
            info = await db(store.create_agent, sid, settings.model_dump(), owner=tenant.owner,
                            initial_context=body.context or "")
        except ContextBudgetError as exc:  # the store applied the agent's budget policy and refused it
            raise _bad(f"context is {exc.original_chars} characters, over the context budget of {exc.budget}",
                       "context") from None
        except AgentExistsError:
            raise ApiError(409, f"you already have an agent {body.agent_id!r}; choose another id", "conflict_error",
                           param="agent_id", code="agent_exists") from None
        return _agent_view(tenant, info)

    @router.get("/v1/agents", response_model=s.AgentList, tags=["agents"])
    async def list_agents(tenant: TenantDep):
        infos = await db(store.list_agents, owner=tenant.owner)
        return {"object": "list", "data": [_agent_view(tenant, i) for i in infos if tenant.public_id(i.agent_id)]}

    @router.post("/v1/imports", response_model=s.AgentResponse, status_code=201, tags=["agents"],
                 responses={**_BODY_ERRORS, **_CONFLICT})
    async def import_agent(
        request: Request, tenant: TenantDep, body: s.ExportDocument,
        agent_id: Annotated[Optional[str], Query(min_length=1, max_length=MAX_PUBLIC_ID_CHARS, pattern=s.AGENT_ID_PATTERN,
                                                 description="Id for the new agent (default: the export's id).")] = None,
    ):
        """Create an agent from an export document (every context version kept)."""
        public = agent_id or body.agent_id
        if not public:
            raise _bad("the export names no agent id; pass ?agent_id=NEW_ID", "agent_id")
        request.state.agent_id = public
        sid = stored_id(tenant, public)
        data = body.model_dump()
        try:
            data["settings"] = AgentSettings(**body.settings).model_dump()
        except (ValueError, TypeError) as exc:
            raise _bad(f"settings: {exc}", "settings") from None
        try:
            info = await db(store.import_agent, data, sid, owner=tenant.owner)
        except ContextBudgetError as exc:
            last = len(body.versions) - 1
            raise _bad(f"versions[{last}].text: the head context (the last version) is {exc.original_chars} characters, "
                       f"over the agent's context budget of {exc.budget}; shorten it or raise settings.context_budget",
                       f"versions[{last}].text") from None
        except ContextFormatError as exc:
            raise _bad(str(exc), "versions") from None
        except AgentExistsError:
            raise ApiError(409, f"you already have an agent {public!r}; import under another id with ?agent_id=",
                           "conflict_error", param="agent_id", code="agent_exists") from None
        return _agent_view(tenant, info)

    @router.get("/v1/agents/{agent_id}", response_model=s.AgentResponse, tags=["agents"])
    async def get_agent(request: Request, tenant: TenantDep, agent_id: AgentIdPath):
        return _agent_view(tenant, (await db(owned, request, tenant, agent_id))[1])

    @router.delete("/v1/agents/{agent_id}", response_model=s.DeletedResponse, tags=["agents"])
    async def delete_agent(request: Request, tenant: TenantDep, agent_id: AgentIdPath):
        """Delete an agent with all its context versions and episodes (irreversible)."""
        sid, _ = await db(owned, request, tenant, agent_id)
        await service.delete(sid)  # another delete that ran first: AgentNotFoundError, 404
        return {"agent_id": agent_id, "deleted": True}

    @router.post("/v1/agents/{agent_id}/fork", response_model=s.AgentResponse, status_code=201, tags=["agents"],
                 responses={**_BODY_ERRORS, **_CONFLICT})
    async def fork_agent(request: Request, tenant: TenantDep, agent_id: AgentIdPath, body: s.ForkRequest):
        """A new agent whose version 0 is this agent's context at ``version`` (default: current)."""
        new_sid = stored_id(tenant, body.agent_id)

        def fork() -> AgentInfo:
            sid, _ = owned(request, tenant, agent_id)
            if body.version is not None:
                version_or_404(sid, agent_id, body.version)
            return store.fork(sid, new_sid, body.version, owner=tenant.owner)

        try:
            info = await db(fork)
        except ContextFormatError as exc:  # the forked context is over the budget (policy reject)
            raise refused(exc, "version" if body.version is not None else "agent_id",
                          {new_sid: body.agent_id, tenant.stored_id(agent_id): agent_id}) from None
        except AgentExistsError:
            raise ApiError(409, f"you already have an agent {body.agent_id!r}; choose another id", "conflict_error",
                           param="agent_id", code="agent_exists") from None
        return _agent_view(tenant, info)

    @router.get("/v1/agents/{agent_id}/export", response_model=s.ExportDocument, tags=["agents"])
    async def export_agent(request: Request, tenant: TenantDep, agent_id: AgentIdPath):
        """Settings and every context version (the body ``POST /v1/imports`` takes)."""
        sid, _ = await db(owned, request, tenant, agent_id)
        data = await db(store.export_agent, sid)
        data["agent_id"] = agent_id
        return data

    # ------------------------------------------------------------------ contexts
    @router.get("/v1/agents/{agent_id}/context", response_model=s.ContextResponse, tags=["contexts"])
    async def get_context(
        request: Request, tenant: TenantDep, agent_id: AgentIdPath,
        version: Annotated[Optional[int], Query(ge=0, le=s.MAX_VERSION, description="Version to read (default: current).")] = None,
    ):

        def read() -> ContextVersion:
            sid, _ = owned(request, tenant, agent_id)
            return store.head(sid) if version is None else version_or_404(sid, agent_id, version)

        ctx = await db(read)
        return JSONResponse(_context_view(tenant, ctx))  # hot path: built from a validated row, sent as is

    @router.put("/v1/agents/{agent_id}/context", response_model=s.ContextResponse, tags=["contexts"],
                responses=_BODY_ERRORS)
    async def set_context(request: Request, tenant: TenantDep, agent_id: AgentIdPath, body: s.SetContextRequest):
        """Write a context by hand (a new version, source ``edit``; the budget applies)."""
        sid, _ = await db(owned, request, tenant, agent_id)
        try:
            ctx = await service.write(sid, lambda agent: agent.set_context(body.text, body.note))
        except ValueError as exc:  # ContextFormatError among them
            raise refused(exc, "text", {sid: agent_id}) from None
        return _context_view(tenant, ctx)

    @router.get("/v1/agents/{agent_id}/history", response_model=s.HistoryPage, tags=["contexts"])
    async def history(
        request: Request, tenant: TenantDep, agent_id: AgentIdPath,
        limit: Annotated[int, Query(ge=1, le=1000, description="Versions per page.")] = 100,
        offset: Annotated[int, Query(ge=0, le=s.MAX_JSON_INT, description="Versions to skip (oldest first).")] = 0,
    ):
        """Context versions, oldest first, one page at a time."""

        def read() -> tuple[AgentInfo, list[ContextVersion]]:
            sid, info = owned(request, tenant, agent_id)
            return info, store.history(sid, limit=limit, offset=offset)

        info, versions = await db(read)
        data = [_context_view(tenant, v) for v in versions]
        total = info.head_version + 1
        return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset,
                "has_more": offset + len(data) < total}

    @router.get("/v1/agents/{agent_id}/diff", response_model=s.DiffResponse, tags=["contexts"])
    async def diff(
        request: Request, tenant: TenantDep, agent_id: AgentIdPath,
        a: Annotated[int, Query(ge=0, le=s.MAX_VERSION, description="Older version.")],
        b: Annotated[Optional[int], Query(ge=0, le=s.MAX_VERSION, description="Newer version (default: current).")] = None,
    ):
        """Unified diff between two context versions."""

        def read() -> tuple[str, int, str]:
            sid, info = owned(request, tenant, agent_id)
            newer = info.head_version if b is None else b
            version_or_404(sid, agent_id, a)
            version_or_404(sid, agent_id, newer)
            return sid, newer, store.diff(sid, a, newer)

        sid, b, text = await db(read)
        if tenant.prefix:  # the file labels name the stored id; show the caller's id
            head, sep, rest = text.partition("\n@@")
            text = head.replace(f"{sid}@v", f"{agent_id}@v") + sep + rest
        return {"agent_id": agent_id, "a": a, "b": b, "diff": text}

    @router.post("/v1/agents/{agent_id}/rollback", response_model=s.ContextResponse, tags=["contexts"],
                 responses=_BODY_ERRORS)
    async def rollback(request: Request, tenant: TenantDep, agent_id: AgentIdPath, body: s.RollbackRequest):
        """Make an old version current again, appended as a new version (nothing is deleted)."""

        def check() -> str:
            sid, _ = owned(request, tenant, agent_id)
            version_or_404(sid, agent_id, body.version)
            return sid

        sid = await db(check)
        try:
            ctx = await service.write(sid, lambda agent: agent.rollback(body.version))
        except ContextFormatError as exc:  # the old version is over the agent's budget (policy reject)
            raise refused(exc, "version", {sid: agent_id}) from None
        return _context_view(tenant, ctx)

    # ------------------------------------------------------------------ episodes
    @router.get("/v1/agents/{agent_id}/episodes", response_model=s.EpisodePage, tags=["episodes"])
    async def episodes(
        request: Request, tenant: TenantDep, agent_id: AgentIdPath,
        kind: Annotated[Optional[Literal["solve", "update"]], Query(description="Only this kind.")] = None,
        completion_id: Annotated[Optional[str], Query(max_length=s.MAX_COMPLETION_ID_CHARS,
                                                      description="Only the episodes of this completion.")] = None,
        limit: Annotated[int, Query(ge=1, le=500, description="Episodes per page.")] = 50,
        offset: Annotated[int, Query(ge=0, le=s.MAX_JSON_INT, description="Episodes to skip.")] = 0,
        newest_first: Annotated[bool, Query(description="Newest first instead of oldest first.")] = False,
    ):
        """Stored episodes, one page at a time."""

        def read() -> tuple[list[EpisodeRow], int]:
            sid, _ = owned(request, tenant, agent_id)
            rows = store.episodes(sid, kind=kind, task_id=completion_id, limit=limit, offset=offset,
                                  newest_first=newest_first)
            if completion_id is None:
                return rows, store.count_episodes(sid, kind)
            return rows, len(store.episodes(sid, kind=kind, task_id=completion_id, limit=None))

        rows, total = await db(read)
        return {"object": "list", "data": [_episode_view(tenant, r) for r in rows], "total": total, "limit": limit,
                "offset": offset, "has_more": offset + len(rows) < total}

    @router.get("/v1/agents/{agent_id}/episodes/{episode_id}", response_model=s.EpisodeResponse, tags=["episodes"])
    async def episode(
        request: Request, tenant: TenantDep, agent_id: AgentIdPath,
        episode_id: Annotated[int, Path(ge=1, le=s.MAX_JSON_INT)],
    ):

        def read() -> tuple[str, Optional[EpisodeRow]]:
            sid, _ = owned(request, tenant, agent_id)
            try:
                return sid, store.get_episode(episode_id)
            except KeyError:
                return sid, None

        sid, row = await db(read)
        if row is None or row.agent_id != sid:
            raise ApiError(404, f"agent {agent_id!r} has no episode {episode_id}", "not_found_error",
                           code="episode_not_found")
        return _episode_view(tenant, row)

    return router


async def _sse(completion_id: str, created: int, model: str, text: str, finish: str,
               usage: Optional[dict], context_version: Optional[int]):
    """The finished reply as OpenAI ``chat.completion.chunk`` events."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}

    def event(choices: list, **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                context_version=context_version)
    yield event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"
