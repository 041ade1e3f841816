"""A plain Python callable as a model: ``fn(messages) -> str``. Scripted policies for tests and demos."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Optional

from ..errors import ModelCallError, ModelSpecError
from .base import ChatModel, Generation, copy_messages


class CallableModel(ChatModel):
    """Wraps ``fn(messages: list[dict]) -> str`` (sync or async).

    The callable may also return a :class:`Generation` or a dict with a ``text`` key
    (and optionally token fields). An exception inside it becomes a
    :class:`ModelCallError` naming the callable, so the run records the task as failed.
    """

    def __init__(self, fn: Callable[..., Any], model_id: Optional[str] = None):
        if not callable(fn):
            raise ModelSpecError(f"expected a callable fn(messages) -> str, got {type(fn).__name__}")
        self.fn = fn
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        module = getattr(fn, "__module__", None) or "python"
        self.model_id = model_id or f"py:{module}:{name}"
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        try:
            value = self.fn(copy_messages(messages))
            if inspect.isawaitable(value):
                value = asyncio.run(_await(value))
        except ModelCallError:
            raise
        except Exception as exc:
            raise ModelCallError(f"model {self.model_id} raised {type(exc).__name__}: {exc}") from exc
        return self._to_generation(value)

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        if not self._is_async:
            return await super().agenerate(messages, temperature=temperature, max_new_tokens=max_new_tokens)
        try:
            value = await self.fn(copy_messages(messages))
        except ModelCallError:
            raise
        except Exception as exc:
            raise ModelCallError(f"model {self.model_id} raised {type(exc).__name__}: {exc}") from exc
        return self._to_generation(value)

    def _to_generation(self, value: Any) -> Generation:
        if isinstance(value, Generation):
            return value
        if isinstance(value, str):
            return Generation(text=value)
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            known = {k: value[k] for k in Generation.__dataclass_fields__ if k in value}
            return Generation(**known)
        raise ModelCallError(
            f"model {self.model_id} returned {type(value).__name__}; expected str, Generation or a dict with 'text'"
        )


async def _await(value):
    return await value
