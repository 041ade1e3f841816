"""Errors raised by the trainer. Each says what was wrong and what to do."""

from __future__ import annotations

from lifecycle_agent.errors import LifecycleAgentError


class TrainConfigError(LifecycleAgentError, ValueError):
    """A training option is invalid (the message names the option)."""


class OutputDirError(LifecycleAgentError):
    """The output directory holds another run, or has nothing to resume."""


class NonFiniteLossError(LifecycleAgentError):
    """The loss or a gradient became NaN or infinite; training stopped before the optimizer step."""
