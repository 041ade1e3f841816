"""The real embedded model end to end through ``LifecycleAgent.run`` (slow: loads SmolLM2-135M)."""

import pytest

from lifecycle_agent import LifecycleAgent, envs

pytestmark = pytest.mark.slow


def test_smollm2_runs_a_pack_through_the_runtime(db_path):
    pack = envs.make("fact-recall", preset="easy").pack(seed=3, size=2)
    agent = LifecycleAgent(db=db_path, agent_id="real", max_new_tokens=32, temperature=0.0)
    result = agent.run(pack.tasks)

    assert agent.model.model_id == "smollm2"
    assert [r.status for r in result.records] == ["ok", "ok"], [r.error for r in result.records]
    assert all(r.reward in (0.0, 1.0) for r in result.records)
    assert all(r.update_status in ("ok", "format_miss", "failed") for r in result.records)

    solve = agent.episodes(kind="solve")[0]
    turn = solve.turns[0]
    assert len(turn["completion_ids"]) == len(turn["logprobs"]) == turn["completion_tokens"] > 0
    assert all(lp <= 0.0 for lp in turn["logprobs"])
    assert len(turn["prompt_ids"]) == turn["prompt_tokens"] > 0

    versions = agent.history()
    written = [r.new_context_version for r in result.records if r.new_context_version is not None]
    assert [v.version for v in versions] == list(range(len(written) + 1))
    assert result.records[1].context_version == (result.records[0].new_context_version or 0)
