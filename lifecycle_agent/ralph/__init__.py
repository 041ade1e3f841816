"""Ralph-loop mode: a coding agent run again and again on one repository until a check passes.

>>> from lifecycle_agent.ralph import run_loop, loop_status
>>> result = run_loop("my-repo", check="pytest -q", agent_cmd="claude -p", max_iterations=20)  # doctest: +SKIP
>>> result.stop_reason, result.passed                                                          # doctest: +SKIP
('check_passed', True)

Each iteration starts the agent with a fresh model context; what carries over is its
notes, stored as the context versions of a :class:`~lifecycle_agent.LifecycleAgent` and
mirrored to a notes file in the repository. See docs/ralph.md.
"""

from __future__ import annotations

from .config import DEFAULT_MARKER, RalphConfig, RalphError
from .iteration import AgentCommandModel, IterationTask, iteration_id
from .loop import LoopEvent, LoopResult, StopReason, check_setup, run_loop
from .prompts import RALPH_V1
from .status import IterationInfo, LoopStatus, RunInfo, loop_status
from .tools import RepoTools, ToolCall, ToolError, parse_tool_call

__all__ = [
    "run_loop",
    "loop_status",
    "check_setup",
    "RalphConfig",
    "RalphError",
    "LoopResult",
    "LoopEvent",
    "LoopStatus",
    "IterationInfo",
    "RunInfo",
    "StopReason",
    "IterationTask",
    "AgentCommandModel",
    "RepoTools",
    "ToolCall",
    "ToolError",
    "parse_tool_call",
    "iteration_id",
    "RALPH_V1",
    "DEFAULT_MARKER",
]
