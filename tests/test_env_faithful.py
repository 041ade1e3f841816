"""No hidden fact leaks: in the ``train`` and ``hard`` presets an environment states a hidden fact
only after the agent's own actions showed it.

Each test plays many packs with a seeded random policy, keeps every observation and feedback
text with the action that led to it, and checks the environment's hidden facts against what the
agent did. (frozen-lake-obscure, grid-navigation and optimal-control have their own tests.)
"""

from __future__ import annotations

import random
import re

import pytest

from lifecycle_agent import envs
from lifecycle_agent.envs import alchemy as alchemy_module
from lifecycle_agent.envs import terminal as terminal_module
from lifecycle_agent.tasks import StepResult

STRICT_PRESETS = ("train", "hard")
PACKS = 40
SIZE = 8


def play_recorded(task, policy):
    """Play ``task`` with ``policy(observation, rng-free)``; return the start text and the ``(action, result)`` steps."""
    start = task.start()
    observation, steps = start, []
    for _ in range(task.max_turns):
        action = policy(observation)
        result = StepResult(*task.step(action))
        steps.append((action, result))
        if result.done:
            break
        observation = result.observation
    else:
        steps.append(("", StepResult(*task.timeout_result())))
    return start, steps


# ---------------------------------------------------------------- alchemy


def random_alchemist(rng):
    def policy(observation):
        have = re.findall(r"You have: ([a-z, ]+)\.", observation)
        items = have[-1].split(", ") if have else list(alchemy_module.BASE_NAMES[:4])
        if rng.random() < 0.1:
            return rng.choice(["combine", "I think I should wait.", f"combine {items[0]} + {items[0]}"])
        a, b = rng.sample(items, 2) if len(items) > 1 else (items[0], items[0])
        return f"combine {a} + {b}"

    return policy


@pytest.mark.parametrize("preset", STRICT_PRESETS)
def test_alchemy_names_no_recipe_and_no_item_the_agent_did_not_make(preset):
    env = envs.make("alchemy", preset=preset)
    rng = random.Random(f"alchemy-{preset}")
    made_names = set(alchemy_module.MADE_NAMES)
    checked = 0
    for seed in range(PACKS):
        for task in env.pack(seed, SIZE).tasks:
            start, steps = play_recorded(task, random_alchemist(rng))
            assert "made from" not in start and "Recipes found" not in start
            performed: dict[frozenset, str] = {}
            for action, result in steps:
                before = set(task.inventory)
                pair, _ = alchemy_module.parse_pair(action, task.known)
                text = (result.observation or "") + " " + (result.feedback or "")
                assert "made from" not in text and "Recipes found" not in text
                if pair and frozenset(pair) in task.recipes:
                    performed[frozenset(pair)] = task.recipes[frozenset(pair)]
                # every recipe a text states is one the agent performed, with its true product
                for a, b, item in re.findall(r"\b([a-z]+) \+ ([a-z]+) (?:made|makes) ([a-z]+)", text):
                    assert performed.get(frozenset((a, b))) == item, (task.id, action, text)
                # every made item a text names is the goal or one the agent's own combinations made
                for item in made_names & set(re.findall(r"[a-z]+", text)):
                    assert item == task.target or item in performed.values(), (task.id, item, text)
                assert set(task.inventory) - before <= set(performed.values())
                checked += 1
    assert checked > 1000


def test_alchemy_easy_preset_gives_the_recipes_as_hints():
    task = envs.make("alchemy", preset="easy").pack(0, 1).tasks[0]
    start, steps = play_recorded(task, lambda _observation: "combine nothing + nothing")
    feedback = steps[-1][1].feedback
    assert "it is made from" in feedback and " + ".join(task.ingredients[task.target]) in feedback


# ---------------------------------------------------------------- terminal

_READERS = ("cat", "head", "tail", "less", "more", "grep", "find", "ls", "wc", "echo")


def random_admin(rng, task):
    """Random commands over paths that are everywhere, paths of every pack, and answers; never the hidden layout."""
    places = [p.format(root=root) for root in terminal_module.ROOTS for p in terminal_module.LOG_PLACES + terminal_module.LOCK_PLACES]
    places += [f"{root}/{place}" for root in terminal_module.ROOTS for place in terminal_module.CONFIG_PLACES]
    places += ["/", "/etc", "/var", "/srv", "/opt", "/tmp", "/home/deploy", "/var/log"]

    def policy(_observation):
        pick = rng.random()
        path = rng.choice(places)
        if pick < 0.1:
            return f"answer {rng.choice(['8080', 'deploy', '3', 'root'])}"
        if pick < 0.15:
            return "I am not sure what to do."
        command = rng.choice(["ls", "ls -R", "cat", "head -n 50", "grep -c ERROR", "find", "rm", "wc -l", "cp"])
        if command == "find":
            return f"find {path} -type f"
        if command == "cp":
            return f"cp {path} /tmp/copy"
        return f"{command} {path}"

    return policy


def hidden_terminal_facts(task) -> dict[str, str]:
    facts = {"config": task.config, "log": task.log, "lock": task.lock, "port": f"port = {task.port}",
             "user": f"user = {task.user}"}
    return facts


@pytest.mark.parametrize("preset", STRICT_PRESETS)
def test_terminal_states_no_path_value_or_quirk_the_commands_did_not_show(preset):
    env = envs.make("terminal", preset=preset)
    rng = random.Random(f"terminal-{preset}")
    quirk_notes = list(terminal_module.QUIRK_NOTES.values())
    checked = 0
    for seed in range(PACKS):
        for task in env.pack(seed, SIZE).tasks:
            start, steps = play_recorded(task, random_admin(rng, task))
            facts = hidden_terminal_facts(task)
            assert not any(fact in start for fact in facts.values())
            for action, result in steps:
                kind, line = terminal_module.parse_command(action)
                observation, feedback = result.observation or "", result.feedback or ""
                # the feedback is the outcome only: no layout, no value, no quirk, not even the count of errors
                assert not any(fact in feedback for fact in facts.values()), (task.id, feedback)
                assert not any(note in feedback for note in quirk_notes)
                assert not re.search(r"\bERROR lines\b", feedback)
                # an observation shows the layout only as the output of the agent's own reading command
                if kind != "command" or line.split()[0] not in _READERS + ("rm", "cp", "mv"):
                    assert not any(fact in observation for fact in facts.values()), (task.id, action, observation)
                # a quirk shows only as the error of the command that ran into it
                for name in ("find", "grep"):
                    if f"bash: {name}: command not found" in observation:
                        assert name in (line or "")
                if "Permission denied" in observation:
                    assert "cat" in (line or "")
                checked += 1
    assert checked > 1000


def test_terminal_easy_preset_gives_the_layout_as_a_hint():
    task = next(t for t in envs.make("terminal", preset="easy").pack(3, 5).tasks if t.chore == "port")
    task.start()
    feedback = task.step("answer 1").feedback
    assert task.config in feedback and f"port = {task.port}" in feedback


# ---------------------------------------------------------------- fact-recall and preference


def played_tasks(name, preset, answer):
    """``(pack, task, start text, final feedback)`` of every task of PACKS packs, one answer from ``answer(task, rng)``."""
    env, rng = envs.make(name, preset=preset), random.Random(f"{name}-{preset}")
    for seed in range(PACKS):
        pack = env.pack(seed, SIZE)
        for task in pack.tasks:
            start, steps = play_recorded(task, lambda _o: answer(task, rng))
            yield pack, task, start, steps[-1][1].feedback


@pytest.mark.parametrize("preset", STRICT_PRESETS)
def test_fact_recall_states_only_the_code_the_task_asked_for_after_the_answer(preset):
    for pack, task, start, feedback in played_tasks("fact-recall", preset, lambda t, rng: f"Answer: {rng.randint(0, 9999)}"):
        assert task.code not in start
        told = re.sub(r"you answered \d+", "", feedback)  # what the feedback says beyond echoing the answer
        assert re.findall(r"\d+", told) == [task.code]
        for item in pack.hidden["codes"]:
            assert (item in told) == (item == task.item)


@pytest.mark.parametrize("preset", STRICT_PRESETS)
def test_preference_states_only_this_task_pick(preset):
    for pack, task, start, feedback in played_tasks("preference", preset, lambda t, rng: f"Answer: {rng.choice(t.options)}"):
        assert "picked" not in start and "favourite" not in start
        for category in pack.hidden["categories"]:
            assert (category in feedback) == (category == task.category)


# ---------------------------------------------------------------- every environment


@pytest.mark.parametrize("name", ["alchemy", "terminal", "fact-recall", "preference"])
def test_the_rules_state_no_hidden_fact(name):
    """(Names of things, not facts, can be in the rules: frozen-lake's directions are left to its own tests.)"""
    env = envs.make(name)
    pack = env.pack(4, 2)
    rules = env.instructions() or ""
    for value in _leaf_strings(pack.hidden):
        if len(value) >= 4 and not value.isdigit():
            assert value not in rules, (name, value)


@pytest.mark.parametrize("name", [row["name"] for row in envs.describe()])
def test_an_easy_preset_that_hints_says_so(name):
    row = next(r for r in envs.describe() if r["name"] == name)
    hints = row["preset_options"].get("easy", {}).get("hints")
    assert bool(hints) == bool(row["easy_hints"]), (name, hints, row["easy_hints"])
    assert not row["preset_options"].get("train", {}).get("hints")
    assert not row["preset_options"].get("hard", {}).get("hints")


def _leaf_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():  # keys are field names; facts keyed by name also appear as values
            yield from _leaf_strings(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _leaf_strings(item)
