"""The one small interface every model adapter implements."""

from __future__ import annotations

import asyncio
import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Generation:
    """One model reply, with what the adapter knows about its tokens.

    Local models fill the token ids and per-token log-probs (at the sampling
    temperature) so the trainer reuses the runtime's own rollouts; remote models
    usually give only the token counts.
    """

    text: str
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    prompt_ids: Optional[list[int]] = None
    completion_ids: Optional[list[int]] = None
    logprobs: Optional[list[float]] = None
    finish_reason: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, model_id: str) -> "Generation":
        """``self`` when every field has the type the runtime stores; else a :class:`ModelCallError` saying which.

        The runtime checks every reply before anything is stored, so a model (or adapter) that reports,
        say, ``prompt_tokens="lots"`` fails its task with a clear message instead of corrupting the store.
        """
        from ..errors import ModelCallError

        def bad(field_name: str, expected: str) -> ModelCallError:
            value = getattr(self, field_name)
            return ModelCallError(
                f"model {model_id} returned an invalid reply: {field_name} must be {expected}, got {value!r:.80}"
            )

        if not isinstance(self.text, str):
            raise bad("text", "a string")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise bad(name, "a whole number >= 0 or null")
        for name in ("prompt_ids", "completion_ids"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in value)):
                raise bad(name, "a list of whole numbers or null")
        if self.logprobs is not None and (not isinstance(self.logprobs, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.logprobs)):
            raise bad("logprobs", "a list of finite numbers or null")
        if self.finish_reason is not None and not isinstance(self.finish_reason, str):
            raise bad("finish_reason", "a string or null")
        if not isinstance(self.extra, dict):
            raise bad("extra", "a dict")
        return self

    def turn_record(self) -> dict[str, Any]:
        """What the store keeps for this call (token ids and log-probs only when present)."""
        record: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }
        if self.prompt_ids is not None:
            record["prompt_ids"] = self.prompt_ids
        if self.completion_ids is not None:
            record["completion_ids"] = self.completion_ids
        if self.logprobs is not None:
            record["logprobs"] = self.logprobs
        return record


class ChatModel(ABC):
    """A chat model: messages in (``[{"role": ..., "content": ...}]``), one :class:`Generation` out.

    Implement :meth:`generate`; override :meth:`agenerate` when the model has a native
    async path (the default runs :meth:`generate` in a worker thread, which is also how
    several agents share one batched local model).
    """

    #: Stable identifier stored with every episode (e.g. ``openai:gpt-4o-mini``).
    model_id: str = "model"
    #: Sampling temperature used when the caller gives none.
    default_temperature: Optional[float] = None
    #: Whether this model can be trained by the trainer (local weights, token log-probs).
    trainable: bool = False
    #: Whether this model continues a final assistant message marked ``"prefill": True`` instead of starting a
    #: new reply (a prompt set's ``update_prefill`` is only given to such models; the reply is the continuation).
    supports_prefill: bool = False

    @abstractmethod
    def generate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Reply to ``messages``. Raise :class:`~lifecycle_agent.errors.ModelCallError` on failure."""

    async def agenerate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Async twin of :meth:`generate`."""
        return await asyncio.to_thread(
            self.generate, messages, temperature=temperature, max_new_tokens=max_new_tokens
        )

    def close(self) -> None:
        """Release resources (threads, clients). Safe to call twice."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model_id}>"


def copy_messages(messages: list[dict]) -> list[dict]:
    """A deep copy, so a model (or a user callable) cannot mutate the runtime's transcript."""
    return copy.deepcopy(list(messages))
