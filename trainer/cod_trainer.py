"""``CoDTrainer``: TRL's GRPOTrainer fed by the runtime's own rollouts, with per-episode credit.

TRL and PEFT do the engineering: accelerate (multi-GPU, DeepSpeed/FSDP under
``accelerate launch``), the optimizer and scheduler, gradient accumulation, checkpoints,
``--resume``, logging (tensorboard/wandb), LoRA. Two private GRPOTrainer methods are
overridden; this is the whole seam, pinned to ``trl==1.16.*`` and covered by
``tests/test_trainer_seam.py``:

- ``_generate_and_score_completions(inputs)``: TRL calls it from ``_prepare_inputs`` with one
  generation batch (dataset rows = packs, each repeated ``group_size`` times). We run the
  rollouts with :class:`~lifecycle_agent.LifecycleAgent`, compute CoD advantages and return
  one row per turn in the tensor dict ``_compute_loss`` reads (TRL then shuffles it and splits
  it into ``gradient_accumulation_steps`` micro-batches).
- ``_compute_loss(model, inputs)``: the paper's one-sided masked loss for ``loss_type="cod"``,
  TRL's own code for its loss types; a non-finite loss stops training before the optimizer step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from lifecycle_agent.models.local import LocalModel, load_pretrained
from lifecycle_agent.store import Store

from .cod_config import CoDConfig, check_trainable_spec, resolve_precision
from .credit import batch_advantages
from .errors import NonFiniteLossError, OutputDirError, TrainConfigError
from .loss import cod_policy_loss_sum
from .rollout import (
    PackSpec, Rollout, RolloutCollector, RolloutSettings, rollout_metrics, run_sync, summarize, training_rows,
)

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
EVAL_HISTORY_FILE = "eval_history.jsonl"
ROLLOUT_DB = "rollouts.db"


class CoDTrainer(GRPOTrainer):
    """GRPO over LifecycleAgent rollouts with per-episode credit (see the module docstring).

    Args:
        model: the base causal LM (a LoRA adapter is added from ``peft_config``).
        processing_class: its tokenizer (with a chat template).
        cod_config: the run's :class:`CoDConfig`.
        args: ``GRPOConfig`` from :func:`grpo_arguments`.
        train_dataset: rows ``{"env", "preset", "seed", "prompt"}`` from :meth:`CoDConfig.pack_schedule`.
        peft_config: a ``peft.LoraConfig`` (see :func:`lora_config`).
        rollout_store: where rollout episodes are written (default: in memory; see :meth:`keep_rollouts_in`).
    """

    def __init__(self, model, processing_class, cod_config: CoDConfig, args: GRPOConfig, train_dataset,
                 peft_config=None, callbacks=None, rollout_store: Optional[Store] = None):
        super().__init__(
            model=model, reward_funcs=[environment_reward], args=args, train_dataset=train_dataset,
            processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
        )
        self.cod = cod_config
        local_rollouts = cod_config.rollouts_per_step // self.accelerator.num_processes
        self.policy = LocalModel(
            self.accelerator.unwrap_model(self.model), processing_class, model_id=cod_config.model,
            default_temperature=cod_config.temperature, max_new_tokens=cod_config.max_new_tokens,
            max_batch_size=cod_config.rollout_batch_size or max(local_rollouts, cod_config.eval_packs * len(cod_config.envs)),
            batch_wait_ms=50,
        )
        settings = RolloutSettings(
            pack_size=cod_config.pack_size, temperature=cod_config.temperature, max_new_tokens=cod_config.max_new_tokens,
            context_budget=cod_config.context_budget, parse_policy=cod_config.parse_policy,
            on_failed_update=cod_config.on_failed_update,
            prompt_set=cod_config.prompt_set, parse_failure_reward=cod_config.parse_failure_reward,
        )
        self.collector = RolloutCollector(
            self.policy, rollout_store or Store(":memory:"), settings,
            id_prefix=f"train-{uuid.uuid4().hex[:6]}-p{self.accelerator.process_index}", keep=cod_config.keep_rollouts,
        )

    def keep_rollouts_in(self, store: Store) -> None:
        """Write the rollout episodes to ``store`` from now on (:func:`train` opens the run's store only once the
        trainer is built, so a start that fails leaves the output directory alone)."""
        self.collector.store.close()
        self.collector.store = store

    # ------------------------------------------------------------------ the seam: rollouts and credit
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        specs = [PackSpec.from_row(row) for row in inputs]
        rollouts = self._collect(self.collector, specs)
        rollout_seconds = time.perf_counter() - started
        # Rollouts of one pack may sit on several processes: gather their rewards for the group baselines.
        everyone = gather_object([summarize(r, self.accelerator.process_index) for r in rollouts])
        solve_adv, update_adv, temperature = batch_advantages(
            [s["pack"] for s in everyone], [s["solve_rewards"] for s in everyone], [s["update_rewards"] for s in everyone],
            solve_tokens=[s["solve_tokens"] for s in everyone], update_tokens=[s["update_tokens"] for s in everyone],
            normalize_std=self.cod.normalize_std, reweight=self.cod.reweight,
        )
        mine = [k for k, s in enumerate(everyone) if s["rank"] == self.accelerator.process_index]
        rows = []
        for rollout, k in zip(rollouts, mine):
            rows.extend(training_rows(rollout, solve_adv[k], update_adv[k]))
        self._log_rollouts(everyone, rollout_seconds, temperature, len(rows))
        return self._batch(rows)

    def _collect(self, collector: RolloutCollector, specs: list[PackSpec]) -> list[Rollout]:
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ):
            return collector.collect(specs)

    def _batch(self, rows) -> dict[str, Any]:
        """Pad the turns into the tensors TRL's ``_compute_loss`` reads (prompts left-padded, completions right)."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        chunks = self.args.steps_per_generation
        # TRL splits the batch into `chunks` equal micro-batches; filler rows (no completion token) keep every row.
        fillers = (-len(rows)) % chunks or (chunks if not rows else 0)
        prompts = [torch.tensor(r.prompt_ids) for r in rows] + [torch.tensor([pad_id])] * fillers
        completions = [torch.tensor(r.completion_ids) for r in rows] + [torch.tensor([pad_id])] * fillers
        completion_masks = [torch.ones(len(r.completion_ids), dtype=torch.long) for r in rows]
        completion_masks += [torch.zeros(1, dtype=torch.long)] * fillers
        logps = [torch.tensor(r.logprobs, dtype=torch.float32) for r in rows] + [torch.zeros(1)] * fillers
        advantages = [r.advantage for r in rows] + [0.0] * fillers
        multiple = self.pad_to_multiple_of
        tokens = torch.tensor(sum(len(r.completion_ids) for r in rows), device=device)
        rollout_logps = pad(logps, padding_value=0.0, padding_side="right", pad_to_multiple_of=multiple).to(device)
        batch = {
            "prompt_ids": pad(prompts, padding_value=pad_id, padding_side="left", pad_to_multiple_of=multiple).to(device),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left",
                               pad_to_multiple_of=multiple).to(device),
            "completion_ids": pad(completions, padding_value=pad_id, padding_side="right", pad_to_multiple_of=multiple).to(device),
            "completion_mask": pad(completion_masks, padding_value=0, padding_side="right", pad_to_multiple_of=multiple).to(device),
            "advantages": torch.tensor(advantages, dtype=torch.float32, device=device),
            # The rollout policy's own log-probs are pi_old: the ratio of every TRL loss and of the cod loss.
            "old_per_token_logps": rollout_logps,
            "sampling_per_token_logps": rollout_logps,
            "num_items_in_batch": self.accelerator.gather(tokens).sum(),
        }
        if self.beta != 0.0:
            batch["ref_per_token_logps"] = self._base_logps(batch)
        self.state.num_input_tokens_seen += int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        return batch

    def _base_logps(self, batch) -> torch.Tensor:
        """Log-probs of the completions under the base model (the adapter disabled), for TRL's KL term."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.unwrap_model(self.model).disable_adapter():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, batch["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return logps

    def _log_rollouts(self, everyone: list[dict], seconds: float, temperature: Optional[float], rows: int) -> None:
        metrics = self._metrics["train"]
        for name, value in rollout_metrics(everyone).items():
            metrics[name].append(value)
        metrics["time/rollout_s"].append(seconds)
        metrics["rows"].append(float(rows))
        if temperature is not None:
            metrics["reweight/temperature"].append(temperature)

    # ------------------------------------------------------------------ the seam: the loss
    def _compute_loss(self, model, inputs):
        loss = self._cod_loss(model, inputs) if self.cod.loss_type == "cod" else super()._compute_loss(model, inputs)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before the "
                f"optimizer step, so the weights and the last checkpoint ({last_checkpoint(self.args.output_dir) or 'none yet'}) "
                "are unchanged. Lower --lr (or try --normalize-std), then continue with --resume"
            )
        return loss

    def _cod_loss(self, model, inputs):
        """Token mean of -A * logp over completion tokens kept by the one-sided ratio rule (trainer/loss.py)."""
        loss_sum, kept, entropy_sum = 0.0, 0.0, 0.0
        for group in length_groups(inputs["prompt_mask"], 2 * self.cod.pack_size - 1):  # one per episode kind
            sub = trim_padding(inputs, group)
            # The entropies cost nothing extra: TRL's fused LM head (add_fused_lm_head in GRPOTrainer.__init__,
            # outputs=("log_probs", "entropy")) computes them on every call; compute_entropy only returns them.
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, torch.cat([sub["prompt_ids"], sub["completion_ids"]], dim=1),
                torch.cat([sub["prompt_mask"], sub["completion_mask"]], dim=1), sub["completion_ids"].size(1),
                compute_entropy=True,
            )
            group_sum, group_kept = cod_policy_loss_sum(
                logps, sub["sampling_per_token_logps"], sub["advantages"], sub["completion_mask"],
                self.cod.clip_low, self.cod.clip_high,
            )
            loss_sum, kept = loss_sum + group_sum, kept + group_kept
            entropy_sum = entropy_sum + (entropies * sub["completion_mask"]).sum().detach()
        # num_items_in_batch counts the completion tokens of the whole step on every process: summing the
        # micro-batches' losses (and averaging gradients across processes) gives the step's token mean.
        loss = loss_sum / (inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes)
        tokens = inputs["completion_mask"].sum().float()
        stats = self.accelerator.reduce(torch.stack([torch.as_tensor(kept, dtype=torch.float32, device=tokens.device),
                                                     tokens, torch.as_tensor(entropy_sum, device=tokens.device)]), "sum")
        self._metrics["train"]["cod/kept_fraction"].append((stats[0] / stats[1].clamp(min=1)).item())
        self._metrics["train"]["entropy"].append((stats[2] / stats[1].clamp(min=1)).item())
        return loss

    # ------------------------------------------------------------------ held-out evaluation
    def evaluate_held_out(self, *, base: bool = False) -> Optional[dict[str, Any]]:
        """Reward by position on the held-out packs, with the eval harness (:func:`lifecycle_agent.eval.aevaluate`).

        ``base=True`` evaluates with the adapter disabled (the model before training). Every
        process enters the generation context (DeepSpeed ZeRO-3 gathers weights collectively);
        the main process evaluates and returns the harness report with ``step`` and ``base``
        added, the others return ``None``.
        """
        from lifecycle_agent.eval import aevaluate

        c = self.cod
        peft_model = self.accelerator.unwrap_model(self.model)
        report = None
        with (peft_model.disable_adapter() if base else nullcontext()), unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ):
            if self.accelerator.is_main_process:
                report = run_sync(aevaluate(
                    c.envs, self.policy, packs=c.eval_packs, pack_size=c.held_out_pack_size, preset=c.preset,
                    seeds=[c.eval_seed], modes=["live"], out=None, concurrency=c.eval_packs * len(c.envs),
                    temperature=c.held_out_temperature, update_temperature=c.held_out_temperature,
                    max_new_tokens=c.max_new_tokens, context_budget=c.context_budget, parse_policy=c.parse_policy,
                    prompt_set=c.prompt_set, plot=False,
                ))
                report.update(step=self.state.global_step, base=base)
        self.accelerator.wait_for_everyone()
        return report


def length_groups(prompt_mask: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Row indices of a micro-batch sorted by prompt length and cut into at most ``groups`` groups.

    A CoD step mixes short solve prompts with long update prompts (they hold the previous
    context and a transcript). Scoring rows of similar length together, each group without
    the padding it does not need, gives the same loss for less compute and memory.
    """
    lengths = prompt_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    return [chunk for chunk in torch.tensor_split(order, min(groups, len(order))) if len(chunk)]


def trim_padding(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of a batch, without the prompt columns (left) and completion columns (right) that are
    padding in every one of them."""
    prompt_mask, completion_mask = inputs["prompt_mask"][rows], inputs["completion_mask"][rows]
    start = int((prompt_mask.sum(dim=0) == 0).sum())  # left padding shared by every row
    width = max(int(completion_mask.sum(dim=1).max()), 1)
    sub = {key: inputs[key][rows][:, start:] for key in ("prompt_ids", "prompt_mask")}
    for key in ("completion_ids", "completion_mask", "sampling_per_token_logps"):
        sub[key] = inputs[key][rows][:, :width]
    sub["advantages"] = inputs["advantages"][rows]
    return sub


def environment_reward(*args, **kwargs):
    """The reward source TRL requires; never called: rewards come from the environments through the rollouts.

    If TRL ever scores completions itself (its own ``_generate_and_score_completions`` ran instead of
    :meth:`CoDTrainer._generate_and_score_completions`), this fails loudly instead of training on nothing.
    """
    raise RuntimeError(
        "TRL called its own reward path: CoDTrainer._generate_and_score_completions was bypassed. The installed "
        "trl no longer matches the seam pinned in trainer/cod_trainer.py (trl==1.16.*); run tests/test_trainer_seam.py"
    )


# ---------------------------------------------------------------------- building the run
def lora_config(config: CoDConfig):
    """The ``peft.LoraConfig`` of a run (causal LM, no bias, ``lora_target`` modules)."""
    from peft import LoraConfig

    target = config.lora_target.strip()
    modules = target if target == "all-linear" else [m.strip() for m in target.split(",") if m.strip()]
    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,  # no dropout: rollout and loss see one policy
        target_modules=modules, bias="none", task_type="CAUSAL_LM",
    )


def grpo_arguments(config: CoDConfig, device: str, dtype: str, world_size: int) -> GRPOConfig:
    """TRL's ``GRPOConfig`` for a run: one generation per optimizer step, split into micro-batches."""
    micro = config.gradient_accumulation_steps
    arguments = dict(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        num_generations=config.group_size,
        per_device_train_batch_size=config.rollouts_per_step // (micro * world_size),
        gradient_accumulation_steps=micro,
        steps_per_generation=micro,
        num_iterations=1,
        temperature=config.temperature,
        max_completion_length=config.max_new_tokens,
        loss_type="dapo" if config.loss_type == "cod" else config.loss_type,
        epsilon=config.clip_low,
        epsilon_high=config.clip_high,
        beta=config.beta,
        scale_rewards="none",
        shuffle_dataset=False,
        remove_unused_columns=False,
        disable_dropout=True,
        activation_checkpointing=config.gradient_checkpointing,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=list(config.report_to) or "none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
    )
    arguments.update(config.trl_args)
    try:
        return GRPOConfig(**arguments)
    except (TypeError, ValueError) as exc:
        if not config.trl_args:
            raise
        raise TrainConfigError(
            f"trl_args {config.trl_args}: TRL's GRPOConfig refused them: {exc}. Fix or drop the --trl-arg"
        ) from None


def check_optimizer(args: GRPOConfig, model) -> None:
    """Resolve the optimizer ``args.optim`` names as ``Trainer`` will, so an unknown or uninstalled one fails now."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError) as exc:
        name = getattr(args.optim, "value", args.optim)
        raise TrainConfigError(f"trl_args optim={name!r}: {exc}. Fix or drop --trl-arg optim") from None


def load_base_model(config: CoDConfig, dtype: str):
    """``(model, tokenizer)`` of the base model on CPU in ``dtype`` (the Trainer moves it to the device)."""
    kind, path = check_trainable_spec(config.model)
    if kind == "smollm2":
        from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

        path = str(ensure_smollm2_cache())
    return load_pretrained(path, device="cpu", dtype=dtype)


def last_checkpoint(output_dir: str | Path) -> Optional[str]:
    """The newest ``checkpoint-N`` directory of a run, or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    directory = Path(output_dir)
    return get_last_checkpoint(str(directory)) if directory.is_dir() else None


def check_output_dir(config: CoDConfig, *, resume: bool, overwrite: bool) -> Optional[str]:
    """Whether the run may use its output directory (changes nothing); returns the checkpoint to resume from.

    A directory holding another run is refused unless ``resume`` (same options; continues from
    its last checkpoint) or ``overwrite`` (its contents will be deleted). A non-empty directory
    that holds no run is refused. ``None`` for a new run.
    """
    out = Path(config.output_dir).expanduser()
    stored = out / CONFIG_FILE
    if resume and overwrite:
        raise OutputDirError("give either --resume (continue the run) or --overwrite (start over), not both")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} is a file; give a directory")
    if resume:
        if not stored.is_file():
            raise OutputDirError(f"nothing to resume: {out} holds no {CONFIG_FILE}; start a new run without --resume")
        differences = config.differences(CoDConfig.load(stored))
        if differences:
            raise OutputDirError(
                f"{out} holds a run with different options; resume it with the same options, or start over "
                "with --overwrite. Differences (stored -> given):\n  " + "\n  ".join(differences)
            )
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise OutputDirError(
                f"{out} holds a run that stopped before its first checkpoint (every {config.save_steps} steps); "
                "start it again with --overwrite"
            )
        return checkpoint
    if out.is_dir() and any(out.iterdir()):
        if not stored.is_file():
            raise OutputDirError(f"{out} is not empty and holds no training run; choose an empty or new directory")
        if not overwrite:
            raise OutputDirError(
                f"{out} already holds a training run; pass --resume to continue it or --overwrite to start over"
            )
    return None


def prepare_output_dir(config: CoDConfig, *, resume: bool, overwrite: bool) -> Optional[str]:
    """:func:`check_output_dir`, then make the directory ready: with ``overwrite`` the run in it is deleted."""
    checkpoint = check_output_dir(config, resume=resume, overwrite=overwrite)
    out = Path(config.output_dir).expanduser()
    if overwrite and (out / CONFIG_FILE).is_file():
        for item in out.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def _remove_new_directories(out: Path, top: Optional[Path]) -> None:
    """Remove ``out`` and its parents up to ``top`` (the highest that did not exist before) while they are empty."""
    if top is None:
        return
    for directory in (out, *out.parents):
        if not directory.is_dir() or any(directory.iterdir()):
            return
        directory.rmdir()
        if directory == top:
            return


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__}


def _truncate_after(path: Path, step: int) -> None:
    """Drop JSON lines written after ``step`` (the resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue
    path.write_text("".join(k + "\n" for k in kept))


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    output_dir: str
    adapter_dir: str
    steps: int
    metrics_path: str
    before: Optional[dict] = None
    after: Optional[dict] = None
    report_path: Optional[str] = None
    resumed_from: Optional[str] = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True
    """Whether this is the main process (under ``torchrun`` / ``accelerate launch`` every process returns one)."""


def train(
    config: CoDConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: Optional[str] = None,
    callbacks: Optional[list] = None,
) -> TrainResult:
    """Train a LoRA adapter with CoD credit; the Python twin of ``lifecycle-agent train --lora``.

    Args:
        config: the run's options (validated here).
        resume: continue the run in ``config.output_dir`` from its last checkpoint (same options,
            same pack order; ``max_steps``, ``eval_every``, saving and logging options may change).
        overwrite: delete the run already in ``config.output_dir`` and start over.
        command: the command line, recorded in ``train_config.json`` and ``report.md``.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Writes into ``config.output_dir``: the adapter (load it with ``hf:BASE@DIR`` or
    ``smollm2@DIR``), ``checkpoint-N/`` directories, ``metrics.jsonl``, ``train_config.json``,
    the held-out evaluations (``eval_before.json``, ``eval_after.json``, ``eval_history.jsonl``)
    and ``report.md`` with ``report.png``. Raises :class:`~trainer.errors.NonFiniteLossError`
    when the loss or a gradient stops being finite (the last checkpoint stays good). A start
    that fails before training (a missing model, a GRPOConfig field or optimizer TRL refuses,
    LoRA target modules the model lacks) leaves ``config.output_dir`` as it was.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from transformers.trainer_callback import PrinterCallback

    from .callbacks import FiniteGradients, HeldOutEval, MetricsFile, RewardProgress, TimeBudget

    started = time.perf_counter()
    device, dtype = resolve_precision(
        config.device, config.dtype, cuda_available=torch.cuda.is_available(),
        bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    state = PartialState(cpu=device == "cpu")  # under torchrun / accelerate launch: this process's rank
    config.validate(world_size=state.num_processes)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.output_dir).expanduser()
    if state.is_main_process:
        check_output_dir(config, resume=resume, overwrite=overwrite)

    from datasets import Dataset

    # Everything that can refuse the start (the TRL arguments, the model, the adapter) runs before the output
    # directory changes: a failed start leaves it as it was, and a corrected command may use it.
    args = grpo_arguments(config, device, dtype, state.num_processes)
    model, tokenizer = load_base_model(config, dtype)
    peft_config = lora_config(config)
    if config.init_adapter is not None:
        from peft import PeftModel

        # continue from a warm-start adapter (train --sft): it is the trainable adapter, no new one is added
        model = PeftModel.from_pretrained(model, str(Path(config.init_adapter).expanduser()), is_trainable=True)
        peft_config = None
    new_top = next((d for d in reversed((out, *out.parents)) if not d.exists()), None)  # highest directory to create
    trainer = None
    try:
        trainer = CoDTrainer(
            model, tokenizer, config, args, Dataset.from_list(config.pack_schedule()), peft_config=peft_config,
        )
        check_optimizer(trainer.args, trainer.model)
    except BaseException:
        if trainer is not None:
            trainer.policy.close()
        if state.is_main_process:
            _remove_new_directories(out, new_top)  # transformers' Trainer creates the output directory first thing
        raise
    checkpoint = None
    if state.is_main_process:
        checkpoint = prepare_output_dir(config, resume=resume, overwrite=overwrite)
        config.save(out / CONFIG_FILE, versions=_versions(), command=command, device=device, dtype=dtype)
        if checkpoint is not None:
            for name in (METRICS_FILE, EVAL_HISTORY_FILE):
                _truncate_after(out / name, int(Path(checkpoint).name.split("-")[-1]))
    state.wait_for_everyone()
    if not state.is_main_process and resume:
        checkpoint = last_checkpoint(out)
    store = None
    if config.keep_rollouts:
        store = Store(str(out / (ROLLOUT_DB if state.process_index == 0 else f"rollouts-rank{state.process_index}.db")))
        trainer.keep_rollouts_in(store)
    trainer.remove_callback(PrinterCallback)  # every log goes to metrics.jsonl (and the progress bar) instead
    evaluate = config.report or config.eval_every > 0
    if config.progress:
        trainer.add_callback(RewardProgress(
            "held-out evaluation of the base model ..." if evaluate and checkpoint is None else "collecting rollouts ..."
        ))
    trainer.add_callback(MetricsFile(out / METRICS_FILE))
    trainer.add_callback(FiniteGradients())
    evaluation = HeldOutEval(trainer, out, every=config.eval_every, before=evaluate)
    trainer.add_callback(evaluation)
    if config.max_minutes is not None:
        trainer.add_callback(TimeBudget(config.max_minutes))
    for callback in callbacks or []:
        trainer.add_callback(callback)
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(str(out))
        after = None
        if evaluate:
            after = trainer.evaluate_held_out()
        report_path = None
        if state.is_main_process:
            before = evaluation.before
            if after is not None:
                (out / EVAL_AFTER_FILE).write_text(json.dumps(after, indent=2) + "\n")
                evaluation.record(after)
            if config.report and before is not None and after is not None:
                from .report import write_report

                report_path = str(write_report(out, config, before, after, command=command))
    finally:
        trainer.policy.close()
        if store is not None:
            store.close()
    return TrainResult(
        output_dir=str(out), adapter_dir=str(out), steps=trainer.state.global_step, metrics_path=str(out / METRICS_FILE),
        before=evaluation.before, after=after, report_path=report_path, resumed_from=checkpoint,
        seconds=time.perf_counter() - started, summary=dict(output.metrics), main_process=state.is_main_process,
    )
