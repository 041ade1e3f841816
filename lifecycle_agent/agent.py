"""``LifecycleAgent``: a persistent agent that alternates solve and update-context episodes.

The loop is written once, as generators that *yield* model calls and receive
:class:`~lifecycle_agent.models.Generation` replies. :meth:`LifecycleAgent.run` drives
them with blocking calls, :meth:`LifecycleAgent.arun` with awaits; serve, eval and the
trainer reuse the same generators, so every entry point shares one code path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterable, Awaitable, Callable, Generator, Iterable, Literal, Optional

from pydantic import BaseModel, Field

from . import protocol
from .errors import AgentNotFoundError, LifecycleAgentError, ModelCallError, TaskFormatError
from .models.base import ChatModel, Generation
from .prompts import DEFAULT_PROMPT_SET, get_prompt_set
from .errors import ContextConflictError
from .settings import AgentSettings
from .store import ContextVersion, EpisodeRow, Store, check_agent_id
from .tasks import AnyTask, StepResult, Task, extract_answer, iter_tasks

log = logging.getLogger("lifecycle_agent")

ContextMode = Literal["live", "frozen", "none"]
DEFAULT_DB = "lifecycle-agent.db"


class TaskRecord(BaseModel):
    """The outcome of one task: its solve episode and (usually) its update episode."""

    task_id: str
    position: int = Field(description="Index of the task in the stream, from 0.")
    answer: Optional[str] = Field(default=None, description="The model's answer: the last ``Answer:`` line of its final reply, else that whole reply.")
    reward: Optional[float] = None
    feedback: Optional[str] = None
    context_version: int = Field(description="Context version shown as Hints while solving.")
    status: Literal["ok", "failed"] = "ok"
    error: Optional[str] = None
    turns: int = 0
    solve_episode_id: Optional[int] = None
    update_episode_id: Optional[int] = None
    update_status: Optional[str] = Field(default=None, description="ok, format_miss, failed, conflict, error; None when no update ran.")
    budget_status: Optional[str] = Field(default=None, description="ok, truncated or rejected.")
    new_context_version: Optional[int] = Field(default=None, description="Version written by the update, if any.")
    context_chars: int = Field(default=0, description="Length of the context after this task, characters.")
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    duration_s: float = 0.0
    resumed: bool = Field(default=False, description="The solve episode came from the store (an interrupted run).")


class RunResult(BaseModel):
    """What :meth:`LifecycleAgent.run` returns."""

    run_id: str
    agent_id: str
    records: list[TaskRecord] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="Task ids already completed by this agent (resume).")
    stopped: Optional[str] = Field(default=None, description="Why the run stopped early (fail-fast), if it did.")

    @property
    def mean_reward(self) -> Optional[float]:
        rewards = [r.reward for r in self.records if r.reward is not None]
        return sum(rewards) / len(rewards) if rewards else None

    @property
    def failed(self) -> list[TaskRecord]:
        return [r for r in self.records if r.status == "failed"]


@dataclass
class ModelCall:
    """A model request yielded by the loop generators, marked with the kind of episode it serves."""

    messages: list[dict]
    temperature: Optional[float]
    max_new_tokens: Optional[int]
    kind: Literal["solve", "update"] = "solve"


_Flow = Generator[ModelCall, Generation, Any]


def _close_quietly(flow: _Flow) -> None:
    """Close an interrupted flow; a failure while it records the interruption (a locked
    database, say) is logged, so the interruption itself is what the caller sees."""
    try:
        flow.close()
    except Exception as exc:  # noqa: BLE001 - the interruption being raised matters more
        log.warning("could not record the interrupted run: %s", exc)


def _checked(reply: Any, model: ChatModel) -> Generation:
    """A model's reply, checked before the flow stores anything of it (a :class:`ModelCallError` otherwise)."""
    model_id = getattr(model, "model_id", type(model).__name__)
    if not isinstance(reply, Generation):
        raise ModelCallError(f"model {model_id} returned {type(reply).__name__}, not a Generation")
    return reply.check(model_id)


def drive(flow: _Flow, model: ChatModel, *, route: Optional[Callable[[ModelCall], ChatModel]] = None) -> Any:
    """Run a loop generator to completion with blocking model calls.

    ``route`` (optional) picks the model of each call (by its ``kind``, say) instead of ``model``.
    """
    try:
        call = next(flow)
        while True:
            try:
                target = model if route is None else route(call)
                reply = _checked(target.generate(call.messages, temperature=call.temperature,
                                                 max_new_tokens=call.max_new_tokens), target)
            except ModelCallError as exc:
                call = flow.throw(exc)
            except BaseException:
                # interrupted (Ctrl-C, a model's unexpected exception): the flow records its run
                # as interrupted now, while its store is open, instead of whenever it is collected
                _close_quietly(flow)
                raise
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        return stop.value


async def adrive(flow: _Flow, model: ChatModel, *, run_step: Optional[Callable[..., Awaitable[Any]]] = None) -> Any:
    """Run a loop generator to completion with awaited model calls.

    ``run_step`` (optional) runs each step of the flow, which is where its store work
    happens: ``await run_step(fn, *args)``. The server passes one that runs steps on the
    store's worker thread, so SQLite never blocks the event loop.
    """

    def step(advance: Callable[[Any], ModelCall], value: Any) -> tuple[bool, Any]:
        # StopIteration cannot cross a thread's future: return the end of the flow instead.
        try:
            return False, advance(value)
        except StopIteration as stop:
            return True, stop.value

    async def advance(fn: Callable[[Any], ModelCall], value: Any) -> tuple[bool, Any]:
        return step(fn, value) if run_step is None else await run_step(step, fn, value)

    done, value = await advance(flow.send, None)
    while not done:
        call: ModelCall = value
        try:
            reply = _checked(await model.agenerate(call.messages, temperature=call.temperature,
                                                   max_new_tokens=call.max_new_tokens), model)
        except ModelCallError as exc:
            done, value = await advance(flow.throw, exc)
        except BaseException:
            # cancelled or interrupted: close the flow (on the thread that runs its steps) so it
            # records its run as interrupted while its store is open
            await advance(lambda _: _close_quietly(flow), None)
            raise
        else:
            done, value = await advance(flow.send, reply)
    return value


def _step_result(value: Any, where: str) -> StepResult:
    """Validate what a task's ``step()`` (or ``timeout_result()``) returned."""
    if not (isinstance(value, tuple) and len(value) == 4):
        raise TaskFormatError(f"{where}: step() returned {type(value).__name__}; expected (observation, reward, done, feedback)")
    obs, reward, done, feedback = value
    if obs is not None and not isinstance(obs, str):
        raise TaskFormatError(f"{where}: step() observation must be a string, got {type(obs).__name__}")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise TaskFormatError(f"{where}: step() reward must be a finite number or None, got {reward!r}")
        reward = float(reward)
    if feedback is not None and not isinstance(feedback, str):
        raise TaskFormatError(f"{where}: step() feedback must be a string or None, got {type(feedback).__name__}")
    return StepResult(obs or "", reward, bool(done), feedback)


def _sum(values: list[Optional[int]]) -> Optional[int]:
    known = [v for v in values if v is not None]
    return sum(known) if known else None



def edit_context(store: Store, agent_id: str, text: str, note: Optional[str] = None) -> ContextVersion:
    """The rule of a person's edit, wherever it comes from (Python, ``context set``, ``PUT .../context``):
    a new version with source ``edit``, checked as it will be stored (delimiters neutralised) and never
    cut: text over the agent's context budget is refused, whatever the agent's budget policy."""
    if not isinstance(text, str):
        raise TypeError(f"context must be a string, got {type(text).__name__}")
    return store.write_context(agent_id, text, source="edit", note=note, budget_policy="reject")


class LifecycleAgent:
    """A persistent agent whose self-written context lives in SQLite.

    Args:
        model: what answers: a :class:`~lifecycle_agent.models.ChatModel`, a callable
            ``fn(messages) -> str``, an agentscope ``ChatModelBase``, a spec string
            (``smollm2``, ``hf:PATH[@ADAPTER]``, ``openai:MODEL``, ``py:module:fn``), or
            ``None`` for the embedded SmolLM2-135M-Instruct. Resolved on first use.
        db: SQLite file (its directory must exist) or an open :class:`Store`.
        agent_id: the agent's name in the store. Reopening the same id continues from
            its stored context.
        context_budget: maximum context length in characters (default 2000).
        budget_policy: ``truncate`` (cut at a word boundary, recorded) or ``reject``
            (keep the previous context, recorded).
        parse_policy: ``lenient`` (default; take the note from the reply when the
            delimiter lines are missing, flagged ``format_miss``) or ``strict``.
        prompt_set: prompt-set id (see :mod:`lifecycle_agent.prompts`).
        on_failed_update: ``keep`` (default; an update with no usable notes leaves the previous
            context, recorded as ``failed``) or ``reset`` (the context becomes the prompt set's fixed
            "No notes available." text, as in training, so a bad update costs the later tasks).
        context_mode: ``live`` (update after every task), ``frozen`` (update after the
            first task only) or ``none`` (no context, no updates). Baselines for eval.
        temperature: sampling temperature of solve episodes (``None``: the model's default).
        update_temperature: of update episodes (``None``: same as ``temperature``).
        max_new_tokens: per model call (``None``: the model's default).
        owner: tenant that owns the agent (used by the server).
        create: create the agent when it does not exist (default); ``False`` raises
            :class:`~lifecycle_agent.errors.AgentNotFoundError` instead.

    Settings given here are stored with the agent; settings left as ``None`` come from
    the store (or the defaults for a new agent).
    """

    def __init__(
        self,
        model: Any = None,
        db: str | Store = DEFAULT_DB,
        agent_id: str = "default",
        *,
        context_budget: Optional[int] = None,
        budget_policy: Optional[str] = None,
        parse_policy: Optional[str] = None,
        prompt_set: Optional[str] = None,
        on_failed_update: Optional[str] = None,
        context_mode: ContextMode = "live",
        temperature: Optional[float] = None,
        update_temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
        owner: Optional[str] = None,
        create: bool = True,
    ):
        self.agent_id = check_agent_id(agent_id)
        if isinstance(model, str):
            from .models import check_spec

            check_spec(model)  # a mistyped or empty spec fails here, before anything is stored
        if context_mode not in ("live", "frozen", "none"):
            raise ValueError(f"context_mode must be 'live', 'frozen' or 'none', got {context_mode!r}")
        self.context_mode: ContextMode = context_mode
        self.temperature = temperature
        self.update_temperature = update_temperature
        self.max_new_tokens = max_new_tokens
        self._owns_store = not isinstance(db, Store)
        self.store = db if isinstance(db, Store) else Store(db)
        overrides = {
            k: v
            for k, v in dict(
                context_budget=context_budget, budget_policy=budget_policy, parse_policy=parse_policy, prompt_set=prompt_set,
                on_failed_update=on_failed_update,
            ).items()
            if v is not None
        }
        if "prompt_set" in overrides:
            get_prompt_set(overrides["prompt_set"])
        if self.store.has_agent(self.agent_id):
            stored = self.store.get_agent(self.agent_id).settings
            self.settings = AgentSettings(**{**stored, **overrides})
            if self.settings.model_dump() != stored:
                self.store.update_settings(self.agent_id, self.settings.model_dump())
        elif not create:
            if self._owns_store:
                self.store.close()
            raise AgentNotFoundError(f"no agent {self.agent_id!r} in {self.store.path}")
        else:
            self.settings = AgentSettings(**overrides)
            self.store.create_agent(self.agent_id, self.settings.model_dump(), owner=owner, exist_ok=True)
        self._model_arg = model
        self._model: Optional[ChatModel] = model if isinstance(model, ChatModel) else None

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> ChatModel:
        """The resolved model (loaded on first use)."""
        if self._model is None:
            from .models import resolve_model

            self._model = resolve_model(self._model_arg)
        return self._model

    # ------------------------------------------------------------------ context
    @property
    def context(self) -> str:
        """The agent's current self-written context."""
        return self.store.head(self.agent_id).text

    @property
    def context_version(self) -> int:
        """The number of the current context version (0 = the initial context)."""
        return self.store.head(self.agent_id).version

    def history(self) -> list[ContextVersion]:
        """Every context version, oldest first."""
        return self.store.history(self.agent_id)

    def diff(self, a: int, b: Optional[int] = None) -> str:
        """Unified diff between versions ``a`` and ``b`` (default: the current one)."""
        return self.store.diff(self.agent_id, a, self.context_version if b is None else b)

    def rollback(self, version: int) -> ContextVersion:
        """Make ``version`` current again as a new version (nothing is deleted)."""
        return self.store.rollback(self.agent_id, version)

    def set_context(self, text: str, note: Optional[str] = None) -> ContextVersion:
        """Write a context by hand (a person's edit). The budget applies; over-long text is refused."""
        return edit_context(self.store, self.agent_id, text, note)

    def fork(self, new_agent_id: str, version: Optional[int] = None) -> "LifecycleAgent":
        """A new agent starting from this agent's context at ``version`` (default: current), same model."""
        self.store.fork(self.agent_id, new_agent_id, version)
        return LifecycleAgent(
            self._model if self._model is not None else self._model_arg,
            self.store,
            new_agent_id,
            context_mode=self.context_mode,
            temperature=self.temperature,
            update_temperature=self.update_temperature,
            max_new_tokens=self.max_new_tokens,
        )

    def export(self) -> dict[str, Any]:
        """Settings and every context version as a JSON-ready dict (see :meth:`Store.import_agent`)."""
        return self.store.export_agent(self.agent_id)

    def episodes(self, **filters: Any) -> list[EpisodeRow]:
        """Stored episodes of this agent (filters: kind, task_id, run_id, limit, offset, newest_first)."""
        return self.store.episodes(self.agent_id, **filters)

    def close(self) -> None:
        """Close the store if this agent opened it (the model is left to its owner)."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "LifecycleAgent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    def _update_temperature(self) -> Optional[float]:
        return self.update_temperature if self.update_temperature is not None else self.temperature

    def solve_flow(
        self,
        task: AnyTask,
        position: int,
        *,
        run_id: Optional[str] = None,
        update: bool = True,
        metadata: Optional[dict] = None,
    ) -> _Flow:
        """One task: its solve episode, then (when ``update``) its update episode.

        A generator yielding :class:`ModelCall` and returning a :class:`TaskRecord`.
        Each finished episode is committed before the next begins.
        """
        started = time.perf_counter()
        state, stored_solve = self.store.task_state(self.agent_id, task.id)
        if state == "solved" and stored_solve is not None:
            if getattr(task, "replay_on_resume", False):
                # the solve is not repeated, but the pack state it left behind is rebuilt
                self._replay(task, stored_solve)
            record = self._record_from_solve(stored_solve, position)
            record.resumed = True
            solve_messages = stored_solve.messages
            head_version = stored_solve.context_version or 0
        else:
            head = self.store.head(self.agent_id)
            head_version = head.version
            context = head.text if self.context_mode != "none" else ""
            record, solve_messages = yield from self._solve(task, position, context, head_version, run_id, update, metadata)
            if record.status == "failed" or not update:
                record.duration_s = time.perf_counter() - started
                record.context_chars = len(self.context)
                return record
        if update:
            yield from self._update(record, solve_messages, head_version, run_id, metadata)
        record.duration_s = time.perf_counter() - started
        return record

    def _record_from_solve(self, row: EpisodeRow, position: int) -> TaskRecord:
        return TaskRecord(
            task_id=row.task_id or "",
            position=position,
            answer=row.answer,
            reward=row.reward,
            feedback=row.feedback,
            context_version=row.context_version or 0,
            turns=len(row.turns),
            solve_episode_id=row.episode_id,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
        )

    def _solve(self, task, position, context, head_version, run_id, update, metadata):
        ps = get_prompt_set(self.settings.prompt_set)
        where = f"task {task.id!r}"
        started = time.perf_counter()
        messages: list[dict] = []
        turns: list[dict] = []
        reward: Optional[float] = None
        feedback: Optional[str] = None
        last_reply = ""
        error: Optional[str] = None
        model_failed = False
        try:
            observation = task.start()
            messages = protocol.solve_messages(context, str(observation), ps, getattr(task, "instructions", None))
            max_turns = max(1, int(getattr(task, "max_turns", 1) or 1))
            done = False
            for _ in range(max_turns):
                reply = yield ModelCall(messages, self.temperature, self.max_new_tokens)
                last_reply = reply.text
                # Replies go back into later prompts: neutralise any delimiter text in them.
                messages.append({"role": "assistant", "content": protocol.neutralize(reply.text)})
                turns.append(reply.turn_record())
                result = _step_result(task.step(reply.text), where)
                reward, feedback = result.reward, result.feedback
                if result.done:
                    done = True
                    break
                messages.append({"role": "user", "content": protocol.neutralize(result.observation)})
            if not done:
                timeout = getattr(task, "timeout_result", None)
                result = _step_result(timeout(), where) if callable(timeout) else StepResult(
                    "", None, True, f"The turn limit ({max_turns}) was reached before the task was finished."
                )
                reward = result.reward if result.reward is not None else (reward if reward is not None else 0.0)
                feedback = result.feedback
        except ModelCallError as exc:
            error, model_failed = str(exc), True
        except LifecycleAgentError as exc:
            error = str(exc)
        except Exception as exc:  # a task's own code failed: record it on the episode, keep the run going
            error = f"{where} raised {type(exc).__name__}: {exc}"
        answer = extract_answer(last_reply) if last_reply else None
        status = "failed" if error else "ok"
        # A model failure can be retried by a rerun; a task's own failure would repeat, so it completes the task.
        completes = (not update and not model_failed) or (error is not None and not model_failed)
        episode_id = self.store.record_episode(
            agent_id=self.agent_id,
            run_id=run_id,
            kind="solve",
            position=position,
            task_id=task.id,
            context_version=head_version,
            messages=messages,
            answer=answer,
            reward=reward,
            feedback=feedback,
            status=status,
            error=error,
            prompt_set=self.settings.prompt_set,
            model_id=self.model.model_id,
            prompt_tokens=_sum([t.get("prompt_tokens") for t in turns]),
            completion_tokens=_sum([t.get("completion_tokens") for t in turns]),
            turns=turns,
            metadata={**(getattr(task, "metadata", None) or {}), **(metadata or {})},
            duration_s=time.perf_counter() - started,
            completes_task=completes,
        )
        record = TaskRecord(
            task_id=task.id,
            position=position,
            answer=answer,
            reward=reward,
            feedback=feedback,
            context_version=head_version,
            status=status,
            error=error,
            turns=len(turns),
            solve_episode_id=episode_id,
            prompt_tokens=_sum([t.get("prompt_tokens") for t in turns]),
            completion_tokens=_sum([t.get("completion_tokens") for t in turns]),
        )
        return record, messages

    def update_flow(
        self,
        solve_messages: list[dict],
        reward: Optional[float],
        feedback: Optional[str],
        *,
        task_id: Optional[str] = None,
        position: Optional[int] = None,
        run_id: Optional[str] = None,
        read_version: Optional[int] = None,
        metadata: Optional[dict] = None,
    ) -> _Flow:
        """An update episode on its own (the server's feedback call). Returns a :class:`TaskRecord`."""
        head = self.store.head(self.agent_id)
        record = TaskRecord(
            task_id=task_id or "", position=position or 0, reward=reward, feedback=feedback,
            context_version=head.version if read_version is None else read_version,
        )
        yield from self._update(record, solve_messages, record.context_version, run_id, metadata, task_id=task_id)
        return record

    def _update(self, record: TaskRecord, solve_messages, read_version, run_id, metadata, task_id=None):
        """Run the update episode for a solved task and fill ``record`` in place."""
        started = time.perf_counter()
        settings = self.settings
        previous = self.store.get_version(self.agent_id, read_version).text
        messages = protocol.update_messages(
            previous,
            protocol.render_transcript(solve_messages),
            record.reward,
            record.feedback,
            settings.context_budget,
            settings.prompt_set,
        )
        fields: dict[str, Any] = dict(
            agent_id=self.agent_id, run_id=run_id, kind="update", position=record.position,
            task_id=record.task_id or task_id, context_version=read_version, prompt_set=settings.prompt_set,
            model_id=self.model.model_id, reward=record.reward, feedback=record.feedback, metadata=metadata or {},
        )
        ps = get_prompt_set(settings.prompt_set)
        prefill = ps.update_prefill if ps.update_prefill and getattr(self.model, "supports_prefill", False) else None
        if prefill:
            # marked, so a model continues this message instead of starting a new reply after it
            messages = messages + [{"role": "assistant", "content": prefill, "prefill": True}]
        try:
            reply = yield ModelCall(messages, self._update_temperature(), self.max_new_tokens, kind="update")
        except ModelCallError as exc:
            record.update_status, record.status, record.error = "error", "failed", str(exc)
            record.update_episode_id = self.store.record_episode(
                **fields, messages=messages, status="error", error=str(exc),
                duration_s=time.perf_counter() - started, completes_task=False,
            )
            return
        # the stored transcript holds the whole reply: the prefill (prompt side) and what the model wrote
        full_reply = (prefill or "") + reply.text
        messages = (messages[:-1] if prefill else messages) + [{"role": "assistant", "content": full_reply}]
        turn = reply.turn_record()
        parsed = protocol.parse_update(full_reply, settings.parse_policy, prefilled=prefill is not None)
        new_text, note = parsed.text, None
        if new_text is None and settings.on_failed_update == "reset":
            new_text = ps.reset_context
            note = f"reset: the update held no usable notes; the context is now {ps.reset_context!r}"
        fields["metadata"] = {**fields["metadata"], "on_failed_update": settings.on_failed_update}
        if prefill:
            fields["metadata"]["prefill"] = prefill
        fields.update(
            messages=messages, status=parsed.status, turns=[turn],
            prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
            duration_s=time.perf_counter() - started, completes_task=True, error=note,
        )
        budget_status = None
        try:
            # the store applies the budget (the one place it is applied) and records its outcome on the episode
            episode_id, version, budget = self.store.record_update(
                new_text=new_text, note=note, expected_head=read_version if new_text is not None else None, **fields
            )
            budget_status = budget.status if budget is not None else None
        except ContextConflictError as exc:
            fields.update(status="conflict", error=str(exc))
            episode_id, version = self.store.record_episode(**fields), None
        record.update_episode_id = episode_id
        record.update_status = fields["status"]
        record.budget_status = budget_status
        record.new_context_version = version.version if version is not None else None
        record.context_chars = len(version.text) if version is not None else len(self.context)

    # ------------------------------------------------------------------ run / arun
    def _plan(self, tasks, resume: bool, update_after_last: bool, limit: Optional[int]):
        """Walk the stream lazily, yielding ``(task, position, update, state)``; endless streams work.

        Only ``update_after_last=False`` needs to know which task is the last, so only then
        is the next task drawn before the current one is solved (a live stream is never delayed otherwise).
        """
        stream = iter_tasks(tasks)
        if limit is not None:
            stream = itertools.islice(stream, limit)
        lookahead = not update_after_last
        current = next(stream, None)
        position = 0
        while current is not None:
            following = next(stream, None) if lookahead else None
            update = self.context_mode == "live" or (self.context_mode == "frozen" and position == 0)
            if lookahead and following is None:
                update = False
            state = self.store.task_state(self.agent_id, current.id)[0] if resume else "new"
            yield current, position, update, state
            current = following if lookahead else next(stream, None)
            position += 1

    def run(
        self,
        tasks: Iterable[Any],
        *,
        resume: bool = True,
        fail_fast: bool = False,
        update_after_last: bool = True,
        limit: Optional[int] = None,
        run_id: Optional[str] = None,
        on_record: Optional[Callable[[TaskRecord], None]] = None,
    ) -> RunResult:
        """Solve every task in order, updating the context after each.

        Args:
            tasks: any iterable of :class:`Task`, :class:`InteractiveTask`, dicts or prompt strings.
            resume: skip tasks this agent already completed (by task id) and finish a task
                whose solve was stored but whose update was not.
            fail_fast: stop at the first failed task instead of recording it and going on.
            update_after_last: run the update episode after the last task too (deployment: yes;
                training rollouts: no).
            limit: solve at most this many tasks of the stream.
            run_id: a name for this run in the store (default: a new id).
            on_record: called with each :class:`TaskRecord` as it completes (progress bars).
        """
        return drive(self.run_flow(tasks, resume=resume, fail_fast=fail_fast, update_after_last=update_after_last,
                                   limit=limit, run_id=run_id, on_record=on_record), self.model)

    async def arun(
        self,
        tasks: Iterable[Any],
        *,
        resume: bool = True,
        fail_fast: bool = False,
        update_after_last: bool = True,
        limit: Optional[int] = None,
        run_id: Optional[str] = None,
        on_record: Optional[Callable[[TaskRecord], None]] = None,
    ) -> RunResult:
        """Async twin of :meth:`run` (model calls are awaited; several agents can run concurrently)."""
        flow = self.run_flow(tasks, resume=resume, fail_fast=fail_fast, update_after_last=update_after_last,
                             limit=limit, run_id=run_id, on_record=on_record)
        return await adrive(flow, self.model)

    def run_flow(
        self,
        tasks: Iterable[Any],
        *,
        resume: bool = True,
        fail_fast: bool = False,
        update_after_last: bool = True,
        limit: Optional[int] = None,
        run_id: Optional[str] = None,
        on_record: Optional[Callable[[TaskRecord], None]] = None,
    ) -> _Flow:
        """The whole run as one flow (yields :class:`ModelCall`, returns :class:`RunResult`).

        :meth:`run` drives it with blocking calls and :meth:`arun` with awaits; arguments as in :meth:`run`.
        """
        result, plan = self._begin(tasks, resume, update_after_last, limit, run_id)
        try:
            for task, position, update, state in plan:
                if state == "done":
                    result.skipped.append(task.id)
                    if getattr(task, "replay_on_resume", False):
                        self._replay(task)
                    continue
                record = yield from self.solve_flow(task, position, run_id=result.run_id, update=update)
                if self._after(result, record, on_record, fail_fast):
                    break
        except BaseException:
            self._end(result, "interrupted")
            raise
        self._end(result, "stopped" if result.stopped else "completed")
        return result

    def _replay(self, task: AnyTask, row: Optional[EpisodeRow] = None) -> None:
        """Play a task's stored actions again (no model call), rebuilding the state it left behind.

        ``row`` is its stored solve episode (default: the newest one in the store).
        """
        if row is None:
            rows = self.store.episodes(self.agent_id, kind="solve", task_id=task.id, newest_first=True, limit=1)
            if not rows:
                return
            row = rows[0]
        task.start()
        for message in row.messages:
            if message.get("role") == "assistant" and _step_result(task.step(message["content"]), f"task {task.id!r}").done:
                break

    def _begin(self, tasks, resume, update_after_last, limit, run_id):
        if isinstance(tasks, (str, bytes)) or isinstance(tasks, (Task, dict)):
            raise TaskFormatError("run() takes an iterable of tasks; wrap a single task in a list")
        if isinstance(tasks, AsyncIterable):
            raise TaskFormatError("run() takes a plain iterable of tasks, not an async iterable")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        plan = self._plan(tasks, resume, update_after_last, limit)
        result = RunResult(run_id=run_id or uuid.uuid4().hex[:12], agent_id=self.agent_id)
        self.store.start_run(result.run_id, self.agent_id, options={"context_mode": self.context_mode, "limit": limit})
        return result, plan

    def _after(self, result: RunResult, record: TaskRecord, on_record, fail_fast: bool) -> bool:
        result.records.append(record)
        self.store.touch_run(result.run_id)
        if on_record is not None:
            on_record(record)
        if record.status == "failed":
            log.warning("task %s failed: %s", record.task_id, record.error)
            if fail_fast:
                result.stopped = f"task {record.task_id!r} failed: {record.error}"
                return True
        return False

    def _end(self, result: RunResult, status: str) -> None:
        n_failed = len(result.failed)
        self.store.finish_run(result.run_id, status, len(result.records) - n_failed, n_failed)

    def solve(self, task: Any, *, update: bool = True) -> TaskRecord:
        """Solve one task now (and update the context), ignoring resume state. Returns its record."""
        return drive(self._fresh_flow(task, update), self.model)

    async def asolve(self, task: Any, *, update: bool = True) -> TaskRecord:
        """Async twin of :meth:`solve`."""
        return await adrive(self._fresh_flow(task, update), self.model)

    def _fresh_flow(self, item, update):
        task = next(iter_tasks([item]))
        position = self.store.count_episodes(self.agent_id, "solve")
        started = time.perf_counter()
        head = self.store.head(self.agent_id)
        context = head.text if self.context_mode != "none" else ""
        record, messages = yield from self._solve(task, position, context, head.version, None, update, None)
        if update and record.status == "ok":
            yield from self._update(record, messages, head.version, None, None)
        record.duration_s = time.perf_counter() - started
        return record

    # ------------------------------------------------------------------ chat + feedback (the server's loop)
    def chat_flow(self, messages: list[dict], *, task_id: Optional[str] = None, metadata: Optional[dict] = None) -> _Flow:
        """A solve episode over free-form chat messages, awaiting feedback. Returns ``(episode_id, Generation)``.

        The agent's context goes into the Hints section of a fresh system prompt; the
        caller's own system messages follow as instructions, then its conversation.
        Rate the reply later with :meth:`feedback_flow`.
        """
        if not isinstance(messages, list) or not messages:
            raise TaskFormatError("messages must be a non-empty list of {'role', 'content'} objects")
        started = time.perf_counter()
        head = self.store.head(self.agent_id)
        context = head.text if self.context_mode != "none" else ""
        system_parts, conversation = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TaskFormatError(f"messages[{i}] must be an object with 'role' and 'content'")
            content = protocol.flatten_content(message.get("content"))
            if message["role"] in ("system", "developer"):
                system_parts.append(content)
            else:
                conversation.append({"role": message["role"], "content": protocol.neutralize(content)})
        if not conversation:
            raise TaskFormatError("messages hold no user message")
        if not any(m["role"] == "user" and m["content"].strip() for m in conversation):
            raise TaskFormatError("messages hold no user message with text (every user content is empty or null)")
        first = protocol.solve_messages(
            context, conversation[0]["content"] if conversation[0]["role"] == "user" else "",
            self.settings.prompt_set, "\n\n".join(system_parts) or None,
        )
        prompt = [first[0]] + (conversation if conversation[0]["role"] != "user" else [first[1]] + conversation[1:])
        reply = yield ModelCall(prompt, self.temperature, self.max_new_tokens)
        transcript = prompt + [{"role": "assistant", "content": reply.text}]
        episode_id = self.store.record_episode(
            agent_id=self.agent_id, kind="solve", task_id=task_id, context_version=head.version,
            messages=transcript, answer=reply.text, status="ok", prompt_set=self.settings.prompt_set,
            model_id=self.model.model_id, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
            turns=[reply.turn_record()], metadata={**(metadata or {}), "awaiting_feedback": True},
            duration_s=time.perf_counter() - started, completes_task=False,
        )
        return episode_id, reply

    def feedback_flow(self, episode_id: int, reward: Optional[float], feedback: Optional[str]) -> _Flow:
        """The update episode for a chat episode, given its reward and feedback. Returns a :class:`TaskRecord`.

        Raises :class:`KeyError` for an episode of another agent or not a solve episode, and
        :class:`~lifecycle_agent.errors.FeedbackConflictError` when it was already rated. When
        the update itself fails (model error, conflict, cancellation) the rating is released,
        so the same completion can be rated again.
        """
        from .errors import FeedbackConflictError

        try:
            row = self.store.get_episode(episode_id)
        except KeyError:
            raise KeyError(f"agent {self.agent_id!r} has no episode {episode_id}") from None
        if row.agent_id != self.agent_id or row.kind != "solve":
            raise KeyError(f"agent {self.agent_id!r} has no solve episode {episode_id}")
        if reward is not None and not (isinstance(reward, (int, float)) and reward == reward):
            raise ValueError(f"reward must be a number or null, got {reward!r}")
        if not self.store.claim_feedback(episode_id, None if reward is None else float(reward), feedback):
            raise FeedbackConflictError(f"episode {episode_id} of agent {self.agent_id!r} already has feedback")
        try:
            record = yield from self.update_flow(
                row.messages, None if reward is None else float(reward), feedback,
                task_id=row.task_id or f"episode-{episode_id}", read_version=None,
                metadata={"solve_episode_id": episode_id},
            )
        except BaseException:
            self.store.release_feedback(episode_id)
            raise
        if record.update_status in ("error", "conflict"):
            # The update did not happen: the completion may be rated again.
            self.store.release_feedback(episode_id)
        return record

    def __repr__(self) -> str:
        return f"<LifecycleAgent {self.agent_id!r} db={self.store.path!r}>"


async def run_many(agents_and_tasks: list[tuple[LifecycleAgent, Iterable[Any]]], **options: Any) -> list[RunResult]:
    """Run several agents concurrently (one event loop; a shared local model batches their calls)."""
    return list(await asyncio.gather(*(agent.arun(tasks, **options) for agent, tasks in agents_and_tasks)))
