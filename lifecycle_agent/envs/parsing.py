"""Lenient reading of actions from model replies, shared by the environments.

Replies from small models carry format noise: markdown, reasoning before the action,
``Action: 3`` or ``I choose 3``. These helpers find the part that holds the action.
They only read text; nothing a model writes is ever executed.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

_LABEL = r"(?:final\s+)?(?:action|answer|move|command|choice|combine|policy|controller)"
_LABELLED = re.compile(rf"^[\s>*#_`-]*{_LABEL}\s*[*_`]*\s*[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")


def without(text: str, patterns: Iterable[re.Pattern]) -> str:
    """``text`` with every match of ``patterns`` blanked out.

    Small models often echo the observation ("Reply with one action code: 1, 2, 3 or 4"),
    and an echo is not an action: each environment removes its own boilerplate first.
    """
    for pattern in patterns:
        text = pattern.sub(" ", text)
    return text


def strip_markup(text: str) -> str:
    """``text`` without surrounding markdown emphasis, quotes and trailing punctuation."""
    return text.strip().strip("*_`\"'").strip().rstrip(".;,!").strip()


#: Longest reply (characters) the action parsers read; longer replies keep their last part,
#: where answers usually are. Bounds the parsers' cost on runaway replies.
MAX_REPLY_CHARS = 8000


def labelled(reply: str) -> Optional[str]:
    """The value of the last ``Action:`` / ``Answer:`` / ``Move:`` (and similar) line, if any."""
    found = _LABELLED.findall((reply or "")[-MAX_REPLY_CHARS:])
    return strip_markup(found[-1]) if found else None


def code_blocks(reply: str) -> list[str]:
    """Contents of fenced code blocks, in order."""
    return [block.strip() for block in _FENCE.findall(reply or "") if block.strip()]


def inline_code(reply: str) -> list[str]:
    """Contents of inline ``code`` spans, in order."""
    return [span.strip() for span in _INLINE_CODE.findall(reply or "") if span.strip()]


def nonempty_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def first_match(patterns: Iterable[re.Pattern], text: str, last: bool = False) -> Optional[re.Match]:
    """The first (or last) match of the first pattern that matches ``text`` at all."""
    for pattern in patterns:
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1] if last else matches[0]
    return None


def shorten(text: str, width: int = 80) -> str:
    """One line of at most ``width`` characters, for quoting a reply back in feedback."""
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def answer_block(reply: str) -> Optional[str]:
    """The content of the last ``<answer>...</answer>`` block of a reply (the strict answer format), or ``None``."""
    found = _ANSWER_BLOCK.findall((reply or "")[-MAX_REPLY_CHARS:])
    return found[-1] if found else None
