"""``alchemy``: craft a target item from base items when the recipes are a secret.

Each pack hides a recipe graph in tiers: every tier-1 item is made from two base items,
every tier-2 item from a tier-1 item and another lower item, and so on. Every task asks
for a different target. One combination per turn (``combine A + B``); base items never
run out and nothing is used up. Reward 1 when the target is made within ``max_turns``
turns, else 0, or with ``partial_credit`` half the share of the target's missing
ingredients that were made. An agent that notes the recipes it found crafts later
targets directly.

Nothing states a recipe the agent did not perform: a step says what the agent's own
combination made, and the final feedback only the outcome (as the reference's
``show_recipes: false``). The ``easy`` preset (``hints``) adds, as a curriculum, the
recipes found in the task and, when the turns run out, the goal's recipe.
"""

from __future__ import annotations

import random
import re
from itertools import combinations
from typing import Any, Optional

from ..errors import EnvironmentSpecError
from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .parsing import labelled, nonempty_lines, shorten, without

BASE_NAMES = (
    "ash", "brine", "cinder", "dew", "ember", "frost", "grit", "haze", "iron", "jade", "kelp", "loam",
)
MADE_NAMES = (
    "quellite", "zorium", "mirrowax", "cobalith", "thrumite", "vessine", "glimmel", "orrasite", "pellune",
    "skarnite", "wyrdane", "fennox", "lumacite", "brolline", "tazzium", "yllowite", "drunelle", "kravane",
    "noctile", "spirrel", "umberix", "halcyte", "zephrine", "corvalite",
)
#: Text of our own observations that a model may echo back; never read as an action.
_ECHO = (
    re.compile(r"You have:[^.\n]*\.?", re.IGNORECASE),
    re.compile(r"Goal: make \w+\.?", re.IGNORECASE),
    re.compile(r"Reply `?combine <item> \+ <item>`?\.?", re.IGNORECASE),
    re.compile(r"\b\w+ \+ \w+(?::? nothing happened| made \w+!?| makes \w+, which you already have)\.?", re.IGNORECASE),
)
_JOINERS = re.compile(r"\s*(?:\+|&|\band\b|\bwith\b|\bplus\b|,)\s*", re.IGNORECASE)


def parse_pair(reply: str, known: list[str]) -> tuple[Optional[tuple[str, str]], list[str]]:
    """The two items a reply combines, and every known item it mentions.

    An ``Action:``/``Combine:`` line wins; otherwise the last ``A + B`` / ``A and B`` in the
    reply; otherwise the first line naming exactly two different known items. Echoes of
    the observation ("You have: ash, dew, ...", "ash + dew: nothing happened") are ignored.
    """
    reply = without(reply or "", _ECHO)
    names = "|".join(sorted((re.escape(k) for k in known), key=len, reverse=True))
    item = re.compile(rf"\b({names})\b", re.IGNORECASE)
    pair = re.compile(rf"\b({names})\b{_JOINERS.pattern}\b({names})\b", re.IGNORECASE)
    label = labelled(reply)
    texts = ([label] if label else []) + [reply or ""]
    for text in texts:
        matches = pair.findall(text)
        if matches:
            a, b = matches[-1]
            return (a.lower(), b.lower()), [m.lower() for m in item.findall(text)]
    for line in nonempty_lines(reply):
        mentioned = list(dict.fromkeys(m.lower() for m in item.findall(line)))
        if len(mentioned) == 2:
            return (mentioned[0], mentioned[1]), mentioned
    return None, [m.lower() for m in item.findall(reply or "")]


class AlchemyTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        self.max_turns = pack.env.options["max_turns"]
        self.partial_credit = pack.env.options["partial_credit"]
        self.hints = pack.env.options["hints"]
        hidden = pack.hidden
        self.base: list[str] = hidden["base"]
        self.recipes: dict[frozenset, str] = {frozenset(k): v for k, v in hidden["recipes"]}
        self.ingredients: dict[str, tuple[str, str]] = {v: tuple(sorted(k)) for k, v in self.recipes.items()}
        self.known = self.base + list(self.ingredients)
        candidates = [name for name, tier in hidden["tiers"].items() if self._eligible(name, tier)]
        if not candidates:
            raise EnvironmentSpecError(
                f"alchemy: no item of tier {pack.env.options['min_tier']}-{pack.env.options['max_tier']} can be made "
                f"within {self.max_turns} turns; raise max_turns or lower max_tier"
            )
        self.target = pack.instance_rng(index).choice(sorted(candidates))
        self.needed = self._tree(self.target)
        self._reset()

    def _eligible(self, name: str, tier: int) -> bool:
        options = self.pack.env.options
        return options["min_tier"] <= tier <= options["max_tier"] and len(self._tree(name)) <= options["max_turns"]

    def _tree(self, name: str) -> list[str]:
        """Made items needed for ``name`` (itself included), ingredients first."""
        if name not in self.ingredients:
            return []
        order: list[str] = []
        for part in self.ingredients[name]:
            for item in self._tree(part):
                if item not in order:
                    order.append(item)
        return order + [name]

    def _reset(self) -> None:
        self.inventory: list[str] = list(self.base)
        self.turns = 0
        self.found: list[str] = []

    def _status(self) -> str:
        left = self.max_turns - self.turns
        return (
            f"You have: {', '.join(self.inventory)}. Goal: make {self.target}. "
            f"{left} turn{'s' if left != 1 else ''} left. Reply `combine <item> + <item>`."
        )

    def start(self) -> str:
        self._reset()
        return self._status()

    def _found_text(self) -> str:
        """The curriculum hint of the ``easy`` preset: this task's recipes in one line ('' without ``hints``)."""
        if not self.hints:
            return ""
        return " " + (("Recipes found in this task: " + "; ".join(self.found) + ".") if self.found else "No recipe was found in this task.")

    def step(self, action: str) -> StepResult:
        self.turns += 1
        pair, mentioned = parse_pair(action, self.known)
        if pair is None:
            note = f"I could not read two items to combine in {shorten(action, 60)!r}; the turn is lost."
        elif pair[0] == pair[1]:
            note = f"Combining {pair[0]} with itself does nothing; pick two different items."
        elif any(p not in self.inventory for p in pair):
            missing = ", ".join(p for p in pair if p not in self.inventory)
            note = f"You do not have {missing} yet; the turn is lost."
        else:
            made = self.recipes.get(frozenset(pair))
            if made is None:
                note = f"{pair[0]} + {pair[1]}: nothing happened."
            elif made in self.inventory:
                note = f"{pair[0]} + {pair[1]} makes {made}, which you already have."
            else:
                self.inventory.append(made)
                self.found.append(f"{pair[0]} + {pair[1]} = {made}")
                if made == self.target:
                    return StepResult(
                        "", 1.0, True,
                        f"You made {made} in {self.turns} turn{'s' if self.turns != 1 else ''}; reward 1.{self._found_text()}",
                    )
                note = f"{pair[0]} + {pair[1]} made {made}!"
        if self.turns >= self.max_turns:
            return self.timeout_result()
        return StepResult(f"{note}\n{self._status()}", None, False, None)

    def _partial(self) -> float:
        if not self.partial_credit:
            return 0.0
        # ``needed`` ends with the target itself, which a failed task never made: the share is
        # over the intermediate ingredients only (none for a target made from base items).
        intermediates = self.needed[:-1]
        if not intermediates:
            return 0.0
        made = [item for item in intermediates if item in self.inventory]
        return 0.5 * len(made) / len(intermediates)

    def timeout_result(self) -> StepResult:
        reward = self._partial()
        # the goal's recipe is a hidden fact the agent did not perform: only the easy preset's hints tell it
        recipe = f" (it is made from {' + '.join(self.ingredients[self.target])})" if self.hints else ""
        return StepResult(
            "", reward, True,
            f"The {self.max_turns} turns ran out before you made {self.target}{recipe}; reward {reward:.2f}.{self._found_text()}",
        )

    def oracle_action(self) -> str:
        for item in self.needed:
            if item not in self.inventory:
                a, b = self.ingredients[item]
                return f"combine {a} + {b}"
        raise RuntimeError(f"{self.id}: the target is already made")


class Alchemy(Environment):
    name = "alchemy"
    description = "Craft a target item through a hidden, per-pack recipe graph of tiered items."
    easy_hints = "the feedback lists the recipes found in the task and, when the turns run out, the goal's recipe"
    defaults: dict[str, Any] = {
        "base": 4, "tier1": 3, "tier2": 2, "tier3": 0, "min_tier": 1, "max_tier": 2, "max_turns": 6,
        "partial_credit": False, "hints": False,
    }
    presets = {
        "train": {},
        "easy": {"base": 3, "tier1": 3, "tier2": 0, "max_tier": 1, "max_turns": 5, "hints": True},
        "hard": {"base": 5, "tier1": 4, "tier2": 3, "tier3": 2, "min_tier": 2, "max_tier": 3, "max_turns": 8},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        base = self._int_option("base", 2, len(BASE_NAMES))
        tier1 = self._int_option("tier1", 1, base * (base - 1) // 2)
        tier2 = self._int_option("tier2", 0, 8)
        tier3 = self._int_option("tier3", 0, 8)
        if tier1 + tier2 + tier3 > len(MADE_NAMES):
            raise EnvironmentSpecError(f"alchemy: at most {len(MADE_NAMES)} made items in all")
        if tier3 and not tier2:
            raise EnvironmentSpecError("alchemy: tier3 items need tier2 items (set tier2 >= 1)")
        deepest = 3 if tier3 else 2 if tier2 else 1
        low = self._int_option("min_tier", 1, deepest)
        self._int_option("max_tier", low, deepest)
        self._int_option("max_turns", 1, 30)
        self._bool_option("partial_credit")
        self._bool_option("hints")

    def instructions(self) -> str:
        return (
            "You are an alchemist. Each turn, combine two items you have, e.g. `combine ash + dew`. Some pairs make a "
            "new item, others do nothing; base items never run out and nothing is used up. The recipes are secret but "
            "stay the same for the whole series of tasks. Make the goal item before the turns run out."
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        o = self.options
        base = rng.sample(BASE_NAMES, o["base"])
        names = iter(rng.sample(MADE_NAMES, o["tier1"] + o["tier2"] + o["tier3"]))
        tiers: dict[str, int] = {b: 0 for b in base}
        recipes: list[tuple[tuple[str, str], str]] = []
        used: set[frozenset] = set()
        for tier, count in ((1, o["tier1"]), (2, o["tier2"]), (3, o["tier3"])):
            previous = sorted(n for n, t in tiers.items() if t == tier - 1)
            lower = sorted(n for n, t in tiers.items() if t < tier)
            pairs = [
                p for p in combinations(lower, 2)
                if (p[0] in previous or p[1] in previous) and frozenset(p) not in used
            ]
            rng.shuffle(pairs)
            if len(pairs) < count:
                raise EnvironmentSpecError(f"alchemy: not enough item pairs for {count} tier-{tier} items; lower tier{tier}")
            for pair in pairs[:count]:
                made = next(names)
                recipes.append((pair, made))
                used.add(frozenset(pair))
                tiers[made] = tier
        return {"base": base, "recipes": recipes, "tiers": tiers}

    def make_task(self, pack: Pack, index: int, task_id: str) -> AlchemyTask:
        return AlchemyTask(pack, index, task_id)

    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """Every recipe the agent's own combinations made (and the pairs that made nothing), old and new."""
        return AlchemyReference.notes(notes, transcript, feedback)

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """Craft the goal from known recipes when they reach it, else try a pair not tried before."""
        return AlchemyReference.reply(notes, messages)


# ---------------------------------------------------------------- the reference policy (observation only)
#: What a step says about a combination the agent made: ``a + b made c!`` / ``a + b makes c, which ...``
#: / ``a + b: nothing happened.``; and the lines of the reference notes (``- a + b = c``, ``- a + b = nothing``).
_SEEN_MADE = re.compile(r"\b([a-z]+) \+ ([a-z]+) (?:made|makes) ([a-z]+)\b")
_SEEN_NOTHING = re.compile(r"\b([a-z]+) \+ ([a-z]+): nothing happened")
_NOTE = re.compile(r"\b([a-z]+) \+ ([a-z]+) = ([a-z]+)\b")
_HAVE = re.compile(r"You have: ([a-z, ]+)\. Goal: make ([a-z]+)\.")
_MADE_GOAL = re.compile(r"You made ([a-z]+) in \d+ turns?")
_SPEAKER = re.compile(r"^(Environment|You): ", re.MULTILINE)
#: Notes stop growing here (the agent's default context budget is 2000 characters): recipes
#: always stay, combinations that made nothing fill what is left.
_NOTES_CHARS = 1800


def _observed(text: str) -> tuple[dict[frozenset, str], set[frozenset]]:
    """Recipes and fruitless pairs that ``text`` (observations or notes) states."""
    recipes = {frozenset((a, b)): c for a, b, c in _SEEN_MADE.findall(text) + _NOTE.findall(text) if c != "nothing"}
    nothing = {frozenset((a, b)) for a, b in _SEEN_NOTHING.findall(text)}
    nothing |= {frozenset((a, b)) for a, b, c in _NOTE.findall(text) if c == "nothing"}
    return recipes, nothing - set(recipes)


def _transcript_turns(transcript: str) -> list[tuple[str, str]]:
    """``(speaker, text)`` pairs of a rendered transcript (``Environment: ...`` / ``You: ...``)."""
    parts = _SPEAKER.split(transcript)
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _last_pair(reply: str, observation: str) -> Optional[tuple[str, str]]:
    """The two items the agent's last ``reply`` combined, read against the items its last ``observation`` listed."""
    have = _HAVE.search(observation)
    if not have:
        return None
    known = [item.strip() for item in have.group(1).split(",")] + [have.group(2)]
    pair, _ = parse_pair(reply, known)
    return pair


class AlchemyReference:
    """Notes: every recipe the agent saw its own combinations make, and the pairs that made nothing."""

    @staticmethod
    def notes(notes: str, transcript: str, feedback: Optional[str]) -> str:
        recipes, nothing = _observed(notes + "\n" + transcript)
        made = _MADE_GOAL.search(feedback or "")
        turns = _transcript_turns(transcript)
        observations = [text for speaker, text in turns if speaker == "Environment"]
        replies = [text for speaker, text in turns if speaker == "You"]
        if made and replies and observations:
            # the goal was made by the last combination: the step that made it is the feedback itself
            pair = _last_pair(replies[-1], observations[-1])
            if pair:
                recipes[frozenset(pair)] = made.group(1)
                nothing.discard(frozenset(pair))
        lines = [f"- {' + '.join(sorted(pair))} = {item}" for pair, item in sorted(recipes.items(), key=lambda kv: kv[1])]
        for pair in sorted(nothing, key=sorted):
            line = f"- {' + '.join(sorted(pair))} = nothing"
            if sum(len(x) + 1 for x in lines) + len(line) > _NOTES_CHARS:
                break
            lines.append(line)
        return "\n".join(lines)

    @staticmethod
    def reply(notes: str, messages: list[dict]) -> str:
        episode = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        recipes, nothing = _observed(notes + "\n" + episode)
        state = _HAVE.findall(str(messages[-1].get("content", "")))
        if not state:
            return "Action: combine"
        items, goal = [item.strip() for item in state[-1][0].split(",")], state[-1][1]
        step = _plan(goal, items, {item: tuple(sorted(pair)) for pair, item in recipes.items()}, set())
        if step:
            return f"Action: combine {step[0]} + {step[1]}"
        tried = set(recipes) | nothing
        made = [item for item in items if item in recipes.values()]
        untried = [p for p in combinations(items, 2) if frozenset(p) not in tried]
        # a made item is more likely an ingredient of a higher tier than another pair of base items
        untried.sort(key=lambda p: -sum(item in made for item in p))
        a, b = untried[0] if untried else (items[0], items[1])
        return f"Action: combine {a} + {b}"


def _plan(item: str, have: list[str], recipe_of: dict[str, tuple[str, str]], visiting: set[str]) -> Optional[tuple[str, str]]:
    """The next combination on the way to ``item`` from known recipes, or ``None`` when it cannot be planned."""
    if item in have or item in visiting or item not in recipe_of:
        return None
    parts = recipe_of[item]
    for part in parts:
        if part not in have:
            step = _plan(part, have, recipe_of, visiting | {item})
            return step  # the first missing ingredient comes first (None: it cannot be made yet)
    return parts
