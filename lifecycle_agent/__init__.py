"""lifecycle-agent: deploy and train long-lifecycle agents that rewrite their own context after every task.

>>> from lifecycle_agent import LifecycleAgent, Task
>>> agent = LifecycleAgent(model=my_model, db="shop.db", agent_id="shop-bot")  # doctest: +SKIP
>>> result = agent.run(task_stream)                                          # doctest: +SKIP

Importing this package is light: models, environments, the server and the trainer
load their heavy dependencies only when used.
"""

from __future__ import annotations

from .prompts import CONTEXT_BEGIN, CONTEXT_END

__version__ = "0.1.0"

__all__ = [
    "CONTEXT_BEGIN",
    "CONTEXT_END",
    "LifecycleAgent",
    "AgentSettings",
    "RunResult",
    "TaskRecord",
    "Task",
    "InteractiveTask",
    "StepResult",
    "Store",
    "ContextVersion",
    "resolve_model",
    "ChatModel",
    "Generation",
    "__version__",
]

_LAZY = {
    "LifecycleAgent": ".agent",
    "AgentSettings": ".settings",
    "RunResult": ".agent",
    "TaskRecord": ".agent",
    "Task": ".tasks",
    "InteractiveTask": ".tasks",
    "StepResult": ".tasks",
    "Store": ".store",
    "ContextVersion": ".store",
    "resolve_model": ".models",
    "ChatModel": ".models",
    "Generation": ".models",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lifecycle_agent' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
