"""Texts of the Ralph loop, kept as data: the ``ralph-v1`` prompt set and the iteration templates.

``ralph-v1`` is a prompt set like ``cod-v1`` (same delimiter protocol, same sections
the parsers read) worded for a coding agent that works on one repository. The
templates are ``str.format`` strings filled by :mod:`lifecycle_agent.ralph.iteration`.
"""

from __future__ import annotations

from ..prompts import PromptSet, register_prompt_set

RALPH_V1 = PromptSet(
    id="ralph-v1",
    solve_system=(
        "You are a coding agent working on one repository in a loop. Every iteration starts "
        "with a fresh memory: only your notes carry over from earlier iterations.\n\n"
        "## Hints\n"
        "These are the notes kept from your earlier iterations. They may be incomplete or "
        "wrong: combine them with what you see in the repository and in the latest check output.\n"
        "{hints}\n\n"
        "Work on the task below."
    ),
    hints_empty="(no notes yet: this is the first iteration)",
    update_system=(
        "You maintain the notes of a coding agent that works on one repository in a loop. Every "
        "iteration starts with a fresh memory: the notes are all the agent keeps from earlier "
        "iterations.\n\n"
        "Read the previous notes and what happened in the latest iteration (the agent's actions, "
        "the check result and the files it changed), then write the complete new notes: what the "
        "task needs, what was tried, what failed and why, exact file names, commands and values "
        "worth remembering, and what to do next. Keep what is still true, fix what was wrong, drop "
        "what is useless. At most {budget} characters.\n\n"
        "First think briefly. Then write the new notes between these two lines, each on a line "
        "of its own:\n{begin}\n...the new notes...\n{end}"
    ),
    update_user=(
        "## Previous notes\n{context}\n\n"
        "## Latest task\n{transcript}\n\n"
        "## Result\nReward: {reward}\nFeedback: {feedback}\n\n"
        "Write the new notes now."
    ),
    no_reward="(no check result)",
    no_feedback="(no check output)",
)
register_prompt_set(RALPH_V1)

#: Instructions of the built-in tool agent. Fields: tools, max_turns, check, marker_line.
TOOL_INSTRUCTIONS = (
    "You work inside a git repository through tools. Reply with exactly one tool call per "
    "message, a JSON object of this form and nothing else:\n"
    '{{"tool": "<name>", "args": {{...}}}}\n'
    "The next message gives you the tool's result.\n\n"
    "Tools (paths are relative to the repository root):\n{tools}\n\n"
    "You have at most {max_turns} tool calls in this iteration. When you call done (or run out "
    "of calls), the check `{check}` runs and your notes are updated from what you did.{marker_line}"
)

#: Instructions of an external agent command. Fields: check, notes_line, marker_line.
COMMAND_INSTRUCTIONS = (
    "You work in the git repository in the current directory. When you exit, the check "
    "`{check}` runs; the loop ends when it passes.{notes_line}{marker_line}"
)

#: When the agent command keeps its own notes. Fields: notes_file, budget.
AGENT_NOTES_LINE = (
    "\nYour notes file is {notes_file}: it is your only memory between iterations, since every "
    "iteration starts with a fresh context. Before you exit, update it with what you learned: "
    "what you tried, what failed and why, exact commands and values, and what to do next. "
    "Keep it under {budget} characters: only that much is kept, and the rest is cut off at the end."
)
#: When a model writes the notes after each iteration.
MODEL_NOTES_LINE = "\nAfter you exit, your notes are rewritten from your output and the check result."

#: Field: marker.
MARKER_LINE = "\nOnly when the whole task is finished and the check passes, write {marker} in your reply."

#: The first message of an iteration. Fields: prompt, iteration, max_iterations, check_section.
#: Its headings are level 3, so they never read as sections of the update prompt that quotes it.
OBSERVATION = (
    "### Task\n{prompt}\n\n"
    "### Iteration\nIteration {iteration} of at most {max_iterations}.\n\n"
    "### Latest check\n{check_section}"
)
#: Fields: when, command, verdict, output.
CHECK_SECTION = "{when}, `{command}` {verdict}. Its output:\n{output}"
CHECK_WHEN_START = "Before this iteration"
CHECK_WHEN_ITERATION = "After iteration {iteration}"

#: The feedback of an iteration (shown to the update episode). Fields: command, verdict, duration, note, output, changes.
FEEDBACK = (
    "The check `{command}` {verdict} in {duration:.1f} s.{note}\n"
    "Check output:\n{output}\n"
    "Files changed in this iteration:\n{changes}"
)
NO_CHANGES = "(none)"
NO_OUTPUT = "(no output)"

#: Shown when a reply of the built-in agent holds no tool call.
NO_TOOL_CALL = (
    "No tool call found in your reply. Reply with exactly one JSON object, for example "
    '{"tool": "list_files", "args": {"path": "."}}, or {"tool": "done", "args": {}} to end the iteration.'
)

#: Notes that end up in the feedback.
NOTE_TURN_LIMIT = " The agent used all {max_turns} tool calls before saying it was done."
NOTE_TOKEN_LIMIT = " The iteration was cut short: the loop's token limit was reached."
NOTE_TIME_LIMIT = " The iteration was cut short: the loop's wall-time limit was reached."
NOTE_CHECK_TIME_LIMIT = (
    " The check was stopped after {limit:.1f} s at the loop's wall-time limit (its own timeout is {check_timeout:g} s)."
)
NOTE_AGENT_FAILED = " The agent command {status}."
