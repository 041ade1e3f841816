"""The game environments against the reference implementation: no leaked hidden fact, its rules and parameters.

``frozen-lake-obscure``, ``grid-navigation`` and ``optimal-control``: random policies play many packs
and every observation and feedback is checked for a hidden fact the agent did not observe through its
own actions. The ``easy`` presets give hints on purpose (a curriculum): the same checks must catch them,
which shows that the checks can fail.
"""

from __future__ import annotations

import re

import pytest
from helpers.env_texts import play_packs

from lifecycle_agent import envs
from lifecycle_agent.envs.frozen_lake import CODES, DIRECTIONS, parse_strict
from lifecycle_agent.envs.grid_navigation import chebyshev, parse_strict_move, path_cells, read_costs
from lifecycle_agent.errors import EnvironmentSpecError

PACKS = range(40)
SIZE = 6


# --------------------------------------------------------------------------- random policies
def random_code(task, observation, rng):
    if rng.random() < 0.05:
        return rng.choice(["I am not sure.", "<answer>Direction 7</answer>", "Action: 2"])
    return f"Thinking.\n<answer>Direction {rng.choice(CODES)}</answer>"


def random_move(task, observation, rng):
    if rng.random() < 0.05:
        return rng.choice(["Move: down", "<answer>0,0</answer>", "no idea"])
    r, c = task.position
    cells = [(r, j) for j in range(task.size) if j != c] + [(i, c) for i in range(task.size) if i != r]
    end = rng.choice(cells)
    return f"<answer>{end[0] + 1},{end[1] + 1}</answer>"


def random_controller(task, observation, rng):
    if rng.random() < 0.05:
        return rng.choice(["u = 1", "```<answer><action_expression>1</action_expression></answer>```", "push"])
    k1, k2 = round(rng.uniform(-1, 1), 2), round(rng.uniform(-1, 1), 2)
    return f"<answer><action_expression>clip({k1}*(x_target - x) + {k2}*v, -1, 1)</action_expression></answer>"


# --------------------------------------------------------------------------- frozen-lake-obscure
_DIRECTION_WORD = re.compile(r"\b(?:up|down|left|right)\b", re.IGNORECASE)
_CODE_NEXT_TO_DIRECTION = re.compile(
    r"\b[1-4]\b\W{0,3}(?:=|:|->|moves?|moved|is|means)?\W{0,3}(?:you\s+)?\b(?:up|down|left|right)\b", re.IGNORECASE
)


def frozen_leaks(text):
    return _CODE_NEXT_TO_DIRECTION.findall(text) or _DIRECTION_WORD.findall(text)


@pytest.mark.parametrize("preset", ["train", "hard"])
def test_frozen_lake_never_names_a_direction_next_to_a_code(preset):
    env = envs.make("frozen-lake-obscure", preset=preset)
    shown = 0
    for pack in play_packs(env, PACKS, SIZE, random_code):
        for played in pack:
            for text in played.texts():
                assert not frozen_leaks(text), (played.task.id, text)
                shown += 1
    assert shown > 500


def test_frozen_lake_easy_hints_are_caught_by_the_same_check():
    env = envs.make("frozen-lake-obscure", preset="easy")
    texts = [t for pack in play_packs(env, range(5), SIZE, random_code) for played in pack for t in played.texts()]
    assert any(frozen_leaks(t) for t in texts)
    assert "Curriculum" in env.instructions()


def test_frozen_lake_shows_the_position_change_of_every_move():
    env = envs.make("frozen-lake-obscure")
    pack = env.pack(4, 1)
    task = pack.tasks[0]
    task.start()
    for code in CODES:
        before = task.position
        result = task.step(f"<answer>Direction {code}</answer>")
        text = result.observation or result.feedback
        dr, dc = DIRECTIONS[pack.hidden["mapping"][code]]
        after = (before[0] + dr, before[1] + dc)
        inside = 0 <= after[0] < task.size and 0 <= after[1] < task.size
        if inside:
            assert f"from row {before[0] + 1}, column {before[1] + 1}" in text and f"row {after[0] + 1}, column {after[1] + 1}" in text
        else:
            assert "did not change" in text
        if result.done:
            break


def test_frozen_lake_train_preset_has_the_reference_parameters():
    env = envs.make("frozen-lake-obscure")
    tasks = [t for s in range(200) for t in env.pack(s, 2).tasks]
    assert {t.size for t in tasks} == {4, 5}
    assert all(0.3 <= t.hole_share <= 0.4 for t in tasks)  # frozen-tile probability 0.6-0.7
    assert all(2 <= t.distance <= 6 for t in tasks) and {t.max_turns for t in tasks} == {8}
    assert env.options["answer_format"] == "strict"


def test_frozen_lake_strict_parser_follows_the_reference():
    assert parse_strict("reasoning <answer>Direction 3</answer>") == "3"
    assert parse_strict("<answer>direction 4 please</answer>") == "4"  # like the reference's re.match
    assert parse_strict("<answer>Direction 9</answer>") == "9"  # read, then refused as not a code
    assert parse_strict("Direction 3") is None and parse_strict("<answer>3</answer>") is None


# --------------------------------------------------------------------------- grid-navigation
def own_reveals(task, played_turns, seen, radius):
    """Replay the agent's own replies: yield the cells revealed before each observation, then after the last."""
    position = task.start_cell
    for observation, reply in played_turns:
        yield observation, set(seen)
        end = parse_strict_move(reply)
        if end is None or not (0 <= end[0] < task.size and 0 <= end[1] < task.size) or end == position \
                or (end[0] != position[0] and end[1] != position[1]):
            break  # strict: an invalid move ends the task
        for cell in path_cells(position, end):
            seen.update(chebyshev(cell, radius, task.size))
        position = end


@pytest.mark.parametrize("preset", ["train", "hard"])
def test_grid_navigation_shows_no_cost_the_agent_did_not_reveal(preset):
    env = envs.make("grid-navigation", preset=preset)
    radius, checked = env.options["reveal_radius"], 0
    for pack in play_packs(env, PACKS, SIZE, random_move):
        seen: set = set()  # cells revealed by this agent's moves so far in the pack (revealed cells persist)
        for played in pack:
            costs = played.task.costs
            for observation, allowed in own_reveals(played.task, played.turns, seen, radius):
                shown = read_costs(observation)
                assert set(shown) <= allowed, (played.task.id, set(shown) - allowed)
                assert all(costs[r][c] == v for (r, c), v in shown.items())
                checked += len(shown)
            shown = read_costs(played.feedback)
            assert set(shown) <= seen, (played.task.id, set(shown) - seen)
            assert "cheapest cells of the map" not in played.feedback
    assert checked > 1000


def test_grid_navigation_without_reveal_across_pack_starts_each_task_blind():
    env = envs.make("grid-navigation", reveal_across_pack=False)
    for pack in play_packs(env, range(10), 3, random_move):
        for played in pack:
            assert read_costs(played.turns[0][0]) == {}


def test_grid_navigation_easy_hints_name_costs_never_revealed():
    env = envs.make("grid-navigation", preset="easy")
    assert any("cheapest cells of the map" in p.feedback for pack in play_packs(env, range(3), 2, random_move) for p in pack)


def test_grid_navigation_train_preset_has_the_reference_parameters():
    env = envs.make("grid-navigation")
    packs = [env.pack(s, 3) for s in range(120)]
    assert {len(p.hidden["costs"]) for p in packs} == set(range(8, 13))
    assert {t.max_turns for p in packs for t in p.tasks} == {4, 5, 6}
    assert all(0 <= v <= 99 for p in packs for row in p.hidden["costs"] for v in row)
    assert max(v for p in packs for row in p.hidden["costs"] for v in row) == 99  # hills top out at 99
    assert env.options["reveal_radius"] == 2 and env.options["reveal_across_pack"] is True


def test_grid_navigation_reveals_the_square_of_radius_two_around_every_entered_cell():
    task = envs.make("grid-navigation", reveal_across_pack=False).pack(5, 1).tasks[0]
    task.start()
    r, c = task.start_cell
    end = (r, (c + 1) % task.size) if (c + 1) < task.size else (r, c - 1)
    observation = task.step(f"<answer>{end[0] + 1},{end[1] + 1}</answer>").observation or ""
    expected = {cell for entered in path_cells((r, c), end) for cell in chebyshev(entered, 2, task.size)}
    assert set(read_costs(observation)) == expected


# --------------------------------------------------------------------------- optimal-control
_PARAMETER = re.compile(r"(?<![\w.])[ab]\s*(?:=|≈|:|is)\s*-?\d", re.IGNORECASE)


@pytest.mark.parametrize("preset", ["train", "hard"])
def test_optimal_control_never_states_a_or_b(preset):
    env = envs.make("optimal-control", preset=preset)
    shown = 0
    for pack in play_packs(env, PACKS, SIZE, random_controller):
        a, b = pack[0].task.a, pack[0].task.b
        for played in pack:
            for text in played.texts():
                assert not _PARAMETER.search(text), text
                for value in (a, b, -b):
                    assert f"{value:.4f}" not in text and f"{value:.5f}" not in text
                assert "Hint" not in text
                shown += 1
    assert shown > 400


def test_optimal_control_easy_hint_is_the_sign_of_b():
    env = envs.make("optimal-control", preset="easy")
    played = play_packs(env, range(2), 2, random_controller)
    assert any("Hint: a push u > 0" in p.feedback for pack in played for p in pack)


def test_optimal_control_train_preset_has_the_reference_parameters():
    env = envs.make("optimal-control")
    packs = [env.pack(s, 2) for s in range(300)]
    a = [p.hidden["a"] for p in packs]
    b = [p.hidden["b"] for p in packs]
    assert 0.55 <= min(a) and max(a) <= 1.2 and max(a) > 1.0
    assert all(0.35 <= abs(v) <= 1.5 for v in b) and min(b) < 0 < max(b)
    tasks = [t for p in packs for t in p.tasks]
    assert all(-2 <= t.x0 <= 2 and -1.5 <= t.v0 <= 1.5 and -8 <= t.goal <= 8 for t in tasks)
    assert {t.horizon for t in tasks} == {12} and {t.max_turns for t in tasks} == {1}
    assert {t.v_goal for t in tasks} == {0.0}  # the reference's data generator sets v_target = 0


def test_optimal_control_target_velocity_is_given_per_task_and_counts():
    env = envs.make("optimal-control", target_v=[-0.5, 0.5])
    task = env.pack(3, 1).tasks[0]
    assert task.v_goal != 0.0 and f"v_target = {task.v_goal:.3f}" in task.start()
    assert envs.play_oracle(task).reward == pytest.approx(task.optimum())
    stop = "<answer><action_expression>clip(0.5*(x_target - x) + 0.5*(v_target - v), -1, 1)</action_expression></answer>"
    still = "<answer><action_expression>clip(0.5*(x_target - x) - 0.5*v, -1, 1)</action_expression></answer>"
    rewards = []
    for reply in (stop, still):
        task.start()
        rewards.append(task.step(reply).reward)
    assert rewards[0] != rewards[1]


# --------------------------------------------------------------------------- options, answer format, report
@pytest.mark.parametrize("name", ["frozen-lake-obscure", "grid-navigation", "optimal-control"])
@pytest.mark.parametrize("value", ["loose", "", None, 1])
def test_a_bad_answer_format_is_a_clear_error(name, value):
    with pytest.raises(EnvironmentSpecError, match=f"{name}: option answer_format must be one of strict, lenient"):
        envs.make(name, answer_format=value)


@pytest.mark.parametrize("name, options, key", [
    ("frozen-lake-obscure", {"size": [5, 4]}, "size"),
    ("frozen-lake-obscure", {"size": [4, 5, 6]}, "size"),
    ("frozen-lake-obscure", {"size": [1, 5]}, "size"),
    ("frozen-lake-obscure", {"holes": [0.3, 0.9]}, "holes"),
    ("frozen-lake-obscure", {"holes": "0.3"}, "holes"),
    ("frozen-lake-obscure", {"hints": "yes"}, "hints"),
    ("grid-navigation", {"size": 17}, "size"),
    ("grid-navigation", {"size": [8.5, 12]}, "size"),
    ("grid-navigation", {"rounds": [0, 4]}, "rounds"),
    ("grid-navigation", {"reveal_radius": -1}, "reveal_radius"),
    ("grid-navigation", {"hills": 1}, "hills"),
    ("optimal-control", {"a_low": 1.3, "a_high": 1.2}, "a_high"),
    ("optimal-control", {"target_v": [1, -1]}, "target_v"),
    ("optimal-control", {"start_x": "far"}, "start_x"),
])
def test_bad_option_values_are_clear_errors(name, options, key):
    with pytest.raises(EnvironmentSpecError, match=f"{name}: option {key} must be"):
        envs.make(name, **options)


@pytest.mark.parametrize("name", ["frozen-lake-obscure", "grid-navigation", "optimal-control"])
def test_the_lenient_format_still_reads_the_strict_answer(name):
    strict, lenient = envs.make(name), envs.make(name, answer_format="lenient")
    for seed in range(5):
        a, b = strict.pack(seed, 1).tasks[0], lenient.pack(seed, 1).tasks[0]
        assert envs.play_oracle(a).reward == pytest.approx(envs.play_oracle(b).reward)


@pytest.mark.parametrize("name", ["frozen-lake-obscure", "grid-navigation", "optimal-control"])
def test_packs_are_deterministic_from_the_seed_and_do_not_share_state(name):
    env = envs.make(name)
    first = [p.texts() for p in play_packs(env, [3], 4, {"frozen-lake-obscure": random_code,
             "grid-navigation": random_move, "optimal-control": random_controller}[name])[0]]
    again = [p.texts() for p in play_packs(env, [3], 4, {"frozen-lake-obscure": random_code,
             "grid-navigation": random_move, "optimal-control": random_controller}[name])[0]]
    assert first == again


@pytest.mark.parametrize("name", ["frozen-lake-obscure", "grid-navigation", "optimal-control"])
def test_easy_presets_say_they_give_hints_in_envs_list(name):
    from lifecycle_agent.cli import app
    from typer.testing import CliRunner

    row = next(r for r in envs.describe() if r["name"] == name)
    assert row["preset_options"]["easy"]["hints"] is True
    assert row["preset_options"]["train"]["hints"] is False and row["preset_options"]["hard"]["hints"] is False
    assert row["easy_hints"]
    result = CliRunner().invoke(app, ["envs", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "hints=True" in result.output
    assert result.output.count("easy preset hints:") >= 5  # every environment whose easy preset hints


def test_eval_report_records_the_answer_format(tmp_path):
    import json

    from lifecycle_agent.eval import evaluate
    from lifecycle_agent.models.scripted import ScriptedModel

    evaluate("frozen-lake-obscure,grid-navigation", ScriptedModel(), packs=1, pack_size=2, modes=["none"],
             out=tmp_path / "r", plot=False, env_options={"grid-navigation": {"answer_format": "lenient"}})
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    environments = report["environments"]
    assert environments["frozen-lake-obscure"]["options"]["answer_format"] == "strict"
    assert environments["grid-navigation"]["options"]["answer_format"] == "lenient"
