"""Agents: create, list, import, read, delete, fork, export, and rate a completion (feedback)."""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ...errors import AgentExistsError, ContextBudgetError, ContextFormatError
from ...settings import AgentSettings
from .. import schemas as s
from ..auth import MAX_PUBLIC_ID_CHARS
from ..deps import AgentsDep, ClaimedAgent, OwnedAgent, claim
from ..http_errors import BODY_ERRORS, CONFLICT, MODEL_ERRORS, bad, http_error
from ..tenancy import agent_view

router = APIRouter(tags=["agents"])


@router.post("/v1/agents", response_model=s.AgentResponse, status_code=201, responses={**BODY_ERRORS, **CONFLICT})
async def create_agent(request: Request, agents: AgentsDep, body: s.CreateAgentRequest):
    """Create an agent (its context version 0 is ``context``, empty by default)."""
    agent = claim(request, agents, body.agent_id)
    settings = AgentSettings(**body.model_dump(include={"context_budget", "budget_policy", "parse_policy",
                                                        "prompt_set", "on_failed_update"}, exclude_none=True))
    try:
        return await agents.create(agent, settings, body.context or "")
    except ContextBudgetError as exc:  # the store applied the agent's budget policy and refused it
        raise bad(f"context is {exc.original_chars} characters, over the context budget of {exc.budget}",
                  "context") from None


@router.get("/v1/agents", response_model=s.AgentList)
async def list_agents(agents: AgentsDep):
    return {"object": "list", "data": [agent_view(agents.tenant, i) for i in await agents.list_agents()]}


@router.post("/v1/imports", response_model=s.AgentResponse, status_code=201, responses={**BODY_ERRORS, **CONFLICT})
async def import_agent(
    request: Request, agents: AgentsDep, body: s.ExportDocument,
    agent_id: Annotated[Optional[str], Query(min_length=1, max_length=MAX_PUBLIC_ID_CHARS, pattern=s.AGENT_ID_PATTERN,
                                             description="Id for the new agent (default: the export's id).")] = None,
):
    """Create an agent from an export document (every context version kept)."""
    public = agent_id or body.agent_id
    if not public:
        raise bad("the export names no agent id; pass ?agent_id=NEW_ID", "agent_id")
    agent = claim(request, agents, public)
    data = body.model_dump()
    try:
        data["settings"] = AgentSettings(**body.settings).model_dump()
    except (ValueError, TypeError) as exc:
        raise bad(f"settings: {exc}", "settings") from None
    try:
        return await agents.import_agent(agent, data)
    except ContextBudgetError as exc:
        last = len(body.versions) - 1
        raise bad(f"versions[{last}].text: the head context (the last version) is {exc.original_chars} characters, "
                  f"over the agent's context budget of {exc.budget}; shorten it or raise settings.context_budget",
                  f"versions[{last}].text") from None
    except ContextFormatError as exc:
        raise http_error(exc, request, param="versions") from None
    except AgentExistsError as exc:
        raise http_error(exc, request, message=f"you already have an agent {public!r}; import under another id "
                                               "with ?agent_id=") from None


@router.get("/v1/agents/{agent_id}", response_model=s.AgentResponse)
async def get_agent(agents: AgentsDep, agent: OwnedAgent):
    return agent_view(agents.tenant, agent.info)


@router.delete("/v1/agents/{agent_id}", response_model=s.DeletedResponse)
async def delete_agent(agents: AgentsDep, agent: OwnedAgent):
    """Delete an agent with all its context versions and episodes (irreversible)."""
    await agents.delete(agent.ref)
    return {"agent_id": agent.ref.public_id, "deleted": True}


@router.post("/v1/agents/{agent_id}/fork", response_model=s.AgentResponse, status_code=201,
             responses={**BODY_ERRORS, **CONFLICT})
async def fork_agent(request: Request, agents: AgentsDep, agent: ClaimedAgent, body: s.ForkRequest):
    """A new agent whose version 0 is this agent's context at ``version`` (default: current)."""
    new = agents.ref(body.agent_id)
    try:
        return await agents.fork(agent, new, body.version)
    except ContextFormatError as exc:  # the forked context is over the budget (policy reject)
        raise http_error(exc, request, param="version" if body.version is not None else "agent_id") from None


@router.get("/v1/agents/{agent_id}/export", response_model=s.ExportDocument)
async def export_agent(agents: AgentsDep, agent: OwnedAgent):
    """Settings and every context version (the body ``POST /v1/imports`` takes)."""
    return await agents.export(agent.ref)


@router.post("/v1/agents/{agent_id}/feedback", response_model=s.FeedbackResponse,
             responses={**BODY_ERRORS, **CONFLICT, **MODEL_ERRORS})
async def feedback(agents: AgentsDep, agent: ClaimedAgent, body: s.FeedbackRequest):
    """Rate a completion: runs the agent's update episode and returns its context afterwards.

    Feedbacks for one agent are serialised: concurrent feedbacks all land, as successive
    context versions. A completion is rated once: a second rating gets 409.
    """
    return JSONResponse(await agents.rate(agent, body.completion_id, body.reward, body.feedback))
