"""``RalphConfig`` (its mode and how options fit together), the loop's set-up value, its
iteration outcomes and the routing of model calls by their episode kind."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from pydantic import ValidationError

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END
from lifecycle_agent.agent import LifecycleAgent, ModelCall, drive
from lifecycle_agent.errors import ModelCallError
from lifecycle_agent.models.base import ChatModel, Generation
from lifecycle_agent.models.scripted import ScriptedModel
from lifecycle_agent.ralph import RalphConfig, RalphError, check_setup, run_loop
from lifecycle_agent.ralph.iteration import RoutedModel
from lifecycle_agent.ralph.setup import prepare
from lifecycle_agent.store import Store
from test_ralph import AGENT, CHECK, commits_ids, learn_from_check, learner, make_repo


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo")


# ------------------------------------------------------------ the mode field
def test_mode_follows_from_the_options_given():
    assert RalphConfig.build(repo=".", check="true").mode == "builtin"
    assert RalphConfig.build(repo=".", check="true", agent_cmd="claude -p").mode == "external"
    assert RalphConfig.build(repo=".", check="true", mode="external", agent_cmd="claude -p").mode == "external"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"mode": "external"}, "mode 'external' runs an agent command each iteration: give agent_cmd"),
        ({"mode": "builtin", "agent_cmd": "claude -p"}, "mode 'builtin' .* but agent_cmd 'claude -p' was given too"),
        ({"agent_timeout": 5.0}, "agent_timeout .* mode 'external'; mode 'builtin' has none"),
        ({"mode": "cli"}, "ralph option mode: Input should be 'builtin' or 'external'"),
        ({"agent_cmd": "  "}, "ralph option agent_cmd: .*must not be empty"),
    ],
    ids=["external-without-command", "builtin-with-command", "agent-timeout-in-builtin", "unknown-mode", "blank-command"],
)
def test_contradicting_or_missing_options_are_named(options, says):
    with pytest.raises(RalphError, match=says):
        RalphConfig.build(repo=".", check="true", **options)


def test_a_config_is_a_value_that_does_not_change():
    config = RalphConfig.build(repo=".", check="true")
    with pytest.raises(ValidationError):
        config.max_iterations = 3


def test_merged_lays_given_options_over_a_config():
    base = RalphConfig.build(repo=".", check="true", max_iterations=4)
    assert RalphConfig.merged(base) is base
    merged = RalphConfig.merged(base, max_minutes=2.0, agent_cmd="claude -p")
    assert (merged.max_iterations, merged.max_minutes, merged.mode) == (4, 2.0, "external")
    with pytest.raises(RalphError, match="mode 'builtin'"):
        RalphConfig.merged(base, mode="builtin", agent_cmd="claude -p")


def test_run_loop_takes_every_config_field_as_a_keyword():
    params = inspect.signature(run_loop).parameters
    fields = set(RalphConfig.model_fields)
    assert fields <= set(params)
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in fields - {"repo"})


def test_misspelled_options_are_refused(repo):
    with pytest.raises(TypeError, match="max_iteration"):
        run_loop(repo, check=CHECK, model=learner(), max_iteration=3)
    with pytest.raises(RalphError, match="unknown ralph option 'max_iteration'"):
        check_setup(repo, check=CHECK, max_iteration=3)


def test_missing_repository_or_check_is_named():
    with pytest.raises(RalphError, match="ralph option repo: Field required"):
        run_loop(check="true", model=learner())
    with pytest.raises(RalphError, match="ralph option check: Field required"):
        check_setup("somewhere")


def test_run_loop_takes_a_config_and_keywords_override_it(repo):
    config = RalphConfig(repo=repo, check=CHECK, agent_cmd=AGENT, max_iterations=1)
    result = run_loop(config=config)
    assert (result.stop_reason, len(result.iterations)) == ("max_iterations", 1)
    again = run_loop(config=config, max_iterations=3)
    assert (again.stop_reason, [i.iteration for i in again.iterations]) == ("check_passed", [1, 2])


# ------------------------------------------------------------ the set-up value
def test_setup_is_one_frozen_value_checked_before_the_first_step(repo):
    setup = prepare(RalphConfig(repo=repo, check=CHECK, agent_cmd=AGENT), with_model=False)
    assert (setup.agent_notes, setup.prompt_in_repo, setup.notes_path) == (True, "PROMPT.md", repo / "NOTES.md")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.agent_notes = False
    assert prepare(RalphConfig(repo=repo, check=CHECK, agent_cmd=AGENT), with_model=True).agent_notes is False
    assert prepare(RalphConfig(repo=repo, check=CHECK), with_model=False).agent_notes is False  # builtin: the model writes


def test_setup_names_a_missing_program(repo):
    with pytest.raises(RalphError, match="--agent-cmd 'no-such-agent -p': program 'no-such-agent' was not found"):
        prepare(RalphConfig(repo=repo, check=CHECK, agent_cmd="no-such-agent -p"), with_model=False)


# ------------------------------------------------------------ iteration outcomes
def test_a_failed_model_call_is_a_failure_outcome_with_its_reason(repo):
    def broken(messages):
        raise ModelCallError("endpoint down")

    result = run_loop(repo, check=CHECK, model=ScriptedModel(broken, learn_from_check), max_iterations=3)
    assert (result.stop_reason, result.passed, result.iterations_run) == ("error", False, 0)
    assert result.message.startswith("iteration 1 failed: ") and "endpoint down" in result.message
    assert result.message.endswith("(rerun to resume)")


def test_a_failed_notes_update_is_a_failure_outcome_the_rerun_finishes(repo):
    def broken_update(messages):
        raise ModelCallError("notes model down")

    events = []
    result = run_loop(repo, check=CHECK, agent_cmd=AGENT, model=ScriptedModel(update=broken_update), max_iterations=3,
                      on_event=events.append)
    (info,) = result.iterations
    assert (result.stop_reason, info.status, info.commit, result.iterations_run) == ("error", "failed", None, 0)
    assert "notes model down" in result.message
    assert [(e.iteration, e.message) for e in events if e.kind == "iteration_end"] == [(1, result.message)]
    again = run_loop(repo, check=CHECK, agent_cmd=AGENT, model=learner(), max_iterations=3)
    assert (again.resumed, again.iterations[0].update_status, again.stop_reason) == (1, "ok", "check_passed")
    assert again.iterations[0].commit in commits_ids(repo)


# ------------------------------------------------------------ routing by episode kind
class Recording(ChatModel):
    def __init__(self, name: str, reply: str):
        self.model_id, self.reply, self.calls = name, reply, []

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        self.calls.append(messages)
        return Generation(self.reply)


def test_model_calls_are_routed_by_their_kind_never_by_their_text():
    solve, update = Recording("solver", "Answer: 1"), Recording("notes", f"{CONTEXT_BEGIN}\nnote\n{CONTEXT_END}")
    routed = RoutedModel(solve, update, "solver+notes")
    looks_like_update = [{"role": "user", "content": f"the task quotes {CONTEXT_BEGIN} and {CONTEXT_END}"}]
    assert routed.route(ModelCall(looks_like_update, None, None)) is solve
    assert routed.route(ModelCall([{"role": "user", "content": "plain"}], None, None, kind="update")) is update
    with pytest.raises(ModelCallError, match="no model writes the notes"):
        RoutedModel(solve, None, "solver").route(ModelCall([], None, None, kind="update"))


def test_agent_flows_mark_each_model_call_with_its_episode_kind():
    solve, update = Recording("solver", "Answer: 1"), Recording("notes", f"{CONTEXT_BEGIN}\nnote\n{CONTEXT_END}")
    routed = RoutedModel(solve, update, "solver+notes")
    kinds = []

    def route(call: ModelCall) -> ChatModel:
        kinds.append(call.kind)
        return routed.route(call)

    with Store(":memory:") as store:
        agent = LifecycleAgent(routed, store, "a")
        task = {"id": "t1", "prompt": f"quote {CONTEXT_BEGIN} back", "answer": "1"}
        result = drive(agent.run_flow([task, {"id": "t2", "prompt": "2?", "answer": "2"}]), routed, route=route)
    assert kinds == ["solve", "update", "solve", "update"]
    assert (len(solve.calls), len(update.calls), result.records[0].update_status) == (2, 2, "ok")


def test_a_routed_model_called_without_an_episode_kind_says_how_to_drive_it():
    routed = RoutedModel(Recording("solver", "x"), None, "solver")
    with pytest.raises(ModelCallError, match=r"route=model\.route"):
        routed.generate([{"role": "user", "content": "hi"}])


def test_the_notes_budget_has_the_agent_settings_limit(tmp_path):
    from lifecycle_agent.ralph.config import RalphConfig
    from lifecycle_agent.ralph import RalphError

    with pytest.raises(RalphError, match="context_budget: Input should be less than or equal to 100000"):
        RalphConfig.build(repo=tmp_path, check="true", agent_cmd="cat", context_budget=200_000)
