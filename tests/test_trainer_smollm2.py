"""CPU smoke test on the real SmolLM2-135M-Instruct with LoRA (slow: about 2-4 minutes on 2 cores)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from test_trainer_helpers import smollm2_path  # noqa: E402,F401  (registers reply-length; converts SmolLM2 once)
from trainer.cod_config import CoDConfig  # noqa: E402
from trainer.cod_trainer import train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smollm2_path):
    out = tmp_path_factory.mktemp("smollm2") / "run"
    # reply-length rewards vary with every sampled reply, so the two rollouts of a pack always differ somewhere.
    config = CoDConfig(
        output_dir=str(out), model="smollm2", envs=["reply-length"], max_steps=2, group_size=2, pack_size=2,
        max_new_tokens=24, learning_rate=1e-3, save_steps=1, report=False, progress=False, device="cpu",
    )
    return out, train(config)


def test_two_steps_on_smollm2_give_a_finite_loss_and_a_nonzero_grad_norm(smoke_run):
    out, result = smoke_run
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert result.steps == 2 and len(steps) == 2
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert any(s["grad_norm"] > 0 for s in steps)


def test_smollm2_adapter_weights_change(smoke_run):
    from safetensors.torch import load_file

    out, _ = smoke_run
    lora_b = [v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(v.abs().max().item() > 0 for v in lora_b)


def test_run_loads_the_smollm2_adapter_and_generates(smoke_run, tmp_path, capsys, monkeypatch):
    from lifecycle_agent.cli import main

    out, _ = smoke_run
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", f"smollm2@{out}", "--env", "fact-recall", "-n", "1", "--db", str(tmp_path / "a.db"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0
    assert data["records"][0]["completion_tokens"] > 0 and data["records"][0]["answer"]
