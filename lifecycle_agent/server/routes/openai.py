"""The OpenAI-compatible surface: ``/v1/models`` (the caller's agents) and ``/v1/chat/completions``."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...errors import AgentNotFoundError
from .. import schemas as s
from ..deps import AgentsDep, OwnedModel, claim
from ..http_errors import BODY_ERRORS, MODEL_ERRORS, ApiError, http_error
from ..tenancy import AgentIdError, model_view

router = APIRouter(tags=["openai"])

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


@router.get("/v1/models", response_model=s.ModelList)
async def list_models(agents: AgentsDep):
    """The caller's agents, as OpenAI models (``model`` in a chat completion is the agent id)."""
    infos = await agents.list_agents()
    return {"object": "list", "data": [model_view(agents.tenant.public_id(i.agent_id), i) for i in infos]}


@router.get("/v1/models/{model_id}", response_model=s.ModelObject)
async def get_model(model: OwnedModel):
    return model_view(model.ref.public_id, model.info)


@router.post(
    "/v1/chat/completions", response_model=s.ChatCompletionResponse,
    responses={**BODY_ERRORS, **MODEL_ERRORS,
               200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                     "description": "A completion, or with `stream: true` an SSE stream of chunks."}},
)
async def chat_completions(request: Request, agents: AgentsDep, body: s.ChatCompletionRequest):
    """A solve episode of agent ``model`` over ``messages``, with the agent's context as Hints.

    The reply's ``id`` is the completion id: rate it with ``POST /v1/agents/{model}/feedback``.
    With ``stream: true`` the finished reply is sent as SSE chunks (``data: {...}``, then
    ``data: [DONE]``).
    """
    try:
        agent = claim(request, agents, body.model)
        await agents.service.db(agents.owned_now, agent)
    except AgentIdError as exc:
        raise http_error(exc, request, param="model") from None
    except AgentNotFoundError:  # the OpenAI wording: the model field names the agent
        raise ApiError(404, f"no agent {body.model!r} (the model field is the agent id; GET /v1/models lists yours)",
                       "not_found_error", param="model", code="model_not_found") from None
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    completion_id, episode, reply = await agents.chat(
        agent, messages, temperature=body.temperature, max_new_tokens=body.max_completion_tokens or body.max_tokens)
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


def _finish_reason(reason: Optional[str]) -> str:
    return "length" if reason in ("length", "max_tokens") else "stop"


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
