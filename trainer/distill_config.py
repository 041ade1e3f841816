"""``DistillConfig``: every knob of ``lifecycle-agent train --sft`` (warm start by distillation).

A plain dataclass (no torch import), validated before anything heavy loads, beside
:mod:`trainer.distill` as :mod:`trainer.cod_config` sits beside the GRPO trainer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lifecycle_agent.settings import MAX_CONTEXT_BUDGET

from .cod_config import _check_float, _check_int, check_trainable_spec
from .errors import TrainConfigError

#: Training packs start here by default, far from the held-out packs (eval_seed * 10000 + k).
DEFAULT_FIRST_PACK_SEED = 0


@dataclass
class DistillConfig:
    """Options of a supervised warm start: demonstrations from a teacher, collected through
    :class:`~lifecycle_agent.LifecycleAgent`, filtered, then LoRA SFT with TRL's ``SFTTrainer``."""

    output_dir: str
    """Directory for the adapter, ``demonstrations.db``, ``sft_rows.jsonl``, ``train_config.json`` and ``report.md``."""

    # ---------------------------------------------------------------- student, teacher, data
    model: str = "smollm2"
    """The student: a local trainable model, ``smollm2`` or ``hf:PATH``."""
    teacher: str = "oracle"
    """``oracle`` (each environment's reference note-writer and solver: it sees what the agent saw, never a hidden
    fact) or any model spec (``openai:MODEL``, ``hf:PATH``, ``py:module:fn``) whose notes are distilled."""
    envs: list[str] = field(default_factory=lambda: ["fact-recall"])
    """Environments the demonstrations come from."""
    preset: str = "train"
    """Environment preset of demonstration and held-out packs."""
    packs: int = 48
    """Demonstration packs per environment (pack seeds ``first_pack_seed`` and up). Default 48."""
    pack_size: int = 4
    """S: tasks per demonstration pack. Default 4."""
    first_pack_seed: int = DEFAULT_FIRST_PACK_SEED
    """Seed of the first demonstration pack. Default 0."""
    prompt_set: str = "cod-v2"
    """Prompt-set id of every demonstration (and so of the student's input). Default cod-v2."""
    context_budget: int = 2000
    """Maximum context length, characters. Default 2000."""
    teacher_temperature: float = 0.0
    """Sampling temperature of a model teacher (the oracle is deterministic). Default 0 (greedy)."""
    teacher_max_new_tokens: int = 256
    """Completion budget of a model teacher per call, tokens. Default 256."""
    min_gain: float = 0.0
    """Rejection sampling: a pack is kept only when the teacher's reward summed over positions 1.. with its notes
    (``live``) exceeds the same sum without notes (``none``) by more than this. Default 0."""

    # ---------------------------------------------------------------- optimisation (TRL SFTTrainer)
    max_steps: int = 16
    """Optimizer steps. Default 16."""
    batch_size: int = 8
    """Rows per optimizer step. Default 8."""
    learning_rate: float = 1e-3
    """AdamW learning rate (LoRA on a 135M model takes a large one). Default 1e-3."""
    lora_rank: int = 8
    """LoRA rank r. Default 8 (the shipped adapter stays under 10 MB)."""
    lora_alpha: int = 16
    """LoRA alpha. Default 16."""
    lora_target: str = "all-linear"
    """PEFT ``target_modules``. Default all-linear."""
    max_length: int = 1024
    """Longest training row, tokens (longer rows are cut by TRL). Default 1024."""
    seed: int = 0
    """Random seed of LoRA initialisation and row order. Default 0."""
    device: Optional[str] = None
    """``cpu``, ``cuda``, ``cuda:N``; ``None``: cuda when available."""
    dtype: Optional[str] = None
    """``float32``, ``bfloat16``, ``float16``; ``None``: float32 on CPU, bfloat16 on GPU."""
    threads: Optional[int] = None
    """torch CPU threads; ``None``: torch's default."""
    save_dtype: str = "float16"
    """dtype of the saved adapter weights (float16 halves the file; loading casts back). Default float16."""

    # ---------------------------------------------------------------- held-out evaluation
    report: bool = True
    """Evaluate the student before and after on held-out packs and write ``report.md``."""
    eval_packs: int = 16
    """Held-out packs per environment. Default 16."""
    eval_pack_size: Optional[int] = None
    """Tasks per held-out pack; ``None``: ``pack_size``."""
    eval_seed: int = 100
    """Held-out pack seeds ``eval_seed * 10000 + k``. Default 100."""
    eval_envs: list[str] = field(default_factory=list)
    """Environments evaluated besides ``envs`` (never trained on: the transfer check)."""
    eval_temperature: float = 0.6
    """Sampling temperature of the held-out evaluation. Default 0.6."""
    eval_max_new_tokens: int = 96
    """Completion budget per model call in the evaluation. Default 96."""

    def validate(self) -> "DistillConfig":
        """Check every option; raise :class:`TrainConfigError` naming the first bad one. Returns ``self``."""
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise TrainConfigError("output_dir: give the directory the adapter goes to")
        check_trainable_spec(self.model)
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise TrainConfigError("teacher: give oracle or a model spec such as openai:MODEL")
        if self.teacher != "oracle":
            from lifecycle_agent.errors import ModelSpecError
            from lifecycle_agent.models import check_spec

            try:
                check_spec(self.teacher)
            except ModelSpecError as exc:
                raise TrainConfigError(f"teacher: {exc}") from None
        for name in ("envs", "eval_envs"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [e.strip() for e in value.split(",") if e.strip()])
        if not self.envs:
            raise TrainConfigError("envs: name at least one environment (e.g. fact-recall)")
        from lifecycle_agent import envs as registry
        from lifecycle_agent.prompts import get_prompt_set

        for name in [*self.envs, *self.eval_envs]:
            env = registry.make(name, preset=self.preset)
            if self.teacher == "oracle" and name in self.envs and not getattr(env, "has_reference_policy", False):
                raise TrainConfigError(
                    f"teacher: environment {name!r} has no reference note-writer, so --teacher oracle cannot "
                    "demonstrate it; use --teacher SPEC (a model) or another environment"
                )
        get_prompt_set(self.prompt_set)
        for name, minimum in (("packs", 1), ("pack_size", 2), ("context_budget", 1), ("teacher_max_new_tokens", 1),
                              ("max_steps", 1), ("batch_size", 1), ("lora_rank", 1), ("lora_alpha", 1),
                              ("max_length", 16), ("eval_packs", 1), ("eval_max_new_tokens", 1)):
            _check_int(self, name, minimum)
        if self.context_budget > MAX_CONTEXT_BUDGET:
            raise TrainConfigError(f"context_budget: must be at most {MAX_CONTEXT_BUDGET}, got {self.context_budget}")
        for name in ("seed", "first_pack_seed", "eval_seed"):
            _check_int(self, name, None)
        for name in ("eval_pack_size", "threads"):
            if getattr(self, name) is not None:
                _check_int(self, name, 1)
        for name, low in (("teacher_temperature", 0.0), ("learning_rate", 0.0), ("eval_temperature", 0.0), ("min_gain", None)):
            _check_float(self, name, low, None)
        if self.learning_rate == 0:
            raise TrainConfigError("learning_rate: must be > 0")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise TrainConfigError(f"save_dtype: use float32, float16 or bfloat16, got {self.save_dtype!r}")
        held_out = self.eval_pack_seeds()
        last = self.first_pack_seed + self.packs - 1
        if self.first_pack_seed <= held_out[-1] and held_out[0] <= last:
            raise TrainConfigError(
                f"eval_seed: held-out pack seeds {held_out[0]}..{held_out[-1]} overlap the demonstration pack seeds "
                f"{self.first_pack_seed}..{last}; move one of the ranges"
            )
        return self

    def eval_pack_seeds(self) -> list[int]:
        from lifecycle_agent.eval import PACK_SEED_STRIDE

        return [self.eval_seed * PACK_SEED_STRIDE + k for k in range(self.eval_packs)]

    @property
    def held_out_pack_size(self) -> int:
        return self.eval_pack_size if self.eval_pack_size is not None else self.pack_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({"config": self.to_dict(), "method": "sft", **extra}, indent=2, sort_keys=True) + "\n")

