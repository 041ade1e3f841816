"""A loop's set-up: everything checked before its first step, as one value built once.

:func:`prepare` validates the repository, the prompt file, the notes file and the check and
agent programs, and returns a frozen :class:`LoopSetup`; the loop and
:func:`~lifecycle_agent.ralph.loop.check_setup` both start from it, so what a loop checks
before it starts is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import STATE_DIR, RalphConfig, RalphError
from .gitrepo import GitRepo
from .shell import GroupRecord, missing_program
from .status import default_db, state_path
from .tools import PROTECTED


class NotesFileError(RalphError):
    """The notes file cannot be taken in: it leads outside the repository (or into ``.git/``) through a
    symlink, or it is over the notes budget and cannot be cut to it. The loop stops with reason ``error``."""


@dataclass(frozen=True)
class LoopSetup:
    """What a loop works with, checked before its first step (built by :func:`prepare`, never changed)."""

    config: RalphConfig
    repo: GitRepo
    db_path: Path
    notes_path: Path
    """The notes file in the repository (see :meth:`notes_target` for its real path)."""
    prompt_path: Path
    prompt_in_repo: Optional[str]
    """The prompt file's path in the repository, if it is there: edits of it are the person's steering."""
    state_file: Path
    record: GroupRecord
    """Names the process group of the command under way, so a later loop can stop what a killed one left."""
    agent_notes: bool
    """The agent command keeps the notes in the notes file itself (mode ``external`` without a model)."""

    @property
    def root(self) -> Path:
        return self.repo.root

    def read_prompt(self) -> str:
        text = read_text(self.prompt_path, "prompt file")
        if not text.strip():
            raise RalphError(f"prompt file {self.prompt_path} is empty; write the task there")
        return text

    def notes_target(self) -> Path:
        """The notes file's real path, checked before every read and write of it.

        An iteration may have turned the notes file (or a directory above it) into a symlink:
        one leading outside the repository, into ``.git/`` or into the loop's state directory
        is refused with :class:`NotesFileError`, and nothing is read or written through it.
        """
        root = self.root
        real = self.notes_path.resolve()
        inside = root in real.parents
        protected = inside and real.relative_to(root).parts[0] in PROTECTED
        if not inside or protected:
            where = "outside the repository" if not inside else f"into {real.relative_to(root).parts[0]}/"
            name = self.config.notes_file
            raise NotesFileError(
                f"notes file {name!r} leads {where} through a symlink (to {real}); the loop neither reads nor writes "
                f"through it. Replace the link with a plain file (e.g. `rm {name}`) and rerun to go on"
            )
        return real

    def file_notes(self) -> Optional[str]:
        """The notes file's text, normalised; ``None`` when there is no notes file."""
        path = self.notes_target()
        if not path.is_file():
            return None
        return normalise_notes(read_text(path, "notes file"))

    def refuse_dirty(self) -> None:
        """Refuse to start on uncommitted changes (edits of the prompt and notes files excepted) without ``allow_dirty``."""
        steering = (self.config.notes_file, self.prompt_in_repo)
        dirty = [p for p in self.repo.dirty_paths() if p not in steering]
        if dirty and not self.config.allow_dirty:
            raise RalphError(
                f"{self.root} has uncommitted changes ({shown(dirty)}); commit or stash them, or pass "
                "--allow-dirty to let the loop commit them before its first iteration (edits of the prompt and "
                "notes files need neither)"
            )


def prepare(config: RalphConfig, *, with_model: bool) -> LoopSetup:
    """Check everything a loop needs before its first step and return it as a :class:`LoopSetup`.

    ``with_model``: a model is given (in mode ``external`` it writes the notes; without one the
    agent command keeps them). Raises :class:`RalphError` naming what is wrong and where.
    Git-ignores the loop's state directory and database, and creates the state directory.
    """
    repo = GitRepo.open(config.repo)
    root = repo.root
    repo.exclude(f"/{STATE_DIR}/")
    db_path = Path(config.db).expanduser().resolve() if config.db is not None else default_db(root)
    if root in db_path.parents and db_path.parent != root / STATE_DIR:
        rel = db_path.relative_to(root).as_posix()
        for suffix in ("", "-wal", "-shm", "-journal"):
            repo.exclude(f"/{rel}{suffix}")
    prompt_path = _find_prompt(config.prompt, root)
    agent_notes = config.mode == "external" and not with_model
    setup = LoopSetup(
        config=config, repo=repo, db_path=db_path, notes_path=root / config.notes_file, prompt_path=prompt_path,
        prompt_in_repo=prompt_path.relative_to(root).as_posix() if root in prompt_path.parents else None,
        state_file=state_path(root, config.agent_id),
        record=GroupRecord(root / STATE_DIR / f"ralph-{config.agent_id}.groups.json"), agent_notes=agent_notes,
    )
    setup.notes_target()
    setup.read_prompt()
    _check_programs(config, root)
    if config.max_tokens is not None and agent_notes:
        raise RalphError(
            "--max-tokens counts model tokens, and an agent command alone reports none; "
            "give --model too (its notes updates are counted), or use --max-iterations/--max-minutes"
        )
    (root / STATE_DIR).mkdir(exist_ok=True)
    return setup


def _find_prompt(prompt: Path, root: Path) -> Path:
    given = Path(prompt).expanduser()
    candidates = [given] if given.is_absolute() else [root / given, Path.cwd() / given]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = " or ".join(str(p) for p in candidates)
    raise RalphError(f"prompt file {prompt} not found (looked for {tried}); write the task there first")


def _check_programs(config: RalphConfig, root: Path) -> None:
    for option, command in (("--check", config.check), ("--agent-cmd", config.agent_cmd)):
        missing = missing_program(command, root) if command else None
        if missing:
            raise RalphError(f"{option} {command!r}: program {missing!r} was not found (not on PATH, not in {root})")


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RalphError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise RalphError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def normalise_notes(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def shown(paths: list[str]) -> str:
    """Paths for a message: the first eight, then how many more."""
    return ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
