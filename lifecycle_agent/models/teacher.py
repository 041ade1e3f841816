"""``ReferenceTeacher``: an environment's reference policy as a model (``train --sft --teacher oracle``).

The teacher answers the same messages any model gets through :class:`~lifecycle_agent.LifecycleAgent`:
a solve episode is answered by the environment's :meth:`~lifecycle_agent.envs.Environment.reference_reply`
from the Hints in the prompt, an update episode by its
:meth:`~lifecycle_agent.envs.Environment.reference_notes` from the previous notes, transcript, reward
and feedback read back out of the prompt. It holds the environment (its rules and options), never a
pack, so it cannot know a hidden fact that the episode did not show.
"""

from __future__ import annotations

from typing import Optional

from .. import protocol
from ..errors import ModelCallError
from ..prompts import CONTEXT_BEGIN, CONTEXT_END
from .base import ChatModel, Generation
from .scripted import hints, is_update


class ReferenceTeacher(ChatModel):
    """The reference note-writer and solver of ``env`` as a :class:`ChatModel` (zero latency)."""

    supports_prefill = True

    def __init__(self, env, prompt_set: str = "cod-v1"):
        if not getattr(env, "has_reference_policy", False):
            raise ModelCallError(
                f"environment {env.name!r} has no reference note-writer, so it cannot be the teacher; "
                "use --teacher SPEC (a model spec) or an environment that has one"
            )
        self.env = env
        self.prompt_set = prompt_set
        self.model_id = f"reference:{env.name}"

    def generate(self, messages, *, temperature: Optional[float] = None, max_new_tokens: Optional[int] = None) -> Generation:
        prefill = ""
        if messages and messages[-1].get("prefill") is True:
            prefill, messages = str(messages[-1].get("content") or ""), messages[:-1]
        if is_update(messages):
            request = protocol.read_update_request(messages, self.prompt_set)
            notes = self.env.reference_notes(request.context, request.transcript, request.reward, request.feedback)
            text = f"{CONTEXT_BEGIN}\n{notes.strip() or '- Nothing learnt yet.'}\n{CONTEXT_END}"
            if prefill and text.startswith(prefill):
                text = text[len(prefill):]
        else:
            text = self.env.reference_reply(hints(messages), messages)
        return Generation(text=text, prompt_tokens=None, completion_tokens=None)

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        return self.generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)
