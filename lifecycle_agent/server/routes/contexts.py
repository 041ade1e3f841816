"""An agent's context versions: read, write by hand, history, diff, rollback."""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ...errors import ContextFormatError
from .. import schemas as s
from ..deps import AgentsDep, ClaimedAgent
from ..http_errors import BODY_ERRORS, http_error

router = APIRouter(tags=["contexts"])


@router.get("/v1/agents/{agent_id}/context", response_model=s.ContextResponse)
async def get_context(
    agents: AgentsDep, agent: ClaimedAgent,
    version: Annotated[Optional[int], Query(ge=0, le=s.MAX_VERSION, description="Version to read (default: current).")] = None,
):
    # the hot path: one trip to the store's thread; built from a validated row, sent as is
    return JSONResponse(await agents.context(agent, version))


@router.put("/v1/agents/{agent_id}/context", response_model=s.ContextResponse, responses=BODY_ERRORS)
async def set_context(request: Request, agents: AgentsDep, agent: ClaimedAgent, body: s.SetContextRequest):
    """Write a context by hand (a new version, source ``edit``; the budget applies)."""
    try:
        return await agents.set_context(agent, body.text, body.note)
    except ContextFormatError as exc:
        raise http_error(exc, request, param="text") from None


@router.get("/v1/agents/{agent_id}/history", response_model=s.HistoryPage)
async def history(
    agents: AgentsDep, agent: ClaimedAgent,
    limit: Annotated[int, Query(ge=1, le=1000, description="Versions per page.")] = 100,
    offset: Annotated[int, Query(ge=0, le=s.MAX_JSON_INT, description="Versions to skip (oldest first).")] = 0,
):
    """Context versions, oldest first, one page at a time."""
    data, total = await agents.history(agent, limit, offset)
    return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset,
            "has_more": offset + len(data) < total}


@router.get("/v1/agents/{agent_id}/diff", response_model=s.DiffResponse)
async def diff(
    agents: AgentsDep, agent: ClaimedAgent,
    a: Annotated[int, Query(ge=0, le=s.MAX_VERSION, description="Older version.")],
    b: Annotated[Optional[int], Query(ge=0, le=s.MAX_VERSION, description="Newer version (default: current).")] = None,
):
    """Unified diff between two context versions."""
    b, text = await agents.diff(agent, a, b)
    return {"agent_id": agent.public_id, "a": a, "b": b, "diff": text}


@router.post("/v1/agents/{agent_id}/rollback", response_model=s.ContextResponse, responses=BODY_ERRORS)
async def rollback(request: Request, agents: AgentsDep, agent: ClaimedAgent, body: s.RollbackRequest):
    """Make an old version current again, appended as a new version (nothing is deleted)."""
    try:
        return await agents.rollback(agent, body.version)
    except ContextFormatError as exc:  # the old version is over the agent's budget (policy reject)
        raise http_error(exc, request, param="version") from None
