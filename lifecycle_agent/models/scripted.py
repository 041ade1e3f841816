"""Scripted models: zero-latency policies for tests, benchmarks and demos.

:class:`ScriptedModel` tells the two episode kinds apart the way any model can: an
update prompt contains :data:`~lifecycle_agent.CONTEXT_BEGIN`, a solve prompt never does.
The default policy keeps the feedback it received as notes and answers questions
by looking them up: a small, deterministic stand-in for an agent that learns from
its context.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from ..prompts import CONTEXT_BEGIN, CONTEXT_END
from .base import ChatModel, Generation

_WORD = re.compile(r"[a-z][a-z-]{2,}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STOP = {"the", "what", "which", "that", "this", "for", "with", "tell", "secret", "code", "reply", "number", "only", "need", "belongs", "is", "it"}


def is_update(messages: list[dict]) -> bool:
    """Whether a request is an update episode (its prompt holds the context delimiters)."""
    return any(CONTEXT_BEGIN in str(m.get("content", "")) for m in messages)


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section of a prompt (empty when absent)."""
    marker = f"## {heading}\n"
    if marker not in text:
        return ""
    body = text.split(marker, 1)[1]
    return body.split("\n## ", 1)[0].strip()


def hints(messages: list[dict]) -> str:
    """The Hints section of a solve prompt ('' while the context is empty)."""
    text = section(str(messages[0].get("content", "")), "Hints") if messages else ""
    lines = [line for line in text.splitlines()[1:] if line.strip() and not line.startswith("(no hints")]
    return "\n".join(lines)


def feedback_notes(messages: list[dict], max_lines: int = 20) -> str:
    """Default update policy: previous notes plus ``<task> -> <feedback>`` for the latest task, as a delimited block."""
    user = str(messages[-1].get("content", ""))
    previous = [line for line in section(user, "Previous notes").splitlines() if line.strip() and not line.startswith("(")]
    result = section(user, "Result")
    feedback = result.split("Feedback:", 1)[1].split("\n\n", 1)[0].strip() if "Feedback:" in result else ""
    task = section(user, "Latest task").split("\n", 1)[0].removeprefix("Environment: ").strip()
    entry = f"{task} -> {feedback}" if task and feedback and not feedback.startswith("(") else ""
    notes = [line for line in previous if line != entry]
    if entry:
        notes.append(entry)
    notes = notes[-max_lines:]
    return "Keeping what the feedback taught.\n" + CONTEXT_BEGIN + "\n" + "\n".join(notes) + "\n" + CONTEXT_END


_OPTIONS = re.compile(r"options?:\s*([^.?!\n]+)", re.IGNORECASE)


def _candidates(line: str, options: list[str]) -> list[str]:
    """Answers a note line offers, in order: the question's options it names, else its numbers.

    Only the feedback part of a ``task -> feedback`` note counts when there is one (the task
    part repeats the question, options included)."""
    text = line.split(" -> ", 1)[-1]
    if options:
        return [w for w in _WORD.findall(text.lower()) if w in options]
    return _NUMBER.findall(text)


def lookup_answer(messages: list[dict]) -> str:
    """Default solve policy: look the task up in the notes.

    The hint line sharing most words with the task gives the answer: the last of the task's
    options it names (``Options: tea, coffee, ...``), or for a task without options its last
    number, since feedback states the right value last ("you answered 1. The code is 42.").
    Without a fitting note: the first option, or 0.
    """
    question = str(messages[-1].get("content", "")).lower()
    listed = _OPTIONS.search(question)
    options = [o.strip() for o in re.split(r",|\bor\b", listed.group(1)) if o.strip()] if listed else []
    words = {w for w in _WORD.findall(question) if w not in _STOP and w not in options}
    best, best_score = None, 0
    for line in hints(messages).splitlines():
        score = len(words & set(_WORD.findall(line.lower())))
        if score > best_score and _candidates(line, options):
            best, best_score = line, score
    if best is None:
        return f"I do not know yet.\nAnswer: {options[0] if options else 0}"
    return f"From my notes: {best.strip()}\nAnswer: {_candidates(best, options)[-1]}"


class ScriptedModel(ChatModel):
    """A deterministic model made of two policies, ``solve(messages)`` and ``update(messages)``.

    Defaults: :func:`lookup_answer` and :func:`feedback_notes`. Replies come back in
    microseconds, which is what the runtime-overhead benchmark needs.
    """

    def __init__(
        self,
        solve: Optional[Callable[[list[dict]], str]] = None,
        update: Optional[Callable[[list[dict]], str]] = None,
        model_id: str = "scripted",
    ):
        self.solve = solve or lookup_answer
        self.update = update or feedback_notes
        self.model_id = model_id
        self.calls = 0

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        self.calls += 1
        text = self.update(messages) if is_update(messages) else self.solve(messages)
        return Generation(text=text, prompt_tokens=sum(len(str(m.get("content", ""))) // 4 for m in messages), completion_tokens=len(text) // 4)

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        return self.generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)
