"""The one small interface every model adapter implements."""

from __future__ import annotations

import asyncio
import copy
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
    #: Whether this model continues a final assistant message instead of starting a new reply
    #: (a prompt set's ``update_prefill`` is only given to such models; the reply is the continuation).
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
