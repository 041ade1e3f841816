"""Tasks: what an agent solves. Single-turn :class:`Task` and multi-turn :class:`InteractiveTask`.

Both expose the same two calls the runtime uses, ``start() -> observation`` and
``step(action) -> StepResult``, so one solve loop serves every kind of task.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TaskFormatError


class StepResult(NamedTuple):
    """What a task returns for one action."""

    observation: str
    """Text shown to the model on its next turn (ignored when ``done``)."""
    reward: Optional[float]
    """Reward for the episode so far; the last step's reward is the episode's reward. ``None``: no verifier."""
    done: bool
    """Whether the episode is over."""
    feedback: Optional[str]
    """A sentence a person would write about the outcome, shown to the update episode."""


class InteractiveTask(ABC):
    """A multi-turn task: ``start()`` gives the first observation, ``step(action)`` plays one turn.

    Subclasses set ``id`` (unique within the agent's stream) and may set ``max_turns`` and
    ``instructions`` (rules shown in the system prompt). When ``max_turns`` is reached
    without ``done``, the runtime ends the episode with the last reward seen (or 0.0 when
    the task gave none) and feedback saying the turn limit was hit.
    """

    id: str
    max_turns: int = 8
    instructions: Optional[str] = None
    #: Replay this task's stored actions when a resumed run skips it. Set it on tasks whose
    #: play changes state shared with later tasks (e.g. cells revealed across a pack), so a
    #: resumed run sees what an uninterrupted one would. Leave it off for tasks with side
    #: effects outside the process (commands, files): those must never run twice.
    replay_on_resume: bool = False

    @abstractmethod
    def start(self) -> str:
        """Reset the task and return the first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult | tuple:
        """Apply the model's reply; return ``(observation, reward, done, feedback)``."""

    def timeout_result(self) -> StepResult:
        """The outcome when the turn limit is reached without ``done``."""
        return StepResult("", 0.0, True, f"The turn limit ({self.max_turns}) was reached before the task was finished.")


_ANSWER_LINE = re.compile(r"^[\s*>#-]*answer\s*\**\s*[:=]\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_ANSWER_INLINE = re.compile(r"answer\s*\**\s*[:=]\s*\**\s*(.+)", re.IGNORECASE)


def extract_answer(reply: str) -> str:
    """The answer in a reply: the last ``Answer: ...`` line, else the last inline ``answer:``, else the whole reply."""
    matches = _ANSWER_LINE.findall(reply or "")
    if matches:
        return matches[-1].strip()
    inline = _ANSWER_INLINE.findall(reply or "")
    if inline:
        return inline[-1].strip()
    return (reply or "").strip()


def normalise_answer(text: str) -> str:
    """Normalisation for exact-match answers: case, surrounding quotes/markup/punctuation and spacing ignored."""
    text = re.sub(r"\s+", " ", (text or "").strip().lower())
    return text.strip(" .!?;:,\"'`*_()[]{}")


Check = Callable[[str], Union[bool, float, tuple]]


class Task(BaseModel):
    """A single-turn task: a prompt, and optionally a reference answer or a check function.

    - ``answer``: the reply's answer (see :func:`extract_answer`) is compared with it after
      :func:`normalise_answer`; reward 1.0 or 0.0 with a feedback sentence.
    - ``check``: ``fn(answer) -> bool | float | (float, feedback)``.
    - neither: no reward; the update episode still runs on the transcript.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    prompt: str = Field(description="The task text shown to the model.")
    id: Optional[str] = Field(default=None, description="Unique id within the agent's stream; generated when missing.")
    answer: Optional[str] = Field(default=None, description="Reference answer for normalised exact match.")
    check: Optional[Check] = Field(default=None, description="Custom verifier: fn(answer) -> bool | float | (float, feedback).", exclude=True)
    reveal_answer: bool = Field(default=True, description="Whether feedback on a wrong answer states the reference answer.")
    instructions: Optional[str] = Field(default=None, description="Rules shown in the system prompt (shared by a stream's tasks).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form data stored with the episode.")

    max_turns: int = Field(default=1, exclude=True)

    @field_validator("id", "answer", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        """Numbers are accepted as text (``"answer": 4`` is the answer ``"4"``); other non-strings are refused."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"must be a string or a finite number, got {value!r}")
            return str(value)
        raise ValueError(f"must be a string or a number, got {type(value).__name__}")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("id")
    @classmethod
    def _id_clean(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value.strip() or len(value) > 512):
            raise ValueError("id must be a non-empty string of at most 512 characters")
        return value

    @model_validator(mode="after")
    def _answer_or_check(self) -> "Task":
        if self.answer is not None and self.check is not None:
            raise ValueError("give either answer or check, not both")
        if self.check is not None and not callable(self.check):
            raise ValueError("check must be callable: fn(answer) -> bool | float | (float, feedback)")
        return self

    @property
    def has_verifier(self) -> bool:
        return self.answer is not None or self.check is not None

    def start(self) -> str:
        return self.prompt

    def step(self, action: str) -> StepResult:
        answer = extract_answer(action)
        if self.answer is not None:
            if normalise_answer(answer) == normalise_answer(self.answer) or normalise_answer(action) == normalise_answer(self.answer):
                return StepResult("", 1.0, True, f"Correct: the answer is {self.answer}.")
            shown = answer if len(answer) <= 200 else answer[:200] + "..."
            if self.reveal_answer:
                return StepResult("", 0.0, True, f"Wrong: you answered {shown!r}; the correct answer is {self.answer}.")
            return StepResult("", 0.0, True, f"Wrong: {shown!r} is not the correct answer.")
        if self.check is not None:
            return _run_check(self.check, answer)
        return StepResult("", None, True, None)


def _run_check(check: Check, answer: str) -> StepResult:
    reward, feedback = _check_outcome(check(answer))
    return StepResult("", reward, True, feedback)


def _check_outcome(value: Any) -> tuple[float, str]:
    feedback: Optional[str] = None
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TaskFormatError(f"check returned a tuple of {len(value)} items; expected (reward, feedback)")
        value, feedback = value
    if isinstance(value, bool):
        reward = 1.0 if value else 0.0
        return reward, feedback or ("Correct." if value else "Wrong.")
    if isinstance(value, (int, float)):
        reward = float(value)
        if not math.isfinite(reward):
            raise TaskFormatError(f"check returned a non-finite reward {value!r}")
        return reward, feedback or f"Reward {reward:.3g}."
    raise TaskFormatError(f"check returned {type(value).__name__}; expected bool, float or (float, feedback)")


AnyTask = Union[Task, InteractiveTask]


def _generated_id(index: int, content: str) -> str:
    digest = hashlib.sha1(content.encode("utf-8")).hexdigest()[:10]
    return f"t{index + 1}-{digest}"


def coerce_task(item: Any, index: int, where: str = "task stream") -> AnyTask:
    """Turn a stream item (Task, InteractiveTask, dict or prompt string) into a task with an id.

    Items without an id get ``t<index+1>-<content hash>``, so the same stream gives the
    same ids every time (this is what makes resuming a run idempotent).
    """
    if isinstance(item, InteractiveTask):
        if not getattr(item, "id", None):
            raise TaskFormatError(f"{where} item {index + 1}: interactive task {type(item).__name__} has no id")
        return item
    if isinstance(item, Task):
        if item.id is None:
            item = item.model_copy(update={"id": _generated_id(index, item.prompt)})
        return item
    if isinstance(item, str):
        try:
            return Task(prompt=item, id=_generated_id(index, item))
        except ValidationError as exc:
            raise TaskFormatError(f"{where} item {index + 1}: {_first_error(exc)}") from None
    if isinstance(item, dict):
        try:
            task = Task(**item)
        except ValidationError as exc:
            raise TaskFormatError(f"{where} item {index + 1}: {_first_error(exc)}") from None
        except TypeError as exc:
            raise TaskFormatError(f"{where} item {index + 1}: {exc}") from None
        if task.id is None:
            task = task.model_copy(update={"id": _generated_id(index, json.dumps(item, sort_keys=True, default=str))})
        return task
    if hasattr(item, "start") and hasattr(item, "step") and getattr(item, "id", None):
        return item  # duck-typed interactive task
    raise TaskFormatError(
        f"{where} item {index + 1}: expected a Task, an InteractiveTask, a dict or a prompt string, "
        f"got {type(item).__name__}"
    )


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    # An unknown field is usually a typo of a missing one: report it first.
    err = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    field = ".".join(str(p) for p in err.get("loc", ())) or "task"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"missing field {field!r}"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {field!r} (known: id, prompt, answer, reveal_answer, instructions, metadata)"
    return f"field {field!r}: {msg}"


def iter_tasks(stream: Iterable[Any], where: str = "task stream") -> Iterator[AnyTask]:
    """Coerce a stream lazily, refusing a repeated task id (it would be skipped as already done)."""
    seen: set[str] = set()
    for index, item in enumerate(stream):
        task = coerce_task(item, index, where)
        if task.id in seen:
            raise TaskFormatError(f"{where} item {index + 1}: task id {task.id!r} appears twice; task ids must be unique")
        seen.add(task.id)
        yield task


def load_tasks_jsonl(path: str | Path) -> list[Task]:
    """Read a JSONL task file completely, validating every line before anything runs.

    Each non-blank line is a JSON object with ``prompt`` and optional ``id``, ``answer``,
    ``reveal_answer``, ``instructions``, ``metadata``; a JSON string is a bare prompt.
    Numeric ``id`` and ``answer`` values are read as text. Lines without an id get
    ``line<N>-<content hash>``. A UTF-8 byte-order mark at the start is ignored.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskFormatError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFormatError(f"task file {path} cannot be read: {exc}") from None
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    # split on "\n" only: str.splitlines() would also split inside strings holding U+2028 and friends
    for lineno, line in enumerate(raw.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise TaskFormatError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field, got {type(item).__name__}")
        try:
            task = Task(**item)
        except ValidationError as exc:
            raise TaskFormatError(f"{path}:{lineno}: {_first_error(exc)}") from None
        if task.id is None:
            digest = hashlib.sha1(line.strip().encode("utf-8")).hexdigest()[:10]
            task = task.model_copy(update={"id": f"line{lineno}-{digest}"})
        if task.id in first_line:
            raise TaskFormatError(f"{path}:{lineno}: task id {task.id!r} repeats the id on line {first_line[task.id]}")
        first_line[task.id] = lineno
        tasks.append(task)
    if not tasks:
        raise TaskFormatError(f"task file {path} holds no tasks")
    return tasks
