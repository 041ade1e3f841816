"""``RalphConfig``: every knob of a Ralph loop, with its unit and default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import LifecycleAgentError
from ..settings import MAX_CONTEXT_BUDGET

#: Where the loop keeps its database, state and lock files, inside the repository (git-ignored).
STATE_DIR = ".lifecycle-agent"
DEFAULT_AGENT_ID = "ralph"
DEFAULT_MARKER = "<promise>COMPLETE</promise>"
#: Default notes budget of a new ralph agent, characters (coding notes are longer than task notes).
DEFAULT_NOTES_BUDGET = 4000
#: ``finish_reason`` of a model call the loop did not make because its token limit left no room for it.
TOKEN_LIMIT_FINISH = "token_limit"


class _Unset:
    """The default of an option not given: the :class:`RalphConfig` field's own default applies."""

    def __repr__(self) -> str:
        return "<RalphConfig default>"


#: Marks an option of :func:`~lifecycle_agent.ralph.run_loop` that was not given (``None`` is a value of some).
UNSET: Any = _Unset()


class RalphError(LifecycleAgentError):
    """A Ralph loop cannot start or go on: bad repository, prompt, command or option."""


#: Who works in the repository each iteration: ``builtin``, the loop's own tool agent over a
#: model; ``external``, an external coding CLI (``agent_cmd``).
LoopMode = Literal["builtin", "external"]


class RalphConfig(BaseModel):
    """Options of :func:`~lifecycle_agent.ralph.run_loop` (the model is passed separately).

    A validated value: building one checks every option and that they fit together
    (:meth:`build` words the first problem as a :class:`RalphError`); it is never changed after.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: Path = Field(description="Top-level directory of the git repository the agent works on.")
    check: str = Field(
        description="Shell command run in the repository after every iteration; exit code 0 means done (e.g. 'pytest -q')."
    )
    prompt: Path = Field(
        default=Path("PROMPT.md"),
        description="Task file, re-read every iteration. A relative path is looked up in the repository first, "
        "then in the current directory.",
    )
    mode: LoopMode = Field(
        default=None, validate_default=False,
        description="Who works in the repository: 'builtin' (the loop's tool agent over a model) or 'external' "
        "(the agent command); default: 'external' when an agent command is given, else 'builtin'.",
    )
    agent_cmd: Optional[str] = Field(
        default=None,
        description="External coding CLI run in the repository each iteration; it reads the prompt on stdin "
        "(mode 'external').",
    )
    notes_file: str = Field(
        default="NOTES.md",
        description="The notes mirror, relative to the repository root; people may edit it between iterations.",
    )
    max_iterations: int = Field(default=10, ge=1, le=100_000, description="Iterations of the whole loop (resumed runs included).")
    max_minutes: float = Field(default=60.0, gt=0, description="Wall time of this invocation, minutes.")
    max_tokens: Optional[int] = Field(
        default=None, ge=1, description="Model tokens (prompt + completion) of the whole loop; not set: no limit."
    )
    max_no_progress: int = Field(default=3, ge=1, description="Stop after this many iterations in a row that change no file.")
    max_same_failure: int = Field(default=3, ge=1, description="Stop after the same failing check output this many times in a row.")
    completion_marker: Optional[str] = Field(
        default=DEFAULT_MARKER,
        description="Text that, in the agent's output, stops the loop after this iteration; empty or None: off."
    )
    check_timeout: float = Field(default=600.0, gt=0, description="Longest check run, seconds.")
    agent_timeout: Optional[float] = Field(
        default=None, gt=0, description="Longest external agent run, seconds (always cut at the wall-time limit)."
    )
    command_timeout: float = Field(default=60.0, gt=0, description="Longest run_command call of the built-in agent, seconds.")
    max_turns: int = Field(default=30, ge=1, description="Tool calls of the built-in agent per iteration.")
    output_chars: int = Field(default=4000, ge=200, description="Longest check, command or tool output shown to the agent, characters.")
    db: Optional[Path] = Field(default=None, description=f"SQLite file of the loop (default: <repo>/{STATE_DIR}/ralph.db, git-ignored).")
    agent_id: str = Field(default=DEFAULT_AGENT_ID, description="The agent's id in the database.")
    allow_dirty: bool = Field(
        default=False,
        description="Start even when the repository has uncommitted changes (committed before the first iteration).",
    )
    context_budget: Optional[int] = Field(
        default=None, ge=1, le=MAX_CONTEXT_BUDGET, description=f"Notes budget, characters (stored with the agent; new agents get {DEFAULT_NOTES_BUDGET})."
    )
    temperature: Optional[float] = Field(default=None, ge=0, description="Sampling temperature of the model (not set: the model's own).")
    max_new_tokens: Optional[int] = Field(
        default=None, ge=1,
        description="New tokens per model call (not set: the model's own; 4096 at most under a token limit).",
    )

    @field_validator("check")
    @classmethod
    def _check_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the check command must not be empty (e.g. 'pytest -q')")
        return value

    @field_validator("agent_cmd")
    @classmethod
    def _agent_cmd_not_blank(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("the agent command must not be empty")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data):
        """The mode follows from the options given when it is not named, so existing calls keep working."""
        if isinstance(data, dict) and data.get("mode") is None:
            data = {**data, "mode": "external" if data.get("agent_cmd") is not None else "builtin"}
        return data

    @model_validator(mode="after")
    def _mode_fits(self) -> "RalphConfig":
        if self.mode == "external" and self.agent_cmd is None:
            raise ValueError("mode 'external' runs an agent command each iteration: give agent_cmd (--agent-cmd), "
                             "e.g. 'claude -p', or use mode 'builtin'")
        if self.mode == "builtin" and self.agent_cmd is not None:
            raise ValueError(f"mode 'builtin' runs the loop's own tool agent, but agent_cmd {self.agent_cmd!r} was "
                             "given too: drop agent_cmd, or use mode 'external'")
        if self.mode == "builtin" and self.agent_timeout is not None:
            raise ValueError("agent_timeout (--agent-timeout) limits the agent command of mode 'external'; mode "
                             "'builtin' has none (its commands are limited by command_timeout)")
        return self

    @field_validator("completion_marker")
    @classmethod
    def _marker(cls, value: Optional[str]) -> Optional[str]:
        return value if value and value.strip() else None

    @field_validator("notes_file")
    @classmethod
    def _notes_inside(cls, value: str) -> str:
        path = Path(value)
        if not value.strip() or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{value!r} must be a path inside the repository, relative to its root (e.g. NOTES.md)")
        if path.parts[0] in (".git", STATE_DIR):
            raise ValueError(f"{value!r} must not be inside {path.parts[0]}/")
        return path.as_posix()

    @classmethod
    def build(cls, **options) -> "RalphConfig":
        """Validate options, turning validation errors into a :class:`RalphError` naming the option."""
        try:
            return cls(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ()))
            if err.get("type") == "extra_forbidden":
                known = ", ".join(sorted(cls.model_fields))
                raise RalphError(f"unknown ralph option {field!r} (known: {known})") from None
            message = err.get("msg", "").removeprefix("Value error, ")
            raise RalphError(f"ralph option {field}: {message}" if field else f"ralph options: {message}") from None

    @classmethod
    def fields_in(cls, names: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``names`` that are fields: a function whose parameters are named after the fields
        passes ``locals()``, so that no field name is written twice."""
        return {name: value for name, value in names.items() if name in cls.model_fields}

    @classmethod
    def merged(cls, config: Optional["RalphConfig"] = None, **options: Any) -> "RalphConfig":
        """``config`` (if any) with the options given (those not :data:`UNSET`) laid over it, validated.

        Given ``agent_cmd`` without ``mode``, the mode follows from the new ``agent_cmd`` (a valid
        config's mode always matches its ``agent_cmd``, so nothing named is dropped).
        """
        given = {name: value for name, value in options.items() if value is not UNSET}
        if config is None:
            return cls.build(**given)
        if not given:
            return config
        base = config.model_dump()
        if "agent_cmd" in given and "mode" not in given:
            base.pop("mode")
        return cls.build(**{**base, **given})
