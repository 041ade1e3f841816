"""``train --sft`` (warm start by distillation) end to end on a tiny random model, and its refusals."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from lifecycle_agent.cli import main  # noqa: E402
from test_trainer_helpers import one_torch_thread, smollm2_path, tiny_config, tiny_llama  # noqa: E402,F401
from trainer.cod_config import CoDConfig  # noqa: E402
from trainer.distill import TeacherError, distill  # noqa: E402
from trainer.distill_config import DistillConfig  # noqa: E402
from trainer.errors import TrainConfigError  # noqa: E402


def tiny_distill(out, tiny_llama, **overrides):
    options = dict(output_dir=str(out), model=f"hf:{tiny_llama}", envs=["fact-recall"], packs=3, max_steps=2,
                   batch_size=4, learning_rate=1e-2, report=False, device="cpu")
    options.update(overrides)
    return DistillConfig(**options)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("sft") / "out"
    return out, distill(tiny_distill(out, tiny_llama), command="lifecycle-agent train --sft ...")


def test_sft_writes_an_adapter_the_local_model_loads_and_runs(distilled, tiny_llama):
    from lifecycle_agent.models.local import LocalModel

    out, result = distilled
    assert result.steps == 2 and result.packs_kept == 3 and result.rows > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = LocalModel.from_pretrained(tiny_llama, adapter=out, device="cpu", max_new_tokens=4)
    try:
        assert isinstance(model.generate([{"role": "user", "content": "hi"}]).text, str)
    finally:
        model.close()


def test_sft_adapter_weights_are_saved_in_float16_and_were_trained(distilled):
    from safetensors.torch import load_file

    out, _ = distilled
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero


def test_sft_rows_are_the_teachers_updates_and_rewarded_solves(distilled):
    out, result = distilled
    rows = [json.loads(line) for line in (out / "sft_rows.jsonl").read_text().splitlines()]
    assert len(rows) == result.rows
    updates = [r for r in rows if r["kind"] == "update"]
    solves = [r for r in rows if r["kind"] == "solve"]
    assert len(updates) == 3 * 3  # 3 packs x (S-1) updates
    assert all("<<<END CONTEXT>>>" in r["completion"][0]["content"] for r in updates)
    assert solves and all(r["completion"][0]["content"].startswith("Answer: ") for r in solves)
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)


def test_sft_records_its_config_and_demonstrations(distilled):
    out, _ = distilled
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["method"] == "sft" and stored["config"]["teacher"] == "oracle" and stored["packs_kept"] == 3
    assert (out / "demonstrations.db").is_file() and (out / "metrics.jsonl").is_file()


def test_grpo_continues_from_the_sft_adapter(distilled, tiny_llama, tmp_path):
    from trainer.cod_trainer import train

    sft_out, _ = distilled
    out = tmp_path / "grpo"
    train(tiny_config(out, tiny_llama, max_steps=1, init_adapter=str(sft_out), prompt_set="cod-v2"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8  # the SFT adapter's rank, not the GRPO default of 16


def test_a_teacher_spec_that_fails_to_load_is_a_clear_error(tmp_path, tiny_llama):
    with pytest.raises(TeacherError, match="teacher 'py:no_such_module_xyz:fn' could not be loaded"):
        distill(tiny_distill(tmp_path / "out", tiny_llama, teacher="py:no_such_module_xyz:fn"))
    assert not (tmp_path / "out").exists()


def test_a_teacher_whose_notes_never_help_trains_nothing(tmp_path, tiny_llama, monkeypatch):
    # well-formed notes that hold nothing useful: no later task becomes solvable
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "useless_teacher.py").write_text(
        "from lifecycle_agent.models.scripted import is_update\n"
        "def reply(messages):\n"
        "    return '<<<CONTEXT>>>\\n- Nothing to note.\\n<<<END CONTEXT>>>' if is_update(messages) else 'Answer: 0'\n"
    )
    monkeypatch.syspath_prepend(str(teachers))
    out = tmp_path / "runs" / "out"
    (tmp_path / "runs").mkdir()
    with pytest.raises(TeacherError, match="never helped: 0 of 3 packs kept"):
        distill(tiny_distill(out, tiny_llama, teacher="py:useless_teacher:reply"))
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []  # no demonstrations left behind


def test_a_teacher_that_fails_every_call_says_so(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "broken_teacher.py").write_text("def reply(messages):\n    raise RuntimeError('endpoint down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TeacherError, match="failed on every demonstration pack.*endpoint down"):
        distill(tiny_distill(tmp_path / "out", tiny_llama, teacher="py:broken_teacher:reply"))


def test_an_oracle_teacher_needs_an_environment_with_a_reference_policy(tmp_path, tiny_llama):
    from lifecycle_agent import envs
    from lifecycle_agent.envs.fact_recall import FactRecall

    class Silent(FactRecall):  # built-ins gain reference policies: this one never has one
        name = "silent-recall"
        has_reference_policy = False

    envs.register("silent-recall", Silent)
    try:
        with pytest.raises(TrainConfigError, match="no reference note-writer"):
            tiny_distill(tmp_path / "out", tiny_llama, envs=["silent-recall"]).validate()
    finally:
        envs.unregister("silent-recall")


@pytest.mark.parametrize("option,value,message", [
    ("packs", 0, "packs: must be >= 1"), ("learning_rate", 0.0, "learning_rate: must be > 0"),
    ("prompt_set", "cod-v9", "unknown prompt set"), ("save_dtype", "int8", "save_dtype"),
    ("eval_seed", 0, "overlap the demonstration pack seeds"), ("model", "openai:gpt", "not a local trainable model"),
])
def test_bad_sft_options_name_the_option(tmp_path, tiny_llama, option, value, message):
    with pytest.raises((TrainConfigError, ValueError), match=message):
        tiny_distill(tmp_path / "out", tiny_llama, **{option: value}).validate()


def test_init_adapter_must_be_an_adapter_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(TrainConfigError, match="not a LoRA adapter directory"):
        CoDConfig(output_dir=str(tmp_path / "o"), init_adapter=str(tmp_path)).validate()
    with pytest.raises(TrainConfigError, match="is not a directory"):
        CoDConfig(output_dir=str(tmp_path / "o"), init_adapter=str(tmp_path / "missing")).validate()


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out + err


def test_cli_init_adapter_pointing_at_a_plain_directory_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_cli(capsys, "train", "--lora", "--init-adapter", tmp_path, "--output", tmp_path / "o")
    assert code == 2 and "not a LoRA adapter directory" in text


@pytest.mark.parametrize("flags", [[], ["--lora", "--sft"]])
def test_cli_needs_exactly_one_training_method(tmp_path, capsys, monkeypatch, flags):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_cli(capsys, "train", *flags, "--output", tmp_path / "o")
    assert code == 2 and "exactly one of --lora" in text


def test_cli_refuses_grpo_options_with_sft(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_cli(capsys, "train", "--sft", "--group-size", "4", "--output", tmp_path / "o")
    assert code == 2 and "--group-size" in text and "belong" in text


def test_cli_sft_with_a_failing_teacher_exits_2_with_the_reason(tmp_path, capsys, monkeypatch, tiny_llama):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_cli(capsys, "train", "--sft", "--model", f"hf:{tiny_llama}", "--teacher", "py:no_such_module_xyz:fn",
                         "--output", tmp_path / "o", "--packs", "2", "--no-report")
    assert code == 2 and "could not be loaded" in text


def test_a_mistyped_teacher_spec_is_refused_before_anything_runs(tmp_path, tiny_llama):
    with pytest.raises(TrainConfigError, match="teacher: model spec 'orcale'"):
        tiny_distill(tmp_path / "out", tiny_llama, teacher="orcale").validate()


def test_a_model_spec_teacher_is_distilled_when_its_notes_help(tmp_path, tiny_llama):
    out = tmp_path / "out"
    result = distill(tiny_distill(out, tiny_llama, teacher="scripted", max_steps=1))
    assert result.packs_kept == 3 and result.steps == 1
    rows = [json.loads(line) for line in (out / "sft_rows.jsonl").read_text().splitlines()]
    assert any("-> Correct" in r["completion"][0]["content"] or "-> Wrong" in r["completion"][0]["content"]
               for r in rows if r["kind"] == "update")  # the scripted teacher's own note format


def test_a_student_that_cannot_load_leaves_nothing_behind(tmp_path):
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "out"
    config = DistillConfig(output_dir=str(out), model=f"hf:{tmp_path / 'no-such-model'}", packs=2, report=False,
                           device="cpu")
    from lifecycle_agent.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="no such directory"):
        distill(config)
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []
