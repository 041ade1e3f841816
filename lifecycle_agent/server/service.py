"""The server's bridge to the runtime: cached agents, per-agent update locks, episode tasks.

Nothing here re-implements the loop: a chat completion is :meth:`LifecycleAgent.chat_flow`
and a feedback is :meth:`LifecycleAgent.feedback_flow`, both driven by
:func:`~lifecycle_agent.agent.adrive` against the one shared model.

Concurrency rules:

- every episode runs as its own asyncio task, shielded from the request that started it:
  a client that hangs up does not cut an episode in half, and shutdown waits for them;
- updates of one agent (feedback, rollback, a hand-written context, delete) hold that
  agent's lock, so concurrent feedbacks land as successive context versions, none lost;
- chat completions take no lock: they read the current context and never write it.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Awaitable, Optional, TypeVar

from ..agent import LifecycleAgent, TaskRecord, adrive
from ..errors import ModelCallError
from ..models.base import ChatModel, Generation
from ..store import ContextVersion, EpisodeRow, Store

T = TypeVar("T")
_timeout = getattr(asyncio, "timeout", None)


class ModelTimeoutError(ModelCallError):
    """A model call took longer than the server's model timeout."""


class CallPolicy(ChatModel):
    """The shared model as one request sees it: a timeout, and the request's sampling overrides."""

    def __init__(
        self,
        model: ChatModel,
        timeout_s: float,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ):
        self.inner = model
        self.model_id = model.model_id
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timed_out = False

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        raise RuntimeError("CallPolicy is async only: drive flows with adrive()")

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        call = self.inner.agenerate(
            messages,
            temperature=self.temperature if self.temperature is not None else temperature,
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else max_new_tokens,
        )
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(call, self.timeout_s)
            async with _timeout(self.timeout_s):  # no extra task per call, unlike wait_for
                return await call
        except asyncio.TimeoutError:
            self.timed_out = True
            raise ModelTimeoutError(f"the model did not answer within {self.timeout_s:g} s") from None


def new_completion_id() -> str:
    """An unguessable completion id (144 random bits)."""
    return "chatcmpl-" + secrets.token_urlsafe(18)


class AgentService:
    """Agents of one store served over one model.

    Args:
        store: the open store.
        model: the shared model (a local model batches concurrent calls).
        model_timeout_s: longest a single model call may take, seconds.
    """

    def __init__(self, store: Store, model: ChatModel, *, model_timeout_s: float = 120.0):
        if model_timeout_s <= 0:
            raise ValueError(f"model timeout must be > 0 seconds, got {model_timeout_s!r}")
        self.store = store
        self.model = model
        self.model_timeout_s = float(model_timeout_s)
        self._agents: dict[str, LifecycleAgent] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._episodes: set[asyncio.Task] = set()
        self.draining = False

    # ------------------------------------------------------------------ bookkeeping
    @property
    def in_flight(self) -> int:
        return len(self._episodes)

    @property
    def agents_loaded(self) -> int:
        return len(self._agents)

    def agent(self, stored_id: str) -> LifecycleAgent:
        """The cached agent object of an existing agent (the caller checked it exists)."""
        agent = self._agents.get(stored_id)
        if agent is None:
            agent = self._agents[stored_id] = LifecycleAgent(self.model, self.store, stored_id)
        return agent

    def lock(self, stored_id: str) -> asyncio.Lock:
        lock = self._locks.get(stored_id)
        if lock is None:
            lock = self._locks[stored_id] = asyncio.Lock()
        return lock

    def forget(self, stored_id: str) -> None:
        self._agents.pop(stored_id, None)

    async def episode(self, work: Awaitable[T]) -> T:
        """Run ``work`` as a tracked task that finishes even if the awaiting request is cancelled."""
        task = asyncio.ensure_future(work)
        self._episodes.add(task)
        task.add_done_callback(self._episodes.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout_s: Optional[float] = None) -> int:
        """Wait for running episodes (graceful shutdown). Returns how many were still running at the end."""
        self.draining = True
        pending = set(self._episodes)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        return len(pending)

    # ------------------------------------------------------------------ chat + feedback
    async def chat(
        self,
        stored_id: str,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> tuple[str, EpisodeRow, Generation]:
        """A solve episode over chat messages. Returns ``(completion_id, episode, reply)``.

        The completion id is stored as the episode's task id (indexed), which is how
        :meth:`feedback` finds the episode again.
        """
        completion_id = new_completion_id()
        flow = self.agent(stored_id).chat_flow(messages, task_id=completion_id)
        policy = CallPolicy(self.model, self.model_timeout_s, temperature, max_new_tokens)
        episode_id, reply = await self.episode(adrive(flow, policy))
        return completion_id, self.store.get_episode(episode_id), reply

    def find_completion(self, stored_id: str, completion_id: str) -> Optional[EpisodeRow]:
        rows = self.store.episodes(stored_id, kind="solve", task_id=completion_id, limit=1)
        return rows[0] if rows else None

    async def feedback(
        self, stored_id: str, episode_id: int, reward: Optional[float], feedback: Optional[str]
    ) -> tuple[TaskRecord, ContextVersion, CallPolicy]:
        """The update episode for a rated completion, under the agent's lock.

        Returns the record, the context after the update, and the call policy (which says
        whether the model timed out). Raises ``FeedbackConflictError`` when already rated.
        """
        policy = CallPolicy(self.model, self.model_timeout_s)

        async def locked() -> tuple[TaskRecord, ContextVersion]:
            async with self.lock(stored_id):
                record = await adrive(self.agent(stored_id).feedback_flow(episode_id, reward, feedback), policy)
                version = (
                    self.store.get_version(stored_id, record.new_context_version)
                    if record.new_context_version is not None
                    else self.store.head(stored_id)
                )
                return record, version

        record, version = await self.episode(locked())
        return record, version, policy

    async def write(self, stored_id: str, fn, *args: Any) -> Any:
        """Run a context write (rollback, edit, delete) under the agent's update lock."""
        async with self.lock(stored_id):
            return fn(*args)

    def close(self) -> None:
        self._agents.clear()
