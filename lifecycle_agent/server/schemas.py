"""Request and response bodies of the HTTP API (pydantic; they make the OpenAPI document).

Requests of the ``/v1/agents`` API forbid unknown fields, so a typo is a 400 instead of a
silently ignored option. The OpenAI-compatible chat request accepts and ignores fields it
does not use (``top_p``, ``user``, ``seed``, ...) so unchanged OpenAI clients work.

Every text a caller sends that can reach a prompt or a stored context (message contents,
feedback, context texts, imported versions) is refused when it holds one of the reserved
context delimiter strings, so no request can forge or corrupt the stored context format.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from ..settings import MAX_CONTEXT_BUDGET, AgentSettings, BudgetPolicy, OnFailedUpdate, ParsePolicy
from ..prompts import CONTEXT_BEGIN, CONTEXT_END, PROMPT_SETS
from .auth import MAX_PUBLIC_ID_CHARS

#: Longest single text field accepted (characters); the body-size limit applies as well.
MAX_TEXT_CHARS = 200_000
#: Longest completion id accepted (characters).
MAX_COMPLETION_ID_CHARS = 64


def no_delimiters(text: str) -> str:
    """Refuse text holding a reserved context delimiter (it would forge the stored context format)."""
    for token in (CONTEXT_BEGIN, CONTEXT_END):
        if token in text:
            raise ValueError(f"text holds the reserved context delimiter {token!r}; remove it")
    return text


def known_prompt_set(prompt_set: str) -> str:
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; known prompt sets: {', '.join(sorted(PROMPT_SETS))}")
    return prompt_set


AGENT_ID_PATTERN = r"^[A-Za-z0-9_:@-][A-Za-z0-9_.:@-]*$"
def _integral(value: Any) -> Any:
    """JSON integers: ``3`` and ``3.0`` are the same number; ``true`` and ``"3"`` are not numbers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**bounds: int) -> Any:
    """An integer field of a request (strict, but ``3.0`` counts as ``3``, as JSON Schema says)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]
SafeText = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(no_delimiters)]
AgentIdField = Annotated[
    str,
    Field(
        min_length=1, max_length=MAX_PUBLIC_ID_CHARS, pattern=AGENT_ID_PATTERN,
        description=f"1-{MAX_PUBLIC_ID_CHARS} letters, digits and - _ . : @ (not starting with '.').",
        examples=["support-bot"],
    ),
]
# the enum is read when the OpenAPI document is built, so prompt sets registered by then are listed
PromptSetId = Annotated[
    str, AfterValidator(known_prompt_set), Field(json_schema_extra=lambda schema: schema.update(enum=sorted(PROMPT_SETS)))
]
Reward = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]
#: A time stamp: finite and not before 1970 (JSON's ``NaN``, ``Infinity`` and ``1e999`` are refused).
UnixSeconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
#: Largest integer a request may carry (versions, ids, offsets): 2**53 - 1, the largest that
#: every JSON parser reads exactly (beyond it, numbers are doubles to many clients) and well
#: inside SQLite's 64-bit integers.
MAX_JSON_INT = 2**53 - 1
MAX_VERSION = MAX_JSON_INT


class _Strict(BaseModel):
    """Request bodies of the agents API: unknown fields refused, no type coercion (``false`` is no ``0``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    """What went wrong, in the OpenAI error shape (``type``, ``code``, ``param``)."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, conflict_error, "
                                  "request_too_large, model_error, model_timeout or server_error.")
    param: Optional[str] = Field(default=None, description="The request field at fault, when one is.")
    code: Optional[str] = None
    context_version: Optional[int] = Field(default=None, description="On conflicts: the agent's current context version.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------- agents


_SETTINGS = AgentSettings.model_fields


class CreateAgentRequest(_Strict):
    """A new agent. Settings left out take the defaults (see ``AgentSettings``)."""

    agent_id: AgentIdField
    # the settings' types, limits and descriptions come from AgentSettings (their one home)
    context_budget: Optional[json_int(ge=1, le=MAX_CONTEXT_BUDGET)] = Field(
        default=None, description=_SETTINGS["context_budget"].description)
    budget_policy: Optional[BudgetPolicy] = Field(default=None, description=_SETTINGS["budget_policy"].description)
    parse_policy: Optional[ParsePolicy] = Field(default=None, description=_SETTINGS["parse_policy"].description)
    on_failed_update: Optional[OnFailedUpdate] = Field(
        default=None, description=_SETTINGS["on_failed_update"].description)
    prompt_set: Optional[PromptSetId] = Field(default=None, description=_SETTINGS["prompt_set"].description)
    context: Optional[SafeText] = Field(default=None, description="Initial context (version 0); empty when left out.")


class AgentResponse(BaseModel):
    """An agent: its id, settings and current context version."""

    agent_id: str
    created_at: float = Field(description="Unix time, seconds.")
    context_version: int = Field(description="The current (head) context version.")
    settings: AgentSettings
    forked_from: Optional[str] = None
    forked_at_version: Optional[int] = None


class AgentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AgentResponse]


class DeletedResponse(BaseModel):
    agent_id: str
    deleted: Literal[True] = True


class ForkRequest(_Strict):
    agent_id: AgentIdField = Field(description="Id of the new agent.")
    version: Optional[json_int(ge=0, le=MAX_VERSION)] = Field(default=None, description="Version to fork at (default: current).")


class ExportVersion(BaseModel):
    """One context version of an export document."""

    model_config = ConfigDict(extra="allow", strict=True)

    version: json_int(ge=0, le=MAX_VERSION)
    text: SafeText
    created_at: Optional[UnixSeconds] = Field(default=None, description="Unix time, seconds (default: the import time).")
    parent_version: Optional[json_int(ge=0, le=MAX_VERSION)] = None
    source: Optional[str] = None
    note: Optional[str] = None


class ExportDocument(BaseModel):
    """An agent's settings and every context version (``GET .../export``; the body of ``POST /v1/imports``)."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["lifecycle-agent/agent-export"]
    format_version: Literal[1]
    agent_id: Optional[AgentIdField] = None
    settings: dict[str, Any] = Field(default_factory=dict)
    head_version: Optional[json_int(ge=0, le=MAX_VERSION)] = None
    versions: list[ExportVersion] = Field(min_length=1, description="Oldest first; entry i must have version i.")


# ---------------------------------------------------------------------------------------- contexts


class ContextResponse(BaseModel):
    """One context version of an agent."""

    agent_id: str
    version: int
    text: str
    source: str = Field(description="init, update, rollback, fork, import or edit.")
    created_at: float = Field(description="Unix time, seconds.")
    parent_version: Optional[int] = None
    episode_id: Optional[int] = Field(default=None, description="The update episode that wrote it, if any.")
    note: Optional[str] = None


class SetContextRequest(_Strict):
    text: SafeText = Field(description="The new context (the agent's context budget applies).")
    note: Optional[Annotated[str, Field(max_length=1000)]] = None


class RollbackRequest(_Strict):
    version: json_int(ge=0, le=MAX_VERSION) = Field(description="Version to make current again (appended as a new version).")


class HistoryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ContextResponse]
    total: int
    limit: int
    offset: int
    has_more: bool


class DiffResponse(BaseModel):
    agent_id: str
    a: int
    b: int
    diff: str = Field(description="Unified diff; empty when the versions are equal.")


# ---------------------------------------------------------------------------------------- episodes


class EpisodeResponse(BaseModel):
    """One stored episode (solve or update)."""

    episode_id: int
    agent_id: str
    kind: str = Field(description="solve or update.")
    completion_id: Optional[str] = Field(default=None, description="The chat completion this episode belongs to, if any.")
    task_id: Optional[str]
    run_id: Optional[str]
    position: Optional[int]
    context_version: Optional[int] = Field(description="Solve: the version shown as Hints. Update: the version it read.")
    messages: list[dict[str, Any]]
    answer: Optional[str]
    reward: Optional[float]
    feedback: Optional[str]
    status: str
    budget_status: Optional[str]
    error: Optional[str]
    prompt_set: Optional[str]
    model_id: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    metadata: dict[str, Any]
    duration_s: Optional[float]
    created_at: float


class EpisodePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[EpisodeResponse]
    total: int
    limit: int
    offset: int
    has_more: bool


class FeedbackRequest(_Strict):
    """A rating for one chat completion: runs the agent's update episode."""

    completion_id: Annotated[str, Field(min_length=1, max_length=MAX_COMPLETION_ID_CHARS, pattern=r"^chatcmpl-[A-Za-z0-9_-]+$")]
    reward: Optional[Reward] = Field(default=None, description="0.0 (wrong) to 1.0 (right), or null.")
    feedback: Optional[SafeText] = Field(default=None, description="What was right or wrong, in words, or null.")


class FeedbackResponse(ContextResponse):
    """The agent's context after the update episode (same fields as a context), plus what the update did."""

    completion_id: str
    update_status: str = Field(description="ok, format_miss (note taken leniently) or failed (context kept).")
    update_episode_id: Optional[int]
    changed: bool = Field(description="Whether the update wrote a new context version.")


# ---------------------------------------------------------------------------------------- OpenAI-compatible


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lifecycle-agent"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text"]
    text: SafeText


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[SafeText, list[TextPart], None] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: Optional[StrictBool] = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request; ``model`` is the agent id. Unused OpenAI fields are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: AgentIdField = Field(description="The agent id.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: Optional[json_int(ge=1, le=65_536)] = None
    max_completion_tokens: Optional[json_int(ge=1, le=65_536)] = None
    n: Optional[Literal[1]] = Field(default=None, description="Only one choice per request is supported.")
    tools: Optional[list[dict[str, Any]]] = Field(default=None, max_length=0, description="Tools are not supported.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    """OpenAI chat completion. ``id`` is the completion id to send feedback for."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None
    context_version: int = Field(description="The context version shown as Hints while answering.")


class HealthResponse(BaseModel):
    status: Literal["ok", "draining"]
    auth: Literal["api-keys", "local-only"]
    in_flight: int = Field(description="Episodes running now.")
    agents_loaded: int
