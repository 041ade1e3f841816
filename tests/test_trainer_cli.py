"""``lifecycle-agent train --lora``: bad input exits 2 with a clear message; a tiny run works end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lifecycle_agent.cli import main
from lifecycle_agent.cli.train import build_config, parse_trl_args
from test_trainer_helpers import one_torch_thread, smollm2_path, tiny_llama  # noqa: F401
from trainer.cod_config import CoDConfig
from trainer.errors import TrainConfigError


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return invoke


def test_lora_flag_is_required(cli, tmp_path):
    code, _, err = cli("train", "--output", tmp_path / "o")
    assert code == 2 and "pass exactly one of --lora" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group-size", "1"], "group_size: must be >= 2"),
        (["--pack-size", "1"], "pack_size: must be >= 2"),
        (["--env", "fact-recall,nope"], "unknown environment 'nope'"),
        (["--model", "openai:gpt-4o-mini"], "not a local trainable model"),
        (["--loss", "ppo"], "loss_type: must be one of"),
        (["--trl-arg", "temperature=1.0"], "temperature are set by the trainer"),
        (["--trl-arg", "novalue"], "expected KEY=VALUE"),
        (["--packing", "loop"], "packing: unknown packing 'loop'; packings: cod, ralph_sample, ralph_full, ralph"),
    ],
)
def test_bad_options_exit_2_with_the_reason(cli, tmp_path, args, message):
    code, _, err = cli("train", "--lora", "--output", tmp_path / "o", *args)
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "o").exists()  # nothing written


def test_packing_belongs_to_lora(cli, tmp_path):
    code, _, err = cli("train", "--sft", "--output", tmp_path / "o", "--packing", "ralph_full")
    assert code == 2 and "--packing belong(s) to --lora" in " ".join(err.split())


def test_the_packing_is_stored_with_the_run(tmp_path):
    config = build_config(tmp_path / "o", {"packing": "ralph"}, resume=False).validate()
    assert config.packing == "ralph_sample" and config.pack_schedule()[0]["packing"] == "ralph_sample"


def test_directory_holding_another_run_is_refused(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    CoDConfig(output_dir=str(out), group_size=8).save(out / "train_config.json")
    code, _, err = cli("train", "--lora", "--output", out, "--no-progress")
    assert code == 2 and "already holds a training run" in err and "--resume" in err


def test_resume_with_a_changed_option_is_refused(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    CoDConfig(output_dir=str(out), group_size=8).save(out / "train_config.json")
    code, _, err = cli("train", "--lora", "--output", out, "--resume", "--group-size", "4", "--no-progress")
    assert code == 2 and "group_size: 8 -> 4" in err


def test_resume_takes_unspecified_options_from_the_stored_run(tmp_path):
    CoDConfig(output_dir=str(tmp_path), group_size=8, max_steps=5).save(tmp_path / "train_config.json")
    config = build_config(tmp_path, {"max_steps": 9, "group_size": None}, resume=True)
    assert (config.group_size, config.max_steps, config.output_dir) == (8, 9, str(tmp_path))


def test_new_run_uses_the_defaults_for_unspecified_options(tmp_path):
    config = build_config(tmp_path, {"group_size": 6, "envs": None}, resume=False)
    assert config.group_size == 6 and config.envs == ["fact-recall"]


def test_trl_args_values_are_read_as_json_when_they_parse():
    assert parse_trl_args(["weight_decay=0.01", "optim=adamw_torch", "entropy_coef=1e-3"]) == {
        "weight_decay": 0.01, "optim": "adamw_torch", "entropy_coef": 0.001,
    }
    with pytest.raises(TrainConfigError, match="expected KEY=VALUE"):
        parse_trl_args(["=3"])


def test_cli_import_stays_light():
    code = "import sys, lifecycle_agent.cli; print(sorted(m for m in ('torch', 'trl', 'peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tiny_run_from_the_command_line(cli, tmp_path, tiny_llama):
    pytest.importorskip("trl")
    out = tmp_path / "o"
    code, stdout, err = cli(
        "train", "--lora", "--model", f"hf:{tiny_llama}", "--env", "reply-length", "--steps", "1", "--group-size", "2",
        "--pack-size", "2", "--lr", "1e-3", "--max-new-tokens", "8", "--output", out, "--device", "cpu",
        "--no-report", "--json",
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["steps"] == 1 and (out / "adapter_model.safetensors").is_file()
    command = json.loads((out / "train_config.json").read_text())["command"]
    # the old spellings are aliases; the stored command line speaks the field names
    assert command.startswith("lifecycle-agent train --lora --output-dir ") and "--group-size 2" in command
    assert "--max-steps 1" in command and "--learning-rate 0.001" in command and "--envs reply-length" in command


def test_a_failed_start_leaves_the_output_directory_for_a_corrected_retry(cli, tmp_path, tiny_llama):
    pytest.importorskip("trl")
    out = tmp_path / "runs" / "o"
    common = ["train", "--lora", "--env", "reply-length", "--steps", "1", "--group-size", "2", "--pack-size", "2",
              "--max-new-tokens", "8", "--output", out, "--device", "cpu", "--no-report", "--no-progress"]
    for bad, message in (
        (["--model", f"hf:{tmp_path / 'missing'}"], "no such directory"),  # fails loading the model
        (["--model", f"hf:{tiny_llama}", "--trl-arg", "optim=bogus"], "GRPOConfig refused them: bogus is not a valid"),
        (["--model", f"hf:{tiny_llama}", "--lora-target", "nope_proj"], "Target modules {'nope_proj'} not found"),
    ):
        code, _, err = cli(*common, *bad)
        assert code == 2 and message in " ".join(err.split())
        assert not (tmp_path / "runs").exists()  # no train_config.json, not even the directory
    code, _, err = cli(*common, "--model", f"hf:{tiny_llama}")
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file()
