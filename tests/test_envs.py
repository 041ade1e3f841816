"""Environments: the registry, packs, the built-in environments, their oracles and their action parsing."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from lifecycle_agent import envs
from lifecycle_agent.envs import Environment, EnvTask, Pack, play, play_oracle
from lifecycle_agent.errors import EnvironmentSpecError
from lifecycle_agent.tasks import StepResult

BUILT_IN = ["alchemy", "fact-recall", "frozen-lake-obscure", "grid-navigation", "optimal-control", "terminal"]
PRESETS = ["train", "easy", "hard"]
ORACLE_SEEDS = 200
ORACLE_PACK_SIZE = 3
TESTS_DIR = str(Path(__file__).parent)


# --------------------------------------------------------------------------- a small third-party environment


class CountTask(EnvTask):
    max_turns = 1

    def start(self) -> str:
        return f"Say the number {self.pack.hidden['number'] + self.index}."

    def step(self, action: str) -> StepResult:
        right = str(self.pack.hidden["number"] + self.index)
        return StepResult("", 1.0 if right in action else 0.0, True, f"The number was {right}.")

    def oracle_action(self) -> str:
        return str(self.pack.hidden["number"] + self.index)


class CountEnv(Environment):
    """A third-party environment used by the tests (loaded as test_envs:CountEnv)."""

    name = "count"
    description = "Say a number."
    defaults = {"offset": 0}

    def hidden_facts(self, rng):
        return {"number": rng.randint(10, 99) + self.options["offset"]}

    def make_task(self, pack, index, task_id):
        return CountTask(pack, index, task_id)


@pytest.fixture
def tests_on_path(monkeypatch):
    """Makes this file importable as ``test_envs`` (for ``package.module:factory`` specs)."""
    monkeypatch.syspath_prepend(TESTS_DIR)


@pytest.fixture
def registered():
    """Registers CountEnv as ``count`` for one test."""
    envs.register("count", CountEnv)
    yield
    envs.unregister("count")


# --------------------------------------------------------------------------- registry


def test_every_builtin_is_listed_with_train_easy_hard_presets():
    rows = {row["name"]: row for row in envs.describe()}
    for name in BUILT_IN:
        assert rows[name]["presets"] == PRESETS
        assert rows[name]["description"]
        assert set(rows[name]["preset_options"]["hard"]) == set(rows[name]["options"])


def test_unknown_environment_error_lists_the_known_names():
    with pytest.raises(EnvironmentSpecError) as info:
        envs.make("frozen-lake")
    for name in BUILT_IN:
        assert name in str(info.value)


def test_unknown_preset_error_lists_the_presets():
    with pytest.raises(EnvironmentSpecError, match="no preset 'medium'; presets: train, easy, hard"):
        envs.make("alchemy", preset="medium")


def test_unknown_option_error_lists_the_options():
    with pytest.raises(EnvironmentSpecError, match="unknown option.*colour.*options: .*holes"):
        envs.make("frozen-lake-obscure", colour="blue")


@pytest.mark.parametrize(
    "name, options, named",
    [
        ("frozen-lake-obscure", {"size": 1}, "size"),
        ("frozen-lake-obscure", {"max_turns": 3}, "max_turns"),
        ("frozen-lake-obscure", {"max_moves": 7}, "max_moves"),
        ("grid-navigation", {"reveal_across_pack": "yes"}, "reveal_across_pack"),
        ("optimal-control", {"b_low": 0.9, "b_high": 0.5}, "b_high"),
        ("alchemy", {"tier1": 99}, "tier1"),
        ("terminal", {"quirks": 9}, "quirks"),
        ("terminal", {"hints": "yes"}, "option hints must be true or false"),
        ("alchemy", {"hints": 1}, "option hints must be true or false"),
        ("fact-recall", {"items": 16, "digits": 1}, "digits"),
    ],
)
def test_out_of_range_option_is_refused_with_its_name(name, options, named):
    with pytest.raises(EnvironmentSpecError, match=named):
        envs.make(name, **options)


def test_register_adds_an_environment_by_name(registered):
    pack = envs.make("count").pack(seed=3, size=2)
    assert "count" in envs.names()
    assert [play_oracle(t).reward for t in pack.tasks] == [1.0, 1.0]


def test_register_refuses_to_replace_a_builtin():
    with pytest.raises(EnvironmentSpecError, match="already registered"):
        envs.register("alchemy", CountEnv)


def test_register_refuses_a_name_with_a_colon():
    with pytest.raises(EnvironmentSpecError, match="without ':'"):
        envs.register("a:b", CountEnv)


def test_third_party_factory_loads_from_module_colon_name(tests_on_path):
    env = envs.make("test_envs:CountEnv", preset="train", offset=1000)
    assert env.pack(1, 1).hidden["number"] >= 1000


def test_third_party_factory_with_missing_attribute_says_which(tests_on_path):
    with pytest.raises(EnvironmentSpecError, match="has no attribute 'Nope'"):
        envs.make("test_envs:Nope")


def test_third_party_factory_returning_a_non_environment_is_refused(tests_on_path):
    with pytest.raises(EnvironmentSpecError, match="not a lifecycle_agent.envs.Environment"):
        envs.make("test_envs:not_an_environment")


def not_an_environment(preset="train"):
    return object()


def no_preset_factory():
    return CountEnv()


def crashing_factory(preset="train", **options):
    raise RuntimeError("the simulator is not installed")


@pytest.mark.parametrize("spec, says", [
    ("test_envs:no_preset_factory", r"'test_envs:no_preset_factory' raised TypeError: .*called as factory\(preset='train'\)"),
    ("test_envs:crashing_factory", r"raised RuntimeError: the simulator is not installed"),
])
def test_a_third_party_factory_that_raises_is_a_clear_error(tests_on_path, spec, says):
    with pytest.raises(EnvironmentSpecError, match=says):
        envs.make(spec)


def test_a_third_party_module_that_fails_to_import_is_a_clear_error(tests_on_path, tmp_path, monkeypatch):
    (tmp_path / "exploding_env.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvironmentSpecError, match="importing module 'exploding_env' raised RuntimeError: needs a licence key"):
        envs.make("exploding_env:factory")


def test_run_command_accepts_a_third_party_environment(tests_on_path, tmp_path, capsys):
    from lifecycle_agent.cli import main
    from lifecycle_agent.store import Store

    db = str(tmp_path / "run.db")
    with pytest.raises(SystemExit) as info:
        main(["run", "--env", "test_envs:CountEnv", "--model", "scripted", "--db", db, "-n", "3", "--quiet"])
    assert info.value.code == 0
    with Store(db) as store:
        solves = store.episodes("default", kind="solve")
    assert [row.task_id for row in solves] == [f"count/train/s0/cod3/p{j}" for j in range(3)]


# --------------------------------------------------------------------------- packs


@pytest.mark.parametrize("name", BUILT_IN)
def test_pack_task_ids_are_pack_id_slash_position(name):
    pack = envs.make(name).pack(seed=5, size=3)
    assert [t.id for t in pack.tasks] == [f"{pack.id}/p{j}" for j in range(3)]


@pytest.mark.parametrize("name", BUILT_IN)
def test_same_seed_gives_the_same_first_observations(name):
    first = [t.start() for t in envs.make(name).pack(seed=9, size=3).tasks]
    again = [t.start() for t in envs.make(name).pack(seed=9, size=3).tasks]
    assert first == again


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_task_is_the_same_whatever_the_pack_size(name):
    short = envs.make(name).pack(seed=4, size=2).tasks[1].start()
    long = envs.make(name).pack(seed=4, size=6).tasks[1].start()
    assert short == long


@pytest.mark.parametrize("name", BUILT_IN)
def test_ralph_packing_repeats_the_first_task(name):
    pack = envs.make(name).pack(seed=2, size=3, packing="ralph")
    observations = [t.start() for t in pack.tasks]
    assert observations == [observations[0]] * 3
    assert observations[0] == envs.make(name).pack(seed=2, size=3).tasks[0].start()


@pytest.mark.parametrize("name", BUILT_IN)
def test_ralph_repeats_carry_nothing_over_but_the_context(name):
    # a repeat played to the end leaves no pack state behind: the next repeat starts as the first did
    pack = envs.make(name).pack(seed=7, size=3, packing="ralph")
    first = pack.tasks[0].start()
    play_oracle(pack.tasks[0])
    play_oracle(pack.tasks[1])
    assert pack.tasks[2].start() == first
    assert pack.state == {}
    assert not any(getattr(task, "replay_on_resume", False) for task in pack.tasks)


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n != "fact-recall"])
def test_packs_of_different_seeds_hide_different_facts(name):
    hidden = [envs.make(name).pack(seed=s, size=1).hidden for s in range(12)]
    assert len({repr(h) for h in hidden}) > 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_pack_size_below_one_or_not_an_integer_is_refused(bad):
    with pytest.raises(EnvironmentSpecError, match="pack size must be an integer >= 1"):
        envs.make("fact-recall").pack(seed=1, size=bad)


@pytest.mark.parametrize("bad", ["loop", "RALPH", "", None, 3])
def test_unknown_packing_is_refused_with_the_choices(bad):
    with pytest.raises(EnvironmentSpecError, match="packings: cod, ralph_sample, ralph_full, ralph"):
        envs.make("fact-recall").pack(seed=1, size=2, packing=bad)


def test_ralph_is_ralph_sample():
    env = envs.make("alchemy")
    alias, named = env.pack(seed=3, size=3, packing="ralph"), env.pack(seed=3, size=3, packing="ralph_sample")
    assert alias.packing == named.packing == "ralph_sample" and alias.id == named.id
    assert [t.start() for t in alias.tasks] == [t.start() for t in named.tasks]


@pytest.mark.parametrize("name", BUILT_IN)
def test_ralph_full_repeats_every_task_of_the_cod_pack_in_a_pack_of_its_own(name):
    env = envs.make(name)
    cod = [env.pack(seed=5, size=3).tasks[j].start() for j in range(3)]  # each from a fresh pack: no state
    full = env.packs(seed=5, size=3, packing="ralph_full")
    assert [p.instance for p in full] == [0, 1, 2] and len({p.id for p in full}) == 3
    for j, pack in enumerate(full):
        assert [t.start() for t in pack.tasks] == [cod[j]] * 3
        assert pack.hidden == env.pack(seed=5, size=3).hidden
    assert [len(env.packs(seed=5, size=3, packing=p)) for p in ("cod", "ralph", "ralph_sample")] == [1, 1, 1]


def test_ralph_full_packs_carry_nothing_over_but_the_context():
    pack = envs.make("grid-navigation").pack(seed=7, size=3, packing="ralph_full", instance=2)
    first = pack.tasks[0].start()
    play_oracle(pack.tasks[0])
    assert pack.tasks[1].start() == first and pack.state == {}


@pytest.mark.parametrize(
    "packing, instance, message",
    [
        ("cod", 1, "cod packing plays every instance"),
        ("ralph_sample", 2, "ralph_sample packing always repeats instance 0"),
        ("ralph", 1, "ralph_sample packing always repeats instance 0"),
        ("ralph_full", 3, "ralph_full instance must be an integer from 0 to 2"),
        ("ralph_full", -1, "ralph_full instance must be an integer from 0 to 2"),
        ("ralph_full", "1", "ralph_full instance must be an integer"),
    ],
)
def test_a_bad_instance_is_refused(packing, instance, message):
    with pytest.raises(EnvironmentSpecError, match=message):
        envs.make("fact-recall").pack(seed=1, size=3, packing=packing, instance=instance)


def test_two_packs_with_the_same_seed_share_no_state():
    env = envs.make("grid-navigation")
    a, b = env.pack(seed=7, size=2), env.pack(seed=7, size=2)
    fresh_view = env.pack(seed=7, size=2).tasks[1].start()
    play_oracle(a.tasks[0])
    assert a.state["seen"]
    assert b.state == {}
    assert b.tasks[1].start() == fresh_view
    assert a.tasks[1].start() != fresh_view


def test_grid_navigation_keeps_seen_cells_revealed_across_the_pack():
    pack = envs.make("grid-navigation").pack(seed=7, size=2)
    before = pack.tasks[1].start().count("?")
    pack = envs.make("grid-navigation").pack(seed=7, size=2)
    play_oracle(pack.tasks[0])
    assert pack.tasks[1].start().count("?") < before


def test_grid_navigation_without_reveal_across_pack_forgets_seen_cells():
    env = envs.make("grid-navigation", reveal_across_pack=False)
    before = env.pack(seed=7, size=2).tasks[1].start()
    pack = env.pack(seed=7, size=2)
    play_oracle(pack.tasks[0])
    assert pack.tasks[1].start() == before


def test_restarting_a_task_resets_it():
    task = envs.make("alchemy").pack(seed=3, size=1).tasks[0]
    first = play_oracle(task)
    again = play_oracle(task)
    assert (first.reward, first.turns) == (again.reward, again.turns)


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", BUILT_IN)
def test_oracle_reaches_the_optimum_on_every_task_over_200_seeds(name, preset):
    env = envs.make(name, preset=preset)
    for seed in range(ORACLE_SEEDS):
        for task in env.pack(seed=seed, size=ORACLE_PACK_SIZE).tasks:
            episode = play_oracle(task)
            optimum = task.optimum()
            assert 0.0 < optimum <= 1.0, (task.id, optimum)
            assert episode.reward == pytest.approx(optimum, abs=1e-5), (task.id, episode)


@pytest.mark.parametrize("name", ["fact-recall", "alchemy"])
def test_oracle_scores_exactly_one_where_the_optimum_is_one(name):
    for seed in range(50):
        for task in envs.make(name).pack(seed=seed, size=3).tasks:
            assert play_oracle(task).reward == 1.0


def test_frozen_lake_oracle_reaches_the_goal_by_a_shortest_path_for_reward_one():
    task = envs.make("frozen-lake-obscure").pack(seed=11, size=1).tasks[0]
    episode = play_oracle(task)
    assert task.optimum() == episode.reward == 1.0  # the reference's reward: 1 at the goal, whatever the turns
    assert episode.turns == task.distance


def test_grid_navigation_optimum_beats_every_random_route():
    from lifecycle_agent.envs.grid_navigation import path_cells

    rng = random.Random(0)
    for seed in range(20):
        task = envs.make("grid-navigation").pack(seed=seed, size=1).tasks[0]
        best = task.optimum()
        for _ in range(300):
            position, spent, entered = task.start_cell, 0, 0
            for _ in range(task.max_turns):  # exactly max_turns moves; only where they end counts
                r, c = position
                choices = [(r, j) for j in range(task.size) if j != c] + [(i, c) for i in range(task.size) if i != r]
                position_next = rng.choice(choices)
                cells = path_cells(position, position_next)
                spent += sum(task.costs[i][j] for i, j in cells)
                entered += len(cells)
                position = position_next
            if position == task.target:
                assert 1 - spent / entered / 100 <= best + 1e-12


def test_optimal_control_optimum_satisfies_the_optimality_conditions():
    from lifecycle_agent.envs.optimal_control import EFFORT, VELOCITY_WEIGHT, simulate

    for preset in PRESETS:
        for seed in range(60):
            task = envs.make("optimal-control", preset=preset).pack(seed=seed, size=1).tasks[0]
            u = task.optimal_controls()

            def loss(controls):
                return simulate(task.a, task.b, task.x0, task.v0, task.goal, task.horizon, lambda x, v, t: controls[t],
                                task.v_goal)["loss"]

            base = loss(u)
            for i in range(len(u)):  # no feasible coordinate move lowers the convex loss: the KKT conditions
                for step in (1e-4, -1e-4):
                    moved = list(u)
                    moved[i] = min(1.0, max(-1.0, moved[i] + step))
                    assert loss(moved) >= base - 1e-9, (preset, seed, i, step)
            assert all(-1.0 <= value <= 1.0 for value in u)
            assert EFFORT == 0.03 and VELOCITY_WEIGHT == 2.0


# --------------------------------------------------------------------------- rewards and feedback


@pytest.mark.parametrize("answer_format, says", [("strict", "Expected <answer>Direction X</answer>"), ("lenient", "held no action code")])
def test_frozen_lake_format_error_ends_the_task_with_reward_zero(answer_format, says):
    task = envs.make("frozen-lake-obscure", answer_format=answer_format).pack(seed=1, size=1).tasks[0]
    task.start()
    result = task.step("I am not sure what to do.")
    assert (result.reward, result.done) == (0.0, True)
    assert says in result.feedback


@pytest.mark.parametrize("reply", ["Action: 3", "3", "<answer>3</answer>", "<answer>Direction 5</answer>", "<answer>Direction</answer>"])
def test_frozen_lake_strict_format_refuses_anything_but_an_answer_direction_block(reply):
    task = envs.make("frozen-lake-obscure").pack(seed=1, size=1).tasks[0]
    task.start()
    result = task.step(reply)
    assert (result.reward, result.done) == (0.0, True) and "Invalid format" in result.feedback


def test_frozen_lake_strict_format_reads_the_last_answer_block():
    task = envs.make("frozen-lake-obscure").pack(seed=1, size=1).tasks[0]
    task.start()
    result = task.step("I think <answer>Direction 9</answer> is wrong, so:\n<answer> direction 2 </answer>")
    assert task.turns == 1 and "Direction 2" in (result.observation or result.feedback)
    assert "Invalid" not in (result.feedback or "")


def test_frozen_lake_hole_gives_reward_zero_and_shows_only_the_position_change():
    from lifecycle_agent.envs.frozen_lake import DIRECTIONS

    env = envs.make("frozen-lake-obscure", holes=0.6)
    for seed in range(200):
        task = env.pack(seed=seed, size=1).tasks[0]
        task.start()
        for code in "1234":
            direction = task.mapping[code]
            dr, dc = DIRECTIONS[direction]
            if (task.position[0] + dr, task.position[1] + dc) in task.holes:
                result = task.step(f"<answer>Direction {code}</answer>")
                assert (result.reward, result.done) == (0.0, True)
                assert "into the hole at" in result.feedback
                assert direction not in result.feedback
                return
    pytest.fail("no map with a hole next to the start in 200 seeds")


def test_frozen_lake_timeout_gives_reward_zero():
    task = envs.make("frozen-lake-obscure").pack(seed=3, size=1).tasks[0]
    bump = next(code for code in "1234" if _off_map(task, code))
    episode = play(task, lambda _: f"<answer>Direction {bump}</answer>")
    assert episode.reward == 0.0
    assert episode.turns == task.max_turns
    assert "ran out" in episode.feedback


def _off_map(task, code) -> bool:
    from lifecycle_agent.envs.frozen_lake import DIRECTIONS

    dr, dc = DIRECTIONS[task.mapping[code]]
    r, c = task.start_cell[0] + dr, task.start_cell[1] + dc
    return not (0 <= r < task.size and 0 <= c < task.size)


def test_grid_navigation_reward_is_one_minus_mean_entered_cost():
    task = next(t for s in range(100) for t in [envs.make("grid-navigation", rounds=2).pack(seed=s, size=1).tasks[0]]
                if t.start_cell[0] != t.target[0] and t.start_cell[1] != t.target[1])
    task.start()
    (r0, c0), (r1, c1) = task.start_cell, task.target
    assert not task.step(f"<answer>{r0 + 1},{c1 + 1}</answer>").done
    result = task.step(f"<answer>{r1 + 1},{c1 + 1}</answer>")
    costs = task.costs
    step = 1 if c1 > c0 else -1
    entered = [costs[r0][c] for c in range(c0 + step, c1 + step, step)]
    step = 1 if r1 > r0 else -1
    entered += [costs[r][c1] for r in range(r0 + step, r1 + step, step)]
    assert result.done
    assert result.reward == pytest.approx(1 - sum(entered) / len(entered) / 100)


def test_grid_navigation_move_off_the_line_is_lost_not_fatal_when_lenient():
    task = envs.make("grid-navigation", answer_format="lenient").pack(seed=8, size=1).tasks[0]
    task.start()
    r, c = task.start_cell
    result = task.step(f"Move: row {(r + 1) % task.size + 1}, column {(c + 1) % task.size + 1}")
    assert not result.done
    assert "not along your row or column" in result.observation


@pytest.mark.parametrize("move", ["off the line", "unreadable", "off the map", "stay"])
def test_grid_navigation_invalid_move_ends_the_task_when_strict(move):
    task = envs.make("grid-navigation").pack(seed=8, size=1).tasks[0]
    task.start()
    r, c = task.start_cell
    reply = {"off the line": f"<answer>{(r + 1) % task.size + 1},{(c + 1) % task.size + 1}</answer>",
             "unreadable": "Move: row 1, column 1", "off the map": f"<answer>{r + 1},{task.size + 3}</answer>",
             "stay": f"<answer>{r + 1},{c + 1}</answer>"}[move]
    result = task.step(reply)
    assert (result.reward, result.done) == (0.0, True) and result.feedback.startswith("Invalid move")


def test_grid_navigation_landing_on_the_target_early_does_not_end_the_task():
    for seed in range(50):
        task = envs.make("grid-navigation").pack(seed=seed, size=1).tasks[0]
        task.start()
        r, c = task.start_cell
        if r != task.target[0] and c != task.target[1]:
            continue
        result = task.step(f"<answer>{task.target[0] + 1},{task.target[1] + 1}</answer>")
        assert not result.done and f"{task.max_turns - 1} moves left" in result.observation
        return
    pytest.fail("no task with the target in line with the start in 50 seeds")


def test_optimal_control_reward_is_one_over_one_plus_loss():
    from lifecycle_agent.envs.optimal_control import simulate

    task = envs.make("optimal-control", answer_format="lenient").pack(seed=2, size=1).tasks[0]
    task.start()
    result = task.step("u = clip(0.4*(goal - x) - v, -1, 1)")
    expected = simulate(
        task.a, task.b, task.x0, task.v0, task.goal, task.horizon,
        lambda x, v, t: min(1, max(-1, 0.4 * (task.goal - x) - v)),
    )
    assert result.reward == pytest.approx(1 / (1 + expected["loss"]))


def test_optimal_control_best_attempt_counts():
    task = envs.make("optimal-control", attempts=2).pack(seed=2, size=1).tasks[0]
    task.start()
    good = task.step(task.oracle_action())
    final = task.step("<answer><action_expression>0</action_expression></answer>")
    assert final.done
    assert final.reward == pytest.approx(good.reward)


def test_optimal_control_unreadable_policy_scores_zero_and_explains_the_language():
    task = envs.make("optimal-control", attempts=1, answer_format="lenient").pack(seed=2, size=1).tasks[0]
    task.start()
    result = task.step("I would push hard towards the goal.")
    assert (result.reward, result.done) == (0.0, True)
    assert "u = <expression>" in result.feedback


@pytest.mark.parametrize("reply, why", [
    ("u = clip(x_target - x, -1, 1)", "no <answer>"),
    ("```\n<answer><action_expression>0</action_expression></answer>\n```", "code fences"),
    ("<answer><action_expression>0</action_expression></answer> and more", "must end the reply"),
    ("<answer>0</answer>", "exactly one <action_expression>"),
    ("<answer><action_expression>os.system(1)</action_expression></answer>", "os"),
])
def test_optimal_control_strict_format_refuses_what_the_reference_refuses(reply, why):
    task = envs.make("optimal-control").pack(seed=2, size=1).tasks[0]
    task.start()
    result = task.step(reply)
    assert (result.reward, result.done) == (0.0, True) and why in result.feedback


def test_optimal_control_strict_format_reads_the_reference_answer_with_escapes():
    task = envs.make("optimal-control").pack(seed=2, size=1).tasks[0]
    task.start()
    reply = "Reasoning.\n<answer>\n  <action_expression>\n    1 if x_target &gt; x else -1\n  </action_expression>\n</answer>\n"
    result = task.step(reply)
    assert result.done and result.reward > 0.0 and "1 if x_target > x else -1" in result.feedback


def test_alchemy_partial_credit_counts_made_ingredients():
    env = envs.make("alchemy", partial_credit=True, min_tier=2)
    task = env.pack(seed=1, size=1).tasks[0]
    task.start()
    first = task.oracle_action()
    task.step(first)
    result = task.timeout_result()
    # half the share of the intermediate ingredients made (the target itself is not one)
    assert result.reward == pytest.approx(0.5 * 1 / (len(task.needed) - 1))


def test_alchemy_without_partial_credit_gives_zero_on_timeout():
    task = envs.make("alchemy", min_tier=2).pack(seed=1, size=1).tasks[0]
    task.start()
    task.step(task.oracle_action())
    assert task.timeout_result().reward == 0.0


@pytest.mark.parametrize("preset", ["train", "hard"])
def test_terminal_wrong_answer_ends_with_zero_and_reveals_nothing(preset):
    pack = envs.make("terminal", preset=preset).pack(seed=1, size=5)
    task = next(t for t in pack.tasks if t.chore == "port")
    task.start()
    result = task.step("answer 1")
    assert (result.reward, result.done) == (0.0, True)
    assert result.feedback == "Wrong answer '1'; reward 0."


def test_terminal_easy_hints_name_the_file_and_the_value():
    pack = envs.make("terminal", preset="easy").pack(seed=1, size=5)
    task = next(t for t in pack.tasks if t.chore == "port")
    task.start()
    result = task.step("answer 1")
    assert task.config in result.feedback and task.port in result.feedback


@pytest.mark.parametrize("hints", [True, False])
def test_terminal_feedback_names_the_quirk_the_agent_ran_into_only_as_a_hint(hints):
    env = envs.make("terminal", quirks=1, hints=hints)
    for seed in range(100):
        pack = env.pack(seed=seed, size=5)
        if pack.hidden["quirks"] != ["cat_denied"]:
            continue
        task = next(t for t in pack.tasks if t.chore == "port")
        task.start()
        observation = task.step(f"cat {task.config}").observation
        assert "Permission denied" in observation
        result = task.step("answer 0")
        assert ("`cat` is not permitted" in result.feedback) == hints
        return
    pytest.fail("no pack with the cat_denied quirk in 100 seeds")


def test_alchemy_feedback_lists_recipes_only_in_the_easy_preset():
    for preset, hinted in (("train", False), ("hard", False), ("easy", True)):
        task = envs.make("alchemy", preset=preset).pack(seed=2, size=1).tasks[0]
        episode = play_oracle(task)
        assert episode.reward == 1.0
        assert ("Recipes found in this task" in episode.feedback) == hinted
        timeout = envs.make("alchemy", preset=preset).pack(seed=2, size=1).tasks[0]
        timeout.start()
        assert ("it is made from" in timeout.timeout_result().feedback) == hinted


@pytest.mark.parametrize("name", BUILT_IN)
def test_feedback_is_a_sentence_not_a_code(name):
    task = envs.make(name).pack(seed=6, size=1).tasks[0]
    feedback = play_oracle(task).feedback
    assert feedback and len(feedback.split()) >= 5 and feedback.rstrip().endswith((".", "!"))


# --------------------------------------------------------------------------- lenient action parsing


@pytest.mark.parametrize(
    "reply, code",
    [
        ("3", "3"),
        ("Action: 3", "3"),
        ("I choose 3", "3"),
        ("**Action:** 2", "2"),
        ("I am at row 1, column 4, so I press 2.", "2"),
        ("Let me think. Code 1 went up before.\nAction: 4", "4"),
        ("Moving with 3.", "3"),
    ],
)
def test_frozen_lake_reads_codes_through_format_noise(reply, code):
    from lifecycle_agent.envs.frozen_lake import parse_code

    assert parse_code(reply) == code


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "go left",
        "Action: 7",
        "row 2, column 3",
        "You are at row 2, column 2; the goal is at row 3, column 3. 8 turns left. Reply with one action code: 1,",
        ". . G .\nYou are at row 4, column 3; the goal is at row 3, column 2. 1 turn left.",
        "Action 3 moved you down.",
    ],
)
def test_frozen_lake_finds_no_code_where_there_is_none(reply):
    from lifecycle_agent.envs.frozen_lake import parse_code

    assert parse_code(reply) is None


@pytest.mark.parametrize(
    "reply, cell",
    [
        ("Move: row 3, column 5", (2, 4)),
        ("(3, 5)", (2, 4)),
        ("I am at row 1, column 1 and go to row 3, column 1.", (2, 0)),
        ("down 2", (2, 0)),
        ("3 1", (2, 0)),
    ],
)
def test_grid_navigation_reads_moves_through_format_noise(reply, cell):
    from lifecycle_agent.envs.grid_navigation import parse_move

    assert parse_move(reply, (0, 0)) == cell


def test_grid_navigation_does_not_read_an_echoed_observation_as_a_move():
    from lifecycle_agent.envs.grid_navigation import parse_move

    echo = "You are at row 2, column 3; the target is row 5, column 1. 4 moves left."
    assert parse_move(echo, (1, 2)) is None


@pytest.mark.parametrize(
    "reply, pair",
    [
        ("combine ash + dew", ("ash", "dew")),
        ("Action: Ash and Dew", ("ash", "dew")),
        ("I have ash, dew and brine.\nLet me mix brine with ash.", ("brine", "ash")),
        ("ash dew", ("ash", "dew")),
    ],
)
def test_alchemy_reads_pairs_through_format_noise(reply, pair):
    from lifecycle_agent.envs.alchemy import parse_pair

    assert parse_pair(reply, ["ash", "dew", "brine"])[0] == pair


@pytest.mark.parametrize("echo", ["You have: ash, dew, brine. Goal: make moss.", "ash + dew: nothing happened."])
def test_alchemy_does_not_read_an_echoed_observation_as_a_pair(echo):
    from lifecycle_agent.envs.alchemy import parse_pair

    assert parse_pair(echo, ["ash", "dew", "brine", "moss"])[0] is None


@pytest.mark.parametrize(
    "reply, kind, text",
    [
        ("ls /srv", "command", "ls /srv"),
        ("```bash\n$ cat /etc/hosts\n```", "command", "cat /etc/hosts"),
        ("Let me look.\n$ find / -name '*.ini'", "command", "find / -name '*.ini'"),
        ("Command: head -n 5 x.log", "command", "head -n 5 x.log"),
        ("The port is in the file.\nAnswer: 8080", "answer", "8080"),
        ("answer deploy", "answer", "deploy"),
        ("I'll run grep -c ERROR /var/log/app.log", "command", "grep -c ERROR /var/log/app.log"),
    ],
)
def test_terminal_reads_commands_through_format_noise(reply, kind, text):
    from lifecycle_agent.envs.terminal import parse_command

    assert parse_command(reply) == (kind, text)


@pytest.mark.parametrize(
    "reply, text",
    [
        ("u = clip(0.5*(goal - x) - v, -1, 1)", "clip(0.5*(goal - x) - v, -1, 1)"),
        ("I think u = -0.3*v + 0.2*(goal - x).", "-0.3*v + 0.2*(goal - x)"),
        ("```\nu(x, v, t) = 1 if t < 3 else -1\n```", "1 if t < 3 else -1"),
        ("Policy: `0.5*x`", "0.5*x"),
    ],
)
def test_optimal_control_reads_policies_through_format_noise(reply, text):
    from lifecycle_agent.envs.optimal_control import parse_policy

    expression, why = parse_policy(reply)
    assert why is None and expression.text == text


# --------------------------------------------------------------------------- model text is never executed


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "x.__class__",
        "(lambda: 1)()",
        "[c for c in 'ab']",
        "open('/etc/passwd')",
        "eval('1')",
        "'a' * 3",
        "9 ** 9 ** 9",
        "1" + "0" * 400,
        "x[0]",
    ],
)
def test_expression_parser_refuses_anything_but_arithmetic(text):
    from lifecycle_agent.envs.expression import Expression, ExpressionError

    with pytest.raises(ExpressionError):
        Expression(text, ["x", "v"])(x=1.0, v=0.0)


def test_expression_parser_computes_allowed_arithmetic():
    from lifecycle_agent.envs.expression import Expression

    expression = Expression("clip(2^2 * x - abs(v), -1, 1) if t < 2 else [0.5, -0.5][t - 2]", ["x", "v", "t"])
    assert [expression(x=0.1, v=-0.1, t=t) for t in range(4)] == [pytest.approx(0.3), pytest.approx(0.3), 0.5, -0.5]


def test_expression_parser_never_calls_eval(monkeypatch):
    import builtins

    from lifecycle_agent.envs.expression import Expression

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert Expression("1 + 2 * x", ["x"])(x=3) == 7.0


def test_terminal_is_a_simulation_that_touches_no_real_file(tmp_path):
    marker = tmp_path / "made-by-model"
    task = envs.make("terminal").pack(seed=1, size=1).tasks[0]
    task.start()
    for command in (f"touch {marker}", f"echo hi > {marker}", f"$(touch {marker})", f"rm -rf {tmp_path}", "rm -rf /"):
        task.step(command)
    assert tmp_path.is_dir() and not marker.exists()
    assert os.path.isdir("/etc")


def test_terminal_shell_supports_pipes_and_redirection():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/a/log": "x ERROR\ny\nz ERROR\n"}, set(), ())
    assert shell.run("grep ERROR /a/log | wc -l").strip() == "2"
    shell.run("echo hello > /a/note")
    assert shell.files["/a/note"] == "hello\n"
    assert shell.run("cd /a && ls") == "log  note"
    assert shell.cwd == "/a"


def test_terminal_wc_labels_each_count_with_its_own_file():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/a": "1\n2\n", "/b": "1\n"}, set(), ())
    assert shell.run("wc -l /nope /b").splitlines() == ["1 /b", "wc: /nope: No such file or directory"]
    assert shell.run("wc -l /a /b").splitlines() == ["2 /a", "1 /b", "3 total"]


def test_terminal_missing_command_reads_like_bash():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/a": "x\n"}, set(), ("find_missing",))
    assert shell.run("find / -name a") == "bash: find: command not found"
    assert shell.run("vim /a") == "bash: vim: command not found"


def test_terminal_rm_quirk_needs_force_for_the_lock():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/run/app.lock": "1\n"}, {"/run/app.lock"}, ("rm_needs_force",))
    assert "use -f" in shell.run("rm /run/app.lock")
    assert "/run/app.lock" in shell.files
    shell.run("rm -f /run/app.lock")
    assert "/run/app.lock" not in shell.files


def test_terminal_output_is_truncated_to_keep_observations_compact():
    from lifecycle_agent.envs.terminal import MAX_OUTPUT_LINES, Shell

    shell = Shell({"/big": "".join(f"line {i}\n" for i in range(100))}, set(), ())
    lines = shell.run("cat /big").splitlines()
    assert len(lines) == MAX_OUTPUT_LINES + 1 and "80 more lines" in lines[-1]


@pytest.mark.parametrize("name", BUILT_IN)
def test_observations_stay_compact(name):
    task = envs.make(name, preset="hard").pack(seed=1, size=1).tasks[0]
    assert len(task.start()) < 1200
    assert math.isfinite(task.optimum())


def test_alchemy_partial_credit_is_zero_for_a_target_made_from_base_items():
    env = envs.make("alchemy", partial_credit=True)
    for seed in range(50):
        task = env.pack(seed=seed, size=1).tasks[0]
        task.start()
        if len(task.needed) == 1:
            assert task.timeout_result().reward == 0.0
            return
    pytest.skip("no tier-1 target in 50 seeds")


def test_terminal_globs_never_cross_directories():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/var/lib/app/app.lock": "1\n", "/app.cfg": "x\n"}, set(), ())
    assert "/var/lib/app/app.lock" not in shell.run("ls /*.lock")
    shell.run("rm -f /*app.lock")
    assert "/var/lib/app/app.lock" in shell.files
    assert shell.run("ls /*.cfg").strip() == "/app.cfg"


def _lock_task():
    for seed in range(200):
        pack = envs.make("terminal").pack(seed=seed, size=6)
        for task in pack.tasks:
            if task.chore == "lock":
                return task
    pytest.skip("no lock chore in 200 seeds")


def test_terminal_wiping_the_machine_fails_the_chore():
    task = _lock_task()
    task.start()
    result = task.step("rm -rf /")
    assert (result.reward, result.done) == (0.0, True) and "did not ask to touch" in result.feedback
    assert task.config not in result.feedback and "files)" in result.feedback  # a count, not the paths


def test_terminal_recursive_rm_respects_write_protection():
    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/run/app/app.lock": "1\n"}, {"/run/app/app.lock"}, ("rm_needs_force",))
    assert "use -f" in shell.run("rm -r /run/app")
    assert "/run/app/app.lock" in shell.files


def test_terminal_grep_treats_patterns_as_fixed_strings():
    import time

    from lifecycle_agent.envs.terminal import Shell

    shell = Shell({"/log": "a" * 40 + "\n" + "x (a*)*b y\n"}, set(), ())
    started = time.perf_counter()
    assert shell.run("grep '(a*)*b' /log").strip() == "x (a*)*b y"
    assert time.perf_counter() - started < 1.0


def test_terminal_disk_is_bounded():
    from lifecycle_agent.envs.terminal import MAX_FILE_CHARS, Shell

    shell = Shell({"/tmp/a": "x" * 1000 + "\n"}, set(), ())
    outputs = [shell.run("cat /tmp/a >> /tmp/a") for _ in range(10)]
    assert any("No space left on device" in out for out in outputs)
    assert len(shell.files["/tmp/a"]) <= MAX_FILE_CHARS


def test_terminal_refuses_overlong_command_chains():
    from lifecycle_agent.envs.terminal import MAX_COMMANDS_PER_LINE, Shell

    shell = Shell({"/a": "x\n"}, set(), ())
    assert "at most" in shell.run(" ; ".join(["pwd"] * (MAX_COMMANDS_PER_LINE + 1)))


def test_action_parsing_cost_is_bounded_on_runaway_replies():
    import time

    from lifecycle_agent.envs.parsing import labelled

    started = time.perf_counter()
    assert labelled("action" + " " * 100_000) is None
    assert time.perf_counter() - started < 1.0
