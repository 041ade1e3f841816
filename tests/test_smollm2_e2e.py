"""The real embedded model end to end through ``LifecycleAgent.run`` (slow: loads SmolLM2-135M)."""

import pytest

from lifecycle_agent import LifecycleAgent, envs

pytestmark = pytest.mark.slow


def test_smollm2_runs_a_pack_through_the_runtime(db_path):
    pack = envs.make("fact-recall", preset="easy").pack(seed=3, size=2)
    agent = LifecycleAgent(model="smollm2", db=db_path, agent_id="real", max_new_tokens=32, temperature=0.0)
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


def test_the_default_model_is_smollm2_with_the_shipped_adapter(db_path):
    agent = LifecycleAgent(db=db_path, agent_id="default-model", max_new_tokens=48, temperature=0.0)
    pack = envs.make("fact-recall").pack(seed=123_456, size=3)
    result = agent.run(pack.tasks)
    assert agent.model.model_id == "smollm2-cod" and agent.model.supports_prefill
    assert [r.status for r in result.records] == ["ok"] * 3
    # the shipped adapter writes delimited notes holding the code the feedback revealed
    first = pack.tasks[0]
    assert result.records[0].update_status == "ok"
    assert first.code in agent.history()[1].text


def test_cli_run_without_a_model_uses_smollm2_cod(tmp_path, capsys, monkeypatch):
    from lifecycle_agent.cli import main
    from lifecycle_agent.store import Store

    monkeypatch.setenv("COLUMNS", "120")
    db = str(tmp_path / "q.db")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--env", "fact-recall", "-n", "2", "--seed", "7", "--max-new-tokens", "48", "--db", db])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "feedback:" in out and "prompt:" in out
    with Store(db) as store:
        assert {e.model_id for e in store.episodes("default", limit=None)} == {"smollm2-cod"}
