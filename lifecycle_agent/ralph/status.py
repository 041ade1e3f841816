"""What a Ralph loop has done, read back from its database, its state file and its commits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, Field

from ..store import ContextVersion, EpisodeRow, Store
from .config import DEFAULT_AGENT_ID, STATE_DIR, TOKEN_LIMIT_FINISH, RalphError
from .gitrepo import GitRepo
from .iteration import iteration_number

#: Context-version source of notes the agent wrote to the notes file itself.
AGENT_NOTES_SOURCE = "agent-notes"
#: Context-version source of edits of the notes file: a person's between iterations, or in the
#: update modes any change made to it while an iteration ran.
EDIT_SOURCE = "edit"

StopReason = Literal[
    "check_passed", "completion_marker", "max_iterations", "max_minutes", "max_tokens", "no_progress",
    "same_failure", "error",
]
#: How a run of the loop ends: a stop reason, or ``interrupted`` (Ctrl-C, SIGTERM, SIGHUP).
RUN_ENDS = (*get_args(StopReason), "interrupted")


def plural(count: int, noun: str) -> str:
    """``1 iteration``, ``2 iterations``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class IterationInfo(BaseModel):
    """One finished (or failed) iteration of a loop."""

    iteration: int
    finished: bool = Field(description="The iteration's episodes are complete (a rerun does not run it again).")
    status: str = Field(description="ok, or failed when the agent or the iteration's own code failed.")
    error: Optional[str] = None
    check_passed: Optional[bool] = None
    check_exit_code: Optional[int] = None
    check_timed_out: bool = False
    check_verdict: Optional[str] = None
    check_output: str = Field(default="", description="Trimmed check output.")
    check_fingerprint: Optional[str] = None
    changed_files: list[str] = Field(default_factory=list, description="Files changed, the notes file included.")
    progress_files: list[str] = Field(default_factory=list, description="Files changed, the notes file left out.")
    diff_stat: str = ""
    completion_marker: bool = False
    agent_exit_code: Optional[int] = Field(default=None, description="Exit code of the external agent command.")
    agent_timed_out: bool = False
    tool_calls: int = 0
    turns: int = 0
    tokens: Optional[int] = Field(default=None, description="Model tokens of the iteration (solve + update).")
    context_version: Optional[int] = Field(default=None, description="Notes version the iteration started with.")
    notes_version: Optional[int] = Field(default=None, description="Notes version the iteration wrote, if any.")
    update_status: Optional[str] = Field(
        default=None,
        description="The notes update: ok, format_miss, failed, conflict, error, or token_limit (not run: the "
        "loop's token limit left no room for it); None when none ran (an agent command keeping its own notes).",
    )
    note: Optional[str] = None
    duration_s: Optional[float] = None
    started_at: Optional[float] = Field(default=None, description="Unix time, seconds.")
    commit: Optional[str] = None


class RunInfo(BaseModel):
    """One invocation of the loop."""

    run_id: str
    started_at: float
    finished_at: Optional[float] = None
    stop_reason: str = Field(description="running, interrupted, or why it stopped (check_passed, max_iterations, ...).")
    stale: bool = Field(
        default=False,
        description="Stored as still running, but no loop holds the repository's lock: the loop was killed "
        "(SIGKILL, a crash of the machine), so it is shown as interrupted.",
    )


class LoopStatus(BaseModel):
    """What :func:`loop_status` returns (``lifecycle-agent ralph status``)."""

    repo: str
    agent_id: str
    db: str
    iterations: list[IterationInfo] = Field(default_factory=list)
    in_progress: Optional[dict[str, Any]] = Field(
        default=None, description="The iteration under way (or interrupted): iteration, started_at, pid, running."
    )
    runs: list[RunInfo] = Field(default_factory=list)
    notes: str = ""
    notes_version: int = 0
    notes_history: list[ContextVersion] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.iterations and self.iterations[-1].check_passed)


def _tokens(*rows: Optional[EpisodeRow]) -> Optional[int]:
    counts = [c for row in rows if row is not None for c in (row.prompt_tokens, row.completion_tokens) if c is not None]
    return sum(counts) if counts else None


def read_iterations(store: Store, agent_id: str, commits: Optional[dict[int, str]] = None) -> list[IterationInfo]:
    """Every iteration stored for ``agent_id``, oldest first (the last attempt of each)."""
    solves: dict[int, EpisodeRow] = {}
    updates: dict[int, EpisodeRow] = {}
    finished: set[int] = set()
    for row in store.episodes(agent_id, limit=None):
        n = iteration_number(row.task_id)
        if n is None:
            continue
        (solves if row.kind == "solve" else updates)[n] = row
        if row.completes_task:
            finished.add(n)
    versions = store.history(agent_id)
    # an update's version names its update episode; notes an agent command wrote name its solve episode
    by_episode = {v.episode_id: v.version for v in versions if v.episode_id is not None}
    # notes versions written by earlier releases name no episode, only "iteration N" in their note
    by_note = {v.note.split(";", 1)[0]: v.version for v in versions
               if v.source == AGENT_NOTES_SOURCE and v.episode_id is None and v.note}
    infos = []
    for n in sorted(solves):
        solve, update = solves[n], updates.get(n)
        meta = dict(solve.metadata.get("ralph") or {})
        meta.pop("iteration", None)
        known = {k: v for k, v in meta.items() if k in IterationInfo.model_fields}
        status = "failed" if solve.status == "failed" or (update is not None and update.status == "error") else "ok"
        error = solve.error or (update.error if update is not None and update.status == "error" else None)
        notes_version = by_episode.get((update or solve).episode_id)
        if notes_version is None and update is None:
            notes_version = by_note.get(notes_label(n))
        update_status = update.status if update is not None else None
        if update is not None and update.turns and update.turns[0].get("finish_reason") == TOKEN_LIMIT_FINISH:
            update_status = TOKEN_LIMIT_FINISH
        infos.append(
            IterationInfo(
                iteration=n, finished=n in finished, status=status, error=error, turns=len(solve.turns), tokens=_tokens(solve, update),
                context_version=solve.context_version, notes_version=notes_version,
                update_status=update_status,
                duration_s=(solve.duration_s or 0.0) + ((update.duration_s or 0.0) if update is not None else 0.0),
                commit=(commits or {}).get(n), **known,
            )
        )
    return infos


def notes_label(iteration: int) -> str:
    """The note stored with the notes version an agent command wrote in ``iteration``."""
    return f"iteration {iteration}"


def state_path(root: Path, agent_id: str) -> Path:
    """The file recording the iteration under way (removed once it is committed)."""
    return root / STATE_DIR / f"ralph-{agent_id}.state.json"


def read_state(path: Path) -> Optional[dict[str, Any]]:
    """The in-flight iteration record, or ``None``. A damaged file is an error naming it."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RalphError(f"loop state file {path} is damaged ({exc}); delete it to start the iteration over") from None
    if not isinstance(data, dict) or not isinstance(data.get("iteration"), int):
        raise RalphError(f"loop state file {path} holds no iteration number; delete it to start the iteration over")
    return data


def lock_path(root: Path, agent_id: str) -> Path:
    """The lock file a running loop holds (an OS lock, released when its process dies)."""
    return root / STATE_DIR / f"ralph-{agent_id}.lock"


def lock_held(path: Path) -> bool:
    """Whether a live process holds the loop's lock (probed with a shared lock, released at once)."""
    import fcntl  # POSIX only: imported here so that the CLI loads on every platform

    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _runs(store: Store, agent_id: str, running: bool) -> list[RunInfo]:
    """The loop's runs; one stored as unfinished is running only while the lock is held (the newest one then)."""
    runs = [
        RunInfo(run_id=r["run_id"], started_at=r["started_at"], finished_at=r["finished_at"], stop_reason=r["status"],
                stale=bool(r.get("stale")))  # closed by the store because its process was gone
        for r in store.runs(agent_id)
        if r.get("source") == "ralph"
    ]
    unfinished = [run for run in runs if run.stop_reason not in RUN_ENDS]
    for run in unfinished:
        # a run between two iterations reads `completed` (the agent's own run of the iteration ended)
        if running and run is unfinished[-1]:
            run.stop_reason, run.finished_at = "running", None
        else:
            run.stop_reason, run.stale = "interrupted", True
    return runs


def default_db(root: Path) -> Path:
    return root / STATE_DIR / "ralph.db"


def loop_status(repo: Path | str, *, db: Optional[Path | str] = None, agent_id: str = DEFAULT_AGENT_ID) -> LoopStatus:
    """Iterations, check results, the notes and their history of the loop on ``repo``.

    Safe while the loop runs (SQLite readers do not block its writer).
    """
    git = GitRepo.open(repo)
    db_path = Path(db).expanduser() if db is not None else default_db(git.root)
    if not db_path.exists():
        raise RalphError(f"no Ralph loop has run on {git.root}: there is no database at {db_path}")
    with Store(db_path, create=False) as store:
        if not store.has_agent(agent_id):
            known = ", ".join(a.agent_id for a in store.list_agents()) or "none"
            raise RalphError(f"database {db_path} has no loop agent {agent_id!r} (agents: {known})")
        iterations = read_iterations(store, agent_id, git.iteration_commits(agent_id))
        head = store.head(agent_id)
        history = store.history(agent_id)
        running = lock_held(lock_path(git.root, agent_id))
        runs = _runs(store, agent_id, running)
    state = read_state(state_path(git.root, agent_id))
    in_progress = None
    if state is not None:
        in_progress = {
            "iteration": state["iteration"], "started_at": state.get("started_at"), "pid": state.get("pid"),
            "running": running,
        }
    return LoopStatus(
        repo=str(git.root), agent_id=agent_id, db=str(db_path), iterations=iterations, in_progress=in_progress,
        runs=runs, notes=head.text, notes_version=head.version, notes_history=history,
    )
