"""End-to-end training on a tiny random Llama: outputs, adapter, resume, output-dir rules, NaN stop, evaluation."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from lifecycle_agent.store import Store  # noqa: E402
from test_trainer_helpers import one_torch_thread, smollm2_path, tiny_config, tiny_llama  # noqa: E402,F401
from trainer import cod_trainer  # noqa: E402
from trainer.cod_trainer import train  # noqa: E402
from trainer.errors import NonFiniteLossError, OutputDirError  # noqa: E402


def steps_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def lora_b(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k}


def solve_task_ids(out):
    """Solve-episode task ids of the stored rollouts, in the order they were run."""
    with Store(str(out / "rollouts.db")) as store:
        rows = store._read("SELECT task_id FROM episodes WHERE kind = 'solve' ORDER BY episode_id")
    return [r["task_id"] for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """One 2-step run (G=2, S=2) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = train(tiny_config(out, tiny_llama, progress=True), command="lifecycle-agent train --lora ...")
    return out, result


def test_two_steps_give_a_finite_loss_and_a_nonzero_grad_norm(trained):
    out, result = trained
    steps = steps_of(out)
    assert [s["step"] for s in steps] == [1, 2] and result.steps == 2
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert any(s["grad_norm"] > 0 for s in steps)


def test_training_changes_the_adapter_weights(trained):
    out, _ = trained
    weights = lora_b(out)
    assert weights and any(w.abs().max().item() > 0 for w in weights.values())  # LoRA B starts at zero


def test_metrics_hold_loss_rewards_by_position_parse_failures_tokens_and_seconds(trained):
    out, _ = trained
    step = steps_of(out)[0]
    for key in ("loss", "grad_norm", "learning_rate", "reward/reply-length/pos0", "reward/reply-length/pos1",
                "update/parse_failure_rate", "tokens/completion", "tokens/prompt", "time/rollout_s", "time/step_s"):
        assert key in step, key


def test_run_directory_holds_adapter_checkpoints_and_exact_config(trained, tiny_llama):
    out, _ = trained
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["config"]["group_size"] == 2 and stored["config"]["model"] == f"hf:{tiny_llama}"
    assert stored["versions"]["trl"].startswith("1.16.") and stored["command"].startswith("lifecycle-agent train")


def test_rollouts_are_kept_in_the_run_store(trained):
    out, _ = trained
    ids = solve_task_ids(out)
    assert len(ids) == 2 * 2 * 2  # steps x G x S
    assert ids[0].startswith("reply-length/train/s0/") and ids[-1].startswith("reply-length/train/s1/")


def test_run_loads_the_trained_adapter_and_generates(trained, tiny_llama, tmp_path, capsys, monkeypatch):
    from lifecycle_agent.cli import main

    out, _ = trained
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", f"hf:{tiny_llama}@{out}", "--env", "fact-recall", "-n", "1",
              "--db", str(tmp_path / "a.db"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0
    assert data["records"][0]["completion_tokens"] > 0


def test_a_directory_holding_a_run_is_refused(trained, tiny_llama):
    out, _ = trained
    with pytest.raises(OutputDirError, match="already holds a training run; pass --resume .* or --overwrite"):
        train(tiny_config(out, tiny_llama))


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model": "hf:/nonexistent/model"}, "no such directory"),
        ({"trl_args": {"optim": "bogus"}}, "GRPOConfig refused them: bogus is not a valid OptimizerNames"),
        pytest.param({"trl_args": {"optim": "adamw_bnb_8bit"}}, "You need to install `bitsandbytes`", marks=pytest.mark.skipif(
            importlib.util.find_spec("bitsandbytes") is not None, reason="needs bitsandbytes not installed")),
        ({"lora_target": "nope_proj"}, "Target modules {'nope_proj'} not found"),
    ],
    ids=["missing-model", "unknown-optimizer", "uninstalled-optimizer", "unknown-lora-target"],
)
def test_a_failed_start_with_overwrite_keeps_the_previous_run(trained, tiny_llama, tmp_path, bad, message):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = tree(out)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(tiny_config(out, tiny_llama, **bad), overwrite=True)
    assert tree(out) == before  # the run is intact, so --resume or a corrected --overwrite still work
    assert cod_trainer.check_output_dir(tiny_config(out, tiny_llama), resume=True, overwrite=False)


def test_resume_with_different_options_is_refused(trained, tiny_llama):
    out, _ = trained
    with pytest.raises(OutputDirError, match=r"(?s)different options.*group_size: 2 -> 4"):
        train(tiny_config(out, tiny_llama, group_size=4), resume=True)


def test_resume_and_overwrite_together_are_refused(trained, tiny_llama):
    out, _ = trained
    with pytest.raises(OutputDirError, match="not both"):
        train(tiny_config(out, tiny_llama), resume=True, overwrite=True)


def test_resume_without_a_run_is_refused(tmp_path, tiny_llama):
    with pytest.raises(OutputDirError, match="nothing to resume"):
        train(tiny_config(tmp_path / "empty", tiny_llama), resume=True)


def test_a_directory_of_other_files_is_never_overwritten(tmp_path, tiny_llama):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds no training run"):
        train(tiny_config(tmp_path, tiny_llama), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_starts_the_run_over(tmp_path, tiny_llama):
    out = tmp_path / "out"
    train(tiny_config(out, tiny_llama, max_steps=1))
    (out / "stale.txt").write_text("x")
    result = train(tiny_config(out, tiny_llama, max_steps=1), overwrite=True)
    assert result.steps == 1 and not (out / "stale.txt").exists()
    assert [s["step"] for s in steps_of(out)] == [1]


class InterruptAt(TrainerCallback):
    """Raises KeyboardInterrupt when step ``step`` begins (as Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_from_its_checkpoint_with_the_same_pack_order(tmp_path, tiny_llama):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny_config(straight, tiny_llama, max_steps=3))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(interrupted, tiny_llama, max_steps=3), callbacks=[InterruptAt(2)])
    assert (interrupted / "checkpoint-2").is_dir() and not (interrupted / "checkpoint-3").exists()
    result = train(tiny_config(interrupted, tiny_llama, max_steps=3), resume=True)
    assert result.steps == 3 and result.resumed_from.endswith("checkpoint-2")
    assert [s["step"] for s in steps_of(interrupted)] == [1, 2, 3]
    packs = lambda out: [task_id.rsplit("/", 1)[0] for task_id in solve_task_ids(out)]  # noqa: E731
    assert packs(interrupted) == packs(straight)


def test_resume_can_extend_the_number_of_steps(tmp_path, tiny_llama):
    out = tmp_path / "out"
    train(tiny_config(out, tiny_llama, max_steps=1))
    result = train(tiny_config(out, tiny_llama, max_steps=2), resume=True)
    assert result.steps == 2 and [s["step"] for s in steps_of(out)] == [1, 2]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama, monkeypatch):
    real = cod_trainer.cod_policy_loss_sum
    broken = {"now": False}

    class BreakAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            broken["now"] = state.global_step >= 1

    def nan_once_broken(*args, **kwargs):
        loss, kept = real(*args, **kwargs)
        return (loss * float("nan"), kept) if broken["now"] else (loss, kept)

    monkeypatch.setattr(cod_trainer, "cod_policy_loss_sum", nan_once_broken)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 2.*checkpoint-1.*--resume"):
        train(tiny_config(out, tiny_llama, max_steps=3), callbacks=[BreakAtStep2()])
    assert not (out / "checkpoint-2").exists()
    assert all(torch.isfinite(w).all() for w in lora_b(out / "checkpoint-1").values())


def test_eval_every_logs_held_out_curves_and_the_report_compares_base_and_adapter(tmp_path, tiny_llama):
    out = tmp_path / "out"
    result = train(tiny_config(out, tiny_llama, max_steps=2, eval_every=1, eval_packs=2, report=True))
    history = [json.loads(line) for line in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["base"]) for h in history] == [(0, True), (1, False), (2, False)]
    assert "eval/reply-length/pos0" in steps_of(out)[0]
    assert result.before["base"] is True and result.after["step"] == 2
    report = (out / "report.md").read_text()
    assert "| reply-length | 0 |" in report and "| reply-length | mean |" in report
    assert (out / "report.png").stat().st_size > 1000


def test_gradient_accumulation_gives_the_same_gradient_as_one_micro_batch(tmp_path, tiny_llama):
    one = train(tiny_config(tmp_path / "one", tiny_llama, max_steps=1, group_size=2))
    two = train(tiny_config(tmp_path / "two", tiny_llama, max_steps=1, group_size=2, gradient_accumulation_steps=2))
    norm_one, norm_two = steps_of(tmp_path / "one")[0]["grad_norm"], steps_of(tmp_path / "two")[0]["grad_norm"]
    assert one.steps == two.steps == 1
    assert norm_one > 0 and norm_two == pytest.approx(norm_one, rel=1e-3)


def test_trl_loss_with_kl_against_the_base_model_trains(tmp_path, tiny_llama):
    out = tmp_path / "out"
    train(tiny_config(out, tiny_llama, max_steps=1, loss_type="grpo", beta=0.1))
    step = steps_of(out)[0]
    assert math.isfinite(step["loss"]) and "kl" in step


def test_two_processes_share_the_rollouts_of_a_pack(tmp_path, tiny_llama):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "lifecycle_agent", "train", "--lora", "--model", f"hf:{tiny_llama}",
         "--env", "test_trainer_helpers:ReplyLength", "--steps", "2", "--group-size", "2", "--pack-size", "2",
         "--max-new-tokens", "12", "--lr", "1e-2", "--output", str(out), "--no-report", "--no-progress",
         "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for db in ("rollouts.db", "rollouts-rank1.db"):  # each process ran one rollout of every pack
        with Store(str(out / db)) as store:
            assert len([a for a in store.list_agents() if re.search(r"-r\d+$", a.agent_id)]) == 2
    # one rollout per process: only rewards gathered across processes give a non-zero group advantage
    assert any(step["grad_norm"] > 0 for step in steps_of(out))


def test_progress_shows_loss_rewards_by_position_and_parse_failures():
    from trainer.callbacks import progress_status

    logs = {"loss": 0.0123, "reward/fact-recall/pos1": 0.5, "reward/fact-recall/pos0": 0.25, "reward/fact-recall/mean": 0.4,
            "update/parse_failure_rate": 0.75}
    assert progress_status(logs) == "loss 0.0123 | fact-recall 0.25 0.50 | parse fail 0.75"
