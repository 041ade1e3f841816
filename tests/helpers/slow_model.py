"""Models for subprocess tests, loaded with ``--model py:slow_model:NAME``."""

import os
import time

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END
from lifecycle_agent.models.scripted import is_update


def policy(messages):
    """Answers slowly (``SLOW_MODEL_DELAY`` seconds) and appends each task prompt to its notes."""
    time.sleep(float(os.environ.get("SLOW_MODEL_DELAY", "0.2")))
    if is_update(messages):
        user = messages[-1]["content"]
        previous = user.split("## Previous notes\n", 1)[1].split("\n\n## Latest task", 1)[0]
        task = user.split("Environment: ", 1)[1].split("\n", 1)[0]
        lines = [] if previous.startswith("(no hints") else previous.splitlines()
        return f"{CONTEXT_BEGIN}\n" + "\n".join(lines + [f"saw {task}"]) + f"\n{CONTEXT_END}"
    return "Answer: 1"


def fast(messages):
    """The same policy without delay."""
    os.environ["SLOW_MODEL_DELAY"] = "0"
    return policy(messages)


def slow_update(messages):
    """The scripted note-taker whose update episodes take ``SLOW_UPDATE_DELAY`` seconds (solves are instant)."""
    from lifecycle_agent.models.scripted import feedback_notes, lookup_answer

    if is_update(messages):
        time.sleep(float(os.environ.get("SLOW_UPDATE_DELAY", "3")))
        return feedback_notes(messages)
    return lookup_answer(messages)
