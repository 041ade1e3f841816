"""One iteration of a Ralph loop as an :class:`~lifecycle_agent.tasks.InteractiveTask`.

The agent (the built-in tool agent, or an external agent command seen through
:class:`AgentCommandModel`) works in the repository; its turns are the task's steps.
When it says it is done, runs out of turns, or a loop limit is hit, the task runs the
check: reward 1.0 when it passes, else 0.0, and feedback = the trimmed check output and
the files changed. :class:`~lifecycle_agent.agent.LifecycleAgent` solves the task and then
runs the update-context episode, so an iteration is stored like any other task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..agent import ModelCall
from ..errors import ModelCallError
from ..models.base import ChatModel, Generation
from ..tasks import InteractiveTask, StepResult
from . import prompts
from .config import TOKEN_LIMIT_FINISH, RalphConfig
from .gitrepo import GitRepo
from .shell import CommandResult, GroupRecord, fingerprint, run_shell, trim
from .tools import DONE, RepoTools, parse_tool_call, tool_list

#: Characters per token assumed when a model does not report token counts.
CHARS_PER_TOKEN = 4
#: Completion cap sent under a token limit when neither the call nor the model sets one: an
#: endpoint refuses a cap above its model's output limit, so the rest of a large limit is never sent.
DEFAULT_COMPLETION_CAP = 4096
#: Seconds a check may run past the loop's wall-time limit, so that an iteration ending
#: at the limit still gets a verdict from a quick check.
CHECK_GRACE_S = 2.0


def check_time_limit(config: RalphConfig, deadline: float) -> float:
    """Seconds the check may run now: ``--check-timeout``, cut at the wall-time limit plus :data:`CHECK_GRACE_S`.

    ``deadline`` is the loop's wall-time limit on the ``time.monotonic()`` clock. A check
    started after the limit still gets the grace, so every iteration gets a verdict.
    """
    return min(config.check_timeout, max(deadline - time.monotonic(), 0.0) + CHECK_GRACE_S)


def iteration_id(iteration: int) -> str:
    """The task id of iteration ``iteration`` (from 1)."""
    return f"iter-{iteration}"


def iteration_number(task_id: Optional[str]) -> Optional[int]:
    """The inverse of :func:`iteration_id`; ``None`` for other ids."""
    if task_id and task_id.startswith("iter-") and task_id[5:].isdigit():
        return int(task_id[5:])
    return None


@dataclass
class CheckSummary:
    """The latest check result shown to the next iteration."""

    output: str
    verdict: str
    after_iteration: Optional[int]
    """The iteration it ran after; ``None`` when it ran before the first iteration of this invocation."""


def _chars(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "")) for m in messages)


class TokenMeter:
    """Counts the model tokens of a loop against its limit (``None``: no limit) and fits each call in it.

    A call is made only when its prompt and at least one new token fit in what is left,
    and its ``max_new_tokens`` is capped to the rest (:class:`MeteredModel`). The prompt
    is estimated from its characters, at the highest tokens-per-character ratio the
    model reported in this loop (1 token per :data:`CHARS_PER_TOKEN` characters until it
    reports one). The limit is then passed only by a prompt denser than every earlier
    one, or by a model that generates more than its ``max_new_tokens``.

    Args:
        limit: tokens (prompt + completion) of the whole loop.
        spent: tokens used by earlier runs.
        smallest_prompt: tokens of the smallest prompt of earlier runs (no call fits in less).
    """

    def __init__(self, limit: Optional[int], spent: int = 0, smallest_prompt: int = 0):
        self.limit = limit
        self.spent = spent
        self.smallest_prompt = smallest_prompt
        self.tokens_per_char: Optional[float] = None
        self.last_prompt_chars = 0
        self.refused: Optional[str] = None
        """The call not made for lack of tokens (``the notes update``, ``a call of the agent``), if any."""

    @property
    def left(self) -> Optional[int]:
        return None if self.limit is None else self.limit - self.spent

    def _room(self, prompt_chars: int) -> int:
        ratio = self.tokens_per_char if self.tokens_per_char is not None else 1 / CHARS_PER_TOKEN
        return self.left - math.ceil(prompt_chars * ratio)

    def room(self, messages: list[dict]) -> Optional[int]:
        """New tokens a call with these messages may generate within the limit (< 1: it does not fit)."""
        if self.limit is None:
            return None
        self.last_prompt_chars = _chars(messages)
        return self._room(self.last_prompt_chars)

    def fits_after(self, extra_chars: int) -> bool:
        """Whether the next call of a conversation, the last prompt plus ``extra_chars``, fits in the limit."""
        return self.limit is None or self._room(self.last_prompt_chars + extra_chars) >= 1

    def add(self, reply: Generation, messages: list[dict]) -> None:
        """Count one call; estimates (and fills in) counts the model did not report."""
        chars = _chars(messages)
        if reply.prompt_tokens is None:
            reply.prompt_tokens = chars // CHARS_PER_TOKEN
        elif chars:
            ratio = reply.prompt_tokens / chars
            self.tokens_per_char = ratio if self.tokens_per_char is None else max(self.tokens_per_char, ratio)
        if reply.completion_tokens is None:
            reply.completion_tokens = len(reply.text) // CHARS_PER_TOKEN
        self.spent += reply.prompt_tokens + reply.completion_tokens
        if reply.prompt_tokens:
            self.smallest_prompt = min(self.smallest_prompt or reply.prompt_tokens, reply.prompt_tokens)

    @property
    def exhausted(self) -> bool:
        """No further call fits: a call was refused, or what is left is no more than the smallest prompt so far."""
        return self.limit is not None and (self.refused is not None or self.left <= self.smallest_prompt)


def _own_cap(model: ChatModel) -> int:
    """New tokens a model generates at most when a call gives none (``LocalModel.max_new_tokens``, ``OpenAIModel.max_tokens``)."""
    for name in ("max_new_tokens", "max_tokens"):
        value = getattr(model, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_COMPLETION_CAP


class MeteredModel(ChatModel):
    """A model whose calls are counted by a :class:`TokenMeter` and kept within its limit.

    A call that does not fit is not made: its reply is empty, with no tokens and
    ``finish_reason`` :data:`~lifecycle_agent.ralph.config.TOKEN_LIMIT_FINISH` (an empty
    update reply leaves the notes as they are), and the meter records ``what`` (what the
    call was, in words: ``the notes update``, ``a call of the agent``) as refused.
    """

    def __init__(self, inner: ChatModel, meter: TokenMeter, what: str):
        self.inner = inner
        self.meter = meter
        self.what = what
        self.model_id = inner.model_id
        self.default_temperature = inner.default_temperature

    def _cap(self, messages: list[dict], max_new_tokens: Optional[int]) -> Optional[int]:
        """The call's ``max_new_tokens`` within the limit; 0 when it does not fit."""
        room = self.meter.room(messages)
        if room is None:
            return max_new_tokens
        if room < 1:
            self.meter.refused = self.what
            return 0
        return min(max_new_tokens or _own_cap(self.inner), room)

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        cap = self._cap(messages, max_new_tokens)
        if cap == 0:
            return Generation("", prompt_tokens=0, completion_tokens=0, finish_reason=TOKEN_LIMIT_FINISH)
        reply = self.inner.generate(messages, temperature=temperature, max_new_tokens=cap)
        self.meter.add(reply.check(getattr(self.inner, "model_id", "model")), messages)
        return reply

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        cap = self._cap(messages, max_new_tokens)
        if cap == 0:
            return Generation("", prompt_tokens=0, completion_tokens=0, finish_reason=TOKEN_LIMIT_FINISH)
        reply = await self.inner.agenerate(messages, temperature=temperature, max_new_tokens=cap)
        self.meter.add(reply.check(getattr(self.inner, "model_id", "model")), messages)
        return reply

    def close(self) -> None:
        self.inner.close()


def render_prompt(messages: list[dict]) -> str:
    """A solve prompt as one text for an external command's stdin (system text, then the task)."""
    return "\n\n".join(str(m.get("content") or "").strip() for m in messages if m.get("role") in ("system", "user")) + "\n"


class AgentCommandModel(ChatModel):
    """An external coding CLI as the solve side of the loop: prompt on stdin, its output as the reply.

    Args:
        command: shell command, run in the repository.
        repo: the repository root.
        timeout: returns the seconds this run may take (the loop's remaining wall time, capped).
        output_chars: longest reply kept, characters.
        record: names the command's process group while it runs.
    """

    def __init__(
        self, command: str, repo: Path, timeout: Callable[[], float], output_chars: int,
        record: Optional[GroupRecord] = None,
    ):
        self.command = command
        self.repo = repo
        self.timeout = timeout
        self.output_chars = output_chars
        self.record = record
        self.model_id = f"agent-cmd:{command[:200]}"
        self.last: Optional[CommandResult] = None

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        result = run_shell(
            self.command, self.repo, timeout=self.timeout(), stdin_text=render_prompt(messages), separate_stderr=True,
            record=self.record,
        )
        self.last = result
        text = trim(result.output.strip(), self.output_chars)
        if not result.passed:
            stderr = trim(result.stderr.strip(), self.output_chars // 4)
            text += f"\n[agent command {_command_status(result)}]" + (f"\n[stderr]\n{stderr}" if stderr else "")
        return Generation(text=text.strip() or "(the agent command printed nothing)", finish_reason="exit")


def _command_status(result: CommandResult) -> str:
    if result.timed_out:
        return f"was stopped after {result.timeout_s:g} s"
    return f"exited with code {result.exit_code}"


class RoutedModel(ChatModel):
    """The model of each episode kind: solve calls go to one (the built-in agent's model or an agent
    command), update calls to another (``None``: no model writes the notes; the agent command keeps them).

    The kind is the one each :class:`~lifecycle_agent.agent.ModelCall` is marked with, so the
    loop drives its flows with ``route=`` :meth:`route`; nothing reads a prompt to tell the kinds apart.
    """

    def __init__(self, solve: ChatModel, update: Optional[ChatModel], model_id: str):
        self.solve = solve
        self.update = update
        self.model_id = model_id

    def route(self, call: ModelCall) -> ChatModel:
        if call.kind == "solve":
            return self.solve
        if self.update is None:
            raise ModelCallError("no model writes the notes in this loop (the agent command keeps them itself)")
        return self.update

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        # a bare call carries no episode kind, and guessing it from the prompt is what routing by kind replaces
        raise ModelCallError(
            f"model {self.model_id} answers only calls marked with their episode kind: "
            "drive the flow with drive(flow, model, route=model.route)"
        )


def instructions(config: RalphConfig, *, builtin: bool, agent_notes: bool, notes_budget: int) -> str:
    """The task-level instructions shown in the system prompt of every iteration."""
    marker = prompts.MARKER_LINE.format(marker=config.completion_marker) if config.completion_marker else ""
    if builtin:
        return prompts.TOOL_INSTRUCTIONS.format(
            tools=tool_list(), max_turns=config.max_turns, check=config.check, marker_line=marker
        )
    notes = (
        prompts.AGENT_NOTES_LINE.format(notes_file=config.notes_file, budget=notes_budget) if agent_notes
        else prompts.MODEL_NOTES_LINE
    )
    return prompts.COMMAND_INSTRUCTIONS.format(check=config.check, notes_line=notes, marker_line=marker)


class IterationTask(InteractiveTask):
    """Iteration ``iteration`` of a loop (task id ``iter-<n>``).

    Its ``metadata["ralph"]`` (stored with the solve episode) records the check result,
    the files changed, whether the completion marker was seen and the agent command's
    exit status; :mod:`lifecycle_agent.ralph.status` reads it back.
    """

    def __init__(
        self,
        iteration: int,
        *,
        config: RalphConfig,
        repo: GitRepo,
        prompt_text: str,
        previous: Optional[CheckSummary],
        base: Optional[str],
        tools: Optional[RepoTools],
        command: Optional[AgentCommandModel],
        meter: TokenMeter,
        deadline: float,
        agent_notes: bool,
        notes_budget: int,
        record: Optional[GroupRecord] = None,
    ):
        self.id = iteration_id(iteration)
        self.iteration = iteration
        self.config = config
        self.repo = repo
        self.prompt_text = prompt_text
        self.previous = previous
        self.base = base
        self.tools = tools
        self.command = command
        self.meter = meter
        self.deadline = deadline
        self.record = record
        self.max_turns = config.max_turns if tools is not None else 1
        self.instructions = instructions(
            config, builtin=tools is not None, agent_notes=agent_notes, notes_budget=notes_budget
        )
        self.metadata: dict[str, Any] = {}
        self.started_at = time.time()
        self.marker_seen = False
        self.tool_calls = 0

    def start(self) -> str:
        if self.previous is None:
            section = "(the check has not run yet)"
        else:
            when = (
                prompts.CHECK_WHEN_START if self.previous.after_iteration is None
                else prompts.CHECK_WHEN_ITERATION.format(iteration=self.previous.after_iteration)
            )
            section = prompts.CHECK_SECTION.format(
                when=when, command=self.config.check, verdict=self.previous.verdict,
                output=self.previous.output or prompts.NO_OUTPUT,
            )
        return prompts.OBSERVATION.format(
            prompt=self.prompt_text.strip(), iteration=self.iteration,
            max_iterations=self.config.max_iterations, check_section=section,
        )

    def _saw(self, action: str) -> None:
        marker = self.config.completion_marker
        if not marker:
            return
        # An agent command that echoes its prompt repeats the instruction naming the marker: not a claim.
        told = prompts.MARKER_LINE.format(marker=marker).strip()
        if marker in action.replace(told, ""):
            self.marker_seen = True

    def step(self, action: str) -> StepResult:
        if self.tools is None:  # an agent command: one turn, its output is the reply
            last = self.command.last if self.command is not None else None
            self._saw(last.output if last is not None else action)  # the reply is trimmed; its output is not
            note = prompts.NOTE_AGENT_FAILED.format(status=_command_status(last)) if last and not last.passed else ""
            if last is not None and last.timed_out and time.monotonic() >= self.deadline:
                note = prompts.NOTE_TIME_LIMIT
            return self._finish(note)
        self._saw(action)
        call = parse_tool_call(action)
        if call is not None and call.name == DONE:
            return self._finish("")
        if call is None:
            if self.marker_seen:
                return self._finish("")
            observation = prompts.NO_TOOL_CALL
        else:
            if time.monotonic() >= self.deadline:  # the reply came after the limit: its call is not carried out
                return self._finish(prompts.NOTE_TIME_LIMIT)
            observation = self.tools.call(call)
            self.tool_calls += 1
        if self.meter.exhausted or not self.meter.fits_after(len(action) + len(observation)):
            return self._finish(prompts.NOTE_TOKEN_LIMIT)
        if time.monotonic() >= self.deadline:
            return self._finish(prompts.NOTE_TIME_LIMIT)
        return StepResult(observation, None, False, None)

    def timeout_result(self) -> StepResult:
        return self._finish(prompts.NOTE_TURN_LIMIT.format(max_turns=self.max_turns))

    def _finish(self, note: str) -> StepResult:
        """Run the check; reward 1.0 when it passes; feedback = check output + changed files."""
        changes = self.repo.changes(self.base)  # before the check, so files the check writes do not count
        limit = check_time_limit(self.config, self.deadline)
        check = run_shell(self.config.check, self.repo.root, timeout=limit, record=self.record)
        if check.timed_out and limit < self.config.check_timeout:
            note += prompts.NOTE_CHECK_TIME_LIMIT.format(limit=limit, check_timeout=self.config.check_timeout)
        output = trim(check.output.strip(), self.config.output_chars)
        progress = [f for f in changes.files if f != self.config.notes_file]
        last = self.command.last if self.command is not None else None
        self.metadata["ralph"] = {
            "iteration": self.iteration,
            "check_passed": check.passed,
            "check_exit_code": check.exit_code,
            "check_timed_out": check.timed_out,
            "check_verdict": check.verdict(),
            "check_output": output,
            "check_fingerprint": fingerprint(check),
            "check_duration_s": round(check.duration_s, 3),
            "changed_files": changes.files,
            "progress_files": progress,
            "diff_stat": changes.stat,
            "completion_marker": self.marker_seen,
            "tool_calls": self.tool_calls,
            "agent_exit_code": last.exit_code if last else None,
            "agent_timed_out": bool(last and last.timed_out),
            "note": note.strip() or None,
            "base": self.base,
            "started_at": self.started_at,
        }
        feedback = prompts.FEEDBACK.format(
            command=self.config.check, verdict=check.verdict(), duration=check.duration_s, note=note,
            output=output or prompts.NO_OUTPUT, changes=changes.stat or prompts.NO_CHANGES,
        )
        return StepResult("", 1.0 if check.passed else 0.0, True, feedback)
