"""An agent's stored episodes: ``/v1/agents/{agent_id}/episodes``."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Path, Query

from .. import schemas as s
from ..deps import AgentsDep, ClaimedAgent

router = APIRouter(tags=["episodes"])


@router.get("/v1/agents/{agent_id}/episodes", response_model=s.EpisodePage)
async def episodes(
    agents: AgentsDep, agent: ClaimedAgent,
    kind: Annotated[Optional[Literal["solve", "update"]], Query(description="Only this kind.")] = None,
    completion_id: Annotated[Optional[str], Query(max_length=s.MAX_COMPLETION_ID_CHARS,
                                                  description="Only the episodes of this completion.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Episodes per page.")] = 50,
    offset: Annotated[int, Query(ge=0, le=s.MAX_JSON_INT, description="Episodes to skip.")] = 0,
    newest_first: Annotated[bool, Query(description="Newest first instead of oldest first.")] = False,
):
    """Stored episodes, one page at a time."""
    data, total = await agents.episodes(agent, kind=kind, completion_id=completion_id, limit=limit, offset=offset,
                                        newest_first=newest_first)
    return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset,
            "has_more": offset + len(data) < total}


@router.get("/v1/agents/{agent_id}/episodes/{episode_id}", response_model=s.EpisodeResponse)
async def episode(agents: AgentsDep, agent: ClaimedAgent, episode_id: Annotated[int, Path(ge=1, le=s.MAX_JSON_INT)]):
    return await agents.episode(agent, episode_id)
