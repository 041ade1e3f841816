"""The server's bridge to the runtime: cached agents, per-agent update locks, episode tasks.

Nothing here re-implements the loop: a chat completion is :meth:`LifecycleAgent.chat_flow`
and a feedback is :meth:`LifecycleAgent.feedback_flow`, both driven by
:func:`~lifecycle_agent.agent.adrive` against the one shared model.

Concurrency rules:

- every episode runs as its own asyncio task, shielded from the request that started it:
  a client that hangs up does not cut an episode in half, and shutdown waits for them;
- updates of one agent (feedback, rollback, a hand-written context, delete) hold that
  agent's lock, so concurrent feedbacks land as successive context versions, none lost;
  once it holds the lock, an update checks again that the agent exists (a delete queued
  before it may have removed it) and answers 404 instead of writing;
- chat completions take no lock: they read the current context and never write it;
- SQLite never runs on the event loop: every store call, and every step of a flow (which
  reads and writes the store), runs on the store's own worker thread, one at a time.
  A write waiting for another process's lock then holds up other database requests,
  never ``/healthz`` or the model calls in flight.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Generator, Optional, TypeVar

from ..agent import LifecycleAgent, ModelCall, TaskRecord, adrive
from ..errors import ModelCallError
from ..models.base import ChatModel, Generation
from ..store import ContextVersion, EpisodeRow, Store

T = TypeVar("T")
Flow = Generator[ModelCall, Generation, Any]
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
        self._store_thread: Optional[ThreadPoolExecutor] = None  # started on first use, stopped by close()
        self.draining = False

    # ------------------------------------------------------------------ bookkeeping
    @property
    def in_flight(self) -> int:
        return len(self._episodes)

    @property
    def agents_loaded(self) -> int:
        return len(self._agents)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` (store calls) on the store's thread, so the event loop never waits for SQLite."""
        if self._store_thread is None:
            # The store has one connection, used one call at a time: one thread is all it can use,
            # and it keeps store calls in arrival order.
            self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifecycle-agent-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_thread, functools.partial(fn, *args, **kwargs))

    def agent(self, stored_id: str) -> LifecycleAgent:
        """The cached agent object of an existing agent (store thread only).

        Never creates an agent: raises ``AgentNotFoundError`` when it does not exist.
        """
        agent = self._agents.get(stored_id)
        if agent is None:
            agent = self._agents[stored_id] = LifecycleAgent(self.model, self.store, stored_id, create=False)
        return agent

    def existing(self, stored_id: str) -> LifecycleAgent:
        """Like :meth:`agent`, after checking the agent is still stored (a delete may have run meanwhile)."""
        self.store.get_agent(stored_id)  # AgentNotFoundError when gone
        return self.agent(stored_id)

    def lock(self, stored_id: str) -> asyncio.Lock:
        lock = self._locks.get(stored_id)
        if lock is None:
            lock = self._locks[stored_id] = asyncio.Lock()
        return lock

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

    async def drive(self, start: Callable[[], Flow], model: ChatModel, finish: Callable[[Any], T]) -> T:
        """:func:`~lifecycle_agent.agent.adrive` with the flow's steps (its store work) on the store's thread.

        ``start()`` makes the flow and ``finish(result)`` turns its result into the answer, both
        on the store's thread. Model calls are awaited on the event loop; a failed call is thrown
        into the flow, which records it.
        """
        flow = await self.db(start)
        result = await adrive(flow, model, run_step=self.db)
        return await self.db(finish, result)

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
        :meth:`feedback` finds the episode again. Raises ``AgentNotFoundError`` when the
        agent does not exist.
        """
        completion_id = new_completion_id()
        policy = CallPolicy(self.model, self.model_timeout_s, temperature, max_new_tokens)

        def start() -> Flow:
            return self.agent(stored_id).chat_flow(messages, task_id=completion_id)

        def finish(result: tuple[int, Generation]) -> tuple[EpisodeRow, Generation]:
            episode_id, reply = result
            return self.store.get_episode(episode_id), reply

        episode, reply = await self.episode(self.drive(start, policy, finish))
        return completion_id, episode, reply

    def find_completion(self, stored_id: str, completion_id: str) -> Optional[EpisodeRow]:
        rows = self.store.episodes(stored_id, kind="solve", task_id=completion_id, limit=1)
        return rows[0] if rows else None

    async def feedback(
        self, stored_id: str, episode_id: int, reward: Optional[float], feedback: Optional[str]
    ) -> tuple[TaskRecord, ContextVersion, CallPolicy]:
        """The update episode for a rated completion, under the agent's lock.

        Returns the record, the context after the update, and the call policy (which says
        whether the model timed out). Raises ``FeedbackConflictError`` when already rated,
        ``AgentNotFoundError`` when the agent was deleted (also while this waited for the lock).
        """
        policy = CallPolicy(self.model, self.model_timeout_s)

        def start() -> Flow:
            return self.existing(stored_id).feedback_flow(episode_id, reward, feedback)

        def finish(record: TaskRecord) -> tuple[TaskRecord, ContextVersion]:
            if record.new_context_version is not None:
                return record, self.store.get_version(stored_id, record.new_context_version)
            return record, self.store.head(stored_id)

        async def locked() -> tuple[TaskRecord, ContextVersion]:
            async with self.lock(stored_id):
                return await self.drive(start, policy, finish)

        record, version = await self.episode(locked())
        return record, version, policy

    async def write(self, stored_id: str, fn: Callable[[LifecycleAgent], T]) -> T:
        """``fn(agent)`` (a rollback or an edit) under the agent's update lock, on the store's thread.

        Raises ``AgentNotFoundError`` when the agent is gone by the time the lock is held.
        """
        async with self.lock(stored_id):
            return await self.db(lambda: fn(self.existing(stored_id)))

    async def delete(self, stored_id: str) -> None:
        """Delete an agent under its update lock (updates queued behind it then find it gone: 404)."""

        def delete() -> None:
            self.store.delete_agent(stored_id)
            self._agents.pop(stored_id, None)

        async with self.lock(stored_id):
            await self.db(delete)

    def close(self) -> None:
        """Forget the cached agents and stop the store's thread (after the store calls queued on it)."""
        self._agents.clear()
        if self._store_thread is not None:
            self._store_thread.shutdown(wait=True)
            self._store_thread = None
