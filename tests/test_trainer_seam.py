"""The seam with TRL's GRPOTrainer (pinned to trl==1.16.*): fails loudly when TRL changes what we rely on.

CoDTrainer overrides two private methods: ``_generate_and_score_completions`` (rollouts and
credit; TRL calls it from ``_prepare_inputs``) and ``_compute_loss`` (the cod loss, TRL's for
its own loss types). These tests pin the call site, the signatures, the keys TRL's loss reads,
and that the log-probs TRL computes at ``args.temperature`` equal the rollout's sampling log-probs.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from test_trainer_helpers import one_torch_thread, smollm2_path, tiny_config, tiny_llama  # noqa: E402,F401
from trl import GRPOTrainer  # noqa: E402

from trainer import cod_trainer  # noqa: E402
from trainer.cod_trainer import (  # noqa: E402
    CoDTrainer, environment_reward, grpo_arguments, length_groups, load_base_model, lora_config, trim_padding,
)
from trainer.loss import cod_policy_loss_sum  # noqa: E402
from trainer.errors import NonFiniteLossError  # noqa: E402
from trainer.rollout import PackSpec, TrainingRow  # noqa: E402

#: Keys of the batch CoDTrainer._generate_and_score_completions returns.
BATCH_KEYS = {
    "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_per_token_logps",
    "sampling_per_token_logps", "num_items_in_batch", "ref_per_token_logps",
}


def make_trainer(output_dir, tiny_llama, **overrides):
    from datasets import Dataset

    config = tiny_config(output_dir, tiny_llama, **overrides).validate()
    model, tokenizer = load_base_model(config, "float32")
    args = grpo_arguments(config, "cpu", "float32", 1)
    return CoDTrainer(model, tokenizer, config, args, Dataset.from_list(config.pack_schedule()), peft_config=lora_config(config))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_llama):
    made = make_trainer(tmp_path_factory.mktemp("seam"), tiny_llama)
    yield made
    made.policy.close()


def test_trl_minor_version_is_the_pinned_one():
    assert trl.__version__.startswith("1.16."), (
        f"trl {trl.__version__} is installed but the CoDTrainer seam was verified against trl 1.16: re-check "
        "_prepare_inputs, _generate_and_score_completions and _compute_loss, then update the pin in pyproject.toml"
    )


def test_prepare_inputs_gets_generation_batches_from_generate_and_score():
    source = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "self._generate_and_score_completions(generation_batch)" in source
    assert "split_tensor_dict(generation_batch, self.args.steps_per_generation)" in source


def test_private_methods_keep_their_signatures():
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:7] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy"]


def test_trl_loss_reads_only_keys_our_batch_provides():
    source = inspect.getsource(GRPOTrainer._compute_loss)
    read = set(re.findall(r'inputs\["(\w+)"\]', source))
    guarded = set(re.findall(r'"(\w+)" (?:not )?in inputs', source))  # optional keys, checked before use
    vllm_only = {"importance_sampling_ratio"}  # read only when use_vllm with importance sampling (never here)
    missing = read - guarded - vllm_only - BATCH_KEYS
    assert not missing, f"TRL's _compute_loss now also needs {missing}"


def test_trl_reward_path_fails_loudly():
    with pytest.raises(RuntimeError, match="_generate_and_score_completions was bypassed"):
        environment_reward(prompts=["x"], completions=["y"])


def test_one_generation_batch_becomes_one_row_per_turn(trainer):
    batch = trainer._generate_and_score_completions([{"env": "reply-length", "preset": "train", "seed": 0}] * 2)
    assert set(batch) == BATCH_KEYS - {"ref_per_token_logps"}
    rows = 2 * (2 + 1)  # G rollouts x (S solve + S-1 update episodes), one turn each
    assert batch["prompt_ids"].shape[0] == batch["completion_ids"].shape[0] == rows
    assert batch["old_per_token_logps"].shape == batch["completion_ids"].shape
    assert batch["num_items_in_batch"].item() == batch["completion_mask"].sum().item()
    assert abs(batch["advantages"].sum().item()) < 1e-5  # group advantages cancel at each (type, position)


def test_prompts_are_left_padded_and_completions_right_padded(trainer):
    batch = trainer._generate_and_score_completions([{"env": "reply-length", "preset": "train", "seed": 1}] * 2)
    assert (batch["prompt_mask"][:, -1] == 1).all()
    assert (batch["completion_mask"][:, 0] == 1).all()


def test_rollout_logprobs_equal_the_trainers_logprobs_at_the_training_temperature(trainer):
    (rollout,) = trainer.collector.collect([PackSpec("reply-length", "train", 2)])
    turn = rollout.solves[0].turns[0]
    ids = torch.tensor([turn.prompt_ids + turn.completion_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, len(turn.completion_ids))
        logits = trainer.model(input_ids=ids).logits[0, len(turn.prompt_ids) - 1 : -1]
    recorded = torch.tensor(turn.logprobs)
    assert (logps[0] - recorded).abs().max().item() < 1e-3
    at_one = torch.log_softmax(logits, -1).gather(1, torch.tensor(turn.completion_ids)[:, None]).squeeze(1)
    assert (at_one - recorded).abs().max().item() > 1e-2  # a temperature mismatch would be caught


def test_filler_rows_keep_every_row_when_micro_batches_do_not_divide_it(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    rows = [TrainingRow([1, 2, 3], [4, 5], [-1.0, -1.0], 0.5, "solve", 0, "x") for _ in range(3)]
    batch = trainer._batch(rows)
    assert batch["completion_ids"].shape[0] == 4
    assert batch["completion_mask"][3].sum().item() == 0 and batch["advantages"][3].item() == 0.0
    assert batch["num_items_in_batch"].item() == 6


def test_cod_loss_is_finite_with_a_filler_row(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    rows = [TrainingRow([1, 2, 3], [4, 5], [-1.0, -1.0], 0.5, "solve", 0, "x") for _ in range(3)]
    loss = trainer._compute_loss(trainer.model, trainer._batch(rows))
    assert math.isfinite(loss.item()) and loss.requires_grad


def test_trl_loss_types_run_through_trls_own_code(trainer, monkeypatch):
    monkeypatch.setattr(trainer.cod, "loss_type", "grpo")
    monkeypatch.setattr(trainer, "loss_type", "grpo")
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)  # set by the training loop
    trainer._metrics["train"].clear()
    batch = trainer._generate_and_score_completions([{"env": "reply-length", "preset": "train", "seed": 3}] * 2)
    loss = trainer._compute_loss(trainer.model, batch)
    assert math.isfinite(loss.item())
    assert "clip_ratio/region_mean" in trainer._metrics["train"]  # logged by TRL's _compute_loss


def test_non_finite_loss_stops_before_the_optimizer_step(trainer, monkeypatch):
    monkeypatch.setattr(cod_trainer, "cod_policy_loss_sum", lambda *a, **k: (torch.tensor(float("nan")), torch.tensor(0.0)))
    batch = trainer._generate_and_score_completions([{"env": "reply-length", "preset": "train", "seed": 4}] * 2)
    with pytest.raises(NonFiniteLossError, match="loss became nan.*--resume"):
        trainer._compute_loss(trainer.model, batch)


def test_length_groups_cover_every_row_once_shortest_first():
    mask = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    groups = length_groups(mask, 2)
    assert [g.tolist() for g in groups] == [[0, 3], [2, 1]]


def test_trim_padding_drops_only_columns_that_are_padding_in_every_row():
    batch = {
        "prompt_ids": torch.tensor([[9, 9, 5], [9, 6, 7]]), "prompt_mask": torch.tensor([[0, 0, 1], [0, 1, 1]]),
        "completion_ids": torch.tensor([[1, 9, 9], [2, 3, 9]]), "completion_mask": torch.tensor([[1, 0, 0], [1, 1, 0]]),
        "sampling_per_token_logps": torch.zeros(2, 3), "advantages": torch.tensor([1.0, -1.0]),
    }
    sub = trim_padding(batch, torch.tensor([0, 1]))
    assert sub["prompt_ids"].tolist() == [[9, 5], [6, 7]] and sub["completion_ids"].tolist() == [[1, 9], [2, 3]]


def test_grouped_cod_loss_equals_one_forward_over_the_padded_batch(trainer):
    batch = trainer._generate_and_score_completions([{"env": "reply-length", "preset": "train", "seed": 5}] * 2)
    batch["advantages"] = torch.linspace(-1, 1, batch["advantages"].numel())  # every row carries loss
    trainer.model.zero_grad()
    grouped = trainer._cod_loss(trainer.model, batch)
    grouped.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, batch["completion_ids"].size(1))
    total, _ = cod_policy_loss_sum(logps, batch["sampling_per_token_logps"], batch["advantages"], batch["completion_mask"])
    whole = total / batch["num_items_in_batch"]
    whole.backward()
    assert grouped.item() == pytest.approx(whole.item(), rel=1e-4, abs=1e-6)
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[name], rtol=1e-3, atol=1e-6), name
    trainer.model.zero_grad()
