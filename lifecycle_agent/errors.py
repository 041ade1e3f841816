"""Errors raised by lifecycle-agent. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class LifecycleAgentError(Exception):
    """Base class for every error this package raises on purpose."""


class TaskFormatError(LifecycleAgentError, ValueError):
    """A task (or a task file) is malformed. The message names the file and line when known."""


class StoreError(LifecycleAgentError):
    """The SQLite store cannot be opened or written."""


class SchemaVersionError(StoreError):
    """The database was written by a newer (or unknown) schema version."""


class StoreLockedError(StoreError):
    """Another process held the write lock for longer than the busy timeout."""


class AgentBusyError(StoreError):
    """Another process is running the same agent (the message names its run and process)."""


class StoreReadOnlyError(StoreError):
    """The database file (or its directory) cannot be written."""


class ContextConflictError(StoreError):
    """A conditional context write found that the head had moved (another writer got there first)."""

    def __init__(self, agent_id: str, expected: int, actual: int):
        super().__init__(
            f"agent {agent_id!r}: context head is version {actual}, not {expected}; re-read the context and retry"
        )
        self.agent_id, self.expected, self.actual = agent_id, expected, actual


class AgentNotFoundError(LifecycleAgentError, KeyError):
    """No agent with this id exists in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "agent not found"


class AgentExistsError(LifecycleAgentError, ValueError):
    """An agent with this id already exists (create, fork or import refused)."""


class VersionNotFoundError(LifecycleAgentError, KeyError):
    """A context version that does not exist was asked for."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "context version not found"


class ContextFormatError(LifecycleAgentError, ValueError):
    """A context text or export file is not acceptable (bad JSON, wrong format, delimiter lines)."""


class ContextBudgetError(ContextFormatError):
    """A context over the agent's budget that its policy (or a person's edit) refuses; nothing was written.

    ``original_chars``, ``budget`` and ``policy`` (the one applied) let a caller word its own message.
    """

    def __init__(self, message: str, *, original_chars: int, budget: int, policy: str):
        super().__init__(message)
        self.original_chars, self.budget, self.policy = original_chars, budget, policy


class ModelSpecError(LifecycleAgentError, ValueError):
    """A model spec string or model object is not understood."""


class ModelCallError(LifecycleAgentError):
    """A model call failed (after retries, where retries apply)."""


class ModelAuthError(ModelCallError):
    """The model endpoint refused the credentials. Retrying will not help."""


class EnvironmentSpecError(LifecycleAgentError, ValueError):
    """An environment name, preset or option is not understood."""


class FeedbackConflictError(LifecycleAgentError):
    """Feedback was given for an episode that already has feedback."""


class EvalError(LifecycleAgentError, ValueError):
    """The evaluation settings are not acceptable (the message says which and what to do)."""
