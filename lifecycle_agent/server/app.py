"""The FastAPI application: OpenAI-compatible chat, feedback, and REST for agents and contexts.

Build it with :func:`create_app` (usable from Python, e.g. mounted in your own ASGI app or
driven by ``httpx.ASGITransport``); ``lifecycle-agent serve`` runs it under uvicorn.

The pieces: one router per resource (:mod:`.routes`), the dependencies they share
(:mod:`.deps`: the service, the caller's tenant, the agent a path names), the service as a
tenant sees it (:mod:`.tenancy`: public ids in, views out, domain errors), and the one table
from domain errors to HTTP statuses (:mod:`.http_errors`).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, Iterable, Optional

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from .. import __version__
from ..models.base import ChatModel
from ..store import Store
from .auth import KeyRing
from .deps import known_query_only
from .http_errors import ERROR_RESPONSES, ApiError, install_error_handlers
from .middleware import RequestGuard
from .routes import ROUTERS
from .service import AgentService

__all__ = ["ApiError", "DEFAULT_DRAIN_TIMEOUT_S", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MODEL_TIMEOUT_S", "create_app"]

log = logging.getLogger("lifecycle_agent.server")

#: Default request body limit, bytes.
DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Default limit for one model call, seconds.
DEFAULT_MODEL_TIMEOUT_S = 120.0
#: Default time shutdown waits for running episodes, seconds.
DEFAULT_DRAIN_TIMEOUT_S = 60.0


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
    install_error_handlers(app)
    for router in ROUTERS:
        # every API route documents the common errors and refuses unknown query parameters
        app.include_router(router, responses=ERROR_RESPONSES, dependencies=[Depends(known_query_only)])
    app.state.api_routes = [route for router in ROUTERS for route in router.routes]  # for 405's Allow header
    app.openapi = lambda: _openapi(app)
    return app


# ---------------------------------------------------------------------------------------- OpenAPI


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
