"""The CoD protocol: building solve and update prompts, parsing context updates, the budget.

This is the one module that run, serve, eval and the trainer use to talk to a model
about contexts. Prompt *texts* live in :mod:`lifecycle_agent.prompts`; this module
only fills them in and reads the replies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from .prompts import CONTEXT_BEGIN, CONTEXT_END, PromptSet, get_prompt_set

ParsePolicy = Literal["strict", "lenient"]
BudgetPolicy = Literal["truncate", "reject"]
ParseStatus = Literal["ok", "format_miss", "failed"]
BudgetStatus = Literal["ok", "truncated", "rejected"]

#: Longest transcript (characters) shown to an update episode; longer ones keep head and tail.
MAX_TRANSCRIPT_CHARS = 8000

_DELIMITER_TOKENS = (CONTEXT_BEGIN, CONTEXT_END)
_NEUTRAL = {CONTEXT_BEGIN: "[context-begin]", CONTEXT_END: "[context-end]"}


def neutralize(text: str) -> str:
    """Replace the delimiter lines wherever they occur in untrusted text.

    Task prompts, observations, feedback and model replies may contain the delimiter
    strings (by accident or as an injection attempt). They are rewritten before they
    enter any prompt or the stored context, so the only delimiters a model ever sees
    are the ones in the update instructions, and a stored context never holds one.
    """
    for token in _DELIMITER_TOKENS:
        if token in text:
            text = text.replace(token, _NEUTRAL[token])
    return text


def hints_text(context: str, prompt_set: PromptSet) -> str:
    """The Hints section body for a context (the prompt set's empty marker when blank)."""
    context = context.strip()
    return neutralize(context) if context else prompt_set.hints_empty


def solve_messages(
    context: str,
    observation: str,
    prompt_set: PromptSet | str = "cod-v1",
    instructions: str | None = None,
) -> list[dict]:
    """Messages that open a solve episode: system prompt with Hints, then the first observation.

    ``instructions`` (optional) is task-level text placed after the system prompt, such as
    the rules of an environment shared by every task of a pack.
    """
    ps = get_prompt_set(prompt_set) if isinstance(prompt_set, str) else prompt_set
    system = ps.solve_system.format(hints=hints_text(context, ps))
    if instructions:
        system = system + "\n\n## Environment\n" + neutralize(instructions)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": neutralize(observation)},
    ]


def render_transcript(messages: Sequence[dict], max_chars: int = MAX_TRANSCRIPT_CHARS) -> str:
    """A solve episode's transcript as plain text, without its system prompt.

    The system prompt holds the previous context, which the update episode already sees
    in its own section. Very long transcripts keep their beginning and end.
    """
    names = {"user": "Environment", "assistant": "You", "tool": "Tool"}
    lines = []
    for message in messages:
        role = message.get("role", "user")
        if role == "system":
            continue
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = flatten_content(content)
        lines.append(f"{names.get(role, role.title())}: {neutralize(content.strip())}")
    text = "\n".join(lines)
    if len(text) > max_chars:
        half = max_chars // 2
        text = text[:half] + "\n[... transcript shortened ...]\n" + text[-half:]
    return text


def flatten_content(content) -> str:
    """Flatten list-of-parts message content (OpenAI / agentscope style) to plain text."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part.get("content"), str):
                parts.append(part["content"])
    return "\n".join(parts)


def format_reward(reward: float | None, prompt_set: PromptSet) -> str:
    if reward is None:
        return prompt_set.no_reward
    return f"{reward:.3g}"


def update_messages(
    context: str,
    transcript: str,
    reward: float | None,
    feedback: str | None,
    budget: int,
    prompt_set: PromptSet | str = "cod-v1",
) -> list[dict]:
    """Messages of an update episode (Markovian: previous context + the latest episode only)."""
    ps = get_prompt_set(prompt_set) if isinstance(prompt_set, str) else prompt_set
    system = ps.update_system.format(begin=CONTEXT_BEGIN, end=CONTEXT_END, budget=budget)
    user = ps.update_user.format(
        context=hints_text(context, ps),
        transcript=neutralize(transcript),
        reward=format_reward(reward, ps),
        feedback=neutralize(feedback.strip()) if feedback and feedback.strip() else ps.no_feedback,
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class UpdateRequest:
    """What an update episode shows its model, read back from the messages (see :func:`read_update_request`)."""

    context: str
    """The previous context ('' while it was empty)."""
    transcript: str
    reward: Optional[float]
    feedback: Optional[str]


def read_update_request(messages: Sequence[dict], prompt_set: PromptSet | str = "cod-v1") -> UpdateRequest:
    """The previous context, transcript, reward and feedback of an update episode's messages.

    The inverse of :func:`update_messages` for the prompt sets' shared user message, used by
    reference note-writers (a teacher model sees nothing but the messages). Raises
    ``ValueError`` when the messages are not an update episode's.
    """
    ps = get_prompt_set(prompt_set) if isinstance(prompt_set, str) else prompt_set
    user = next((m for m in reversed(list(messages)) if m.get("role") == "user"), None)
    text = flatten_content(user.get("content")) if user else ""
    head, task, result = "## Previous notes\n", "\n\n## Latest task\n", "\n\n## Result\nReward: "
    if not text.startswith(head) or task not in text or result not in text:
        raise ValueError("not an update episode: its user message lacks the Previous notes / Latest task / Result sections")
    context, rest = text[len(head):].split(task, 1)
    transcript, outcome = rest.rsplit(result, 1)
    reward_text, _, feedback = outcome.partition("\nFeedback: ")
    feedback = feedback.removesuffix(ps.update_user.split("{feedback}", 1)[-1])
    try:
        reward: Optional[float] = float(reward_text)
    except ValueError:
        reward = None
    return UpdateRequest(
        context="" if context == ps.hints_empty else context,
        transcript=transcript,
        reward=reward,
        feedback=None if feedback == ps.no_feedback else feedback,
    )


@dataclass(frozen=True)
class ParsedUpdate:
    """The outcome of reading an update-episode reply."""

    text: str | None
    """The new context, or ``None`` when nothing usable was found."""
    status: ParseStatus
    """``ok``: a delimited block; ``format_miss``: taken leniently from the reply; ``failed``: nothing usable."""


def _is_line(line: str, token: str) -> bool:
    return line.strip().strip("`*#").strip() == token


_FENCE = re.compile(r"^\s*```[\w-]*\s*$")


def _clean_note(text: str) -> str:
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if not _FENCE.match(line)]
    return neutralize("\n".join(lines).strip())


def parse_update(reply: str, policy: ParsePolicy = "lenient", *, prefilled: bool = False) -> ParsedUpdate:
    """Read the new context out of an update-episode reply.

    ``strict``: only a block between a ``CONTEXT_BEGIN`` line and a ``CONTEXT_END`` line
    counts (the last complete block, so a model may draft and then finalise).
    ``lenient``: when no complete block exists, fall back to the text after the last
    opening delimiter, before a lone closing delimiter, or the whole reply, flagged as
    ``format_miss``. An empty result is ``failed`` and never replaces a context.

    ``prefilled``: the reply was started with the begin line (a prompt set's
    ``update_prefill``; ``reply`` includes it). Then a block whose end line is missing is
    complete at the end of the reply (the model stopped after its notes), under either policy.
    """
    if policy not in ("strict", "lenient"):
        raise ValueError(f"parse policy must be 'strict' or 'lenient', got {policy!r}")
    lines = (reply or "").replace("\r\n", "\n").split("\n")
    begins = [i for i, line in enumerate(lines) if _is_line(line, CONTEXT_BEGIN)]
    for start in reversed(begins):
        ends = [i for i in range(start + 1, len(lines)) if _is_line(lines[i], CONTEXT_END)]
        if ends:
            note = _clean_note("\n".join(lines[start + 1 : ends[0]]))
            if note:
                return ParsedUpdate(note, "ok")
    if prefilled and begins == [0]:
        # only the prefilled begin line and no end line: the notes run to the end of the reply
        note = _clean_note("\n".join(lines[1:]))
        if note:
            return ParsedUpdate(note, "ok")
    if policy == "strict":
        return ParsedUpdate(None, "failed")
    text = (reply or "").replace("\r\n", "\n")
    if CONTEXT_BEGIN in text:
        after = text.rsplit(CONTEXT_BEGIN, 1)[1]
        note = after.split(CONTEXT_END, 1)[0]
    elif CONTEXT_END in text:
        note = text.split(CONTEXT_END, 1)[0]
    else:
        note = text
    note = _clean_note(note)
    return ParsedUpdate(note, "format_miss") if note else ParsedUpdate(None, "failed")


@dataclass(frozen=True)
class BudgetResult:
    text: str | None
    """The text to store, or ``None`` when the update is rejected."""
    status: BudgetStatus
    original_chars: int


def apply_budget(text: str, budget: int, policy: BudgetPolicy = "truncate") -> BudgetResult:
    """Enforce the context budget (characters) where a context is written.

    ``truncate`` cuts at the last whitespace before the budget (never mid-word);
    ``reject`` keeps the previous context. A single word longer than the budget cannot
    be cut cleanly and is rejected under either policy. The caller records the status.
    """
    if budget < 1:
        raise ValueError(f"context budget must be at least 1 character, got {budget}")
    if policy not in ("truncate", "reject"):
        raise ValueError(f"budget policy must be 'truncate' or 'reject', got {policy!r}")
    n = len(text)
    if n <= budget:
        return BudgetResult(text, "ok", n)
    if policy == "reject":
        return BudgetResult(None, "rejected", n)
    head = text[: budget + 1]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    if cut <= 0:
        return BudgetResult(None, "rejected", n)
    return BudgetResult(text[:cut].rstrip(), "truncated", n)
