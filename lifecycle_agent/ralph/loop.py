"""``run_loop``: a coding agent run again and again on one repository until a check passes.

One iteration = one :class:`~lifecycle_agent.ralph.iteration.IterationTask` (task id
``iter-<n>``) solved by a :class:`~lifecycle_agent.agent.LifecycleAgent`, so the solve and
update-context episodes and the notes (the agent's context) are stored like any
agent's. After each iteration the notes are mirrored to the notes file and the
repository is committed with a message naming the iteration.

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
from typing import Any, Callable, Iterator, Literal, Optional

from pydantic import BaseModel, Field

from ..agent import LifecycleAgent
from ..errors import ContextBudgetError
from ..models.base import ChatModel
from ..store import Store
from .config import DEFAULT_NOTES_BUDGET, STATE_DIR, RalphConfig, RalphError
from .gitrepo import GitRepo, commit_message
from .iteration import (
    AgentCommandModel, CheckSummary, IterationTask, MeteredModel, RoutedModel, TokenMeter, check_time_limit,
    iteration_id,
)
from .prompts import RALPH_V1
from .shell import GroupRecord, missing_program, run_shell, stop_recorded_groups, trim
from .signals import Terminated, stop_on_signals
from .status import (
    AGENT_NOTES_SOURCE, EDIT_SOURCE, IterationInfo, StopReason, default_db, lock_held, lock_path, notes_label, plural,
    read_iterations, read_state, state_path,
)
from .tools import PROTECTED, RepoTools

#: Seconds a starting loop waits for the lock (``ralph status`` probes it for an instant).
LOCK_WAIT_S = 2.0


class NotesFileError(RalphError):
    """The notes file cannot be taken in: it leads outside the repository (or into ``.git/``) through a
    symlink, or it is over the notes budget and cannot be cut to it. The loop stops with reason ``error``."""


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


def run_loop(
    repo: Path | str,
    *,
    check: str,
    prompt: Path | str = "PROMPT.md",
    model: Any = None,
    agent_cmd: Optional[str] = None,
    on_event: Optional[Callable[[LoopEvent], None]] = None,
    **options: Any,
) -> LoopResult:
    """Run a Ralph loop on ``repo`` until ``check`` passes or a limit or circuit breaker stops it.

    Args:
        repo: top-level directory of a git repository.
        check: shell command run in the repository after every iteration (exit 0 = done).
        prompt: the task file (PROMPT.md), re-read every iteration.
        model: the built-in tool agent's model (a ChatModel, a callable, a spec string, or
            ``None`` for the embedded default). With ``agent_cmd``, the model that writes
            the notes after each iteration; without a model, the agent command keeps its own
            notes in the notes file.
        agent_cmd: an external coding CLI run in the repository, prompt on stdin.
        on_event: called with a :class:`LoopEvent` as the loop goes.
        options: any other :class:`~lifecycle_agent.ralph.config.RalphConfig` field
            (``max_iterations``, ``max_minutes``, ``max_tokens``, ``notes_file``, ``db``, ...).

    Rerunning the same call resumes the loop from its last finished iteration.
    """
    config = RalphConfig.build(repo=repo, check=check, prompt=prompt, agent_cmd=agent_cmd, **options)
    return _Loop(config, model, on_event, agent_notes=agent_cmd is not None and model is None).run()


def check_setup(
    repo: Path | str,
    *,
    check: str,
    prompt: Path | str = "PROMPT.md",
    agent_cmd: Optional[str] = None,
    with_model: bool = False,
    **options: Any,
) -> None:
    """Raise the :class:`RalphError` that :func:`run_loop` would raise before its first step, without a model.

    Checks the options, the repository, the prompt file, the check and agent programs,
    uncommitted changes and another loop running on the repository, so that a caller can
    load a (slow) model only when the loop can start. ``with_model``: a model will be
    given (with ``agent_cmd``, it writes the notes).
    """
    config = RalphConfig.build(repo=repo, check=check, prompt=prompt, agent_cmd=agent_cmd, **options)
    loop = _Loop(config, None, None, agent_notes=agent_cmd is not None and not with_model)
    loop._prepare()
    path = lock_path(loop.repo.root, config.agent_id)
    if lock_held(path):
        raise RalphError(_locked(path, path.read_text(encoding="utf-8", errors="replace").strip()))
    if read_state(loop.state_file) is None:
        loop._refuse_dirty()


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RalphError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise RalphError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _normalise_notes(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")


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


class _Loop:
    def __init__(
        self, config: RalphConfig, model: Any, on_event: Optional[Callable[[LoopEvent], None]], *, agent_notes: bool
    ):
        self.config = config
        self.model_arg = model
        self.on_event = on_event
        self.started = time.monotonic()
        self.deadline = self.started + config.max_minutes * 60.0
        self.agent_notes = agent_notes
        self.owned_models: list[ChatModel] = []

    # ------------------------------------------------------------ set-up
    def _emit(self, kind: str, iteration: Optional[int], message: str, info: Optional[IterationInfo] = None) -> None:
        if self.on_event is not None:
            self.on_event(LoopEvent(kind, iteration, time.monotonic() - self.started, message, info))

    def _time_left(self) -> float:
        return self.deadline - time.monotonic()

    def _prepare(self) -> None:
        config = self.config
        self.repo = GitRepo.open(config.repo)
        root = self.repo.root
        self.repo.exclude(f"/{STATE_DIR}/")
        self.db_path = Path(config.db).expanduser().resolve() if config.db is not None else default_db(root)
        if root in self.db_path.parents and self.db_path.parent != root / STATE_DIR:
            rel = self.db_path.relative_to(root).as_posix()
            for suffix in ("", "-wal", "-shm", "-journal"):
                self.repo.exclude(f"/{rel}{suffix}")
        self.notes_path = root / config.notes_file
        self._notes_target()
        self.prompt_path = self._find_prompt()
        self._read_prompt()
        #: The prompt file's path in the repository, if it is there: edits of it are the person's steering.
        self.prompt_in_repo = self.prompt_path.relative_to(root).as_posix() if root in self.prompt_path.parents else None
        for option, command in (("--check", config.check), ("--agent-cmd", config.agent_cmd)):
            missing = missing_program(command, root) if command else None
            if missing:
                raise RalphError(f"{option} {command!r}: program {missing!r} was not found (not on PATH, not in {root})")
        if config.max_tokens is not None and self.agent_notes:
            raise RalphError(
                "--max-tokens counts model tokens, and an agent command alone reports none; "
                "give --model too (its notes updates are counted), or use --max-iterations/--max-minutes"
            )
        (root / STATE_DIR).mkdir(exist_ok=True)
        self.state_file = state_path(root, config.agent_id)
        self.record = GroupRecord(root / STATE_DIR / f"ralph-{config.agent_id}.groups.json")

    def _find_prompt(self) -> Path:
        given = Path(self.config.prompt).expanduser()
        candidates = [given] if given.is_absolute() else [self.repo.root / given, Path.cwd() / given]
        for path in candidates:
            if path.is_file():
                return path.resolve()
        tried = " or ".join(str(p) for p in candidates)
        raise RalphError(f"prompt file {self.config.prompt} not found (looked for {tried}); write the task there first")

    def _read_prompt(self) -> str:
        text = _read_text(self.prompt_path, "prompt file")
        if not text.strip():
            raise RalphError(f"prompt file {self.prompt_path} is empty; write the task there")
        return text

    def _make_agent(self, store: Store) -> LifecycleAgent:
        config = self.config
        spent, smallest = 0, 0
        if store.has_agent(config.agent_id):
            for row in store.episodes(config.agent_id, limit=None):
                spent += (row.prompt_tokens or 0) + (row.completion_tokens or 0)
                for turn in row.turns:
                    if turn.get("prompt_tokens"):
                        smallest = min(smallest or turn["prompt_tokens"], turn["prompt_tokens"])
        self.meter = TokenMeter(config.max_tokens, spent, smallest)
        self.command: Optional[AgentCommandModel] = None
        if config.agent_cmd is not None:
            self.command = AgentCommandModel(
                config.agent_cmd, self.repo.root, self._agent_timeout, config.output_chars, self.record
            )
        chat: Optional[ChatModel] = None
        if not self.agent_notes:
            from ..models import resolve_model

            chat = resolve_model(self.model_arg)
            if chat is not self.model_arg:
                self.owned_models.append(chat)
            chat = MeteredModel(chat, self.meter)
        if self.command is None:
            model: ChatModel = chat
        elif chat is None:
            model = self.command
        else:
            model = RoutedModel(self.command, chat)
        budget = config.context_budget
        if budget is None and not store.has_agent(config.agent_id):
            budget = DEFAULT_NOTES_BUDGET
        return LifecycleAgent(
            model, store, config.agent_id, prompt_set=RALPH_V1.id, context_budget=budget,
            temperature=config.temperature, max_new_tokens=config.max_new_tokens,
        )

    def _agent_timeout(self) -> float:
        left = self._time_left()
        return max(0.01, min(left, self.config.agent_timeout) if self.config.agent_timeout else left)

    # ------------------------------------------------------------ notes
    def _notes_target(self) -> Path:
        """The notes file's real path, checked before every read and write of it.

        An iteration may have turned the notes file (or a directory above it) into a symlink:
        one leading outside the repository, into ``.git/`` or into the loop's state directory
        is refused with :class:`NotesFileError`, and nothing is read or written through it.
        """
        root = self.repo.root
        real = self.notes_path.resolve()
        inside = root in real.parents
        protected = inside and real.relative_to(root).parts[0] in PROTECTED
        if not inside or protected:
            where = "outside the repository" if not inside else f"into {real.relative_to(root).parts[0]}/"
            raise NotesFileError(
                f"notes file {self.config.notes_file!r} leads {where} through a symlink (to {real}); the loop neither "
                f"reads nor writes through it. Replace the link with a plain file (e.g. `rm {self.config.notes_file}`) "
                "and rerun to go on"
            )
        return real

    def _file_notes(self) -> Optional[str]:
        path = self._notes_target()
        if not path.is_file():
            return None
        return _normalise_notes(_read_text(path, "notes file"))

    def _take_in_notes(self, source: str, note: str, n: int, episode_id: Optional[int] = None) -> Optional[int]:
        """Store the notes file as a new context version when it differs from the stored notes.

        The notes budget applies as it does to every context: over it, the text is cut at the
        last word boundary before it (recorded on the version's note, and said as a ``notes``
        event), or, under the ``reject`` policy or with no place to cut, the loop stops.
        """
        text = self._file_notes()
        head = self.agent.store.head(self.config.agent_id)
        if text is None or text == _normalise_notes(head.text):
            return None
        try:
            write = self.agent.store.append_context(
                self.config.agent_id, text, source=source, note=note, episode_id=episode_id, what="the notes file"
            )
        except ContextBudgetError as exc:
            why = "the agent's budget policy is 'reject'" if exc.policy == "reject" else (
                f"has no space or line break in its first {exc.budget} characters to cut at"
            )
            raise NotesFileError(
                f"notes file {self.notes_path} is {exc.original_chars} characters, over the notes budget of {exc.budget}, "
                f"and {why}; shorten it (or raise --context-budget) and rerun to go on"
            ) from None
        version = write.version.version
        if write.budget.status != "ok":
            self._emit(
                "notes", n,
                f"notes file {self.config.notes_file} was {write.budget.original_chars} characters, over the notes "
                f"budget of {self.agent.settings.context_budget}: notes version {version} keeps its first "
                f"{len(write.version.text)}, cut at a word boundary (raise --context-budget to keep more)",
            )
        return version

    def _mirror_notes(self) -> None:
        """Write the stored notes to the notes file (people read and edit them there)."""
        text = _normalise_notes(self.agent.context)
        wanted = text + "\n" if text else ""
        path = self._notes_target()
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
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.state_file)

    def _clear_state(self) -> None:
        self.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------ the loop
    def run(self) -> LoopResult:
        with stop_on_signals():
            self._prepare()
            with _lock(lock_path(self.repo.root, self.config.agent_id)):
                for line in stop_recorded_groups(self.record.path):  # what a killed loop left running
                    self._emit("setup", None, line)
                state = read_state(self.state_file)
                if state is None:
                    self._refuse_dirty()
                with Store(self.db_path) as store:
                    return self._run_stored(store, state)

    def _run_stored(self, store: Store, state: Optional[dict]) -> LoopResult:
        self.agent = self._make_agent(store)
        self.run_id = uuid.uuid4().hex[:12]
        store.start_run(self.run_id, self.config.agent_id, source="ralph", options=self.config.model_dump(mode="json"))
        try:
            result = self._run(state)
        except RalphError:
            store.finish_run(self.run_id, "error", 0, 0)
            raise
        except BaseException as exc:
            store.finish_run(self.run_id, "interrupted", 0, 0)
            if isinstance(exc, (Terminated, KeyboardInterrupt)):
                how = exc.name if isinstance(exc, Terminated) else "Ctrl-C"
                self._emit("interrupted", None, f"stopped by {how}: the command under way was stopped with its "
                           "process group; rerun the same command to resume")
            raise
        finally:
            for model in self.owned_models:
                model.close()
        store.finish_run(self.run_id, result.stop_reason, 0, 0)
        return result

    def _refuse_dirty(self) -> None:
        steering = (self.config.notes_file, self.prompt_in_repo)
        dirty = [p for p in self.repo.dirty_paths() if p not in steering]
        if dirty and not self.config.allow_dirty:
            raise RalphError(
                f"{self.repo.root} has uncommitted changes ({_shown(dirty)}); commit or stash them, or pass "
                "--allow-dirty to let the loop commit them before its first iteration (edits of the prompt and "
                "notes files need neither)"
            )

    def _commit_start(self, dirty: list[str]) -> None:
        """Commit what was uncommitted when this invocation started (``dirty``, taken before the
        first check ran, so nothing the check writes is among it), so every iteration starts
        from a commit.

        That is edits of the prompt and notes files, changes let in by ``--allow-dirty``, or in
        a repository without commits an empty first commit: a rerun after a kill stashes an
        interrupted iteration's partial work against it.
        """
        if dirty:
            subject, what = "ralph: commit changes made before the loop started", _shown(dirty)
        elif self.repo.head() is None:
            subject, what = "ralph: start of the loop", "nothing: the repository had no commit yet"
        else:
            return
        body = f"Committed before the first iteration, so that every iteration starts from a commit: {what}."
        commit = self.repo.commit(f"{subject}\n\n{body}\n", paths=dirty)
        self._emit("setup", None, f"committed before the first iteration ({what}) as {commit[:8]}")

    def _run(self, state: Optional[dict]) -> LoopResult:
        config = self.config
        self.iterations_run = 0
        self.resumed: Optional[int] = None
        self._last_error = ""
        try:
            stop = self._resume(state) if state is not None else None
            previous: Optional[CheckSummary] = None
            if stop is None:
                stop = self._limits_before_start()
            dirty_at_start = self.repo.dirty_paths()
            if stop is None:
                previous, stop = self._initial_check()
            if stop is None:
                self._commit_start(dirty_at_start)
            while stop is None:
                if self._time_left() <= 0:
                    stop = "max_minutes", f"reached the wall-time limit of {config.max_minutes:g} minutes"
                    break
                n = self._finished_count() + 1
                self._take_in_person_edits(n)
                info = self._iteration(n, previous)
                if info is None:
                    stop = ("error", self._last_error)
                    break
                previous = CheckSummary(info.check_output, info.check_verdict or "", n)
                stop = self._stop_reason()
        except NotesFileError as exc:  # an iteration made the notes file a symlink leading out
            self._last_error = str(exc)
            stop = ("error", self._last_error)
        return self._result(*stop)

    def _finished(self) -> list[IterationInfo]:
        return [i for i in read_iterations(self.agent.store, self.config.agent_id) if i.finished]

    def _finished_count(self) -> int:
        finished = self._finished()
        return finished[-1].iteration if finished else 0

    def _limits_before_start(self) -> Optional[tuple[str, str]]:
        done = self._finished_count()
        if done >= self.config.max_iterations:
            return "max_iterations", f"the loop already ran {done} of at most {plural(self.config.max_iterations, 'iteration')}"
        if self.meter.exhausted:
            return self._token_stop("the loop already used")
        return None

    def _initial_check(self) -> tuple[Optional[CheckSummary], Optional[tuple[str, str]]]:
        """Run the check once before the first iteration: nothing to do when it passes already."""
        result = run_shell(
            self.config.check, self.repo.root, timeout=check_time_limit(self.config, self.deadline), record=self.record
        )
        if result.exit_code == 127 and "not found" in result.output:
            raise RalphError(
                f"--check {self.config.check!r}: the shell could not find the command: {trim(result.output.strip(), 300)}"
            )
        self._emit("check", None, f"check before the first iteration: {result.verdict()}")
        if result.passed:
            return None, ("check_passed", "the check passes already; nothing to do")
        return CheckSummary(trim(result.output.strip(), self.config.output_chars), result.verdict(), None), None

    def _take_in_person_edits(self, n: int) -> None:
        version = self._take_in_notes(EDIT_SOURCE, f"notes file edited before iteration {n}", n)
        if version is not None:
            self._emit("notes_edit", n, f"took in the edited notes file as notes version {version}")
        self._mirror_notes()

    def _task(self, n: int, previous: Optional[CheckSummary], base: Optional[str]) -> IterationTask:
        tools = None
        if self.config.agent_cmd is None:
            tools = RepoTools(
                self.repo.root, command_timeout=self.config.command_timeout,
                output_chars=self.config.output_chars, time_left=self._time_left, record=self.record,
            )
        return IterationTask(
            n, config=self.config, repo=self.repo, prompt_text=self._read_prompt(), previous=previous, base=base,
            tools=tools, command=self.command, meter=self.meter, deadline=self.deadline, agent_notes=self.agent_notes,
            notes_budget=self.agent.settings.context_budget, record=self.record,
        )

    def _iteration(self, n: int, previous: Optional[CheckSummary]) -> Optional[IterationInfo]:
        """Run iteration ``n`` to its commit; ``None`` when it failed and a rerun must redo or finish it."""
        base = self.repo.head()
        task = self._task(n, previous, base)
        self._write_state(n, base)
        self._emit("iteration_start", n, f"iteration {n} of at most {self.config.max_iterations}")
        return self._complete(n, task)

    def _complete(self, n: int, task: IterationTask) -> Optional[IterationInfo]:
        state = self.agent.store.task_state(self.config.agent_id, task.id)[0]
        if state != "done":
            run = self.agent.run([task], run_id=self.run_id, update_after_last=not self.agent_notes)
            record = run.records[0] if run.records else None
            if record is not None and record.status == "failed":
                state = self.agent.store.task_state(self.config.agent_id, task.id)[0]
                if state != "done":  # a model call failed: the rerun redoes or finishes this iteration
                    self._last_error = f"iteration {n} failed: {record.error} (rerun to resume)"
                    self._emit("iteration_end", n, self._last_error)
                    return None
        info = self._commit(n)
        self.iterations_run += 1
        if info.status == "failed":
            self._last_error = f"iteration {n} failed: {info.error}"
            self._emit("iteration_end", n, self._last_error, info)
            return None
        self._emit("iteration_end", n, f"iteration {n}: check {info.check_verdict}", info)
        return info

    def _commit(self, n: int) -> IterationInfo:
        """Store agent-written notes (or an edit made meanwhile), mirror the notes, commit: the end of every finished iteration."""
        solve = self.agent.store.episodes(
            self.config.agent_id, kind="solve", task_id=iteration_id(n), newest_first=True, limit=1
        )[0]
        if self.agent_notes:
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
        text = self._file_notes()
        if text is None or text == _normalise_notes(self.agent.store.get_version(self.config.agent_id, started_with).text):
            return
        update = self.agent.context_version if self.agent.context_version != started_with else None
        version = self._take_in_notes(EDIT_SOURCE, f"notes file edited during iteration {n}", n)
        if version is not None:
            kept = f"; the update's notes version {update} stays in the history" if update is not None else ""
            self._emit("notes_edit", n, f"the notes file was edited while iteration {n} ran: took the edit in as "
                       f"notes version {version}{kept}")

    def _info(self, n: int) -> IterationInfo:
        return next(i for i in read_iterations(self.agent.store, self.config.agent_id) if i.iteration == n)

    def _resume(self, state: dict) -> Optional[tuple[str, str]]:
        """Pick up the iteration a killed loop left; returns a stop reason when that finishes the loop."""
        n = state["iteration"]
        self.resumed = n
        task_id = iteration_id(n)
        if n in self.repo.iteration_commits(self.config.agent_id):
            self._clear_state()
            self._emit("resume", n, f"iteration {n} was already committed")
            return None
        stored = self.agent.store.task_state(self.config.agent_id, task_id)[0]
        if stored == "new":
            keep = (self.prompt_in_repo,) if self.prompt_in_repo else ()
            stashed = self.repo.stash(f"ralph: partial work of interrupted iteration {n}", keep)
            self._mirror_notes()
            self._clear_state()
            what = "stashed its partial work (git stash list)" if stashed else "it had changed nothing"
            self._emit("resume", n, f"iteration {n} was interrupted before its check; {what}; running it again")
            return None
        self._emit("resume", n, f"iteration {n} was interrupted after its check; finishing it")
        task = self._task(n, None, state.get("base"))
        if self._complete(n, task) is None:
            return "error", self._last_error
        return self._stop_reason()

    # ------------------------------------------------------------ stopping
    def _stop_reason(self) -> Optional[tuple[str, str]]:
        config = self.config
        infos = self._finished()
        last = infos[-1]
        n = last.iteration
        if last.check_passed:
            return "check_passed", f"the check passed at iteration {n}"
        if last.completion_marker:
            return "completion_marker", f"the agent wrote the completion marker at iteration {n}, but the check fails"
        if n >= config.max_iterations:
            return "max_iterations", f"reached the limit of {plural(config.max_iterations, 'iteration')}"
        if self.meter.exhausted:
            return self._token_stop("used")
        if self._time_left() <= 0:
            return "max_minutes", f"reached the wall-time limit of {config.max_minutes:g} minutes"
        same = _streak(infos, lambda i: i.check_fingerprint == last.check_fingerprint and not i.check_passed)
        if same >= config.max_same_failure:
            return "same_failure", f"the check failed with the same output {plural(same, 'time')} in a row"
        idle = _streak(infos, lambda i: not i.progress_files)
        if idle >= config.max_no_progress:
            return "no_progress", f"{plural(idle, 'iteration')} in a row changed no file"
        return None

    def _token_stop(self, did: str) -> tuple[str, str]:
        meter = self.meter
        message = f"{did} {meter.spent} of at most {meter.limit} tokens"
        if meter.refused is not None:
            message += f"; {meter.refused} was not run, for lack of tokens"
        elif meter.left > 0:
            message += f"; the {meter.left} left cannot hold a model call (the smallest prompt so far: {meter.smallest_prompt})"
        return "max_tokens", message

    def _result(self, reason: str, message: str) -> LoopResult:
        infos = read_iterations(self.agent.store, self.config.agent_id, self.repo.iteration_commits(self.config.agent_id))
        passed = reason == "check_passed"
        self._emit("stop", infos[-1].iteration if infos else None, f"stopped: {message}")
        return LoopResult(
            repo=str(self.repo.root), agent_id=self.config.agent_id, db=str(self.db_path), run_id=self.run_id,
            stop_reason=reason, message=message, passed=passed, iterations=infos, iterations_run=self.iterations_run,
            resumed=self.resumed, elapsed_s=time.monotonic() - self.started, tokens=self.meter.spent,
            notes=self.agent.context, notes_version=self.agent.context_version,
        )


def _streak(infos: list[IterationInfo], same: Callable[[IterationInfo], bool]) -> int:
    count = 0
    for info in reversed(infos):
        if info.status != "ok" or not same(info):
            break
        count += 1
    return count
