"""Trainer callbacks: ``metrics.jsonl``, the progress bar, held-out evaluation, the finite-gradient guard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from .errors import NonFiniteLossError


class MetricsFile(TrainerCallback):
    """Appends every log (one per optimizer step) to ``metrics.jsonl`` with the step and its wall time (``time/step_s``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._step_started: Optional[float] = None
        self._step_seconds: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self._step_seconds = time.perf_counter() - self._step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in logs.items()})
        if self._step_seconds is not None and "loss" in logs:
            record["time/step_s"] = round(self._step_seconds, 3)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class RewardProgress(TrainerCallback):
    """A rich progress bar on stderr showing the step, the loss and the current mean reward by position."""

    def __init__(self, first_status: str = "collecting rollouts ..."):
        self.first_status = first_status
        self.progress = None
        self.task = None
        self.status: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           status=self.first_status)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.progress is not None and self.status is None:
            self.progress.update(self.task, status="collecting rollouts ...")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.status = progress_status(logs)
            self.progress.update(self.task, completed=state.global_step, status=self.status)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def progress_status(logs: dict[str, Any]) -> str:
    """``loss 0.012 | fact-recall 0.25 0.50 0.75 | parse fail 0.90`` from one step's logs."""
    parts = [f"loss {logs['loss']:.4g}"] if isinstance(logs.get("loss"), (int, float)) else []
    envs: dict[str, dict[int, float]] = {}
    for key, value in logs.items():
        if key.startswith("reward/") and "/pos" in key:
            _, env, pos = key.split("/")
            envs.setdefault(env, {})[int(pos[3:])] = value
    for env, positions in envs.items():
        parts.append(f"{env} " + " ".join(f"{positions[j]:.2f}" for j in sorted(positions)))
    if "update/parse_failure_rate" in logs:
        parts.append(f"parse fail {logs['update/parse_failure_rate']:.2f}")
    return " | ".join(parts)


class HeldOutEval(TrainerCallback):
    """Evaluates on held-out packs: the base model before training, then every ``every`` steps.

    Results go to ``eval_before.json`` and ``eval_history.jsonl`` and, as ``eval/ENV/posJ``,
    into the step's logs (``metrics.jsonl``, tensorboard, wandb). Every process takes part in
    the generation context; the main process evaluates.
    """

    def __init__(self, trainer, output_dir: str | Path, *, every: int, before: bool):
        self.trainer = trainer
        self.out = Path(output_dir)
        self.every = every
        self.want_before = before
        self.before: Optional[dict] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.want_before:
            return
        path = self.out / "eval_before.json"
        if path.is_file():  # a resumed run measured the base model already
            self.before = json.loads(path.read_text())
            return
        self.before = self.trainer.evaluate_held_out(base=True)
        if self.before is not None:
            path.write_text(json.dumps(self.before, indent=2) + "\n")
            self.record(self.before)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every or state.global_step >= state.max_steps:
            return  # the final evaluation runs after training
        from .report import eval_metrics

        result = self.trainer.evaluate_held_out()
        if result is not None:
            for name, value in eval_metrics(result).items():
                self.trainer._metrics["train"][name].append(value)
            self.record(result)

    def record(self, result: dict) -> None:
        """Append one evaluation to ``eval_history.jsonl``."""
        with (self.out / "eval_history.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")


class TimeBudget(TrainerCallback):
    """Stops training after the first step that ends ``minutes`` after the first step began."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None and time.perf_counter() - self.started >= self.seconds:
            control.should_training_stop = True
            control.should_save = True  # the last step becomes a checkpoint, so --resume can go on from it


class FiniteGradients(TrainerCallback):
    """Stops training before the optimizer step when a gradient is NaN or infinite (the weights stay good)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                raise NonFiniteLossError(
                    f"the gradient of {name} became NaN or infinite at step {state.global_step + 1}; training stopped "
                    "before the optimizer step, so the weights and the last checkpoint are unchanged. Lower --lr, "
                    "then continue with --resume"
                )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
