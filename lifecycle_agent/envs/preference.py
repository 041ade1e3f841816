"""``preference``: a guest's hidden favourites, inferred from what they chose, picked again later.

Each pack is one guest with a hidden favourite in a few categories (a drink, a colour, a
pet, ...). Every task offers four options of one category, in a new order and with new
distractors, and asks which one the guest will pick. The feedback says what the guest
picked *this time*; nothing states a rule. Categories come back later in the pack, so an
agent that notes what the guest picked can choose right the next time. Unlike
``fact-recall`` nothing is looked up by name: the agent must recognise the category,
find the guest's earlier choice among shuffled options and name it. A random choice
scores 0.25, so ``none`` is not 0.
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack

#: Category -> (how a task names it, its options).
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "drink": ("a drink", ("tea", "coffee", "juice", "water", "milk", "soda", "cocoa")),
    "colour": ("a colour for their room", ("red", "blue", "green", "yellow", "purple", "orange", "white")),
    "pet": ("a pet", ("cat", "dog", "rabbit", "parrot", "hamster", "turtle", "goldfish")),
    "sport": ("a sport to watch", ("tennis", "soccer", "golf", "boxing", "cycling", "rugby", "skiing")),
    "snack": ("a snack", ("chips", "nuts", "cookies", "popcorn", "crackers", "pretzels", "grapes")),
    "flower": ("a flower", ("rose", "tulip", "lily", "daisy", "orchid", "sunflower", "violet")),
}
_WORD = re.compile(r"[a-z]+")
_PICKED = re.compile(r"guest picked the ([a-z]+) ([a-z]+)")


class PreferenceTask(EnvTask):
    max_turns = 1

    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        categories = pack.hidden["categories"]
        self.category = categories[index % len(categories)]
        self.favourite = pack.hidden["favourites"][self.category]
        rng = pack.instance_rng(index)
        others = [o for o in CATEGORIES[self.category][1] if o != self.favourite]
        n = int(pack.env.options["options"])
        self.options = rng.sample(others, n - 1) + [self.favourite]
        rng.shuffle(self.options)

    def start(self) -> str:
        what = CATEGORIES[self.category][0]
        return (
            f"The guest wants {what} ({self.category}). Options: {', '.join(self.options)}. "
            "Which one will the guest pick? Reply with one option."
        )

    def chosen(self, action: str) -> Optional[str]:
        """The option the reply names (after its last ``Answer:`` when it has one), or ``None``."""
        answer = action.rsplit("Answer:", 1)[-1] if "Answer:" in action else action
        for word in _WORD.findall(answer.lower()):
            if word in self.options:
                return word
        return None

    def step(self, action: str) -> StepResult:
        choice = self.chosen(action)
        picked = f"The guest picked the {self.category} {self.favourite}."
        if choice == self.favourite:
            return StepResult("", 1.0, True, f"Correct: {picked}")
        said = f"you chose {choice}" if choice else "your reply named none of the options"
        return StepResult("", 0.0, True, f"Wrong: {said}. {picked}")

    def oracle_action(self) -> str:
        return self.favourite


class Preference(Environment):
    name = "preference"
    description = "A guest's hidden favourites per category, learnt from their past choices among shuffled options."
    defaults: dict[str, Any] = {"categories": 2, "options": 4}
    presets = {"train": {}, "easy": {"categories": 1, "options": 3}, "hard": {"categories": 3, "options": 5}}

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self._int_option("categories", 1, len(CATEGORIES))
        self._int_option("options", 2, min(len(o) for _, o in CATEGORIES.values()))

    def instructions(self) -> str:
        return "The same guest comes back in every task; their taste does not change."

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        categories = rng.sample(sorted(CATEGORIES), int(self.options["categories"]))
        return {"categories": categories, "favourites": {c: rng.choice(CATEGORIES[c][1]) for c in categories}}

    def make_task(self, pack: Pack, index: int, task_id: str) -> PreferenceTask:
        return PreferenceTask(pack, index, task_id)

    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """One line per category the guest was seen choosing in; the latest choice wins."""
        picks = dict(_PICKED.findall(notes.lower()))
        picks.update(_PICKED.findall((feedback or "").lower()))
        return "\n".join(f"- The guest picked the {category} {option}." for category, option in picks.items())

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The option the notes say the guest picked in this category, else the first option."""
        question = str(messages[-1].get("content", "")).lower()
        match = re.search(r"\(([a-z]+)\)\. options: ([a-z, ]+)\.", question)
        if not match:
            return "Answer: none"
        category, options = match.group(1), [o.strip() for o in match.group(2).split(",")]
        picks = dict(_PICKED.findall(notes.lower()))
        if picks.get(category) in options:
            return f"Answer: {picks[category]}"
        return f"My notes say nothing about this yet.\nAnswer: {options[0]}"
