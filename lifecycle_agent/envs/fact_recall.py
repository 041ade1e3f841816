"""``fact-recall``: hidden facts revealed by feedback and asked again later in the pack.

Each pack hides a secret numeric code for a few items. Every task asks for the code
of one item; the feedback states the right code. Items come back later in the pack,
so an agent that writes the codes into its context can answer them. Small enough
that SmolLM2-135M shows the effect on a CPU.
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional

from ..errors import EnvironmentSpecError
from ..tasks import StepResult
from .base import Environment, EnvTask, Pack

ITEMS = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
    "kiwi", "melon", "lime", "fig", "papaya", "apricot",
)
QUESTIONS = (
    "What is the secret code of the {item}?",
    "Tell me the secret code for the {item}.",
    "Which secret code belongs to the {item}?",
    "I need the {item}'s secret code. What is it?",
)
_NUMBER = re.compile(r"\d+")
_FACT = re.compile(r"secret code of the ([a-z]+) is (\d+)")


class FactRecallTask(EnvTask):
    max_turns = 1

    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        items = pack.hidden["order"]
        self.item = items[index % len(items)]
        self.code = pack.hidden["codes"][self.item]
        self.question = QUESTIONS[(index + pack.seed) % len(QUESTIONS)].format(item=self.item)

    def start(self) -> str:
        return self.question + " Reply with the number only."

    def step(self, action: str) -> StepResult:
        answer = action.rsplit("Answer:", 1)[-1] if "Answer:" in action else action
        numbers = _NUMBER.findall(answer)
        if numbers and numbers[0] == self.code:
            return StepResult("", 1.0, True, f"Correct: the secret code of the {self.item} is {self.code}.")
        said = f"you answered {numbers[0]}" if numbers else "your reply held no number"
        return StepResult("", 0.0, True, f"Wrong: {said}. The secret code of the {self.item} is {self.code}.")

    def oracle_action(self) -> str:
        return self.code


class FactRecall(Environment):
    name = "fact-recall"
    description = "Secret codes of a few items, revealed by feedback and asked again later in the pack."
    defaults: dict[str, Any] = {"items": 2, "digits": 3}
    presets = {"train": {}, "easy": {"items": 1, "digits": 2}, "hard": {"items": 3, "digits": 4}}
    #: Small enough for the CPU demos with SmolLM2: two items are each asked twice in 4 tasks.
    eval_pack_size = 4

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        items = self._int_option("items", 1, len(ITEMS))
        digits = self._int_option("digits", 1, 9)
        if items > 10**digits - (10 ** (digits - 1) if digits > 1 else 0):
            raise EnvironmentSpecError(f"fact-recall: {items} items cannot have distinct {digits}-digit codes; raise digits")

    def instructions(self) -> str:
        return "Every item has a secret code that stays the same for the whole series of tasks."

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        n, digits = int(self.options["items"]), int(self.options["digits"])
        order = rng.sample(ITEMS, n)
        low = 10 ** (digits - 1) if digits > 1 else 0
        codes: dict[str, str] = {}
        for item in order:
            code = str(rng.randint(low, 10**digits - 1))
            while code in codes.values():
                code = str(rng.randint(low, 10**digits - 1))
            codes[item] = code
        return {"order": order, "codes": codes}

    def make_task(self, pack: Pack, index: int, task_id: str) -> FactRecallTask:
        return FactRecallTask(pack, index, task_id)

    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """One line per code the notes or the feedback stated; the feedback wins over an older note."""
        codes = dict(_FACT.findall(notes.lower()))
        codes.update(_FACT.findall((feedback or "").lower()))
        return "\n".join(f"- The secret code of the {item} is {code}." for item, code in codes.items())

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The code the notes give for the item asked about, else a plain admission."""
        question = str(messages[-1].get("content", "")).lower()
        codes = dict(_FACT.findall(notes.lower()))
        for item in re.findall(r"[a-z]+", question):
            if item in codes:
                return f"Answer: {codes[item]}"
        return "My notes do not hold this code yet.\nAnswer: 0"
