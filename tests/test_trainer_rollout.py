"""Rollout collection through LifecycleAgent, training rows and batch credit (no torch needed)."""

from __future__ import annotations

import pytest

from lifecycle_agent.models.scripted import ScriptedModel
from lifecycle_agent.store import Store
from test_trainer_helpers import TokenScriptedModel
from trainer.credit import batch_advantages
from trainer.rollout import (
    PackSpec,
    RolloutCollector,
    RolloutDataError,
    RolloutSettings,
    read_rollout,
    rollout_metrics,
    summarize,
    training_rows,
)


def collector(model, store=None, pack_size=3, keep=True, **settings):
    return RolloutCollector(
        model, store or Store(":memory:"), RolloutSettings(pack_size=pack_size, temperature=0.6, max_new_tokens=16, **settings),
        id_prefix="t", keep=keep,
    )


def test_each_rollout_has_s_solves_and_s_minus_1_updates():
    (rollout,) = collector(TokenScriptedModel()).collect([PackSpec("fact-recall", "easy", 3)])
    assert [e.position for e in rollout.solves] == [0, 1, 2]
    assert [e.position for e in rollout.updates] == [0, 1]
    assert all(e.kind == "solve" for e in rollout.solves) and all(e.kind == "update" for e in rollout.updates)


@pytest.mark.parametrize("packing, instance", [("ralph_sample", None), ("ralph_full", 1), ("ralph_full", 2)])
def test_a_ralph_rollout_repeats_the_task_its_spec_names(packing, instance):
    from lifecycle_agent import envs

    store = Store(":memory:")
    (rollout,) = collector(TokenScriptedModel(), store).collect([PackSpec("fact-recall", "easy", 3, packing, instance)])
    solves = store.episodes(rollout.agent_id, kind="solve")
    prompts = [next(m["content"] for m in row.messages if m["role"] == "user") for row in solves]
    expected = envs.make("fact-recall", preset="easy").pack(3, 3).tasks[instance or 0].start()
    assert len(rollout.solves) == 3 and all(expected in prompt for prompt in prompts)


def test_group_rollouts_fork_from_one_snapshot_and_run_the_same_pack():
    store = Store(":memory:")
    c = collector(TokenScriptedModel(), store, initial_context="start note")
    rollouts = c.collect([PackSpec("fact-recall", "easy", 7)] * 3)
    agents = [store.get_agent(r.agent_id) for r in rollouts]
    assert len({a.forked_from for a in agents}) == 1
    assert all(store.get_version(a.agent_id, 0).text == "start note" for a in agents)
    task_ids = [[row.task_id for row in store.episodes(r.agent_id, kind="solve")] for r in rollouts]
    assert task_ids[0] == task_ids[1] == task_ids[2]
    assert task_ids[0][0].startswith("fact-recall/easy/s7/")


def test_rollouts_come_back_in_input_order_across_packs():
    specs = [PackSpec("fact-recall", "easy", 1), PackSpec("fact-recall", "easy", 2), PackSpec("fact-recall", "easy", 1)]
    rollouts = collector(TokenScriptedModel()).collect(specs)
    assert [r.pack for r in rollouts] == specs
    assert rollouts[0].agent_id.rsplit("-r", 1)[0] == rollouts[2].agent_id.rsplit("-r", 1)[0]


def test_scripted_note_taker_scores_after_the_first_task():
    (rollout,) = collector(TokenScriptedModel()).collect([PackSpec("fact-recall", "easy", 3)])
    assert rollout.solve_rewards == [0.0, 1.0, 1.0]  # easy: one item, its code learnt from the first feedback
    assert rollout.update_rewards == [0.0, 0.0]


def test_update_without_delimiters_gets_the_parse_penalty_and_resets_the_context():
    (rollout,) = collector(TokenScriptedModel(update_format=False)).collect([PackSpec("fact-recall", "easy", 3)])
    assert [e.status for e in rollout.updates] == ["failed", "failed"]  # strict parsing, the training default
    assert rollout.update_rewards == [-0.1, -0.1]
    assert rollout.solve_rewards[1] == 0.0  # the context was reset to "No notes available.": the bad update cost
    with Store(":memory:") as store:
        c = collector(TokenScriptedModel(update_format=False), store=store)
        (again,) = c.collect([PackSpec("fact-recall", "easy", 3)])
        rows = store.episodes(again.agent_id, kind="update", limit=None)
        assert [r.metadata["on_failed_update"] for r in rows] == ["reset", "reset"]
        assert store.head(again.agent_id).text == "No notes available."


def test_lenient_keep_rollouts_penalise_a_format_miss_but_keep_its_note():
    c = collector(TokenScriptedModel(update_format=False), parse_policy="lenient", on_failed_update="keep")
    (rollout,) = c.collect([PackSpec("fact-recall", "easy", 3)])
    assert [e.status for e in rollout.updates] == ["format_miss", "format_miss"]
    assert rollout.update_rewards == [-0.1, -0.1]
    assert rollout.solve_rewards[1] == 1.0  # lenient parsing still kept the note


def test_custom_parse_penalty_is_used():
    c = collector(TokenScriptedModel(update_format=False), parse_failure_reward=-0.5)
    (rollout,) = c.collect([PackSpec("fact-recall", "easy", 3)])
    assert rollout.update_rewards == [-0.5, -0.5]


def test_turns_carry_the_recorded_token_ids_and_logprobs():
    (rollout,) = collector(TokenScriptedModel()).collect([PackSpec("fact-recall", "easy", 2)])
    turn = rollout.solves[0].turns[0]
    assert turn.prompt_ids and turn.completion_ids
    assert turn.logprobs == [-0.5] * len(turn.completion_ids)


def test_model_without_token_ids_is_refused_for_training():
    with pytest.raises(RolloutDataError, match="recorded no token ids"):
        collector(ScriptedModel()).collect([PackSpec("fact-recall", "easy", 2)])


def test_rollout_agents_are_deleted_when_not_kept():
    store = Store(":memory:")
    collector(TokenScriptedModel(), store, keep=False).collect([PackSpec("fact-recall", "easy", 2)] * 2)
    assert store.list_agents() == []


def test_training_rows_broadcast_each_episode_advantage_over_its_turns():
    (rollout,) = collector(TokenScriptedModel()).collect([PackSpec("fact-recall", "easy", 3)])
    rows = training_rows(rollout, [0.1, 0.2, 0.3], [-0.4, -0.5])
    assert [(r.kind, r.position, r.advantage) for r in rows] == [
        ("solve", 0, 0.1), ("solve", 1, 0.2), ("solve", 2, 0.3), ("update", 0, -0.4), ("update", 1, -0.5),
    ]
    assert rows[0].completion_ids == rollout.solves[0].turns[0].completion_ids


def test_multi_turn_episode_gives_one_row_per_turn_with_the_same_advantage():
    (rollout,) = collector(TokenScriptedModel(), pack_size=2).collect([PackSpec("reply-length", "train", 1)])
    assert len(rollout.solves[0].turns) == 1
    from lifecycle_agent import envs

    envs.register("reply-length-2", lambda preset="train", **o: envs.make("reply-length", preset, turns=2, **o), overwrite=True)
    (rollout,) = collector(TokenScriptedModel(), pack_size=2).collect([PackSpec("reply-length-2", "train", 1)])
    rows = training_rows(rollout, [0.7, 0.1], [0.2])
    solve0 = [r for r in rows if r.kind == "solve" and r.position == 0]
    assert len(solve0) == 2 and {r.advantage for r in solve0} == {0.7}
    assert solve0[0].prompt_ids != solve0[1].prompt_ids  # the second turn's prompt holds the first exchange


def test_training_rows_refuse_a_wrong_number_of_advantages():
    (rollout,) = collector(TokenScriptedModel(), pack_size=2).collect([PackSpec("fact-recall", "easy", 1)])
    with pytest.raises(ValueError, match="2 solve episodes but 1 advantages"):
        training_rows(rollout, [0.1], [0.0])


def test_missing_solve_episode_is_an_error():
    with pytest.raises(RolloutDataError, match=r"no solve episode at position\(s\) \[0, 1\]"):
        read_rollout([], PackSpec("fact-recall", "easy", 1), "agent-x", 2)


def test_batch_advantages_group_rollouts_by_pack():
    solve_adv, update_adv, temperature = batch_advantages(
        ["a", "b", "a", "b"], [[1, 1], [0, 0], [0, 0], [0, 0]], [[0], [0], [0], [0]]
    )
    assert solve_adv == [[0.5, 0.5], [0.0, 0.0], [-0.5, -0.5], [0.0, 0.0]]
    assert update_adv == [[0.25], [0.0], [-0.25], [0.0]]
    assert temperature is None


def test_batch_reweighting_uses_episode_token_counts():
    solve_adv, update_adv, temperature = batch_advantages(
        ["a", "a"], [[1, 0], [0, 0]], [[0], [0]], solve_tokens=[[1, 1], [50, 50]], update_tokens=[[1], [50]],
        reweight=True,
    )
    assert temperature is not None
    assert solve_adv[0][0] > 0.25 and -0.25 < solve_adv[1][0] < 0  # before re-weighting: +0.25 and -0.25


def test_batch_reweighting_needs_token_counts():
    with pytest.raises(ValueError, match="needs the completion tokens"):
        batch_advantages(["a", "a"], [[1, 0], [0, 0]], [[0], [0]], reweight=True)


def test_rollout_metrics_report_reward_by_position_and_parse_failures():
    good = collector(TokenScriptedModel()).collect([PackSpec("fact-recall", "easy", 3)])
    bad = collector(TokenScriptedModel(update_format=False)).collect([PackSpec("fact-recall", "easy", 3)])
    metrics = rollout_metrics([summarize(r) for r in good + bad])
    # the bad rollout's failed updates reset its context, so only the good one scores at position 2
    assert metrics["reward/fact-recall/pos0"] == 0.0 and metrics["reward/fact-recall/pos2"] == 0.5
    assert metrics["update/parse_failure_rate"] == 0.5
    assert metrics["update/format_miss_rate"] == 0.0  # strict parsing: a reply without a block is failed
    assert metrics["tokens/completion"] > 0
