"""``evaluate`` and ``lifecycle-agent eval``: learning curves that measure what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle_agent import envs
from lifecycle_agent.envs import Environment, EnvTask
from lifecycle_agent.errors import EnvironmentSpecError
from lifecycle_agent.eval import (
    DEFAULT_MODES, EvalError, MODES, curve_metrics, evaluate, mean_ci95, parse_seeds, strip_timing, t95,
)
from lifecycle_agent.models.scripted import ScriptedModel
from lifecycle_agent.store import Store
from lifecycle_agent.tasks import StepResult

TESTS_DIR = str(Path(__file__).parent)


def small_eval(tmp_path, name="out", env="fact-recall", model=None, **overrides):
    """3 packs x seeds 1, 2 x S=4 with the scripted note-taking model, into tmp_path/name."""
    options = dict(packs=3, pack_size=4, seeds=[1, 2], out=tmp_path / name, plot=False)
    options.update(overrides)
    return evaluate(env, model or ScriptedModel(), **options)


# --------------------------------------------------------------------------- the harness measures what it claims


def test_note_taking_policy_gains_in_live_and_not_in_none(tmp_path):
    report = small_eval(tmp_path)
    modes = report["environments"]["fact-recall"]["modes"]
    assert modes["live"]["gain"] > 0.5
    assert modes["live"]["by_position"][-1] == 1.0
    assert modes["none"]["gain"] == 0.0
    assert modes["none"]["by_position"] == [0.0, 0.0, 0.0, 0.0]


def test_frozen_context_keeps_only_what_the_first_task_taught(tmp_path):
    modes = small_eval(tmp_path)["environments"]["fact-recall"]["modes"]
    # two secret items alternate: the note written after task 0 answers position 2, not position 3
    assert modes["frozen"]["by_position"] == [0.0, 0.0, 1.0, 0.0]
    assert modes["frozen"]["forgetting"] == 1.0


def test_ralph_packing_learns_the_repeated_task_after_one_try(tmp_path):
    modes = small_eval(tmp_path)["environments"]["fact-recall"]["modes"]
    assert modes["ralph"]["by_position"] == [0.0, 1.0, 1.0, 1.0]


def test_a_policy_that_ignores_its_context_shows_no_gain(tmp_path):
    from lifecycle_agent.models.scripted import feedback_notes

    blind = ScriptedModel(solve=lambda messages: "Answer: 0", update=feedback_notes)
    modes = small_eval(tmp_path, model=blind)["environments"]["fact-recall"]["modes"]
    assert all(modes[m]["gain"] == 0.0 for m in DEFAULT_MODES)


def test_all_modes_run_on_the_same_packs(tmp_path):
    report = small_eval(tmp_path)
    with Store(tmp_path / "out" / "eval.db") as store:
        first_prompts = {}
        for mode in ("live", "frozen", "none"):
            row = store.episodes(f"eval.fact-recall.train.s1.p0.{mode}", kind="solve")[0]
            first_prompts[mode] = row.messages[1]["content"]
    assert len(set(first_prompts.values())) == 1
    assert report["environments"]["fact-recall"]["pack_seeds"] == [10000, 10001, 10002, 20000, 20001, 20002]


# --------------------------------------------------------------------------- the report


def test_report_json_holds_curves_with_intervals_and_summary(tmp_path):
    small_eval(tmp_path, plot=True)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    live = report["environments"]["fact-recall"]["modes"]["live"]
    assert len(live["by_position"]) == 4 and len(live["ci95"]) == 4 and live["n"] == [6, 6, 6, 6]
    for key in ("gain", "auc", "forgetting", "prompt_tokens_per_task", "completion_tokens_per_task", "timing"):
        assert key in live
    assert report["model"]["id"] == "scripted"
    assert report["prompt_set"] == "cod-v2"
    assert report["settings"]["seeds"] == [1, 2]
    assert report["environments"]["fact-recall"]["options"] == {"items": 2, "digits": 3}
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| live |" in (out / "report.md").read_text()


def test_update_after_the_last_task_is_skipped(tmp_path):
    small_eval(tmp_path, packs=1, seeds=[1], modes=["live"])
    with Store(tmp_path / "out" / "eval.db") as store:
        kinds = [row.kind for row in store.episodes("eval.fact-recall.train.s1.p0.live")]
    assert kinds == ["solve", "update", "solve", "update", "solve", "update", "solve"]


def test_same_seeds_give_a_byte_identical_report_apart_from_timing(tmp_path):
    first = small_eval(tmp_path, name="a", env="fact-recall,frozen-lake-obscure", concurrency=1)
    second = small_eval(tmp_path, name="b", env="fact-recall,frozen-lake-obscure", concurrency=4)
    assert json.dumps(strip_timing(first)) == json.dumps(strip_timing(second))
    on_disk = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b")]
    assert json.dumps(strip_timing(on_disk[0])) == json.dumps(strip_timing(on_disk[1]))


def test_confidence_interval_uses_student_t():
    mean, low, high = mean_ci95([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5
    assert high - mean == pytest.approx(3.182 * 0.57735 / 2, rel=1e-3)
    assert mean_ci95([0.3]) == (0.3, None, None)
    assert t95(1000) == pytest.approx(1.962, abs=1e-3)


def test_curve_metrics_gain_auc_and_forgetting():
    metrics = curve_metrics([0.0, 1.0, 0.5, 1.0])
    assert metrics == {"gain": 1.0, "auc": pytest.approx((0.5 + 0.75 + 0.75) / 3), "forgetting": 0.5}
    assert curve_metrics([0.4]) == {"gain": 0.0, "auc": 0.4, "forgetting": 0.0}


# --------------------------------------------------------------------------- resume


class PowerCut(Exception):
    pass


class CutAfter(ScriptedModel):
    """The scripted policy, interrupted after ``n`` calls."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def generate(self, messages, **kwargs):
        if self.calls >= self.n:
            raise PowerCut("the machine went down")
        return super().generate(messages, **kwargs)


def test_interrupted_eval_resumes_from_its_database(tmp_path):
    with pytest.raises(PowerCut):
        small_eval(tmp_path, name="resumed", model=CutAfter(40))
    resumed_model = ScriptedModel()
    resumed = small_eval(tmp_path, name="resumed", model=resumed_model)
    full_model = ScriptedModel()
    full = small_eval(tmp_path, name="full", model=full_model)
    assert resumed_model.calls == full_model.calls - 40
    assert json.dumps(strip_timing(resumed)) == json.dumps(strip_timing(full))


def test_resuming_with_other_settings_is_refused_and_names_them(tmp_path):
    small_eval(tmp_path, packs=1, seeds=[1])
    with pytest.raises(EvalError, match=r"packs: 1 -> 2"):
        small_eval(tmp_path, packs=2, seeds=[1])


def test_resuming_with_another_concurrency_is_allowed(tmp_path):
    first = small_eval(tmp_path, packs=1, seeds=[1], concurrency=1)
    again = small_eval(tmp_path, packs=1, seeds=[1], concurrency=3)
    assert strip_timing(first) == strip_timing(again)


# --------------------------------------------------------------------------- bad input


def test_unknown_environment_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(EnvironmentSpecError, match="known environments: alchemy, fact-recall, frozen-lake-obscure"):
        small_eval(tmp_path, env="fact-recal")
    assert not (tmp_path / "out").exists()


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(EnvironmentSpecError, match="no preset 'medium'"):
        small_eval(tmp_path, preset="medium")


@pytest.mark.parametrize("size", [0, -3])
def test_pack_size_below_one_is_refused(tmp_path, size):
    with pytest.raises(EvalError, match="pack size must be an integer >= 1"):
        small_eval(tmp_path, pack_size=size)


@pytest.mark.parametrize("seeds", ["1,a", "one", [1, "2"], [1.5], "3-1", "1,1"])
def test_bad_seeds_are_refused(seeds):
    with pytest.raises(EvalError, match="seed"):
        parse_seeds(seeds)


def test_seed_ranges_and_lists_are_read():
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds([3, 4]) == [3, 4]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(EvalError, match="unknown mode.*modes: live, frozen, none, ralph"):
        small_eval(tmp_path, modes="live,memory")


def test_evaluate_inside_an_event_loop_points_to_aevaluate(tmp_path):
    import asyncio

    async def inside():
        return small_eval(tmp_path)

    with pytest.raises(EvalError, match="await aevaluate"):
        asyncio.run(inside())


def test_aevaluate_runs_inside_an_event_loop():
    import asyncio

    from lifecycle_agent.eval import aevaluate

    report = asyncio.run(aevaluate("fact-recall", ScriptedModel(), packs=1, pack_size=3, modes="live"))
    assert report["environments"]["fact-recall"]["modes"]["live"]["by_position"] == [0.0, 0.0, 1.0]


def test_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(EvalError, match="not a directory"):
        small_eval(tmp_path)


# --------------------------------------------------------------------------- third-party environments that fail


class StepBombTask(EnvTask):
    max_turns = 1

    def start(self) -> str:
        return "What is 2 + 2?"

    def step(self, action: str) -> StepResult:
        if self.index == 1:
            raise RuntimeError("the simulator crashed")
        return StepResult("", 1.0 if "4" in action else 0.0, True, "The answer is 4.")

    def oracle_action(self) -> str:
        return "4"


class StepBomb(Environment):
    """Raises during step() at position 1."""

    name = "step-bomb"

    def hidden_facts(self, rng):
        return {}

    def make_task(self, pack, index, task_id):
        return StepBombTask(pack, index, task_id)


class PackBomb(StepBomb):
    """Raises while making its tasks."""

    name = "pack-bomb"

    def make_task(self, pack, index, task_id):
        raise ValueError("no tasks today")


def test_environment_raising_in_step_is_recorded_and_the_eval_continues(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    report = small_eval(tmp_path, env="test_eval:StepBomb", modes="live,none")
    modes = report["environments"]["test_eval:StepBomb"]["modes"]
    assert modes["live"]["failed_tasks"] == 6
    assert modes["live"]["n"] == [6, 6, 6, 6]
    assert modes["live"]["by_position"][1] == 0.0
    assert "raised RuntimeError: the simulator crashed" in modes["live"]["task_errors"][0]
    with Store(tmp_path / "out" / "eval.db") as store:
        [agent_id] = [a.agent_id for a in store.list_agents() if a.agent_id.endswith(".train.s1.p0.live")]
        assert agent_id.startswith("eval.test_eval_StepBomb-")  # the ':' made safe, the name's hash appended
        row = store.episodes(agent_id, kind="solve")[1]
    assert row.status == "failed" and "simulator crashed" in row.error


def test_environment_raising_while_making_a_pack_is_reported_and_others_still_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    report = small_eval(tmp_path, env="test_eval:PackBomb,fact-recall", modes="live")
    assert {e["env"] for e in report["errors"]} == {"test_eval:PackBomb"}
    assert "no tasks today" in report["errors"][0]["error"]
    assert report["environments"]["test_eval:PackBomb"]["modes"]["live"]["by_position"] == [None] * 4
    assert report["environments"]["fact-recall"]["modes"]["live"]["gain"] > 0


def test_registered_environment_is_evaluated_by_name(tmp_path):
    envs.register("step-bomb", StepBomb)
    try:
        report = small_eval(tmp_path, env="step-bomb", modes="none")
    finally:
        envs.unregister("step-bomb")
    assert report["environments"]["step-bomb"]["modes"]["none"]["by_position"][0] == 0.0


# --------------------------------------------------------------------------- the command line


def run_cli(args, capsys):
    from lifecycle_agent.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_eval_writes_the_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, _ = run_cli(
        ["eval", "--env", "fact-recall", "--model", "scripted", "--packs", "2", "--pack-size", "3", "--seeds", "1,2",
         "--out", str(out), "--no-plot"],
        capsys,
    )
    assert code == 0
    assert "fact-recall" in stdout and "live" in stdout and "ralph" in stdout and "gain" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["environments"]["fact-recall"]["modes"]["none"]["n"] == [4, 4, 4]


def test_cli_eval_passes_environment_options(tmp_path, capsys):
    out = tmp_path / "cli"
    code, _, _ = run_cli(
        ["eval", "--env", "fact-recall", "--model", "scripted", "--packs", "1", "--pack-size", "2", "--modes", "live",
         "--option", "items=1", "--out", str(out), "--no-plot"],
        capsys,
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["environments"]["fact-recall"]["options"]["items"] == 1
    assert report["environments"]["fact-recall"]["modes"]["live"]["by_position"] == [0.0, 1.0]


def test_cli_eval_passes_the_update_temperature_and_prompt_set(tmp_path, capsys):
    from lifecycle_agent.prompts import DEFAULT_PROMPT_SET

    out = tmp_path / "cli"
    code, _, _ = run_cli(
        ["eval", "--env", "fact-recall", "--model", "scripted", "--packs", "1", "--pack-size", "2", "--modes", "live",
         "--temperature", "0.3", "--update-temperature", "0.9", "--prompt-set", DEFAULT_PROMPT_SET,
         "--out", str(out), "--no-plot"],
        capsys,
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_set"] == DEFAULT_PROMPT_SET
    assert report["settings"]["update_temperature"] == 0.9 and report["settings"]["temperature"] == 0.3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "nope"], "unknown environment 'nope'; known environments:"),
        (["--env", "fact-recall", "--preset", "medium"], "no preset 'medium'"),
        (["--env", "fact-recall", "--pack-size", "0"], "'--pack-size' / '-S': Input should be greater than or equal to 1"),
        (["--env", "fact-recall", "--seeds", "1,x"], "seeds: 'x' is not an integer"),
        (["--env", "fact-recall", "--option", "colour"], "expected KEY=VALUE"),
        (["--env", "fact-recall", "--option", "colour=red"], "unknown option(s) colour"),
        (["--env", "fact-recall", "--prompt-set", "cod-v0"], "unknown prompt set 'cod-v0'"),
        (["--env", "fact-recall", "--update-temperature", "-1"], "'--update-temperature': Input should be greater than or equal to 0"),
    ],
)
def test_cli_eval_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    code, _, stderr = run_cli(["eval", "--model", "scripted", "--out", str(tmp_path / "x")] + args, capsys)
    assert code == 2
    assert message in " ".join(stderr.split())
    assert not (tmp_path / "x").exists()


def test_cli_envs_list_shows_every_environment_with_presets(capsys):
    code, stdout, _ = run_cli(["envs", "list", "--json"], capsys)
    rows = {row["name"]: row for row in json.loads(stdout)}
    assert code == 0
    assert set(rows) >= {"fact-recall", "frozen-lake-obscure", "grid-navigation", "optimal-control", "alchemy", "terminal"}
    assert all(row["presets"] == ["train", "easy", "hard"] for row in rows.values())


def test_cli_envs_show_plays_the_oracle(capsys):
    code, stdout, _ = run_cli(["envs", "show", "frozen-lake-obscure", "--seed", "3", "--json"], capsys)
    shown = json.loads(stdout)
    assert code == 0
    assert shown["reward"] == pytest.approx(shown["optimum"]) and shown["turns"]


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_runs_a_tiny_eval_and_records_token_ids(tmp_path):
    report = evaluate(
        "fact-recall", "smollm2", packs=1, pack_size=2, seeds=[1], modes="live", out=tmp_path / "smol",
        max_new_tokens=16, temperature=0.5, plot=False,
    )
    live = report["environments"]["fact-recall"]["modes"]["live"]
    assert "smollm2" in report["model"]["id"].lower()
    assert live["n"] == [1, 1] and all(0.0 <= r <= 1.0 for r in live["by_position"])
    assert live["completion_tokens_per_task"] > 0
    with Store(tmp_path / "smol" / "eval.db") as store:
        solve = store.episodes("eval.fact-recall.train.s1.p0.live", kind="solve")[0]
    assert solve.turns[0]["completion_ids"]


def test_an_interrupted_eval_marks_every_started_run_interrupted(tmp_path, recwarn):
    with pytest.raises(PowerCut):
        small_eval(tmp_path, name="cut", model=CutAfter(40), concurrency=4)
    with Store(tmp_path / "cut" / "eval.db") as store:
        statuses = [run["status"] for agent in store.list_agents() for run in store.runs(agent.agent_id)]
    assert "interrupted" in statuses and "running" not in statuses
    assert not [w for w in recwarn if issubclass(w.category, pytest.PytestUnraisableExceptionWarning)]


def test_environment_names_that_differ_only_in_unsafe_characters_get_different_agents():
    from lifecycle_agent.eval import _slug

    assert _slug("fact-recall") == "fact-recall"
    assert _slug("pkg.mod:factory") != _slug("pkg.mod_factory")
    assert len(_slug("x" * 200)) <= 48 and _slug("x" * 200) != _slug("x" * 199)


def test_intervals_are_clipped_to_the_reward_range():
    from lifecycle_agent.eval import mean_ci95, position_cell

    assert mean_ci95([0.0, 1.0]) == pytest.approx((0.5, -5.853, 6.853), abs=1e-3)  # Student's t with n = 2
    assert mean_ci95([0.0, 1.0], (0.0, 1.0)) == pytest.approx((0.5, 0.0, 1.0))
    assert position_cell({"by_position": [0.5], "ci95": [[0.0, 1.0]]}, 0) == "0.50 [0.00, 1.00]"


def test_report_intervals_stay_within_the_reward_range_and_say_n(tmp_path):
    report = evaluate("fact-recall", "scripted", packs=2, pack_size=4, seeds=[1], modes=["live", "none"],
                      out=tmp_path / "ev", plot=False)
    for mode in report["environments"]["fact-recall"]["modes"].values():
        assert mode["n"] == [2, 2, 2, 2]
        for low, high in mode["ci95"]:
            assert 0.0 <= low <= high <= 1.0
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "| mode | n | pos 0 |" in text and "| live | 2 |" in text


# --------------------------------------------------------------------------- ralph_full and the default pack size


def test_ralph_full_plays_every_task_of_each_pack_repeated_in_a_pack_of_its_own(tmp_path):
    report = small_eval(tmp_path, packs=1, seeds=[1], pack_size=3, modes="live,ralph,ralph_full")
    entry = report["environments"]["fact-recall"]
    full, sample = entry["modes"]["ralph_full"], entry["modes"]["ralph"]
    assert full["packing"] == "ralph_full" and sample["packing"] == "ralph_sample"
    assert full["n"] == [3, 3, 3] and sample["n"] == [1, 1, 1]  # S packs where ralph_sample has one
    assert full["tasks"] == 9
    # the scripted note-taker misses each code once, then answers it: the first try of every pack is 0
    assert full["by_position"] == [0.0, 1.0, 1.0]


def test_ralph_full_packs_repeat_the_tasks_of_the_cod_pack(tmp_path):
    small_eval(tmp_path, "full", packs=1, seeds=[1], pack_size=3, modes="live,ralph_full")

    def questions(store, agent_id):
        solves = [r for r in store.episodes(agent_id, limit=None) if r.kind == "solve"]
        return [next(m["content"] for m in r.messages if m["role"] == "user") for r in solves]

    with Store(tmp_path / "full" / "eval.db") as store:
        ids = [a.agent_id for a in store.list_agents()]
        live = questions(store, next(a for a in ids if a.endswith(".live")))
        full = [questions(store, a) for a in sorted(a for a in ids if ".ralph_full." in a)]
    assert len(full) == 3
    assert full == [[live[j]] * 3 for j in range(3)]


def test_ralph_sample_is_the_ralph_mode(tmp_path):
    report = small_eval(tmp_path, packs=1, seeds=[1], modes="ralph_sample")
    assert list(report["environments"]["fact-recall"]["modes"]) == ["ralph"]
    with pytest.raises(EvalError, match="modes repeat"):
        small_eval(tmp_path, "again", packs=1, seeds=[1], modes="ralph,ralph_sample")


def test_an_unknown_mode_lists_every_mode_and_alias(tmp_path):
    with pytest.raises(EvalError, match="modes: live, frozen, none, ralph, ralph_full \\(ralph_sample = ralph\\)"):
        small_eval(tmp_path, modes="ralph_loop")


def test_the_pack_size_defaults_per_environment_and_is_recorded(tmp_path):
    report = evaluate("fact-recall,preference", ScriptedModel(), packs=1, seeds=[1], modes="none", plot=False,
                      out=tmp_path / "d")
    assert report["format_version"] == 2
    assert report["settings"]["pack_size"] is None
    assert report["environments"]["fact-recall"]["pack_size"] == 4
    assert report["environments"]["preference"]["pack_size"] == 8
    assert report["environments"]["preference"]["modes"]["none"]["n"] == [1] * 8
    assert "each environment's default (fact-recall 4, preference 8)" in (tmp_path / "d" / "report.md").read_text()
    given = evaluate("preference", ScriptedModel(), packs=1, seeds=[1], modes="none", pack_size=3, plot=False)
    assert given["settings"]["pack_size"] == 3 and given["environments"]["preference"]["pack_size"] == 3


def test_every_built_in_environment_declares_its_eval_pack_size():
    from lifecycle_agent.eval import default_pack_size

    sizes = {row["name"]: row["eval_pack_size"] for row in envs.describe()}
    assert sizes["fact-recall"] == 4
    assert all(size == 8 for name, size in sizes.items() if name != "fact-recall")
    assert all(default_pack_size(envs.make(name)) == size for name, size in sizes.items())


def test_a_bad_declared_eval_pack_size_is_a_clear_error(tmp_path):
    from lifecycle_agent.eval import default_pack_size

    class Odd(envs.make("fact-recall").__class__):
        eval_pack_size = 0

    with pytest.raises(EvalError, match="declares eval_pack_size 0"):
        default_pack_size(Odd())


def test_resuming_with_another_pack_size_is_refused(tmp_path):
    small_eval(tmp_path, "r", packs=1, seeds=[1], modes="none", pack_size=None)
    with pytest.raises(EvalError, match="pack_size"):
        small_eval(tmp_path, "r", packs=1, seeds=[1], modes="none", pack_size=3)


def test_cli_eval_help_states_the_default_pack_size_and_the_modes(capsys):
    code, stdout, _ = run_cli(["eval", "--help"], capsys)
    text = " ".join(stdout.split())
    assert code == 0
    assert "8 as in the method's evaluation" in text and "fact-recall 4" in text
    assert "ralph_full" in text and "ralph_sample = ralph" in text


# ---------------------------------------------------------------- EvalConfig: one home for every setting
def test_an_eval_config_runs_as_keywords_do_and_keywords_change_it():
    from lifecycle_agent.eval_config import EvalConfig

    config = EvalConfig.of("fact-recall", packs=2, pack_size=4, modes="live,none", seeds="1-2")
    assert config.seeds == [1, 2] and config.modes == ["live", "none"] and config.env == ["fact-recall"]
    by_config = strip_timing(evaluate(config, "scripted", plot=False))
    by_keywords = strip_timing(evaluate("fact-recall", "scripted", packs=2, pack_size=4, modes="live,none", seeds=[1, 2]))
    assert by_config == by_keywords
    narrower = strip_timing(evaluate(config, "scripted", modes=["live"]))
    assert list(narrower["environments"]["fact-recall"]["modes"]) == ["live"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pack": 2}, "unknown eval setting(s) pack; settings: env, packs"),
        ({"packs": 0}, "packs must be an integer >= 1, got 0"),
        ({"packs": 10_001}, "packs must be at most 10000"),
        ({"concurrency": True}, "concurrency must be an integer >= 1, got True"),
        ({"temperature": -0.5}, "temperature must be a number >= 0"),
        ({"context_budget": 100_001}, "context budget must be at most 100000"),
        ({"parse_policy": "loose"}, "parse policy must be strict or lenient"),
        ({"env_options": {"alchemy": {}}}, "env_options names environment(s) not evaluated: alchemy"),
        ({"plot": "sometimes"}, "plot: Input should be a valid boolean"),
    ],
)
def test_eval_config_names_the_bad_setting(settings, message):
    from lifecycle_agent.eval_config import EvalConfig

    with pytest.raises(EvalError) as exc:
        EvalConfig.of("fact-recall", **settings)
    assert message in str(exc.value)


def test_the_eval_cli_takes_its_defaults_and_bounds_from_eval_config():
    import typer.main

    from lifecycle_agent.cli import app
    from lifecycle_agent.eval_config import EvalConfig

    command = typer.main.get_command(app).commands["eval"]
    params = {p.name: p for p in command.params}
    for name in ("packs", "concurrency", "preset"):
        assert params[name].default == EvalConfig.model_fields[name].default, name
        assert params[name].help == EvalConfig.model_fields[name].description
    assert params["modes"].default == ",".join(EvalConfig.model_fields["modes"].default)
    assert (params["packs"].min, params["packs"].max) == (1, 10_000)


def test_an_eval_recorded_before_per_environment_pack_sizes_resumes(tmp_path):
    import json as _json

    from lifecycle_agent.eval import SETTINGS_FILE, check_resume, check_settings, _settings

    out = tmp_path / "old"
    out.mkdir()
    recorded = _settings(check_settings("fact-recall", pack_size=4))
    del recorded["pack_sizes"]  # what an older version wrote
    (out / SETTINGS_FILE).write_text(_json.dumps(recorded))
    check_resume("fact-recall", out, pack_size=4)  # the same eval: no error
    with pytest.raises(EvalError, match="pack_size"):
        check_resume("fact-recall", out, pack_size=3)


def test_keywords_over_a_config_change_it_and_none_keeps_its_value():
    from lifecycle_agent.eval_config import EvalConfig

    config = EvalConfig.of("fact-recall", temperature=0.7, pack_size=4)
    again = EvalConfig.of(config, temperature=None, pack_size=None, preset=None)
    assert (again.temperature, again.pack_size, again.preset) == (0.7, 4, "train")
    assert EvalConfig.of(config, env="preference").env == ["preference"]
