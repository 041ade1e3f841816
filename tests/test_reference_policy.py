"""Reference note-writers and solvers (the ``--teacher oracle``) and the preference environment.

A reference policy sees exactly what an agent sees. The leak tests give it a pack whose hidden
facts differ from what was revealed, and check that the notes hold only what the feedback showed.
"""

from __future__ import annotations

import re

import pytest

from lifecycle_agent import LifecycleAgent, envs, protocol
from lifecycle_agent.envs import terminal as terminal_module
from lifecycle_agent.envs.fact_recall import FactRecall
from lifecycle_agent.errors import EnvironmentSpecError, ModelCallError
from lifecycle_agent.models.teacher import ReferenceTeacher

WITH_REFERENCE = ("fact-recall", "preference")


def play_first_task(env, seed):
    """Solve task 0 of a pack with the reference solver (empty notes); return (pack, task, update request)."""
    pack = env.pack(seed, 4)
    task = pack.tasks[0]
    messages = protocol.solve_messages("", task.start(), "cod-v2", task.instructions)
    reply = env.reference_reply("", messages)
    result = task.step(reply)
    transcript = protocol.render_transcript(messages + [{"role": "assistant", "content": reply}])
    return pack, task, (transcript, result.reward, result.feedback)


@pytest.mark.parametrize("seed", range(8))
def test_fact_recall_notes_hold_the_revealed_code_and_no_hidden_one(seed):
    env = envs.make("fact-recall", preset="hard")  # 3 items: two stay hidden after the first task
    pack, task, (transcript, reward, feedback) = play_first_task(env, seed)
    notes = env.reference_notes("", transcript, reward, feedback)
    assert f"{task.item} is {task.code}" in notes
    for item, code in pack.hidden["codes"].items():
        if item != task.item:
            assert item not in notes and code not in notes


@pytest.mark.parametrize("seed", range(8))
def test_preference_notes_hold_the_revealed_pick_and_no_hidden_one(seed):
    env = envs.make("preference", preset="hard")  # 3 categories: two stay hidden after the first task
    pack, task, (transcript, reward, feedback) = play_first_task(env, seed)
    notes = env.reference_notes("", transcript, reward, feedback)
    assert f"{task.category} {task.favourite}" in notes
    for category, favourite in pack.hidden["favourites"].items():
        if category != task.category:
            assert category not in notes


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_notes_follow_the_feedback_not_the_pack(name):
    """The writer reads text only: feedback about another pack's facts gives notes about those facts."""
    env = envs.make(name)
    _, _, (transcript, reward, _) = play_first_task(env, 3)
    invented = ("Wrong: you answered 1. The secret code of the zebra is 4242." if name == "fact-recall"
                else "Wrong: you chose tea. The guest picked the drink lemonade.")
    notes = env.reference_notes("", transcript, reward, invented)
    assert ("zebra is 4242" if name == "fact-recall" else "drink lemonade") in notes


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_notes_keep_older_facts_and_the_newest_feedback_wins(name):
    env = envs.make(name)
    if name == "fact-recall":
        old = "- The secret code of the apple is 111.\n- The secret code of the pear is 222."
        new = env.reference_notes(old, "t", 0.0, "Wrong: you answered 5. The secret code of the pear is 333.")
        assert "apple is 111" in new and "pear is 333" in new and "222" not in new
    else:
        old = "- The guest picked the drink tea.\n- The guest picked the pet cat."
        new = env.reference_notes(old, "t", 0.0, "Wrong: you chose cat. The guest picked the pet dog.")
        assert "drink tea" in new and "pet dog" in new and "pet cat" not in new


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_the_reference_solver_answers_from_its_notes_only(name):
    env = envs.make(name)
    task = env.pack(11, 4).tasks[0]
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": task.start()}]
    assert task.step(env.reference_reply("", messages)).reward in (0.0, 1.0)
    right = (f"- The secret code of the {task.item} is {task.code}." if name == "fact-recall"
             else f"- The guest picked the {task.category} {task.favourite}.")
    assert task.step(env.reference_reply(right, messages)).reward == 1.0


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_the_teacher_through_the_agent_does_better_with_notes_than_without(name):
    env = envs.make(name)
    late = {}
    for mode in ("live", "none"):
        total = 0.0
        for seed in range(12):
            agent = LifecycleAgent(ReferenceTeacher(env, "cod-v2"), ":memory:", "t", prompt_set="cod-v2",
                                   parse_policy="strict", context_mode=mode)
            records = agent.run(env.pack(seed, 4).tasks, update_after_last=False).records
            total += sum(r.reward for r in records[2:])
            if mode == "live":
                assert all(r.update_status == "ok" for r in records[:-1])
        late[mode] = total / 24
    assert late["live"] == 1.0 and late["none"] < 0.5


def test_the_teacher_continues_a_prefilled_update():
    env = envs.make("fact-recall")
    teacher = ReferenceTeacher(env, "cod-v2")
    messages = protocol.update_messages("", "Environment: q\nYou: 1", 0.0,
                                        "Wrong: x. The secret code of the fig is 12.", 500, "cod-v2")
    reply = teacher.generate(messages + [{"role": "assistant", "content": protocol.CONTEXT_BEGIN + "\n", "prefill": True}]).text
    assert not reply.startswith(protocol.CONTEXT_BEGIN)
    assert protocol.parse_update(protocol.CONTEXT_BEGIN + "\n" + reply, "strict", prefilled=True).text == \
        "- The secret code of the fig is 12."


class Silent(FactRecall):
    """fact-recall without its reference policy (built-ins gain them: this one never has one)."""

    name = "silent"
    has_reference_policy = False


def test_an_environment_without_a_reference_policy_cannot_teach():
    with pytest.raises(ModelCallError, match="no reference note-writer"):
        ReferenceTeacher(Silent())


# ---------------------------------------------------------------- every environment with a reference policy
#: Environments whose reference policy is tested here (small and fast); benchmarks/env_reference.py runs
#: every registered environment that has one, with many more packs.
LEARNABLE = ("fact-recall", "preference", "alchemy", "terminal")


def late_rewards(env, mode, packs, size=6):
    """Mean reward at positions size//2.. of ``packs`` packs, the teacher run through the agent in ``mode``."""
    rewards = []
    for seed in range(packs):
        agent = LifecycleAgent(ReferenceTeacher(env, "cod-v2"), ":memory:", "t", prompt_set="cod-v2",
                               parse_policy="strict", context_mode=mode)
        records = agent.run(env.pack(seed, size).tasks, update_after_last=False).records
        if mode == "live":
            assert all(r.update_status == "ok" for r in records[:-1]), [r.update_status for r in records]
        rewards += [r.reward for r in records[size // 2:]]
    return sum(rewards) / len(rewards)


@pytest.mark.parametrize("name", LEARNABLE)
@pytest.mark.parametrize("preset", ["train", "hard"])
def test_the_reference_policy_scores_higher_late_in_the_pack_with_notes(name, preset):
    env = envs.make(name, preset=preset)
    assert env.has_reference_policy
    live, none = late_rewards(env, "live", 16), late_rewards(env, "none", 16)
    assert live > none, (live, none)


def test_describe_lists_the_environments_with_a_reference_policy():
    listed = {row["name"] for row in envs.describe() if row["has_reference_policy"]}
    assert set(LEARNABLE) <= listed


@pytest.mark.parametrize("name", LEARNABLE)
def test_the_oracle_still_reaches_the_optimum(name):
    env = envs.make(name)
    for seed in range(12):
        for task in env.pack(seed, 6).tasks:
            assert envs.play_oracle(task).reward == pytest.approx(task.optimum())


@pytest.mark.parametrize("name", LEARNABLE)
def test_the_reference_policy_is_deterministic(name):
    env = envs.make(name)
    runs = []
    for _ in range(2):
        agent = LifecycleAgent(ReferenceTeacher(env, "cod-v2"), ":memory:", "t", prompt_set="cod-v2", parse_policy="strict")
        runs.append([(r.reward, r.feedback) for r in agent.run(env.pack(9, 5).tasks, update_after_last=False).records])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- alchemy and terminal notes


def play_with_reference(env, task, notes=""):
    """Solve ``task`` with the reference solver; return the transcript, the last result and the messages."""
    messages = protocol.solve_messages(notes, task.start(), "cod-v2", task.instructions)
    for _ in range(task.max_turns):
        reply = env.reference_reply(notes, messages)
        messages.append({"role": "assistant", "content": reply})
        result = task.step(reply)
        if result.done:
            break
        messages.append({"role": "user", "content": result.observation})
    else:
        result = task.timeout_result()
    return protocol.render_transcript(messages), result


def first_task_notes(name, seed):
    """Task 0 of a ``hard`` pack solved by the reference solver from no notes; ``(task, transcript, result, notes)``."""
    env = envs.make(name, preset="hard")
    task = env.pack(seed, 3).tasks[0]
    transcript, result = play_with_reference(env, task)
    return task, transcript, result, env.reference_notes("", transcript, result.reward, result.feedback)


@pytest.mark.parametrize("seed", range(10))
def test_alchemy_notes_hold_only_recipes_the_agent_performed(seed):
    task, transcript, result, notes = first_task_notes("alchemy", seed)
    for line in notes.splitlines():
        a, b, made = re.fullmatch(r"- ([a-z]+) \+ ([a-z]+) = ([a-z]+)", line).groups()
        assert f"{a} + {b}" in transcript or f"{b} + {a}" in transcript, line  # the agent combined them
        assert task.recipes.get(frozenset((a, b)), "nothing") == made  # and the note is true
    if result.reward == 1.0:
        recipe = " + ".join(task.ingredients[task.target])
        assert f"- {recipe} = {task.target}" in notes  # the last combination is read from the agent's own reply


def test_alchemy_solver_crafts_from_its_notes():
    env = envs.make("alchemy")
    task = env.pack(4, 1).tasks[0]
    notes = "\n".join(f"- {' + '.join(task.ingredients[item])} = {item}" for item in task.needed)
    _, result = play_with_reference(env, task, notes)
    assert result.reward == 1.0 and task.turns == len(task.needed)


@pytest.mark.parametrize("seed", range(10))
def test_terminal_notes_hold_only_what_the_commands_showed(seed):
    task, transcript, _, notes = first_task_notes("terminal", seed)
    for path in re.findall(r"file is (/\S+)\.$", notes, re.MULTILINE):
        assert path in transcript and path in (task.config, task.log, task.lock)
    for quirk in task.quirks:
        if quirk not in task.shell.hit:
            assert terminal_module._QUIRK_SIGNS[quirk][1] not in notes  # a quirk never met is not noted


def test_terminal_solver_uses_the_layout_and_quirks_its_notes_give():
    env = envs.make("terminal", quirks=1)
    for seed in range(60):
        task = env.pack(seed, 5).tasks[0]
        if task.chore not in ("port", "user") or task.quirks != ("cat_denied",):
            continue
        notes = f"- The app's config file is {task.config}.\n" + terminal_module._QUIRK_SIGNS["cat_denied"][1]
        _, result = play_with_reference(env, task, notes)
        assert result.reward == pytest.approx(task.optimum())  # head -n 50 CONFIG, answer: the oracle's two commands
        return
    pytest.skip("no port or user chore with the cat quirk in 60 seeds")


# ---------------------------------------------------------------- the preference environment
@pytest.mark.parametrize("preset", ["train", "easy", "hard"])
def test_preference_oracle_reaches_every_task(preset):
    env = envs.make("preference", preset=preset)
    for seed in range(20):
        for task in env.pack(seed, 6).tasks:
            assert envs.play_oracle(task).reward == 1.0


def test_preference_is_deterministic_from_its_seed_and_shuffles_options_per_task():
    env = envs.make("preference")
    a, b = env.pack(5, 6), env.pack(5, 6)
    assert [t.start() for t in a.tasks] == [t.start() for t in b.tasks]
    first, third = a.tasks[0], a.tasks[2]
    assert first.category == third.category and first.favourite == third.favourite
    orders = {tuple(env.pack(s, 1).tasks[0].options).index(env.pack(s, 1).tasks[0].favourite) for s in range(30)}
    assert len(orders) > 1  # the favourite is not always in the same place


def test_preference_feedback_states_this_task_outcome_only():
    env = envs.make("preference", preset="hard")
    pack = env.pack(2, 3)
    task = pack.tasks[0]
    feedback = task.step("Answer: nothing").feedback
    assert "none of the options" in feedback and task.favourite in feedback
    for category in pack.hidden["categories"][1:]:
        assert category not in feedback


def test_preference_reads_the_answer_line_and_the_first_option_named():
    task = envs.make("preference").pack(1, 1).tasks[0]
    wrong = next(o for o in task.options if o != task.favourite)
    assert task.step(f"I like {wrong}.\nAnswer: {task.favourite}").reward == 1.0
    assert task.step(f"Answer: {wrong} or {task.favourite}").reward == 0.0


@pytest.mark.parametrize("options", [{"categories": 0}, {"categories": 99}, {"options": 1}, {"options": "4"}, {"colour": 1}])
def test_preference_bad_options_are_clear_errors(options):
    with pytest.raises(EnvironmentSpecError, match="preference"):
        envs.make("preference", **options)


def test_the_scripted_model_answers_from_its_notes_beyond_numbers():
    """``scripted`` picks the option its notes name (preference), not only numbers (fact-recall)."""
    from lifecycle_agent.models.scripted import ScriptedModel

    env = envs.make("preference")
    rewards = []
    for seed in range(6):
        agent = LifecycleAgent(ScriptedModel(), ":memory:", "s")
        rewards += [r.reward for r in agent.run(env.pack(seed, 4).tasks).records[2:]]
    assert rewards == [1.0] * 12


def test_the_scripted_model_takes_the_value_the_feedback_states_last():
    from lifecycle_agent.models.scripted import lookup_answer

    notes = "What is the code of the fig? -> Wrong: you answered 12. The secret code of the fig is 77."
    messages = [{"role": "system", "content": f"## Hints\nnotes\n{notes}\n\nSolve."},
                {"role": "user", "content": "What is the code of the fig?"}]
    assert lookup_answer(messages).endswith("Answer: 77")


# ---------------------------------------------------------------- benchmarks/env_reference.py


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "env_reference.py"
    spec = importlib.util.spec_from_file_location("env_reference_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_every_environment_with_a_reference_policy_registered_or_built_in():
    from lifecycle_agent.envs.preference import Preference

    class Guest(Preference):
        name = "guest"

    bench = load_benchmark()
    envs.register("guest", Guest)
    try:
        assert "guest" in bench.with_reference_policy() and set(LEARNABLE) <= set(bench.with_reference_policy())
    finally:
        envs.unregister("guest")


def test_the_benchmark_writes_results_without_machine_paths(tmp_path, monkeypatch, capsys):
    import json
    import sys

    bench = load_benchmark()
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["env_reference.py", "--env", "fact-recall", "--packs", "2", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    entry = result["environments"]["fact-recall"]
    assert entry["oracle"]["reward"] == entry["oracle"]["optimum"] == 1.0
    assert entry["reference"]["live"]["by_position"] == [0.0, 0.0, 1.0, 1.0] and entry["reference"]["none"]["late"] == 0.0
    assert entry["harness"]["ms_per_episode"] > 0
    assert str(tmp_path) not in out.read_text() and "fact-recall" in capsys.readouterr().out


def test_the_benchmark_refuses_an_environment_without_a_reference_policy(monkeypatch, capsys):
    import sys

    bench = load_benchmark()
    envs.register("silent", Silent)
    monkeypatch.setattr(sys, "argv", ["env_reference.py", "--env", "silent"])
    try:
        with pytest.raises(SystemExit):
            bench.main()
    finally:
        envs.unregister("silent")
    assert "no reference policy: silent" in capsys.readouterr().err


# ---------------------------------------------------------------- the game environments
#: name -> (options, packs, pack size): small enough for the fast suite. grid-navigation keeps what was
#: revealed on the pack by default (the reference's rule), which helps ``none`` as much as ``live``; without
#: it the notes are the only memory of the map.
GAMES = {
    "frozen-lake-obscure": ({}, 12, 6),
    "grid-navigation": ({"reveal_across_pack": False}, 8, 4),
    "optimal-control": ({}, 12, 4),
}


@pytest.mark.parametrize("name", GAMES)
def test_the_game_teacher_through_the_agent_does_better_with_notes_than_without(name):
    options, packs, size = GAMES[name]
    env = envs.make(name, **options)
    live, none = late_rewards(env, "live", packs, size), late_rewards(env, "none", packs, size)
    assert live > none + 0.05, (live, none)


@pytest.mark.parametrize("seed", range(6))
def test_frozen_lake_notes_hold_only_codes_whose_moves_were_shown(seed):
    env = envs.make("frozen-lake-obscure")
    pack, task, (transcript, reward, feedback) = play_first_task(env, seed)
    notes = env.reference_notes("", transcript, reward, feedback)
    from lifecycle_agent.envs.frozen_lake import read_moves

    shown = read_moves(f"{transcript}\n{feedback}")
    noted = dict(re.findall(r"Direction (\d) moves (\w+)", notes))
    assert set(shown) <= set(noted) and len(noted) <= len(shown) + (1 if len(shown) == 3 else 0)
    assert all(pack.hidden["mapping"][code] == direction for code, direction in noted.items())


def test_the_game_notes_follow_what_was_shown_not_the_pack():
    lake = envs.make("frozen-lake-obscure")
    shown = "Environment: You executed action Direction 2. Your position changed from row 1, column 1 to row 1, column 2."
    assert lake.reference_notes("", shown, 0.0, "Failed.") == "- Direction 2 moves right."
    grid = envs.make("grid-navigation")
    feedback = "Costs seen so far (? = not seen yet):\n       1  2\nrow 1  7  ?\nrow 2  ? 42\nFailed."
    notes = grid.reference_notes("", "", 0.0, feedback)
    from lifecycle_agent.envs.grid_navigation import read_costs

    assert read_costs(notes) == {(0, 0): 7, (1, 1): 42}
    control = envs.make("optimal-control")
    table = "\n".join(f"{t:>3}  {0.0:>10.3f}  {v:>10.3f}  {u:>10.3f}" for t, v, u in [(0, 1.0, 1.0), (1, 0.5, -1.0), (2, -0.85, 0.0)])
    notes = control.reference_notes("", "", 0.5, table)
    # v1 = a*1 + b*1 = 0.5 and v2 = a*0.5 - b = -0.85: a = -0.233, b = 0.733 (whatever the pack)
    assert "v' = -0.2333*v + 0.7333*u" in notes


def test_the_game_notes_keep_older_knowledge_when_a_task_shows_nothing():
    lake = envs.make("frozen-lake-obscure")
    assert lake.reference_notes("- Direction 1 moves up.", "Environment: no move", 0.0, "Invalid format.") == \
        "- Direction 1 moves up."
    control = envs.make("optimal-control")
    old = "- Dynamics fitted to observed steps: v' = 0.9000*v + -0.5000*u."
    assert control.reference_notes(old, "", 0.0, "Attempt 1: I could not use your controller.") == old
