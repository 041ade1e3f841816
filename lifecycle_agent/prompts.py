"""Prompt sets, kept as data apart from the code that fills them (see ``protocol.py``).

A prompt set is the trained policy's input format: changing any text here changes
what a trained adapter sees. Never edit a released set in place; add a new one
with a new id. Every episode stores the id of the set it was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: The line that opens the context block in an update-episode reply.
CONTEXT_BEGIN = "<<<CONTEXT>>>"
#: The line that closes the context block in an update-episode reply.
CONTEXT_END = "<<<END CONTEXT>>>"


@dataclass(frozen=True)
class PromptSet:
    """The texts of one prompt set. Placeholders are ``str.format`` fields."""

    id: str
    solve_system: str
    """System prompt of a solve episode. Fields: ``{hints}``."""
    hints_empty: str
    """What the Hints section says while the context is empty."""
    update_system: str
    """System prompt of an update episode. Fields: ``{begin}``, ``{end}``, ``{budget}``."""
    update_user: str
    """User message of an update episode. Fields: ``{context}``, ``{transcript}``, ``{reward}``, ``{feedback}``."""
    no_reward: str
    """How a missing reward is shown to the update episode."""
    no_feedback: str
    """How missing feedback is shown to the update episode."""
    update_prefill: Optional[str] = None
    """Text the reply of an update episode starts with, given to models that can continue a reply
    (local models): the begin line, so a small model only has to write the notes. ``None``: no prefill."""
    reset_context: str = "No notes available."
    """The context after a failed update under ``on_failed_update="reset"`` (training's rule)."""


COD_V1 = PromptSet(
    id="cod-v1",
    solve_system=(
        "You are a persistent agent that solves a long series of related tasks in the same "
        "environment.\n\n"
        "## Hints\n"
        "These are notes you wrote yourself after earlier tasks. They may be incomplete or "
        "wrong: combine them with the fresh evidence in this task.\n"
        "{hints}\n\n"
        "Solve the task below. Keep your reply short. When the task asks for an answer, end "
        "with a line of the form `Answer: <your answer>`."
    ),
    hints_empty="(no hints yet)",
    update_system=(
        "You maintain the notes (the context) of a persistent agent that solves a long series "
        "of related tasks in the same environment. The notes are the agent's only memory: the "
        "next task will be solved with them and nothing else from this task.\n\n"
        "Read the previous notes and what happened in the latest task, then write the complete "
        "new notes: facts about the environment, what worked, what failed, and the exact values "
        "worth remembering. Keep what is still true, fix what was wrong, drop what is useless. "
        "At most {budget} characters.\n\n"
        "First think briefly. Then write the new notes between these two lines, each on a line "
        "of its own:\n{begin}\n...the new notes...\n{end}"
    ),
    update_user=(
        "## Previous notes\n{context}\n\n"
        "## Latest task\n{transcript}\n\n"
        "## Result\nReward: {reward}\nFeedback: {feedback}\n\n"
        "Write the new notes now."
    ),
    no_reward="(no reward for this task)",
    no_feedback="(no feedback for this task)",
)

#: The update instructions of cod-v2 up to its example of notes (cod-v3 is exactly this text).
_COD_V2_UPDATE_BODY = (
    "You maintain the notes (the context) of a persistent agent that solves a long series "
    "of related tasks in the same environment. The notes are the agent's only memory: the "
    "next task will be solved with them and nothing else from this task.\n\n"
    "Write the complete new notes: keep what is still true, fix what was wrong, and add the "
    "exact facts and values that the latest task and its feedback revealed, one short line "
    "each. At most {budget} characters.\n\n"
    "Write only the notes, between these two lines, each on a line of its own:\n"
    "{begin}\n...the new notes...\n{end}"
)

COD_V2 = PromptSet(
    id="cod-v2",
    solve_system=(
        "You are a persistent agent that solves a long series of related tasks in the same "
        "environment.\n\n"
        "## Hints\n"
        "These are notes you wrote yourself after earlier tasks. They may be incomplete or "
        "wrong: combine them with the fresh evidence in this task. When a hint answers the task, use it.\n"
        "{hints}\n\n"
        "Solve the task below. Keep your reply short. When the task asks for an answer, end "
        "with a line of the form `Answer: <your answer>`."
    ),
    hints_empty="(no hints yet)",
    update_system=_COD_V2_UPDATE_BODY + (
        "\n\nExample of notes:\n"
        "{begin}\n- The code of the blue door is 417.\n- Action 2 moved me one row down.\n{end}"
    ),
    update_user=COD_V1.update_user,
    no_reward=COD_V1.no_reward,
    no_feedback=COD_V1.no_feedback,
    update_prefill=CONTEXT_BEGIN + "\n",
)

COD_V3 = PromptSet(
    id="cod-v3",
    solve_system=COD_V2.solve_system,
    hints_empty=COD_V2.hints_empty,
    # cod-v2 without its example of notes: a small trained model copied the example's lines into its
    # notes in environments it had not seen, instead of what the feedback said
    update_system=_COD_V2_UPDATE_BODY,
    update_user=COD_V1.update_user,
    no_reward=COD_V1.no_reward,
    no_feedback=COD_V1.no_feedback,
    update_prefill=CONTEXT_BEGIN + "\n",
)

PROMPT_SETS: dict[str, PromptSet] = {COD_V1.id: COD_V1, COD_V2.id: COD_V2, COD_V3.id: COD_V3}
#: The prompt set of new agents: cod-v2 (measured better for small models: benchmarks/prompt_sets.py; the
#: shipped smollm2-cod adapter is trained on it). Agents keep the set they were created with.
DEFAULT_PROMPT_SET = COD_V2.id


def register_prompt_set(prompt_set: PromptSet) -> None:
    """Add a prompt set under its id. Refuses to replace an existing set with different text."""
    existing = PROMPT_SETS.get(prompt_set.id)
    if existing is not None and existing != prompt_set:
        raise ValueError(
            f"prompt set {prompt_set.id!r} already exists with different text; "
            "give the changed set a new id (episodes store the id they were built with)"
        )
    PROMPT_SETS[prompt_set.id] = prompt_set


def get_prompt_set(prompt_set_id: str) -> PromptSet:
    """The prompt set with this id, or a clear error listing the known ids."""
    try:
        return PROMPT_SETS[prompt_set_id]
    except KeyError:
        known = ", ".join(sorted(PROMPT_SETS))
        raise ValueError(f"unknown prompt set {prompt_set_id!r}; known prompt sets: {known}") from None
