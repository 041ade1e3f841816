"""``lifecycle-agent train --lora``: LoRA GRPO with per-episode credit over the runtime's own rollouts.

Thin: options become a :class:`trainer.cod_config.CoDConfig` (a light import) and
:func:`trainer.cod_trainer.train` (torch, transformers, trl, peft) is imported only when
the command runs, so ``lifecycle-agent --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from . import app
from .common import JSON_OPTION, console, err_console, print_json

try:  # the trainer ships in the same distribution; its config module imports nothing heavy
    from trainer.cod_config import LOSS_TYPES, CoDConfig
    from trainer.errors import TrainConfigError
except ImportError:  # pragma: no cover - a partial install without the trainer package
    CoDConfig = None  # type: ignore[assignment]
    LOSS_TYPES = ("cod",)

_DEFAULTS = (
    {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(CoDConfig)
     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    if CoDConfig else {}
)


def _d(name: str) -> str:
    """`` (default: X)`` for a CoDConfig field (options default to None so --resume can fill them from the run)."""
    value = _DEFAULTS.get(name)
    return f" (default: {','.join(value) if isinstance(value, list) else value})"


def parse_trl_args(items: list[str]) -> dict[str, Any]:
    """``--trl-arg KEY=VALUE`` (VALUE read as JSON, else as text) into a dict of GRPOConfig fields."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"--trl-arg {item!r}: expected KEY=VALUE, e.g. --trl-arg weight_decay=0.01")
        try:
            result[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            result[key.strip()] = raw
    return result


def build_config(output: Path, given: dict[str, Any], resume: bool) -> "CoDConfig":
    """The run's config: options given on the command line over the stored run (with --resume) or the defaults."""
    if resume:
        return CoDConfig.resume_from(output, **given)
    return CoDConfig(**{k: v for k, v in given.items() if v is not None}, output_dir=str(output))


def results_table(before: Optional[dict], after: Optional[dict]) -> Optional[Table]:
    """Base vs trained mean reward by position on the held-out packs."""
    if not before or not after:
        return None
    from trainer.report import live

    table = Table(title="held-out packs: mean reward by position (live context)")
    for column in ("environment", "position", "base", "trained", "change"):
        table.add_column(column, justify="left" if column == "environment" else "right")
    for env in after.get("environments", {}):
        old, new = live(before, env), live(after, env)
        for j, value in enumerate(new["by_position"]):
            prior = old["by_position"][j] if old and j < len(old["by_position"]) else None
            table.add_row(
                env, str(j), "-" if prior is None else f"{prior:.3f}", "-" if value is None else f"{value:.3f}",
                "-" if prior is None or value is None else f"{value - prior:+.3f}",
            )
    return table


@app.command("train")
def train_command(
    ctx: typer.Context,
    lora: bool = typer.Option(False, "--lora", help="LoRA GRPO with per-episode credit (one of --lora / --sft is required)."),
    sft: bool = typer.Option(False, "--sft", help="Warm start: distil a teacher's notes into a LoRA adapter (TRL SFTTrainer)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="--sft: oracle (each environment's reference note-writer) or a model spec, e.g. openai:MODEL (default: oracle)."),
    packs: Optional[int] = typer.Option(None, "--packs", help="--sft: demonstration packs per environment (default: 48)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="--sft: rows per optimizer step (default: 8)."),
    eval_envs: Optional[str] = typer.Option(None, "--eval-envs", help="--sft: environments evaluated but never trained on (transfer check), comma-separated."),
    init_adapter: Optional[str] = typer.Option(None, "--init-adapter", help="--lora: continue from this LoRA adapter directory (e.g. a train --sft output)."),
    prompt_set: Optional[str] = typer.Option(None, "--prompt-set", help="Prompt-set id of every episode (default: cod-v1 for --lora, cod-v2 for --sft)."),
    on_failed_update: Optional[str] = typer.Option(None, "--on-failed-update", help="--lora: reset (the context becomes 'No notes available.') or keep, after an update with no notes." + _d("on_failed_update")),
    output: Path = typer.Option(..., "--output-dir", "--output", "-o", help="Run directory: adapter, checkpoints, metrics.jsonl, report.md."),
    env: Optional[str] = typer.Option(None, "--envs", "--env", "-e", help="Environment(s), comma-separated." + _d("envs")),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local trainable model: smollm2 or hf:PATH." + _d("model")),
    steps: Optional[int] = typer.Option(None, "--max-steps", "--steps", help="Optimizer steps." + _d("max_steps")),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop after the step that ends this many minutes into training (default: no limit)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-G", help="Rollouts per pack, from the same context (>= 2)." + _d("group_size")),
    pack_size: Optional[int] = typer.Option(None, "--pack-size", "-S", help="Tasks per pack (>= 2)." + _d("pack_size")),
    packs_per_step: Optional[int] = typer.Option(None, "--packs-per-step", help="Packs per optimizer step." + _d("packs_per_step")),
    packing: Optional[str] = typer.Option(None, "--packing", help="--lora: cod, ralph_sample (ralph) or ralph_full; how a training pack is made from its seed." + _d("packing")),
    lr: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Learning rate." + _d("learning_rate")),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint (same pack order)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --output and start over."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate on held-out packs every K steps (0: before and after only)." + _d("eval_every")),
    eval_packs: Optional[int] = typer.Option(None, "--eval-packs", help="Held-out packs per environment." + _d("eval_packs")),
    eval_pack_size: Optional[int] = typer.Option(None, "--eval-pack-size", help="Tasks per held-out pack (default: --pack-size)."),
    eval_seed: Optional[int] = typer.Option(None, "--eval-seed", help="Held-out pack seeds are EVAL_SEED*10000+k." + _d("eval_seed")),
    preset: Optional[str] = typer.Option(None, "--preset", help="Environment preset." + _d("preset")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature of rollouts and of the loss's log-probs." + _d("temperature")),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens per model call." + _d("max_new_tokens")),
    loss: Optional[str] = typer.Option(None, "--loss-type", "--loss", help="cod (one-sided masked PG) or a TRL loss: " + ", ".join(LOSS_TYPES[1:]) + "." + _d("loss_type")),
    normalize_std: Optional[bool] = typer.Option(None, "--normalize-std/--no-normalize-std", help="Divide advantages by the group std." + _d("normalize_std")),
    reweight: Optional[bool] = typer.Option(None, "--reweight/--no-reweight", help="Adaptive advantage re-weighting A*exp(A/T)." + _d("reweight")),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL coefficient (TRL loss types only)." + _d("beta")),
    clip_low: Optional[float] = typer.Option(None, "--clip-low", help="Non-positive advantages learn while ratio >= 1 - clip_low." + _d("clip_low")),
    clip_high: Optional[float] = typer.Option(None, "--clip-high", help="Non-negative advantages learn while ratio <= 1 + clip_high." + _d("clip_high")),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank." + _d("lora_rank")),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha." + _d("lora_alpha")),
    lora_target: Optional[str] = typer.Option(None, "--lora-target", help="all-linear or comma-separated module names." + _d("lora_target")),
    grad_accum: Optional[int] = typer.Option(None, "--gradient-accumulation-steps", "--grad-accum", help="Micro-batches per optimizer step." + _d("gradient_accumulation_steps")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward: less memory, ~1/3 more compute." + _d("gradient_checkpointing")),
    save_every: Optional[int] = typer.Option(None, "--save-steps", "--save-every", help="Checkpoint every N steps." + _d("save_steps")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of sampling and LoRA init." + _d("seed")),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, envvar="LIFECYCLE_AGENT_THREADS", help="torch CPU threads (default: one per core; 1 is faster on a CPU shared with other jobs). Also LIFECYCLE_AGENT_THREADS."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)."),
    context_budget: Optional[int] = typer.Option(None, "--context-budget", help="Context budget, characters." + _d("context_budget")),
    parse_policy: Optional[str] = typer.Option(None, "--parse-policy", help="lenient or strict." + _d("parse_policy")),
    report_to: list[str] = typer.Option([], "--report-to", help="Extra logger: tensorboard or wandb (repeat for both)."),
    trl_arg: list[str] = typer.Option([], "--trl-arg", help="Any other trl.GRPOConfig field, KEY=VALUE (repeatable)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the before/after held-out evaluation and report.md."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a LoRA adapter so the agent writes and uses its context better (per-episode GRPO credit).

    Rollouts run through LifecycleAgent itself (same prompts, parsing, context budget and
    store as deployment). Interrupt with Ctrl-C and continue with --resume.
    """
    if lora == sft:
        raise typer.BadParameter(
            "pass exactly one of --lora (GRPO with per-episode credit) and --sft (warm start by distillation)",
            param_hint="--lora / --sft",
        )
    if CoDConfig is None:  # pragma: no cover
        raise typer.BadParameter("the trainer package is not installed: pip install 'lifecycle-agent[train]'")
    if sft:
        refused = {"--resume": resume, "--init-adapter": init_adapter, "--group-size": group_size, "--loss-type": loss,
                   "--packing": packing,
                   "--on-failed-update": on_failed_update}
        given_refused = [name for name, value in refused.items() if value not in (None, False)]
        if given_refused:
            raise typer.BadParameter(f"{', '.join(given_refused)} belong(s) to --lora, not --sft", param_hint="--sft")
        sft_given = dict(
            envs=[e.strip() for e in env.split(",") if e.strip()] if env is not None else None,
            eval_envs=[e.strip() for e in eval_envs.split(",") if e.strip()] if eval_envs is not None else None,
            model=model, teacher=teacher, packs=packs, pack_size=pack_size, max_steps=steps, batch_size=batch_size,
            learning_rate=lr, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_target=lora_target, seed=seed,
            device=device, dtype=dtype, threads=threads, context_budget=context_budget, eval_packs=eval_packs,
            eval_pack_size=eval_pack_size, eval_seed=eval_seed, preset=preset, prompt_set=prompt_set,
            report=False if no_report else None,
        )
        _run_sft(ctx, output, sft_given, overwrite, as_json)
        return
    if any(v is not None for v in (teacher, packs, batch_size, eval_envs)):
        raise typer.BadParameter("--teacher, --packs, --batch-size and --eval-envs belong to --sft", param_hint="--lora")
    given = dict(
        envs=[e.strip() for e in env.split(",") if e.strip()] if env is not None else None,
        model=model, max_steps=steps, max_minutes=max_minutes, group_size=group_size, pack_size=pack_size, packs_per_step=packs_per_step,
        packing=packing, learning_rate=lr, eval_every=eval_every, eval_packs=eval_packs, eval_pack_size=eval_pack_size,
        eval_seed=eval_seed, preset=preset, temperature=temperature, max_new_tokens=max_new_tokens, loss_type=loss,
        normalize_std=normalize_std, reweight=reweight, beta=beta, clip_low=clip_low, clip_high=clip_high, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_target=lora_target, gradient_accumulation_steps=grad_accum, gradient_checkpointing=gradient_checkpointing,
        save_steps=save_every, seed=seed, device=device, dtype=dtype, threads=threads, context_budget=context_budget,
        parse_policy=parse_policy, report_to=list(report_to) or None, trl_args=parse_trl_args(trl_arg) or None,
        init_adapter=init_adapter, prompt_set=prompt_set, on_failed_update=on_failed_update,
        report=False if no_report else None, progress=progress and not as_json,
    )
    config = build_config(output, given, resume)
    config.validate()  # cheap checks before torch loads
    command = command_line(ctx)
    if not as_json:
        err_console.print(f"training {config.model} on {', '.join(config.envs)} -> {output} (loading the trainer ...)")
    from trainer.cod_trainer import last_checkpoint, train

    try:
        result = train(config, resume=resume, overwrite=overwrite, command=command)
    except KeyboardInterrupt:
        checkpoint = last_checkpoint(output)
        err_console.print(
            f"[yellow]interrupted[/]; last checkpoint: {checkpoint or 'none yet'}. Continue with: "
            f"lifecycle-agent train --lora --output {shlex.quote(str(output))} --resume"
        )
        raise typer.Exit(130)
    if not result.main_process:
        return  # under torchrun / accelerate launch the main process reports
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    table = results_table(result.before, result.after)
    if table is not None:
        console.print(table)
    console.print(f"adapter: {result.adapter_dir} (use --model {_adapter_spec(config.model, result.adapter_dir)})")
    console.print(f"metrics: {result.metrics_path}")
    if result.report_path:
        console.print(f"report:  {result.report_path}")
    console.print(f"{result.steps} steps in {result.seconds:.0f} s")


def _run_sft(ctx: typer.Context, output: Path, given: dict[str, Any], overwrite: bool, as_json: bool) -> None:
    """``train --sft``: a :class:`trainer.distill_config.DistillConfig` run through :func:`trainer.distill.distill`."""
    from trainer.distill_config import DistillConfig

    config = DistillConfig(output_dir=str(output), **{k: v for k, v in given.items() if v is not None})
    config.validate()  # cheap checks before torch loads
    if not as_json:
        err_console.print(
            f"warm start: {config.model} learns from teacher {config.teacher} on {', '.join(config.envs)} -> {output}"
        )
    from trainer.distill import distill

    result = distill(config, overwrite=overwrite, command=command_line(ctx))
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    console.print(
        f"demonstrations: {result.packs_kept} of {result.packs_collected} packs kept, {result.rows} rows; "
        f"{result.steps} SFT steps in {result.seconds:.0f} s"
    )
    console.print(f"adapter: {result.adapter_dir} (use --model {_adapter_spec(config.model, result.adapter_dir)}; "
                  f"continue with train --lora --init-adapter {shlex.quote(result.adapter_dir)})")
    if result.report_path:
        console.print(f"report:  {result.report_path}")


def command_line(ctx: typer.Context) -> str:
    """The command as given (the options set on the command line, in their canonical spelling)."""
    parts = [ctx.command_path]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":  # by name: typer may vendor its own click
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            names = param.opts if value or not param.secondary_opts else param.secondary_opts
            parts.append(names[-1] if names[-1].startswith("--") else names[0])
            continue
        option = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        for item in value if isinstance(value, (list, tuple)) else [value]:
            parts += [option, shlex.quote(str(item))]
    return " ".join(parts)


def _adapter_spec(model: str, adapter_dir: str) -> str:
    return f"{model}@{adapter_dir}"


__all__ = ["train_command", "build_config", "parse_trl_args", "results_table"]
