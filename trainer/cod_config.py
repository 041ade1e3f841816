"""``CoDConfig``: every knob of ``lifecycle-agent train --lora``, with its unit and default.

A plain dataclass (no torch import): the CLI validates it before anything heavy loads.
:meth:`CoDConfig.validate` names the offending option; the trainer maps it onto TRL's
``GRPOConfig`` (see :func:`trainer.cod_trainer.grpo_arguments`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lifecycle_agent.settings import TRAINING_SETTINGS, AgentSettings, OnFailedUpdate, ParsePolicy

from .errors import TrainConfigError

#: Loss types: ``cod`` (the paper's one-sided masked policy gradient) or one of TRL's GRPO losses.
LOSS_TYPES = ("cod", "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: Options that may change when a run is resumed (everything else must match the stored config).
RESUMABLE = frozenset({"max_steps", "max_minutes", "threads", "eval_every", "save_steps", "save_total_limit", "report_to", "progress"})
#: GRPOConfig fields the CoD trainer sets itself from CoDConfig (or bypasses), refused in ``trl_args``.
MANAGED_TRL_ARGS = frozenset({
    "output_dir", "max_steps", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
    "steps_per_generation", "generation_batch_size", "temperature", "max_completion_length", "loss_type",
    "epsilon", "epsilon_high", "beta", "learning_rate", "seed", "use_vllm", "scale_rewards", "reward_weights",
    "multi_objective_aggregation", "mask_truncated_completions", "shuffle_dataset", "remove_unused_columns",
    "bf16", "fp16", "use_cpu", "save_steps", "save_total_limit", "report_to", "logging_steps",
    "gradient_checkpointing", "activation_checkpointing", "max_grad_norm", "lr_scheduler_type", "warmup_steps", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "num_generations_eval", "use_transformers_continuous_batching",
})


@dataclass
class CoDConfig:
    """Options of a LoRA GRPO run with per-episode (CoD) credit.

    Rollouts are collected by :class:`~lifecycle_agent.LifecycleAgent` itself: each
    optimizer step runs ``packs_per_step`` packs, each ``group_size`` times from the same
    starting context, and trains on every turn of every solve and update episode.
    """

    output_dir: str
    """Directory for the adapter, checkpoints, ``metrics.jsonl``, ``train_config.json`` and ``report.md``."""

    # ---------------------------------------------------------------- policy and data
    model: str = "smollm2"
    """Local trainable model: ``smollm2`` (the embedded SmolLM2-135M-Instruct) or ``hf:PATH`` (a local directory)."""
    envs: list[str] = field(default_factory=lambda: ["fact-recall"])
    """Environments to train on (names or ``package.module:factory``); packs alternate between them."""
    preset: str = "train"
    """Environment preset of training and held-out packs."""
    max_steps: int = 100
    """Optimizer steps. Default 100."""
    max_minutes: Optional[float] = None
    """Stop after the first step that ends this many minutes into training (loading and the base evaluation
    not counted); ``None``: run all ``max_steps``. The pack order does not depend on it."""
    group_size: int = 4
    """G: rollouts per pack, all from the same starting context and pack seed (>= 2). Default 4."""
    pack_size: int = 4
    """S: tasks per pack, solved in order with an update episode between tasks (>= 2). Default 4."""
    packs_per_step: int = 1
    """Packs per optimizer step (each run ``group_size`` times). Default 1."""
    packing: str = "cod"
    """How a training pack is made from its pack seed (the reference's ``pack_strategy``): ``cod`` (S distinct
    related tasks), ``ralph_sample`` (task 0 repeated S times; ``ralph`` is the same) or ``ralph_full`` (each
    task of the seed's pack repeated S times in a pack of its own: S training packs per pack seed). Default cod."""
    seed: int = 0
    """Random seed of sampling and LoRA initialisation. Default 0."""
    first_pack_seed: int = 0
    """Seed of the first training pack; later packs use the following seeds. Default 0."""
    eval_seed: int = 100
    """Held-out packs use pack seeds ``eval_seed * 10000 + k`` (the eval harness's numbering); default 100
    (pack seeds 1,000,000 and up), which must not overlap the training pack seeds."""

    # ---------------------------------------------------------------- rollouts (the runtime's own loop)
    temperature: float = 0.6
    """Sampling temperature of solve and update episodes; the loss computes log-probs at the same one. Default 0.6."""
    max_new_tokens: int = 64
    """Completion budget per model call, tokens. Default 64."""
    context_budget: int = TRAINING_SETTINGS.context_budget
    """Maximum context length, characters (as in deployment). Default 2000."""
    parse_policy: ParsePolicy = TRAINING_SETTINGS.parse_policy
    """``strict`` (default, as in the paper: only a delimited block counts) or ``lenient`` parsing of update
    replies (a lenient format miss is still penalised)."""
    on_failed_update: OnFailedUpdate = TRAINING_SETTINGS.on_failed_update
    """After an update with no usable notes: ``reset`` (default, the reference's rule: the context becomes the
    fixed "No notes available." text, so a bad update costs the later tasks) or ``keep`` (deployment's rule)."""
    prompt_set: str = TRAINING_SETTINGS.prompt_set
    """Prompt-set id used to build every prompt."""
    init_adapter: Optional[str] = None
    """Start from this LoRA adapter directory (e.g. a ``train --sft`` run) instead of a new adapter; its rank,
    alpha and target modules are used (the ``lora_*`` options are then ignored)."""
    parse_failure_reward: float = -0.1
    """``r_z`` of an update whose reply held no delimited block (format miss or failure). Default -0.1."""
    rollout_batch_size: Optional[int] = None
    """Most model calls merged into one ``generate``; ``None``: every rollout of the step (G x packs)."""
    keep_rollouts: bool = True
    """Keep every rollout episode in ``OUTPUT_DIR/rollouts.db`` (inspect with ``lifecycle-agent context``)."""

    # ---------------------------------------------------------------- credit and loss
    loss_type: str = "cod"
    """``cod`` (one-sided masked policy gradient, token mean) or a TRL GRPO loss: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo."""
    normalize_std: bool = False
    """Divide advantages by the group's standard deviation at each (episode type, position). Default off."""
    reweight: bool = False
    """The paper's adaptive re-weighting ``A * exp(A / T)`` when a batch's token-weighted advantage sum is negative."""
    clip_low: float = 0.2
    """Tokens with a non-positive advantage learn while ratio >= 1 - clip_low (TRL losses: epsilon). Default 0.2."""
    clip_high: float = 0.2
    """Tokens with a non-negative advantage learn while ratio <= 1 + clip_high (TRL losses: epsilon_high). Default 0.2."""
    beta: float = 0.0
    """KL coefficient against the base model (TRL loss types only; the ``cod`` loss has no KL term). Default 0."""

    # ---------------------------------------------------------------- optimisation
    learning_rate: float = 5e-5
    """AdamW learning rate. Small models on CPU need 1e-5..1e-4. Default 5e-5."""
    lr_scheduler: str = "constant"
    """transformers scheduler name (constant, linear, cosine, ...). Default constant."""
    warmup_steps: int = 0
    """Linear warm-up, optimizer steps. Default 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = none). Default 1.0."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (the step's training rows are split evenly). Default 1."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: memory grows with rows x tokens only through the layer inputs,
    for about a third more compute. Default on (as in TRL); turn off for speed when memory allows."""

    # ---------------------------------------------------------------- LoRA
    lora_rank: int = 16
    """LoRA rank r. Default 16."""
    lora_alpha: int = 32
    """LoRA scaling alpha (the update is scaled by alpha / r). Default 32."""
    lora_target: str = "all-linear"
    """PEFT ``target_modules``: ``all-linear`` or comma-separated module names. Default all-linear."""

    # ---------------------------------------------------------------- hardware
    device: Optional[str] = None
    """``cpu``, ``cuda``, ``cuda:N``; ``None``: cuda when available, else cpu. Under ``accelerate launch`` accelerate decides."""
    dtype: Optional[str] = None
    """``float32``, ``bfloat16``, ``float16``; ``None``: float32 on CPU, bfloat16 on a GPU that supports it."""
    threads: Optional[int] = None
    """torch CPU threads (``torch.set_num_threads``); ``None``: torch's default (one per core). On a CPU shared
    with other jobs, 1 avoids threads waiting on each other (measured 10x faster generation on 2 busy cores)."""

    # ---------------------------------------------------------------- checkpoints, logging, evaluation
    save_steps: int = 10
    """Checkpoint every this many optimizer steps (and at the end). Default 10."""
    save_total_limit: Optional[int] = 2
    """Checkpoints kept (oldest deleted); ``None`` keeps all. Default 2."""
    eval_every: int = 0
    """Evaluate on held-out packs every this many steps (0: only before and after training). Default 0."""
    eval_packs: int = 8
    """Held-out packs per environment for every evaluation. Default 8."""
    eval_pack_size: Optional[int] = None
    """Tasks per held-out pack; ``None``: ``pack_size``."""
    eval_temperature: Optional[float] = None
    """Sampling temperature of evaluations; ``None``: ``temperature``."""
    report: bool = True
    """Evaluate base and trained policy on held-out packs at the end and write ``report.md`` with a plot."""
    report_to: list[str] = field(default_factory=list)
    """Extra loggers: ``tensorboard`` and/or ``wandb`` (when installed). ``metrics.jsonl`` is always written."""
    progress: bool = True
    """Show a progress bar with the current per-position rewards."""
    trl_args: dict[str, Any] = field(default_factory=dict)
    """Further ``trl.GRPOConfig`` fields (e.g. ``optim``, ``weight_decay``, ``entropy_coef``); managed fields are refused."""

    # ---------------------------------------------------------------- derived values
    @property
    def rollouts_per_step(self) -> int:
        """Rollouts collected per optimizer step: ``group_size * packs_per_step``."""
        return self.group_size * self.packs_per_step

    @property
    def held_out_pack_size(self) -> int:
        return self.eval_pack_size if self.eval_pack_size is not None else self.pack_size

    @property
    def held_out_temperature(self) -> float:
        return self.eval_temperature if self.eval_temperature is not None else self.temperature

    def pack_schedule(self) -> list[dict[str, Any]]:
        """Training packs in order: ``max_steps * packs_per_step`` rows of ``env``, ``preset``, ``seed``,
        ``packing`` and ``instance`` (the task a ``ralph_full`` pack repeats, else ``None``).

        Packs alternate between environments; each environment counts its own seeds up from
        ``first_pack_seed``. Under ``ralph_full`` an environment's packs run through the S tasks of a
        pack seed before moving to the next seed. The order is fixed by the config, so a resumed run
        sees the same packs.
        """
        from lifecycle_agent.envs import canonical_packing

        packing = canonical_packing(self.packing)
        per_seed = self.pack_size if packing == "ralph_full" else 1
        rows = []
        for k in range(self.max_steps * self.packs_per_step):
            env = self.envs[k % len(self.envs)]
            count = k // len(self.envs)
            seed = self.first_pack_seed + count // per_seed
            instance = count % per_seed if packing == "ralph_full" else None
            label = f"{env}/{self.preset}/s{seed}" + (f"/{packing}" if packing != "cod" else "")
            label += f"i{instance}" if instance is not None else ""
            rows.append({"prompt": label, "env": env, "preset": self.preset, "seed": seed, "packing": packing,
                         "instance": instance})
        return rows

    def eval_pack_seeds(self) -> list[int]:
        """Held-out pack seeds (the same for every environment), as the eval harness numbers them."""
        from lifecycle_agent.eval import PACK_SEED_STRIDE

        return [self.eval_seed * PACK_SEED_STRIDE + k for k in range(self.eval_packs)]

    # ---------------------------------------------------------------- validation and storage
    def validate(self, world_size: int = 1) -> "CoDConfig":
        """Check every option; raise :class:`TrainConfigError` naming the first bad one. Returns ``self``."""
        def bad(name: str, why: str) -> TrainConfigError:
            return TrainConfigError(f"{name}: {why}")

        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise bad("output_dir", "give the directory the adapter and checkpoints go to")
        check_trainable_spec(self.model)
        if isinstance(self.envs, str):
            self.envs = [e.strip() for e in self.envs.split(",") if e.strip()]
        if not self.envs:
            raise bad("envs", "name at least one environment (e.g. fact-recall)")
        from lifecycle_agent import envs as registry
        from lifecycle_agent.errors import EnvironmentSpecError

        for name in self.envs:
            registry.make(name, preset=self.preset)  # unknown names and presets raise EnvironmentSpecError
        for name, minimum in (
            ("max_steps", 1), ("packs_per_step", 1), ("max_new_tokens", 1),
            ("gradient_accumulation_steps", 1), ("lora_rank", 1), ("lora_alpha", 1), ("save_steps", 1),
            ("eval_packs", 1), ("eval_every", 0), ("warmup_steps", 0),
        ):
            _check_int(self, name, minimum)
        _check_int(self, "group_size", 2, "GRPO needs at least 2 rollouts per pack to form a baseline")
        _check_int(self, "pack_size", 2, "a pack needs at least 2 tasks so that an update episode has a later task to help")
        try:
            self.packing = registry.canonical_packing(self.packing)
        except EnvironmentSpecError as exc:
            raise bad("packing", str(exc)) from None
        for name in ("seed", "first_pack_seed", "eval_seed"):
            _check_int(self, name, None)
        if self.eval_pack_size is not None:
            _check_int(self, "eval_pack_size", 1)
        if self.rollout_batch_size is not None:
            _check_int(self, "rollout_batch_size", 1)
        if self.threads is not None:
            _check_int(self, "threads", 1)
        if self.save_total_limit is not None:
            _check_int(self, "save_total_limit", 1)
        for name, low, high in (
            ("temperature", 0.0, None), ("learning_rate", 0.0, None), ("clip_low", 0.0, 1.0), ("clip_high", 0.0, None),
            ("beta", None, None), ("max_grad_norm", None, None),
            ("parse_failure_reward", None, None),
        ):
            _check_float(self, name, low, high)
        if self.temperature == 0:
            raise bad("temperature", "must be > 0: GRPO learns from sampled rollouts (SmolLM2 works best at 0.5-0.7)")
        if self.max_minutes is not None:
            _check_float(self, "max_minutes", 0.0, None)
        if self.eval_temperature is not None:
            _check_float(self, "eval_temperature", 0.0, None)
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.beta < 0:
            raise bad("beta", f"must be >= 0, got {self.beta}")
        _check_agent_settings(self)
        if self.init_adapter is not None:
            check_adapter_dir(self.init_adapter, "init_adapter")
        from lifecycle_agent.prompts import get_prompt_set

        get_prompt_set(self.prompt_set)
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "cod" and self.beta != 0:
            raise bad("beta", "the cod loss has no KL term; use beta 0 or a TRL loss type (e.g. --loss grpo)")
        if not isinstance(self.lora_target, str) or not self.lora_target.strip():
            raise bad("lora_target", "give all-linear or comma-separated module names")
        unknown_loggers = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if unknown_loggers:
            raise bad("report_to", f"unknown logger(s) {', '.join(unknown_loggers)}; use tensorboard and/or wandb")
        import importlib.util

        for logger, modules in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))):
            if logger in self.report_to and not any(importlib.util.find_spec(m) for m in modules):
                raise bad("report_to", f"{logger} is not installed: pip install {logger} (metrics.jsonl is always written)")
        managed = sorted(set(self.trl_args) & MANAGED_TRL_ARGS)
        if managed:
            raise bad("trl_args", f"{', '.join(managed)} are set by the trainer's own options; use those instead")
        split = self.gradient_accumulation_steps * world_size
        if self.rollouts_per_step % split:
            raise bad(
                "gradient_accumulation_steps",
                f"group_size x packs_per_step = {self.rollouts_per_step} rollouts per step must divide evenly into "
                f"{self.gradient_accumulation_steps} micro-batches x {world_size} process(es)",
            )
        _check_int(self, "eval_packs", 1)
        held_out = self.eval_pack_seeds()
        last_train_seed = max(row["seed"] for row in self.pack_schedule())
        if self.first_pack_seed <= held_out[-1] and held_out[0] <= last_train_seed:
            raise bad(
                "eval_seed",
                f"held-out pack seeds {held_out[0]}..{held_out[-1]} overlap the training pack seeds "
                f"{self.first_pack_seed}..{last_train_seed}; move one of the ranges (--eval-seed or first_pack_seed)",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write the config (and ``extra`` facts such as library versions) as JSON."""
        Path(path).write_text(json.dumps({"config": self.to_dict(), **extra}, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CoDConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise TrainConfigError(f"cannot read the training config {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise TrainConfigError(f"{path} is not a lifecycle-agent training config (no 'config' object)")
        stored = dict(data["config"])
        # runs saved before on_failed_update existed kept the context after a failed update: resume them so
        stored.setdefault("on_failed_update", "keep")
        return cls.from_dict(stored)

    @classmethod
    def resume_from(cls, output_dir: str | Path, **given: Any) -> "CoDConfig":
        """The config of a run in ``output_dir`` continued with ``given`` options.

        The stored ``train_config.json`` is the base when it exists (else the defaults); every
        option in ``given`` that is not ``None`` overrides it (``None`` means "not given", so a
        resumed run keeps what it was started with). Whether an override is allowed on a resumed
        run (:data:`RESUMABLE`) is the trainer's check, against the same stored file.
        """
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)} - {"output_dir"})
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(unknown)}")
        stored = Path(output_dir) / "train_config.json"
        base = cls.load(stored).to_dict() if stored.is_file() else {}
        return cls(**{**base, **{k: v for k, v in given.items() if v is not None}, "output_dir": str(output_dir)})

    def differences(self, other: "CoDConfig") -> list[str]:
        """Options that differ from ``other`` and may not change on resume, as ``name: old -> new`` lines."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: {theirs[name]!r} -> {mine[name]!r}"
            for name in sorted(mine)
            if name not in RESUMABLE and name != "output_dir" and mine[name] != theirs[name]
        ]


def check_trainable_spec(spec: Any) -> tuple[str, Optional[str]]:
    """``("smollm2", None)`` or ``("hf", PATH)`` for a local trainable model spec; else :class:`TrainConfigError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise TrainConfigError("model: give smollm2 or hf:PATH (a local transformers model directory)")
    spec = spec.strip()
    if spec == "smollm2":
        return "smollm2", None
    if spec.startswith("hf:") and len(spec) > 3:
        path = spec[3:]
        if "@" in path:
            raise TrainConfigError(
                f"model {spec!r}: training starts a new LoRA adapter on the base model; drop '@ADAPTER' "
                "(continue an interrupted run with --resume instead)"
            )
        return "hf", path
    if spec.startswith("smollm2@"):
        raise TrainConfigError(
            f"model {spec!r}: training starts a new LoRA adapter on the base model; use 'smollm2' "
            "(continue an interrupted run with --resume instead)"
        )
    raise TrainConfigError(
        f"model {spec!r} is not a local trainable model: training needs the weights and token log-probs, "
        "so use smollm2 or hf:PATH (openai:, py: and scripted models can be evaluated but not trained)"
    )


def check_adapter_dir(path: Any, option: str = "init_adapter") -> Path:
    """``path`` as a PEFT adapter directory (it holds ``adapter_config.json``), or a :class:`TrainConfigError`."""
    if not isinstance(path, str) or not path.strip():
        raise TrainConfigError(f"{option}: give the directory of a LoRA adapter (a train --sft or --lora output)")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise TrainConfigError(f"{option}: {directory} is not a directory")
    if not (directory / "adapter_config.json").is_file():
        raise TrainConfigError(
            f"{option}: {directory} is not a LoRA adapter directory (no adapter_config.json); give the output "
            "directory of lifecycle-agent train --sft or train --lora"
        )
    return directory


def resolve_precision(
    device: Optional[str], dtype: Optional[str], *, cuda_available: bool, bf16_supported: bool
) -> tuple[str, str]:
    """``(device, dtype)`` actually used: ``None`` picks cuda when available; dtype float32 on CPU, bf16 (else fp16) on GPU."""
    if device in (None, "auto"):
        device = "cuda" if cuda_available else "cpu"
    device = str(device)
    if device.startswith("cuda") and not cuda_available:
        raise TrainConfigError(f"device {device!r}: no CUDA GPU is visible; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise TrainConfigError(f"device {device!r}: use cpu, cuda or cuda:N")
    aliases = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}
    if dtype in (None, "auto"):
        if device == "cpu":
            return device, "float32"
        return device, "bfloat16" if bf16_supported else "float16"
    name = aliases.get(str(dtype).lower())
    if name is None:
        raise TrainConfigError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    if device == "cpu" and name == "float16":
        raise TrainConfigError("dtype float16 is not supported for training on CPU; use float32 or bfloat16")
    if name == "bfloat16" and device.startswith("cuda") and not bf16_supported:
        raise TrainConfigError("dtype bfloat16: this GPU does not support it; use float16")
    return device, name


def _check_agent_settings(config: CoDConfig) -> None:
    """The agent settings a run passes to its rollouts, checked by their one definition (AgentSettings)."""
    fields = {name: getattr(config, name) for name in ("context_budget", "parse_policy", "on_failed_update")}
    try:
        AgentSettings.model_validate(fields, strict=True)
    except ValueError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0])
        raise TrainConfigError(f"{name}: {err['msg'].lower()}, got {fields[name]!r}") from None


def _check_int(config: CoDConfig, name: str, minimum: Optional[int], why: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainConfigError(f"{name}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise TrainConfigError(f"{name}: must be >= {minimum}, got {value}" + (f" ({why})" if why else ""))


def _check_float(config: CoDConfig, name: str, low: Optional[float], high: Optional[float]) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainConfigError(f"{name}: must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise TrainConfigError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise TrainConfigError(f"{name}: must be <= {high}, got {value}")
