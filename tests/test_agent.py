"""The agent loop: solve + update episodes, resume, failures, modes, budget, async, concurrency."""

import asyncio
import threading

import pytest

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END, InteractiveTask, LifecycleAgent, StepResult, Task
from lifecycle_agent.errors import ModelCallError, TaskFormatError
from lifecycle_agent.models.scripted import ScriptedModel, is_update


def note(text):
    return f"ok\n{CONTEXT_BEGIN}\n{text}\n{CONTEXT_END}"


def two_step_model(solve_answer="Answer: 1", update_reply=None):
    def fn(messages):
        if is_update(messages):
            return update_reply if update_reply is not None else note("learned")
        return solve_answer

    return fn


def test_run_alternates_solve_and_update_and_records_everything(make_agent):
    agent = make_agent(model=two_step_model())
    result = agent.run([Task(prompt="q1", answer="1", id="t1"), Task(prompt="q2", answer="2", id="t2")])
    assert [r.reward for r in result.records] == [1.0, 0.0]
    assert [r.context_version for r in result.records] == [0, 1]
    assert [r.new_context_version for r in result.records] == [1, 2]
    assert agent.context == "learned" and agent.context_version == 2
    kinds = [(e.kind, e.task_id) for e in agent.episodes()]
    assert kinds == [("solve", "t1"), ("update", "t1"), ("solve", "t2"), ("update", "t2")]
    solve = agent.episodes(kind="solve")[0]
    assert solve.prompt_set == "cod-v2" and solve.model_id.startswith("py:") and solve.messages[-1]["role"] == "assistant"


def test_context_reaches_the_next_solve_prompt(make_agent):
    seen = []

    def fn(messages):
        if is_update(messages):
            return note("the code is 42")
        seen.append(messages[0]["content"])
        return "Answer: 42"

    make_agent(model=fn).run(["first", "second"])
    assert "(no hints yet)" in seen[0] and "the code is 42" in seen[1]


def test_update_sees_previous_context_transcript_reward_and_feedback(make_agent):
    prompts = []

    def fn(messages):
        if is_update(messages):
            prompts.append(messages[1]["content"])
            return note("v")
        return "Answer: Rome"

    make_agent(model=fn).run([Task(prompt="capital?", answer="Paris")])
    assert "capital?" in prompts[0] and "Rome" in prompts[0] and "Reward: 0" in prompts[0] and "Paris" in prompts[0]


def test_history_lists_versions_with_the_episode_that_wrote_them(make_agent):
    agent = make_agent(model=two_step_model())
    agent.run(["a", "b"])
    history = agent.history()
    assert [v.version for v in history] == [0, 1, 2]
    updates = agent.episodes(kind="update")
    assert [v.episode_id for v in history[1:]] == [e.episode_id for e in updates]


def test_reopening_the_agent_continues_from_stored_context(db_path, scripted):
    LifecycleAgent(two_step_model(), db_path, "shop").run(["a"])
    reopened = LifecycleAgent(scripted, db_path, "shop")
    assert reopened.context == "learned" and reopened.context_version == 1


def test_settings_are_stored_and_reused_on_reopen(db_path, scripted):
    LifecycleAgent(scripted, db_path, "s", context_budget=123, parse_policy="strict").close()
    reopened = LifecycleAgent(scripted, db_path, "s")
    assert reopened.settings.context_budget == 123 and reopened.settings.parse_policy == "strict"


def test_unparseable_update_keeps_previous_context_and_records_failure(make_agent):
    agent = make_agent(model=two_step_model(update_reply=note("good")))
    agent.run(["a"])
    agent_strict = make_agent("a1", model=two_step_model(update_reply="no delimiters here"), parse_policy="strict")
    result = agent_strict.run(["b"])
    assert result.records[0].update_status == "failed" and result.records[0].new_context_version is None
    assert agent_strict.context == "good"
    assert agent_strict.episodes(kind="update")[-1].status == "failed"


def test_lenient_update_without_delimiters_is_kept_as_format_miss(make_agent):
    agent = make_agent(model=two_step_model(update_reply="remember: code 7"))
    record = agent.run(["a"]).records[0]
    assert record.update_status == "format_miss" and agent.context == "remember: code 7"


def test_empty_update_reply_never_replaces_context(make_agent):
    agent = make_agent(model=two_step_model(update_reply=note("keep me")))
    agent.run(["a"])
    agent2 = make_agent("a1", model=two_step_model(update_reply="   "))
    agent2.run(["b"])
    assert agent2.context == "keep me"


def test_overlong_update_is_truncated_at_a_word_and_recorded(make_agent):
    agent = make_agent(model=two_step_model(update_reply=note("alpha beta gamma delta epsilon")), context_budget=16)
    record = agent.run(["a"]).records[0]
    assert record.budget_status == "truncated" and agent.context == "alpha beta gamma"
    assert "truncated" in agent.history()[-1].note


def test_overlong_update_rejected_keeps_previous_context(make_agent):
    agent = make_agent(model=two_step_model(update_reply=note("alpha beta gamma delta")), context_budget=8, budget_policy="reject")
    record = agent.run(["a"]).records[0]
    assert record.budget_status == "rejected" and agent.context_version == 0


def test_model_failure_records_failed_task_and_run_continues(make_agent):
    calls = {"n": 0}

    def flaky(messages):
        calls["n"] += 1
        if not is_update(messages) and calls["n"] == 1:
            raise ConnectionError("endpoint down")
        return two_step_model()(messages)

    agent = make_agent(model=flaky)
    result = agent.run(["a", "b"])
    assert [r.status for r in result.records] == ["failed", "ok"]
    assert "endpoint down" in result.records[0].error
    assert agent.episodes(kind="solve")[0].status == "failed"


def test_failed_model_task_is_retried_by_a_rerun(make_agent):
    state = {"fail": True}

    def fn(messages):
        if state["fail"] and not is_update(messages):
            raise ConnectionError("down")
        return two_step_model()(messages)

    agent = make_agent(model=fn)
    agent.run(["a"])
    state["fail"] = False
    result = agent.run(["a"])
    assert result.records[0].status == "ok" and not result.skipped


def test_fail_fast_stops_at_first_failure(make_agent):
    def broken(messages):
        raise RuntimeError("nope")

    result = make_agent(model=broken).run(["a", "b", "c"], fail_fast=True)
    assert len(result.records) == 1 and "nope" in result.stopped


class Boom(InteractiveTask):
    id = "boom"

    def start(self):
        return "go"

    def step(self, action):
        raise ZeroDivisionError("env bug")


def test_task_raising_during_step_is_recorded_and_run_continues(make_agent):
    agent = make_agent(model=two_step_model())
    result = agent.run([Boom(), "next"])
    assert result.records[0].status == "failed" and "ZeroDivisionError: env bug" in result.records[0].error
    assert result.records[1].status == "ok"
    assert agent.run([Boom()]).skipped == ["boom"]


class Counter(InteractiveTask):
    """Reach 3 by answering 'inc' three times."""

    max_turns = 5

    def __init__(self, task_id="count"):
        self.id = task_id

    def start(self):
        self.value = 0
        return "value 0"

    def step(self, action):
        if "inc" in action:
            self.value += 1
        done = self.value >= 3
        return StepResult(f"value {self.value}", 1.0 if done else 0.0, done, "reached 3" if done else None)


def test_multi_turn_task_runs_until_done(make_agent):
    agent = make_agent(model=two_step_model(solve_answer="inc"))
    record = agent.run([Counter()]).records[0]
    assert record.turns == 3 and record.reward == 1.0
    solve = agent.episodes(kind="solve")[0]
    assert [m["role"] for m in solve.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]


def test_multi_turn_task_stops_at_turn_limit(make_agent):
    agent = make_agent(model=two_step_model(solve_answer="wait"))
    record = agent.run([Counter()]).records[0]
    assert record.turns == 5 and record.reward == 0.0 and "turn limit (5)" in record.feedback


def test_task_without_verifier_still_updates_context(make_agent):
    agent = make_agent(model=two_step_model())
    record = agent.run([Task(prompt="write a haiku")]).records[0]
    assert record.reward is None and record.update_status == "ok" and agent.context == "learned"


def test_resume_skips_completed_tasks(make_agent):
    agent = make_agent(model=two_step_model())
    agent.run(["a", "b"])
    result = agent.run(["a", "b", "c"])
    assert len(result.skipped) == 2 and [r.position for r in result.records] == [2]


def test_no_resume_solves_again(make_agent):
    agent = make_agent(model=two_step_model())
    agent.run(["a"])
    assert len(agent.run(["a"], resume=False).records) == 1


def test_stored_solve_without_update_gets_only_its_update_on_resume(make_agent):
    agent = make_agent(model=two_step_model())
    agent.run([Task(prompt="q", answer="1", id="t")], update_after_last=False)
    store = agent.store
    store.conn.execute("UPDATE episodes SET completes_task = 0")  # as if killed before the update committed
    calls = []
    agent2 = make_agent(model=lambda m: calls.append(is_update(m)) or two_step_model()(m))
    record = agent2.run([Task(prompt="q", answer="1", id="t")]).records[0]
    assert calls == [True] and record.resumed and record.reward == 1.0


def test_update_after_last_false_skips_final_update(make_agent):
    agent = make_agent(model=two_step_model())
    result = agent.run(["a", "b"], update_after_last=False)
    assert [r.update_status for r in result.records] == ["ok", None]
    assert agent.run(["a", "b"]).skipped == [result.records[0].task_id, result.records[1].task_id]


def test_none_mode_shows_no_context_and_never_updates(make_agent):
    seen = []

    def fn(messages):
        if is_update(messages):
            return note("should not happen")
        seen.append(messages[0]["content"])
        return "x"

    agent = make_agent(model=fn)
    agent.set_context("existing note")
    none_agent = make_agent("a1", model=fn, context_mode="none")
    none_agent.run(["a", "b"])
    assert all("existing note" not in s for s in seen) and none_agent.context == "existing note"


def test_frozen_mode_updates_only_after_first_task(make_agent):
    agent = make_agent(model=two_step_model(), context_mode="frozen")
    result = agent.run(["a", "b", "c"])
    assert [r.update_status for r in result.records] == ["ok", None, None] and agent.context_version == 1


def test_limit_caps_tasks_and_endless_streams_work(make_agent):
    def endless():
        i = 0
        while True:
            yield f"task {i}"
            i += 1

    result = make_agent(model=two_step_model()).run(endless(), limit=3)
    assert len(result.records) == 3


@pytest.mark.parametrize("bad", ["just a string", {"prompt": "x"}])
def test_run_refuses_a_single_task_instead_of_a_stream(make_agent, bad):
    with pytest.raises(TaskFormatError, match="iterable of tasks"):
        make_agent().run(bad)


def test_bad_context_mode_is_refused(db_path, scripted):
    with pytest.raises(ValueError, match="context_mode"):
        LifecycleAgent(scripted, db_path, "x", context_mode="sometimes")


def test_set_context_respects_budget_and_rollback_restores(make_agent):
    agent = make_agent(context_budget=10)
    agent.set_context("short")
    with pytest.raises(ValueError, match="over the context budget of 10; nothing was written"):
        agent.set_context("far too long for this")
    agent.set_context("other")
    agent.rollback(1)
    assert agent.context == "short" and agent.context_version == 3


def test_an_edit_over_the_budget_once_its_delimiters_are_neutralised_is_refused_not_cut(make_agent):
    agent = make_agent(context_budget=20)  # the agent's own policy truncates; a person's edit never is
    text = CONTEXT_BEGIN + " abcde"
    assert len(text) <= 20
    with pytest.raises(ValueError, match="over the context budget of 20"):
        agent.set_context(text)
    assert agent.context_version == 0


def test_fork_gives_independent_agent(make_agent):
    agent = make_agent(model=two_step_model())
    agent.run(["a"])
    child = agent.fork("child")
    child.set_context("diverged")
    assert agent.context == "learned" and child.context == "diverged"


def test_arun_matches_run(db_path):
    tasks = [Task(prompt=f"q{i}", answer="1", id=f"t{i}") for i in range(3)]
    sync = LifecycleAgent(two_step_model(), db_path, "sync").run(tasks)
    async_result = asyncio.run(LifecycleAgent(two_step_model(), db_path, "async").arun(tasks))
    strip = lambda rs: [(r.task_id, r.reward, r.update_status, r.new_context_version) for r in rs.records]
    assert strip(sync) == strip(async_result)


def test_arun_agents_run_concurrently_over_one_model(db_path):
    from lifecycle_agent.agent import run_many
    from lifecycle_agent.models import CallableModel

    model = CallableModel(two_step_model())
    agents = [LifecycleAgent(model, db_path, f"agent-{i}") for i in range(4)]
    results = asyncio.run(run_many([(a, [f"q{j}" for j in range(5)]) for a in agents]))
    assert all(len(r.records) == 5 for r in results)
    assert all(a.context_version == 5 for a in agents)


def test_two_agents_in_threads_write_one_database(db_path):
    errors = []

    def work(agent_id):
        try:
            LifecycleAgent(ScriptedModel(), db_path, agent_id).run([f"q{j}" for j in range(30)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check = LifecycleAgent(ScriptedModel(), db_path, "t0")
    assert check.store.count_episodes("t0") == 60 and check.store.count_episodes("t1") == 60


def test_model_call_error_from_adapter_is_recorded_not_raised(make_agent):
    def fn(messages):
        raise ModelCallError("quota exceeded")

    record = make_agent(model=fn).run(["a"]).records[0]
    assert record.status == "failed" and "quota exceeded" in record.error


def test_chat_then_feedback_updates_context_once(make_agent):
    from lifecycle_agent.agent import drive
    from lifecycle_agent.errors import FeedbackConflictError

    agent = make_agent()
    episode_id, reply = drive(agent.chat_flow([{"role": "user", "content": "code of the apple?"}]), agent.model)
    record = drive(agent.feedback_flow(episode_id, 0.0, "The secret code of the apple is 12."), agent.model)
    assert record.new_context_version == 1 and "12" in agent.context
    with pytest.raises(FeedbackConflictError):
        drive(agent.feedback_flow(episode_id, 1.0, None), agent.model)


def test_feedback_whose_update_failed_is_released_for_a_retry(make_agent):
    from lifecycle_agent.agent import drive

    state = {"fail": True}

    def fn(messages):
        if is_update(messages) and state["fail"]:
            raise ConnectionError("down")
        return two_step_model()(messages)

    agent = make_agent(model=fn)
    episode_id, _ = drive(agent.chat_flow([{"role": "user", "content": "hi"}]), agent.model)
    assert drive(agent.feedback_flow(episode_id, 1.0, "good"), agent.model).update_status == "error"
    state["fail"] = False
    assert drive(agent.feedback_flow(episode_id, 1.0, "good"), agent.model).update_status == "ok"
    assert agent.context_version == 1


@pytest.mark.parametrize("messages", [[], [{"content": "no role"}], [{"role": "system", "content": "only system"}]])
def test_chat_refuses_malformed_messages(make_agent, messages):
    from lifecycle_agent.agent import drive

    agent = make_agent()
    with pytest.raises(TaskFormatError):
        drive(agent.chat_flow(messages), agent.model)


class Scripted(InteractiveTask):
    """A two-turn task whose step results come from a list (to test validation)."""

    max_turns = 2

    def __init__(self, results, task_id="scripted"):
        self.results, self.id = list(results), task_id

    def start(self):
        return "go"

    def step(self, action):
        return self.results.pop(0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (("obs", 1.0, True, {"not": "text"}), "feedback must be a string"),
        (("obs", float("nan"), True, None), "finite number"),
        (("obs", "high", True, None), "finite number"),
        ((["obs"], 1.0, True, None), "observation must be a string"),
        (("obs", 1.0), "expected \\(observation, reward, done, feedback\\)"),
    ],
)
def test_bad_step_results_are_recorded_as_task_failures(make_agent, bad, match):
    import re

    agent = make_agent(model=two_step_model())
    record = agent.run([Scripted([bad])]).records[0]
    assert record.status == "failed" and re.search(match, record.error)


def test_delimiters_in_a_reply_never_reach_the_next_solve_turn(make_agent):
    seen = []

    def fn(messages):
        if is_update(messages):
            return note("n")
        seen.append(messages)
        return f"{CONTEXT_BEGIN} sneaky"

    agent = make_agent(model=fn)
    agent.run([Scripted([("next", 0.0, False, None), ("", 1.0, True, "ok")])])
    assert len(seen) == 2 and all(CONTEXT_BEGIN not in m["content"] for m in seen[1])


def test_live_stream_is_not_read_ahead(make_agent):
    events = []

    def stream():
        for i in range(3):
            events.append(f"produce {i}")
            yield f"task {i}"

    make_agent(model=two_step_model()).run(stream(), on_record=lambda r: events.append(f"finished {r.position}"))
    assert events == ["produce 0", "finished 0", "produce 1", "finished 1", "produce 2", "finished 2"]


def test_repeated_update_errors_never_solve_the_task_twice(make_agent):
    calls = {"solve": 0}

    def fn(messages):
        if is_update(messages):
            raise ConnectionError("update endpoint down")
        calls["solve"] += 1
        return "Answer: 1"

    agent = make_agent(model=fn)
    for _ in range(6):
        agent.run([Task(prompt="q", answer="1", id="t")])
    assert calls["solve"] == 1


def test_create_false_refuses_unknown_agent(db_path, scripted):
    from lifecycle_agent.errors import AgentNotFoundError

    with pytest.raises(AgentNotFoundError, match="no agent 'ghost'"):
        LifecycleAgent(scripted, db_path, "ghost", create=False)


def test_solve_one_task_now_ignores_resume_state(make_agent):
    agent = make_agent(model=two_step_model())
    first = agent.solve(Task(prompt="q", answer="1", id="same"))
    again = agent.solve(Task(prompt="q", answer="1", id="same"))
    assert (first.reward, again.reward) == (1.0, 1.0) and again.position == 1 and agent.context_version == 2


def test_asolve_matches_solve(make_agent):
    agent = make_agent(model=two_step_model())
    record = asyncio.run(agent.asolve("hello", update=False))
    assert record.status == "ok" and record.update_status is None and agent.context_version == 0


def grid_mover(messages):
    """Moves down on every grid-navigation turn; its notes say so."""
    if is_update(messages):
        return note("keep moving")
    return "Move: down"


def first_observations(agent):
    return [e.messages[1]["content"] for e in agent.episodes(kind="solve")]


def grid_pack():
    from lifecycle_agent import envs

    # lenient answers: "Move: down" is a move (a fresh pack object, as after a restart)
    return envs.make("grid-navigation", answer_format="lenient").pack(seed=4, size=3)


def uninterrupted_observations(db_path):
    from lifecycle_agent.models import CallableModel

    whole = LifecycleAgent(CallableModel(grid_mover), db_path, "whole")
    whole.run(grid_pack().tasks)
    return first_observations(whole)


def test_resumed_pack_with_shared_state_sees_what_an_uninterrupted_one_sees(db_path):
    from lifecycle_agent.models import CallableModel

    resumed = LifecycleAgent(CallableModel(grid_mover), db_path, "resumed")
    resumed.run(grid_pack().tasks, limit=1)  # interrupted after task 0
    resumed.run(grid_pack().tasks)
    assert first_observations(resumed) == uninterrupted_observations(db_path)


def test_resume_between_a_solve_and_its_update_rebuilds_the_pack_state(db_path):
    from lifecycle_agent.models import CallableModel

    class PowerCut(BaseException):  # like KeyboardInterrupt: not a model failure to record
        pass

    def cut_at_the_first_update(messages):
        if is_update(messages):
            raise PowerCut  # the solve of task 0 is stored, its update is not
        return grid_mover(messages)

    interrupted = LifecycleAgent(CallableModel(cut_at_the_first_update), db_path, "resumed")
    with pytest.raises(PowerCut):
        interrupted.run(grid_pack().tasks)
    assert interrupted.store.task_state("resumed", interrupted.episodes(kind="solve")[0].task_id)[0] == "solved"
    resumed = LifecycleAgent(CallableModel(grid_mover), db_path, "resumed")
    resumed.run(grid_pack().tasks)
    assert first_observations(resumed) == uninterrupted_observations(db_path)


def test_tasks_without_replay_are_never_played_twice(make_agent):
    plays = []

    class Once(InteractiveTask):
        id = "once"
        max_turns = 1

        def start(self):
            plays.append("start")
            return "go"

        def step(self, action):
            return ("", 1.0, True, None)

    agent = make_agent(model=two_step_model())
    agent.run([Once()])
    agent.run([Once()])
    assert plays == ["start"]


# ---------------------------------------------------------------- a failed update: keep (deployment) or reset (training)
def test_a_failed_update_keeps_the_previous_context_by_default(make_agent):
    replies = iter([note("first notes"), "no block at all"])
    agent = make_agent(model=lambda m: next(replies) if is_update(m) else "Answer: 1", parse_policy="strict")
    result = agent.run([Task(prompt="q1", answer="1", id="t1"), Task(prompt="q2", answer="1", id="t2")])
    assert [r.update_status for r in result.records] == ["ok", "failed"]
    assert agent.context == "first notes" and result.records[1].new_context_version is None
    assert agent.episodes(kind="update")[1].metadata["on_failed_update"] == "keep"


def test_a_failed_update_under_reset_leaves_the_fixed_no_notes_text(make_agent):
    replies = iter([note("first notes"), "no block at all"])
    agent = make_agent(model=lambda m: next(replies) if is_update(m) else "Answer: 1",
                       parse_policy="strict", on_failed_update="reset")
    result = agent.run([Task(prompt="q1", answer="1", id="t1"), Task(prompt="q2", answer="1", id="t2")])
    assert result.records[1].update_status == "failed"
    assert agent.context == "No notes available." and result.records[1].new_context_version == 2
    update = agent.episodes(kind="update")[1]
    assert update.metadata["on_failed_update"] == "reset" and update.status == "failed"


def test_the_reset_text_is_what_the_next_solve_sees(make_agent):
    seen = []

    def model(messages):
        if is_update(messages):
            return "rambling without delimiters"
        seen.append(messages[0]["content"])
        return "Answer: 1"

    agent = make_agent(model=model, parse_policy="strict", on_failed_update="reset")
    agent.run([Task(prompt="q1", answer="1", id="t1"), Task(prompt="q2", answer="1", id="t2")])
    assert "No notes available." in seen[1]


def test_on_failed_update_is_stored_with_the_agent_and_checked(make_agent):
    agent = make_agent(model=two_step_model(), on_failed_update="reset")
    assert agent.store.get_agent(agent.agent_id).settings["on_failed_update"] == "reset"
    with pytest.raises(ValueError, match="on_failed_update"):
        make_agent(model=two_step_model(), agent_id="other", on_failed_update="wipe")


# ---------------------------------------------------------------- cod-v2 prefill for models that continue a reply
class PrefillModel:
    """A model that continues a final assistant message (records what it was given)."""

    def __init__(self, continuation):
        from lifecycle_agent.models.base import ChatModel, Generation

        outer = self

        class _M(ChatModel):
            model_id = "prefill-test"
            supports_prefill = True

            def generate(self, messages, *, temperature=None, max_new_tokens=None):
                outer.seen.append(messages)
                return Generation(text=continuation if is_update(messages) else "Answer: 1")

        self.seen: list = []
        self.model = _M()


def test_a_prefill_capable_model_gets_the_begin_line_and_its_continuation_is_parsed(make_agent):
    fake = PrefillModel("- the code is 7")
    agent = make_agent(model=fake.model, prompt_set="cod-v2", parse_policy="strict")
    record = agent.run([Task(prompt="q1", answer="1", id="t1")]).records[0]
    update_prompt = fake.seen[-1]
    assert update_prompt[-1] == {"role": "assistant", "content": CONTEXT_BEGIN + "\n", "prefill": True}
    assert record.update_status == "ok" and agent.context == "- the code is 7"
    stored = agent.episodes(kind="update")[0]
    assert stored.messages[-1]["content"] == CONTEXT_BEGIN + "\n- the code is 7"
    assert stored.metadata["prefill"] == CONTEXT_BEGIN + "\n"


def test_models_that_cannot_continue_a_reply_get_no_prefill(make_agent):
    seen = []

    def model(messages):
        seen.append(messages)
        return note("n") if is_update(messages) else "Answer: 1"

    agent = make_agent(model=model, prompt_set="cod-v2")
    agent.run([Task(prompt="q1", answer="1", id="t1")])
    assert seen[-1][-1]["role"] == "user"
    assert agent.context == "n"


def test_an_empty_or_mistyped_model_spec_fails_at_construction_before_anything_is_stored(db_path):
    from lifecycle_agent import LifecycleAgent
    from lifecycle_agent.errors import ModelSpecError
    from lifecycle_agent.store import Store

    for spec in ("", "scriptd", "openai:"):
        with pytest.raises(ModelSpecError, match="model spec"):
            LifecycleAgent(model=spec, db=db_path, agent_id="typo")
    with Store(db_path) as store:
        assert not store.has_agent("typo")


def test_history_gives_each_version_a_utc_datetime(make_agent):
    import datetime

    agent = make_agent(model=two_step_model())
    agent.run([Task(prompt="q1", answer="1", id="t1")])
    created = agent.history()[-1].created
    assert created.tzinfo == datetime.timezone.utc and abs(created.timestamp() - agent.history()[-1].created_at) < 1e-6


def test_a_pack_prints_what_it_is():
    from lifecycle_agent import envs

    assert repr(envs.make("fact-recall").pack(7, 4)) == "<Pack fact-recall/train/s7/cod4: 4 task(s) of fact-recall (cod packing)>"


# ---------------------------------------------------------------- replies are checked before anything is stored
@pytest.mark.parametrize("reply,field", [
    ({"text": "hi", "prompt_tokens": "lots"}, "prompt_tokens"),
    ({"text": "hi", "completion_tokens": -3}, "completion_tokens"),
    ({"text": "hi", "completion_ids": [1, "x"]}, "completion_ids"),
    ({"text": "hi", "logprobs": [float("nan")]}, "logprobs"),
    ({"text": "hi", "finish_reason": 7}, "finish_reason"),
])
def test_a_malformed_model_reply_fails_its_task_and_stores_nothing_of_it(make_agent, reply, field):
    agent = make_agent(model=lambda messages: reply)
    result = agent.run([Task(prompt="q1", answer="1", id="t1"), Task(prompt="q2", answer="1", id="t2")])
    assert [r.status for r in result.records] == ["failed", "failed"]
    assert f"invalid reply: {field} must be" in result.records[0].error
    episodes = agent.episodes()  # the store stays readable
    assert all(e.prompt_tokens is None and e.turns == [] for e in episodes)
    agent2 = make_agent(model=two_step_model(), agent_id=agent.agent_id)
    assert [r.status for r in agent2.run([Task(prompt="q3", answer="1", id="t3")]).records] == ["ok"]
