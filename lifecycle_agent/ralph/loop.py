"""``run_loop``: a coding agent run again and again on one repository until a check passes.

One iteration = one :class:`~lifecycle_agent.ralph.iteration.IterationTask` (task id
``iter-<n>``) solved by a :class:`~lifecycle_agent.agent.LifecycleAgent`, so the solve and
update-context episodes and the notes (the agent's context) are stored like any
agent's. After each iteration the notes are mirrored to the notes file and the
repository is committed with a message naming the iteration.

The loop starts from a :class:`~lifecycle_agent.ralph.setup.LoopSetup` (everything checked
before its first step, built once by :func:`~lifecycle_agent.ralph.setup.prepare`); each
iteration ends in an :data:`IterationOutcome`, and each model call goes to the model of the
episode kind it is marked with (:class:`~lifecycle_agent.ralph.iteration.RoutedModel`).

Crash safety: a state file records the iteration under way and the commit it started
from. A rerun finishes an iteration whose episodes were stored but not committed, and
starts over an iteration whose solve was never stored, after stashing the partial work
it left (``git stash list`` shows it), so the repository and the notes always match the
last finished iteration. SIGTERM and SIGHUP stop the loop like Ctrl-C, after stopping the
command it runs; what a command started is recorded, so that a loop started after a
SIGKILL stops what the killed one left running before anything else (see
:mod:`lifecycle_agent.ralph.shell`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional, Union

from pydantic import BaseModel, Field

from ..agent import LifecycleAgent, drive
from ..errors import ContextBudgetError
from ..models.base import ChatModel
from ..store import Store
from .config import DEFAULT_NOTES_BUDGET, UNSET, RalphConfig, RalphError
from .gitrepo import commit_message
from .iteration import (
    AgentCommandModel, CheckSummary, IterationTask, MeteredModel, RoutedModel, TokenMeter, check_time_limit,
    iteration_id,
)
from .prompts import RALPH_V1
from .setup import LoopSetup, NotesFileError, normalise_notes, prepare, shown
from .shell import run_shell, stop_recorded_groups, trim
from .signals import Terminated, stop_on_signals
from .status import (
    AGENT_NOTES_SOURCE, EDIT_SOURCE, IterationInfo, StopReason, lock_held, lock_path, notes_label, plural,
    read_iterations, read_state,
)
from .tools import RepoTools

#: Seconds a starting loop waits for the lock (``ralph status`` probes it for an instant).
LOCK_WAIT_S = 2.0
#: What a model call refused for lack of tokens was, in the loop's stop message.
AGENT_CALL, NOTES_UPDATE = "a call of the agent", "the notes update"

class LoopResult(BaseModel):
    """What :func:`run_loop` returns."""

    repo: str
    agent_id: str
    db: str
    run_id: str
    stop_reason: StopReason
    message: str = Field(description="Why the loop stopped, in words.")
    passed: bool = Field(description="The check passed when the loop stopped.")
    iterations: list[IterationInfo] = Field(default_factory=list, description="Every iteration of the loop, oldest first.")
    iterations_run: int = Field(default=0, description="Iterations run (or finished) by this invocation.")
    resumed: Optional[int] = Field(default=None, description="The interrupted iteration this invocation picked up, if any.")
    elapsed_s: float = 0.0
    tokens: int = Field(default=0, description="Model tokens of the whole loop (estimated where a model gives no counts).")
    notes: str = ""
    notes_version: int = 0


@dataclass
class LoopEvent:
    """Progress of a running loop, for ``on_event`` callbacks (the CLI prints these)."""

    kind: Literal["setup", "resume", "check", "iteration_start", "iteration_end", "notes_edit", "notes", "stop", "interrupted"]
    iteration: Optional[int]
    elapsed_s: float
    message: str
    info: Optional[IterationInfo] = None


class Stop(NamedTuple):
    """Why the loop stops: a :data:`~lifecycle_agent.ralph.status.StopReason` and the reason in words."""

    reason: StopReason
    message: str


@dataclass(frozen=True)
class IterationDone:
    """An iteration that ran to its commit; ``info`` is what it stored."""

    info: IterationInfo


@dataclass(frozen=True)
class IterationFailed:
    """An iteration that failed; ``reason`` says why (it becomes the loop's stop message).

    ``info`` is set when the iteration was committed with a stored record that says it failed;
    without it nothing was committed (a model call failed), and a rerun redoes or finishes it.
    """

    iteration: int
    reason: str
    info: Optional[IterationInfo] = None


#: How an iteration ended: the loop goes on after an :class:`IterationDone` and stops with
#: reason ``error`` after an :class:`IterationFailed`.
IterationOutcome = Union[IterationDone, IterationFailed]


@dataclass(frozen=True)
class _Clock:
    """The loop's wall-time limit on the ``time.monotonic()`` clock, and its progress events."""

    started: float
    deadline: float
    on_event: Optional[Callable[[LoopEvent], None]]

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def emit(self, kind: str, iteration: Optional[int], message: str, info: Optional[IterationInfo] = None) -> None:
        if self.on_event is not None:
            self.on_event(LoopEvent(kind, iteration, self.elapsed(), message, info))


def run_loop(
    repo: Path | str = UNSET,
    *,
    config: Optional[RalphConfig] = None,
    model: Any = None,
    on_event: Optional[Callable[[LoopEvent], None]] = None,
    check: str = UNSET,
    mode: Optional[str] = UNSET,
    prompt: Path | str = UNSET,
    agent_cmd: Optional[str] = UNSET,
    notes_file: str = UNSET,
    max_iterations: int = UNSET,
    max_minutes: float = UNSET,
    max_tokens: Optional[int] = UNSET,
    max_no_progress: int = UNSET,
    max_same_failure: int = UNSET,
    completion_marker: Optional[str] = UNSET,
    check_timeout: float = UNSET,
    agent_timeout: Optional[float] = UNSET,
    command_timeout: float = UNSET,
    max_turns: int = UNSET,
    output_chars: int = UNSET,
    db: Path | str | None = UNSET,
    agent_id: str = UNSET,
    allow_dirty: bool = UNSET,
    context_budget: Optional[int] = UNSET,
    temperature: Optional[float] = UNSET,
    max_new_tokens: Optional[int] = UNSET,
) -> LoopResult:
    """Run a Ralph loop on ``repo`` until ``check`` passes or a limit or circuit breaker stops it.

    Give the options either as keywords (each a :class:`~lifecycle_agent.ralph.config.RalphConfig`
    field, which documents its meaning, unit and default) or as ``config``; keywords given with
    ``config`` override its fields. ``repo`` and ``check`` are required one way or the other.

    Args:
        repo: top-level directory of a git repository.
        config: all options as one :class:`~lifecycle_agent.ralph.config.RalphConfig`.
        model: the built-in tool agent's model (a ChatModel, a callable, a spec string, or
            ``None`` for the embedded default). In mode ``external`` (``agent_cmd``), the model
            that writes the notes after each iteration; without a model, the agent command
            keeps its own notes in the notes file.
        on_event: called with a :class:`LoopEvent` as the loop goes.

    Rerunning the same call resumes the loop from its last finished iteration.
    """
    clock_started = time.monotonic()
    config = RalphConfig.merged(config, **RalphConfig.fields_in(locals()))
    clock = _Clock(clock_started, clock_started + config.max_minutes * 60.0, on_event)
    with stop_on_signals():
        setup = prepare(config, with_model=model is not None or config.mode == "builtin")
        with _lock(lock_path(setup.root, config.agent_id)):
            for line in stop_recorded_groups(setup.record.path):  # what a killed loop left running
                clock.emit("setup", None, line)
            state = read_state(setup.state_file)
            if state is None:
                setup.refuse_dirty()
            with Store(setup.db_path) as store:
                meter = _token_meter(store, config)
                with _episode_models(setup, model, meter, clock) as models:
                    return _Loop(setup, store, models, meter, clock).run(state)


def check_setup(
    repo: Path | str = UNSET,
    *,
    config: Optional[RalphConfig] = None,
    with_model: bool = False,
    **options: Any,
) -> None:
    """Raise the :class:`RalphError` that :func:`run_loop` would raise before its first step, without a model.

    Takes the options as :func:`run_loop` does (keywords, or ``config``). Checks them, the
    repository, the prompt file, the check and agent programs, uncommitted changes and
    another loop running on the repository, so that a caller can load a (slow) model only
    when the loop can start. ``with_model``: a model will be given (in mode ``external``, it
    writes the notes).
    """
    setup = prepare(RalphConfig.merged(config, repo=repo, **options), with_model=with_model)
    path = lock_path(setup.root, setup.config.agent_id)
    if lock_held(path):
        raise RalphError(_locked(path, path.read_text(encoding="utf-8", errors="replace").strip()))
    if read_state(setup.state_file) is None:
        setup.refuse_dirty()

def _locked(path: Path, holder: str) -> str:
    return (
        f"another Ralph loop is running on this repository (pid {holder or 'unknown'}, lock {path}); "
        "wait for it to stop, or watch it with `lifecycle-agent ralph status`"
    )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One loop per repository and agent at a time (an OS lock: released even when the process dies)."""
    import fcntl  # POSIX only: imported here so that the CLI loads on every platform

    with open(path, "a+", encoding="utf-8") as fh:
        waited_until = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= waited_until:
                    fh.seek(0)
                    raise RalphError(_locked(path, fh.read().strip())) from None
                time.sleep(0.05)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

def _token_meter(store: Store, config: RalphConfig) -> TokenMeter:
    """The loop's token meter, with what earlier runs of this agent spent."""
    spent, smallest = 0, 0
    if store.has_agent(config.agent_id):
        for row in store.episodes(config.agent_id, limit=None):
            spent += (row.prompt_tokens or 0) + (row.completion_tokens or 0)
            for turn in row.turns:
                if turn.get("prompt_tokens"):
                    smallest = min(smallest or turn["prompt_tokens"], turn["prompt_tokens"])
    return TokenMeter(config.max_tokens, spent, smallest)


@contextlib.contextmanager
def _episode_models(setup: LoopSetup, model: Any, meter: TokenMeter, clock: _Clock) -> Iterator[RoutedModel]:
    """The model of each episode kind, model calls metered; a model the loop loaded is closed after it.

    Mode ``builtin``: the model does both kinds. Mode ``external``: the agent command solves,
    and the model (if any) writes the notes.
    """
    config = setup.config
    command: Optional[AgentCommandModel] = None
    if config.mode == "external":
        def agent_timeout() -> float:
            left = clock.time_left()
            return max(0.01, min(left, config.agent_timeout) if config.agent_timeout else left)

        command = AgentCommandModel(config.agent_cmd, setup.root, agent_timeout, config.output_chars, setup.record)
    chat: Optional[ChatModel] = None
    if not setup.agent_notes:
        from ..models import resolve_model

        chat = resolve_model(model)
    try:
        if command is None:
            yield RoutedModel(
                MeteredModel(chat, meter, AGENT_CALL), MeteredModel(chat, meter, NOTES_UPDATE), chat.model_id
            )
        elif chat is None:
            yield RoutedModel(command, None, command.model_id)
        else:
            yield RoutedModel(command, MeteredModel(chat, meter, NOTES_UPDATE), f"{command.model_id}+{chat.model_id}")
    finally:
        if chat is not None and chat is not model:  # the loop loaded it
            chat.close()


class _Loop:
    """One invocation of a loop, from an open store to its :class:`LoopResult`."""

    def __init__(self, setup: LoopSetup, store: Store, models: RoutedModel, meter: TokenMeter, clock: _Clock):
        config = setup.config
        self.setup = setup
        self.config = config
        self.repo = setup.repo
        self.store = store
        self.models = models
        self.command = models.solve if isinstance(models.solve, AgentCommandModel) else None
        self.meter = meter
        self.clock = clock
        self.emit = clock.emit
        budget = config.context_budget
        if budget is None and not store.has_agent(config.agent_id):
            budget = DEFAULT_NOTES_BUDGET
        self.agent = LifecycleAgent(
            models, store, config.agent_id, prompt_set=RALPH_V1.id, context_budget=budget,
            temperature=config.temperature, max_new_tokens=config.max_new_tokens,
        )
        self.run_id = uuid.uuid4().hex[:12]
        self.iterations_run = 0
        """Iterations run (or finished) by this invocation."""
        self.resumed: Optional[int] = None
        """The interrupted iteration this invocation picked up, if any."""

    def run(self, state: Optional[dict]) -> LoopResult:
        """Run the loop, ``state`` being what the state file says of an interrupted iteration (if any)."""
        store = self.store
        store.start_run(self.run_id, self.config.agent_id, source="ralph", options=self.config.model_dump(mode="json"))
        try:
            try:
                stop = self._loop(state)
            except NotesFileError as exc:  # an iteration made the notes file a symlink leading out
                stop = Stop("error", str(exc))
            result = self._result(stop)
        except RalphError:
            store.finish_run(self.run_id, "error", 0, 0)
            raise
        except BaseException as exc:
            store.finish_run(self.run_id, "interrupted", 0, 0)
            if isinstance(exc, (Terminated, KeyboardInterrupt)):
                how = exc.name if isinstance(exc, Terminated) else "Ctrl-C"
                self.emit("interrupted", None, f"stopped by {how}: the command under way was stopped with its "
                          "process group; rerun the same command to resume")
            raise
        store.finish_run(self.run_id, result.stop_reason, 0, 0)
        return result

    def _loop(self, state: Optional[dict]) -> Stop:
        if state is not None:
            stop = self._resume(state)
            if stop is not None:
                return stop
        stop = self._limits_before_start()
        dirty_at_start = self.repo.dirty_paths()
        if stop is not None:
            return stop
        previous, stop = self._initial_check()
        if stop is not None:
            return stop
        self._commit_start(dirty_at_start)
        while True:
            if self.clock.time_left() <= 0:
                return Stop("max_minutes", f"reached the wall-time limit of {self.config.max_minutes:g} minutes")
            n = self._finished_count() + 1
            self._take_in_person_edits(n)
            outcome = self._iteration(n, previous)
            if isinstance(outcome, IterationFailed):
                return Stop("error", outcome.reason)
            previous = CheckSummary(outcome.info.check_output, outcome.info.check_verdict or "", n)
            stop = self._stop_reason()
            if stop is not None:
                return stop

    # ------------------------------------------------------------ notes
    def _take_in_notes(self, source: str, note: str, n: int, episode_id: Optional[int] = None) -> Optional[int]:
        """Store the notes file as a new context version when it differs from the stored notes.

        The notes budget applies as it does to every context: over it, the text is cut at the
        last word boundary before it (recorded on the version's note, and said as a ``notes``
        event), or, under the ``reject`` policy or with no place to cut, the loop stops.
        """
        text = self.setup.file_notes()
        head = self.store.head(self.config.agent_id)
        if text is None or text == normalise_notes(head.text):
            return None
        try:
            write = self.store.append_context(
                self.config.agent_id, text, source=source, note=note, episode_id=episode_id, what="the notes file"
            )
        except ContextBudgetError as exc:
            why = "the agent's budget policy is 'reject'" if exc.policy == "reject" else (
                f"has no space or line break in its first {exc.budget} characters to cut at"
            )
            raise NotesFileError(
                f"notes file {self.setup.notes_path} is {exc.original_chars} characters, over the notes budget of "
                f"{exc.budget}, and {why}; shorten it (or raise --context-budget) and rerun to go on"
            ) from None
        version = write.version.version
        if write.budget.status != "ok":
            self.emit(
                "notes", n,
                f"notes file {self.config.notes_file} was {write.budget.original_chars} characters, over the notes "
                f"budget of {self.agent.settings.context_budget}: notes version {version} keeps its first "
                f"{len(write.version.text)}, cut at a word boundary (raise --context-budget to keep more)",
            )
        return version

    def _mirror_notes(self) -> None:
        """Write the stored notes to the notes file (people read and edit them there)."""
        text = normalise_notes(self.agent.context)
        wanted = text + "\n" if text else ""
        path = self.setup.notes_target()
        if path.is_file():
            if path.read_bytes() == wanted.encode("utf-8"):
                return
        elif not text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted, encoding="utf-8")

    # ------------------------------------------------------------ state file
    def _write_state(self, iteration: int, base: Optional[str]) -> None:
        data = {"iteration": iteration, "base": base, "started_at": time.time(), "pid": os.getpid(), "run_id": self.run_id}
        tmp = self.setup.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.setup.state_file)

    def _clear_state(self) -> None:
        self.setup.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------ the loop
    def _commit_start(self, dirty: list[str]) -> None:
        """Commit what was uncommitted when this invocation started (``dirty``, taken before the
        first check ran, so nothing the check writes is among it), so every iteration starts
        from a commit.

        That is edits of the prompt and notes files, changes let in by ``--allow-dirty``, or in
        a repository without commits an empty first commit: a rerun after a kill stashes an
        interrupted iteration's partial work against it.
        """
        if dirty:
            subject, what = "ralph: commit changes made before the loop started", shown(dirty)
        elif self.repo.head() is None:
            subject, what = "ralph: start of the loop", "nothing: the repository had no commit yet"
        else:
            return
        body = f"Committed before the first iteration, so that every iteration starts from a commit: {what}."
        commit = self.repo.commit(f"{subject}\n\n{body}\n", paths=dirty)
        self.emit("setup", None, f"committed before the first iteration ({what}) as {commit[:8]}")

    def _finished(self) -> list[IterationInfo]:
        return [i for i in read_iterations(self.store, self.config.agent_id) if i.finished]

    def _finished_count(self) -> int:
        finished = self._finished()
        return finished[-1].iteration if finished else 0

    def _limits_before_start(self) -> Optional[Stop]:
        done = self._finished_count()
        if done >= self.config.max_iterations:
            return Stop("max_iterations", f"the loop already ran {done} of at most {plural(self.config.max_iterations, 'iteration')}")
        if self.meter.exhausted:
            return self._token_stop("the loop already used")
        return None

    def _initial_check(self) -> tuple[Optional[CheckSummary], Optional[Stop]]:
        """Run the check once before the first iteration: nothing to do when it passes already."""
        result = run_shell(
            self.config.check, self.repo.root, timeout=check_time_limit(self.config, self.clock.deadline), record=self.setup.record
        )
        if result.exit_code == 127 and "not found" in result.output:
            raise RalphError(
                f"--check {self.config.check!r}: the shell could not find the command: {trim(result.output.strip(), 300)}"
            )
        self.emit("check", None, f"check before the first iteration: {result.verdict()}")
        if result.passed:
            return None, Stop("check_passed", "the check passes already; nothing to do")
        return CheckSummary(trim(result.output.strip(), self.config.output_chars), result.verdict(), None), None

    def _take_in_person_edits(self, n: int) -> None:
        version = self._take_in_notes(EDIT_SOURCE, f"notes file edited before iteration {n}", n)
        if version is not None:
            self.emit("notes_edit", n, f"took in the edited notes file as notes version {version}")
        self._mirror_notes()

    def _task(self, n: int, previous: Optional[CheckSummary], base: Optional[str]) -> IterationTask:
        tools = None
        if self.config.mode == "builtin":
            tools = RepoTools(
                self.repo.root, command_timeout=self.config.command_timeout,
                output_chars=self.config.output_chars, time_left=self.clock.time_left, record=self.setup.record,
            )
        return IterationTask(
            n, config=self.config, repo=self.repo, prompt_text=self.setup.read_prompt(), previous=previous, base=base,
            tools=tools, command=self.command, meter=self.meter, deadline=self.clock.deadline,
            agent_notes=self.setup.agent_notes, notes_budget=self.agent.settings.context_budget, record=self.setup.record,
        )

    def _iteration(self, n: int, previous: Optional[CheckSummary]) -> IterationOutcome:
        """Run iteration ``n`` to its commit."""
        base = self.repo.head()
        task = self._task(n, previous, base)
        self._write_state(n, base)
        self.emit("iteration_start", n, f"iteration {n} of at most {self.config.max_iterations}")
        return self._complete(n, task)

    def _complete(self, n: int, task: IterationTask) -> IterationOutcome:
        """Solve and update (unless stored already), then commit iteration ``n``."""
        if self._task_state(task.id) != "done":
            flow = self.agent.run_flow([task], run_id=self.run_id, update_after_last=not self.setup.agent_notes)
            run = drive(flow, self.models, route=self.models.route)
            record = run.records[0] if run.records else None
            # a model call failed before the solve was stored: the rerun redoes or finishes this iteration
            if record is not None and record.status == "failed" and self._task_state(task.id) != "done":
                failed = IterationFailed(n, f"iteration {n} failed: {record.error} (rerun to resume)")
                self.emit("iteration_end", n, failed.reason)
                return failed
        info = self._commit(n)
        self.iterations_run += 1
        if info.status == "failed":
            failed = IterationFailed(n, f"iteration {n} failed: {info.error}", info)
            self.emit("iteration_end", n, failed.reason, info)
            return failed
        self.emit("iteration_end", n, f"iteration {n}: check {info.check_verdict}", info)
        return IterationDone(info)

    def _task_state(self, task_id: str) -> str:
        return self.store.task_state(self.config.agent_id, task_id)[0]

    def _commit(self, n: int) -> IterationInfo:
        """Store agent-written notes (or an edit made meanwhile), mirror the notes, commit: the end of every finished iteration."""
        solve = self.store.episodes(
            self.config.agent_id, kind="solve", task_id=iteration_id(n), newest_first=True, limit=1
        )[0]
        if self.setup.agent_notes:
            self._take_in_notes(AGENT_NOTES_SOURCE, notes_label(n), n, episode_id=solve.episode_id)
        else:
            self._take_in_edit_during(n, solve.context_version or 0)
        self._mirror_notes()
        info = self._info(n)
        if info.status == "failed":
            summary = "failed"
            body = f"The iteration failed: {info.error}"
        else:
            summary = f"check {'passed' if info.check_passed else 'failed'}"
            body = f"Check `{self.config.check}`: {info.check_verdict}.\nChanged: {', '.join(info.changed_files) or 'nothing'}"
        info.commit = self.repo.commit(commit_message(self.config.agent_id, n, summary, body))
        self._clear_state()
        return info

    def _take_in_edit_during(self, n: int, started_with: int) -> None:
        """In the update modes, a change to the notes file made while iteration ``n`` ran is never overwritten unread.

        The file was the mirror of notes version ``started_with`` when the iteration began; if
        it changed since (a person's edit, or the agent's own), the change is stored as an
        ``edit`` version after the update's, so it is the notes the next iteration sees and
        the update's version stays in the history.
        """
        text = self.setup.file_notes()
        if text is None or text == normalise_notes(self.store.get_version(self.config.agent_id, started_with).text):
            return
        update = self.agent.context_version if self.agent.context_version != started_with else None
        version = self._take_in_notes(EDIT_SOURCE, f"notes file edited during iteration {n}", n)
        if version is not None:
            kept = f"; the update's notes version {update} stays in the history" if update is not None else ""
            self.emit("notes_edit", n, f"the notes file was edited while iteration {n} ran: took the edit in as "
                       f"notes version {version}{kept}")

    def _info(self, n: int) -> IterationInfo:
        return next(i for i in read_iterations(self.store, self.config.agent_id) if i.iteration == n)

    def _resume(self, state: dict) -> Optional[Stop]:
        """Pick up the iteration a killed loop left; returns a stop reason when that finishes the loop."""
        n = state["iteration"]
        self.resumed = n
        task_id = iteration_id(n)
        if n in self.repo.iteration_commits(self.config.agent_id):
            self._clear_state()
            self.emit("resume", n, f"iteration {n} was already committed")
            return None
        stored = self._task_state(task_id)
        if stored == "new":
            keep = (self.setup.prompt_in_repo,) if self.setup.prompt_in_repo else ()
            stashed = self.repo.stash(f"ralph: partial work of interrupted iteration {n}", keep)
            self._mirror_notes()
            self._clear_state()
            what = "stashed its partial work (git stash list)" if stashed else "it had changed nothing"
            self.emit("resume", n, f"iteration {n} was interrupted before its check; {what}; running it again")
            return None
        self.emit("resume", n, f"iteration {n} was interrupted after its check; finishing it")
        task = self._task(n, None, state.get("base"))
        outcome = self._complete(n, task)
        if isinstance(outcome, IterationFailed):
            return Stop("error", outcome.reason)
        return self._stop_reason()

    # ------------------------------------------------------------ stopping
    def _stop_reason(self) -> Optional[Stop]:
        config = self.config
        infos = self._finished()
        last = infos[-1]
        n = last.iteration
        if last.check_passed:
            return Stop("check_passed", f"the check passed at iteration {n}")
        if last.completion_marker:
            return Stop("completion_marker", f"the agent wrote the completion marker at iteration {n}, but the check fails")
        if n >= config.max_iterations:
            return Stop("max_iterations", f"reached the limit of {plural(config.max_iterations, 'iteration')}")
        if self.meter.exhausted:
            return self._token_stop("used")
        if self.clock.time_left() <= 0:
            return Stop("max_minutes", f"reached the wall-time limit of {config.max_minutes:g} minutes")
        same = _streak(infos, lambda i: i.check_fingerprint == last.check_fingerprint and not i.check_passed)
        if same >= config.max_same_failure:
            return Stop("same_failure", f"the check failed with the same output {plural(same, 'time')} in a row")
        idle = _streak(infos, lambda i: not i.progress_files)
        if idle >= config.max_no_progress:
            return Stop("no_progress", f"{plural(idle, 'iteration')} in a row changed no file")
        return None

    def _token_stop(self, did: str) -> Stop:
        meter = self.meter
        message = f"{did} {meter.spent} of at most {meter.limit} tokens"
        if meter.refused is not None:
            message += f"; {meter.refused} was not run, for lack of tokens"
        elif meter.left > 0:
            message += f"; the {meter.left} left cannot hold a model call (the smallest prompt so far: {meter.smallest_prompt})"
        return Stop("max_tokens", message)

    def _result(self, stop: Stop) -> LoopResult:
        reason, message = stop
        infos = read_iterations(self.store, self.config.agent_id, self.repo.iteration_commits(self.config.agent_id))
        passed = reason == "check_passed"
        self.emit("stop", infos[-1].iteration if infos else None, f"stopped: {message}")
        return LoopResult(
            repo=str(self.repo.root), agent_id=self.config.agent_id, db=str(self.setup.db_path), run_id=self.run_id,
            stop_reason=reason, message=message, passed=passed, iterations=infos, iterations_run=self.iterations_run,
            resumed=self.resumed, elapsed_s=self.clock.elapsed(), tokens=self.meter.spent,
            notes=self.agent.context, notes_version=self.agent.context_version,
        )


def _streak(infos: list[IterationInfo], same: Callable[[IterationInfo], bool]) -> int:
    count = 0
    for info in reversed(infos):
        if info.status != "ok" or not same(info):
            break
        count += 1
    return count
