"""Per-agent settings: the one home of their names, types, defaults and limits.

The store, the agent, the server's request schemas, the trainer's rollouts and its config
all read them from here (this module sits below the store, beside the protocol's policies).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .prompts import DEFAULT_PROMPT_SET
from .protocol import BudgetPolicy, ParsePolicy

__all__ = ["AgentSettings", "BudgetPolicy", "ParsePolicy", "OnFailedUpdate", "MAX_CONTEXT_BUDGET", "TRAINING_SETTINGS"]

OnFailedUpdate = Literal["keep", "reset"]

#: Default context budget, characters.
DEFAULT_CONTEXT_BUDGET = 2000
#: Largest context budget any entry point accepts, characters. One rule everywhere: far above what
#: fits any model's prompt, and a bound on what one request can make the store hold per version.
MAX_CONTEXT_BUDGET = 100_000


class AgentSettings(BaseModel):
    """Per-agent settings, stored with the agent so a reopened agent behaves the same."""

    context_budget: int = Field(
        default=DEFAULT_CONTEXT_BUDGET, ge=1, le=MAX_CONTEXT_BUDGET, description="Maximum context length, characters."
    )
    budget_policy: BudgetPolicy = Field(default="truncate", description="What happens to an over-long update.")
    parse_policy: ParsePolicy = Field(default="lenient", description="How update replies are parsed.")
    prompt_set: str = Field(default=DEFAULT_PROMPT_SET, description="Prompt-set id used to build every prompt.")
    on_failed_update: OnFailedUpdate = Field(
        default="keep",
        description="After an update with no usable notes: keep the previous context (deployment) or reset it to "
        "the prompt set's fixed 'no notes' text (training's rule, so a bad update costs the later tasks).",
    )


#: Training's settings (the reference's rules): strict parsing, a failed update resets the context, cod-v2 prompts.
TRAINING_SETTINGS = AgentSettings(parse_policy="strict", on_failed_update="reset", prompt_set="cod-v2")
