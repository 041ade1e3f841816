"""CoDConfig: validation of every bad input, precision selection, the pack schedule (no torch needed)."""

from __future__ import annotations

import pytest

from lifecycle_agent.errors import EnvironmentSpecError
from trainer.cod_config import CoDConfig, check_trainable_spec, resolve_precision
from trainer.errors import TrainConfigError


def config(**options):
    return CoDConfig(output_dir="out", **options)


def test_defaults_are_valid():
    assert config().validate().group_size == 4


@pytest.mark.parametrize("group_size", [1, 0, -3])
def test_group_size_below_two_is_refused(group_size):
    with pytest.raises(TrainConfigError, match=r"group_size: must be >= 2.*baseline"):
        config(group_size=group_size).validate()


@pytest.mark.parametrize("pack_size", [1, 0])
def test_pack_size_below_two_is_refused(pack_size):
    with pytest.raises(TrainConfigError, match=r"pack_size: must be >= 2.*update episode"):
        config(pack_size=pack_size).validate()


def test_unknown_environment_is_refused():
    with pytest.raises(EnvironmentSpecError, match="unknown environment 'nope'"):
        config(envs=["fact-recall", "nope"]).validate()


def test_unknown_preset_is_refused():
    with pytest.raises(EnvironmentSpecError, match="no preset 'impossible'"):
        config(preset="impossible").validate()


def test_comma_separated_environments_are_split():
    assert config(envs="fact-recall, fact-recall").validate().envs == ["fact-recall", "fact-recall"]


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "scripted", "py:pkg.mod:fn", "nonsense"])
def test_models_that_cannot_be_trained_are_refused(spec):
    with pytest.raises(TrainConfigError, match="not a local trainable model"):
        config(model=spec).validate()


@pytest.mark.parametrize("spec", ["smollm2@adapters/x", "hf:/models/base@adapters/x"])
def test_starting_from_an_adapter_is_refused(spec):
    with pytest.raises(TrainConfigError, match="drop '@ADAPTER'|use 'smollm2'"):
        check_trainable_spec(spec)


def test_local_model_specs_are_accepted():
    assert check_trainable_spec("smollm2") == ("smollm2", None)
    assert check_trainable_spec("hf:/models/base") == ("hf", "/models/base")


def test_zero_temperature_is_refused():
    with pytest.raises(TrainConfigError, match="temperature: must be > 0"):
        config(temperature=0).validate()


def test_cod_loss_with_kl_is_refused():
    with pytest.raises(TrainConfigError, match="cod loss has no KL term"):
        config(beta=0.1).validate()


def test_trl_loss_with_kl_is_accepted():
    assert config(loss_type="grpo", beta=0.1).validate().beta == 0.1


def test_unknown_loss_is_refused():
    with pytest.raises(TrainConfigError, match="loss_type: must be one of cod, grpo"):
        config(loss_type="ppo").validate()


def test_trl_args_cannot_override_managed_options():
    with pytest.raises(TrainConfigError, match="num_generations, temperature are set by the trainer"):
        config(trl_args={"temperature": 1.0, "num_generations": 8, "weight_decay": 0.1}).validate()


def test_rollouts_must_split_evenly_into_micro_batches():
    with pytest.raises(TrainConfigError, match="4 rollouts per step must divide evenly into 3 micro-batches"):
        config(gradient_accumulation_steps=3).validate()
    assert config(gradient_accumulation_steps=2).validate()
    with pytest.raises(TrainConfigError, match="2 process"):
        config(group_size=2, gradient_accumulation_steps=2).validate(world_size=2)


def test_held_out_seeds_must_not_overlap_training_seeds():
    with pytest.raises(TrainConfigError, match="held-out pack seeds 10000..10007 overlap the training pack seeds 0..19999"):
        config(eval_seed=1, max_steps=20000).validate()


def test_unknown_logger_is_refused():
    with pytest.raises(TrainConfigError, match="report_to: unknown logger"):
        config(report_to=["mlflow"]).validate()


@pytest.mark.parametrize("name, value", [("max_steps", 0), ("learning_rate", -1.0), ("max_new_tokens", 0),
                                         ("lora_rank", 0), ("clip_low", 1.5), ("eval_packs", 0), ("threads", 0),
                                         ("learning_rate", float("nan")), ("max_steps", 2.5)])
def test_out_of_range_numbers_name_the_option(name, value):
    with pytest.raises(TrainConfigError, match=rf"^{name}:"):
        config(**{name: value}).validate()


def test_pack_schedule_alternates_environments_with_their_own_seeds():
    rows = config(envs=["fact-recall", "reply"], max_steps=2, packs_per_step=2, first_pack_seed=5).pack_schedule()
    assert [(r["env"], r["seed"]) for r in rows] == [("fact-recall", 5), ("reply", 5), ("fact-recall", 6), ("reply", 6)]


def test_ralph_full_schedule_runs_through_every_task_of_a_seed_before_the_next():
    rows = config(max_steps=5, pack_size=2, packing="ralph_full").pack_schedule()
    assert [(r["seed"], r["instance"], r["packing"]) for r in rows] == [
        (0, 0, "ralph_full"), (0, 1, "ralph_full"), (1, 0, "ralph_full"), (1, 1, "ralph_full"), (2, 0, "ralph_full")
    ]
    assert len({r["prompt"] for r in rows}) == 5


@pytest.mark.parametrize("packing", ["ralph", "ralph_sample"])
def test_ralph_sample_schedule_counts_seeds_like_cod(packing):
    checked = config(max_steps=3, packing=packing).validate()
    assert checked.packing == "ralph_sample"
    assert [(r["seed"], r["instance"]) for r in checked.pack_schedule()] == [(0, None), (1, None), (2, None)]
    assert [r["packing"] for r in config(max_steps=1).pack_schedule()] == ["cod"]


@pytest.mark.parametrize("bad", ["loop", "", None])
def test_an_unknown_packing_names_the_option_and_the_choices(bad):
    with pytest.raises(TrainConfigError, match="^packing: unknown packing .*packings: cod, ralph_sample, ralph_full, ralph"):
        config(packing=bad).validate()


def test_ralph_full_packs_count_against_the_held_out_seeds():
    # 3 seeds' worth of cod packs is 3*S ralph_full packs: seeds 0..2 still, so eval seed 0 (packs 0..) overlaps
    with pytest.raises(TrainConfigError, match="overlap the training pack seeds 0..2"):
        config(max_steps=6, pack_size=2, packing="ralph_full", eval_seed=0, first_pack_seed=0).validate()


def test_a_schedule_row_without_packing_columns_is_a_cod_pack():
    from trainer.rollout import PackSpec

    assert PackSpec.from_row({"env": "fact-recall", "preset": "train", "seed": 3}) == PackSpec("fact-recall", "train", 3)
    row = config(max_steps=2, pack_size=2, packing="ralph_full").pack_schedule()[1]
    assert PackSpec.from_row(row) == PackSpec("fact-recall", "train", 0, "ralph_full", 1)


def test_held_out_pack_seeds_follow_the_eval_harness():
    assert config(eval_seed=3, eval_packs=2).eval_pack_seeds() == [30000, 30001]


def test_config_round_trips_through_json(tmp_path):
    original = config(group_size=6, trl_args={"weight_decay": 0.1})
    original.save(tmp_path / "c.json", versions={"trl": "x"})
    assert CoDConfig.load(tmp_path / "c.json") == original


def test_unreadable_config_file_is_reported(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(TrainConfigError, match="cannot read the training config"):
        CoDConfig.load(tmp_path / "c.json")


def test_differences_ignore_options_that_may_change_on_resume():
    old = config(max_steps=10, eval_every=2)
    assert config(max_steps=50, eval_every=5, progress=False).differences(old) == []
    assert config(group_size=8).differences(old) == ["group_size: 4 -> 8"]


def test_cpu_defaults_to_float32():
    assert resolve_precision(None, None, cuda_available=False, bf16_supported=False) == ("cpu", "float32")


def test_gpu_defaults_to_bfloat16_when_supported():
    assert resolve_precision(None, None, cuda_available=True, bf16_supported=True) == ("cuda", "bfloat16")
    assert resolve_precision("cuda:1", "auto", cuda_available=True, bf16_supported=False) == ("cuda:1", "float16")


def test_explicit_dtype_aliases_are_understood():
    assert resolve_precision("cpu", "bf16", cuda_available=False, bf16_supported=False) == ("cpu", "bfloat16")
    assert resolve_precision("cuda", "fp32", cuda_available=True, bf16_supported=True) == ("cuda", "float32")


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(TrainConfigError, match="no CUDA GPU is visible"):
        resolve_precision("cuda", None, cuda_available=False, bf16_supported=False)


def test_float16_on_cpu_is_refused():
    with pytest.raises(TrainConfigError, match="float16 is not supported for training on CPU"):
        resolve_precision("cpu", "fp16", cuda_available=False, bf16_supported=False)


def test_unknown_dtype_and_device_are_refused():
    with pytest.raises(TrainConfigError, match="dtype 'int8'"):
        resolve_precision("cpu", "int8", cuda_available=False, bf16_supported=False)
    with pytest.raises(TrainConfigError, match="device 'tpu'"):
        resolve_precision("tpu", None, cuda_available=False, bf16_supported=False)


def test_loggers_that_are_not_installed_are_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb",) else real(name, *a))
    with pytest.raises(TrainConfigError, match="wandb is not installed"):
        config(report_to=["wandb"]).validate()


def test_a_run_saved_before_on_failed_update_existed_resumes_with_keep(tmp_path):
    import json

    from trainer.cod_config import CoDConfig

    config = CoDConfig(output_dir=str(tmp_path / "o"))
    data = config.to_dict()
    del data["on_failed_update"], data["init_adapter"]
    (tmp_path / "train_config.json").write_text(json.dumps({"config": data}))
    loaded = CoDConfig.load(tmp_path / "train_config.json")
    assert loaded.on_failed_update == "keep" and loaded.init_adapter is None
    assert CoDConfig(output_dir="x").on_failed_update == "reset"  # new runs follow the reference rule


def test_resume_from_overlays_the_given_options_on_the_stored_run(tmp_path):
    CoDConfig(output_dir=str(tmp_path), max_steps=7, group_size=3, learning_rate=1e-4).save(tmp_path / "train_config.json")
    resumed = CoDConfig.resume_from(tmp_path, max_steps=9, group_size=None)
    assert (resumed.max_steps, resumed.group_size, resumed.learning_rate) == (9, 3, 1e-4)  # None: not given, stored kept
    assert resumed.output_dir == str(tmp_path)


def test_resume_from_a_directory_without_a_run_starts_from_the_defaults(tmp_path):
    fresh = CoDConfig.resume_from(tmp_path / "new", max_steps=2)
    assert fresh.max_steps == 2 and fresh.group_size == CoDConfig(output_dir="x").group_size


def test_resume_from_refuses_unknown_options_and_unreadable_runs(tmp_path):
    with pytest.raises(TrainConfigError, match="unknown training option.*max_step"):
        CoDConfig.resume_from(tmp_path, max_step=2)
    (tmp_path / "train_config.json").write_text("{not json")
    with pytest.raises(TrainConfigError, match="cannot read the training config"):
        CoDConfig.resume_from(tmp_path)
