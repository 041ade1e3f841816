"""The routes' FastAPI dependencies: the service, the caller's tenant, and the agent a path names.

- :data:`ServiceDep`: the app's :class:`AgentService` (for routes that need no tenant);
- :data:`AgentsDep`: the caller's tenant, from its bearer key (401/403 otherwise), and the
  service as that tenant sees it (:class:`TenantAgents`);
- :data:`ClaimedAgent`: the ``agent_id`` path parameter as an :class:`AgentRef` (no store
  access); routes that read or write more than the agent's row pass it to a
  :class:`TenantAgents` method, which checks ownership in the same trip to the store's thread
  and only after FastAPI has validated the rest of the request;
- :data:`OwnedAgent` (and :data:`OwnedModel` for ``/v1/models/{model_id}``): the agent checked
  against the store, 404 for others' agents and unknown ids alike. FastAPI runs dependencies
  before it validates a route's own parameters and body, so only routes without either use it
  (a malformed request must get its 400 whether or not the agent exists).

Each sets ``request.state.agent_id`` (logs, and the wording of a 404).
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple, Optional

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..store import AgentInfo
from . import schemas as s
from .auth import LOCAL_TENANT, MAX_PUBLIC_ID_CHARS, KeyRing, Tenant, is_loopback
from .http_errors import ApiError, bad
from .service import AgentService
from .tenancy import AgentRef, TenantAgents

AGENT_ID_PATH = Path(min_length=1, max_length=MAX_PUBLIC_ID_CHARS, pattern=s.AGENT_ID_PATTERN, description="The agent id.")
AgentIdPath = Annotated[str, AGENT_ID_PATH]


async def service_of(request: Request) -> AgentService:
    return request.app.state.service


ServiceDep = Annotated[AgentService, Depends(service_of)]

_bearer = HTTPBearer(auto_error=False, description="An API key given to the server (--tenant-key).")


Credentials = Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)]


def authenticate(request: Request, credentials: Optional[HTTPAuthorizationCredentials]) -> Tenant:
    """The caller's tenant from its bearer key (every route but /healthz asks for it)."""
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


async def agents_of(request: Request, credentials: Credentials) -> TenantAgents:
    # the tenant and the service in one dependency, not two: each dependency FastAPI resolves
    # costs about 10 us per request, measurable on the hot read path
    return TenantAgents(request.app.state.service, authenticate(request, credentials))


AgentsDep = Annotated[TenantAgents, Depends(agents_of)]


def claim(request: Request, agents: TenantAgents, public_id: str) -> AgentRef:
    """The agent a request names (not yet checked against the store)."""
    request.state.agent_id = public_id
    return agents.ref(public_id)


async def claimed_agent(request: Request, agents: AgentsDep, agent_id: AgentIdPath) -> AgentRef:
    return claim(request, agents, agent_id)


ClaimedAgent = Annotated[AgentRef, Depends(claimed_agent)]


class Owned(NamedTuple):
    """One of the caller's agents: its ids and its row."""

    ref: AgentRef
    info: AgentInfo


async def claimed_model(request: Request, agents: AgentsDep, model_id: AgentIdPath) -> AgentRef:
    return claim(request, agents, model_id)


async def owned_agent(agents: AgentsDep, ref: ClaimedAgent) -> Owned:
    return Owned(ref, await agents.service.db(agents.owned_now, ref))


async def owned_model(agents: AgentsDep, ref: Annotated[AgentRef, Depends(claimed_model)]) -> Owned:
    return await owned_agent(agents, ref)


OwnedAgent = Annotated[Owned, Depends(owned_agent)]
OwnedModel = Annotated[Owned, Depends(owned_model)]

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
        raise bad(f"unknown query parameter {', '.join(map(repr, unknown))} for {request.url.path}; {takes}",
                  unknown[0])
