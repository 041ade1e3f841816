"""Warm start by distillation: ``lifecycle-agent train --sft``.

1. **Collect.** For every demonstration pack, the teacher runs it twice through
   :class:`~lifecycle_agent.LifecycleAgent` (the deployment code path: same prompts, parsing,
   budget, store): with its notes (``live``) and without (``none``).
2. **Select** (rejection sampling). A pack is kept when the teacher's notes made its later tasks
   solvable: the reward summed over positions 1.. is higher ``live`` than ``none`` (by more than
   ``min_gain``) and every update episode held a well-formed delimited block.
3. **Rows.** From each kept ``live`` run: every update episode (its prompt, the teacher's reply)
   and every rewarded solve turn (the prompt so far, the teacher's reply).
4. **Train** a LoRA adapter with TRL's ``SFTTrainer`` + PEFT (loss on the completion only). The
   output directory has the layout of a GRPO run, so ``smollm2@DIR`` loads it and
   ``train --lora --init-adapter DIR`` continues with GRPO.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lifecycle_agent import LifecycleAgent
from lifecycle_agent import envs as env_registry
from lifecycle_agent.errors import LifecycleAgentError
from lifecycle_agent.store import Store

from .distill_config import DistillConfig
from .errors import OutputDirError, TrainConfigError

CONFIG_FILE = "train_config.json"
DEMO_DB = "demonstrations.db"
ROWS_FILE = "sft_rows.jsonl"
METRICS_FILE = "metrics.jsonl"


class TeacherError(LifecycleAgentError, ValueError):
    """The teacher could not be loaded, failed on every call, or its notes never helped."""


@dataclass
class PackDemo:
    """The teacher's two runs of one pack."""

    env: str
    seed: int
    live_agent: str
    live_rewards: list[float]
    none_rewards: list[float]
    update_ok: int
    updates: int
    errors: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float:
        return sum(self.live_rewards[1:]) - sum(self.none_rewards[1:])


@dataclass
class DistillResult:
    """What :func:`distill` returns."""

    output_dir: str
    adapter_dir: str
    packs_collected: int
    packs_kept: int
    rows: int
    steps: int
    seconds: float
    before: Optional[dict] = None
    after: Optional[dict] = None
    report_path: Optional[str] = None


def teacher_models(config: DistillConfig) -> dict[str, Any]:
    """The teacher of every demonstration environment: its reference policy (``oracle``), or the one model the
    spec names, loaded once and shared by every environment."""
    if config.teacher == "oracle":
        from lifecycle_agent.models.teacher import ReferenceTeacher

        return {name: ReferenceTeacher(env_registry.make(name, preset=config.preset), config.prompt_set)
                for name in config.envs}
    from lifecycle_agent.models import resolve_model

    try:
        model = resolve_model(config.teacher)
    except Exception as exc:  # a spec that cannot load: say which option and why
        raise TeacherError(f"teacher {config.teacher!r} could not be loaded: {exc}") from exc
    return {name: model for name in config.envs}


async def collect(config: DistillConfig, store: Store, teachers: dict[str, Any]) -> list[PackDemo]:
    """Run every demonstration pack ``live`` and ``none`` with its environment's teacher."""

    async def one(env_name: str, seed: int) -> PackDemo:
        rewards: dict[str, list[float]] = {}
        errors: list[str] = []
        update_ok = updates = 0
        for mode in ("live", "none"):
            agent = LifecycleAgent(
                teachers[env_name], store, f"{env_name}-s{seed}-{mode}", prompt_set=config.prompt_set,
                parse_policy="strict", context_budget=config.context_budget, context_mode=mode,
                temperature=config.teacher_temperature, max_new_tokens=config.teacher_max_new_tokens,
            )
            pack = env_registry.make(env_name, preset=config.preset).pack(seed, config.pack_size)
            result = await agent.arun(pack.tasks, resume=False, update_after_last=False)
            rewards[mode] = [r.reward or 0.0 for r in result.records]
            errors += [r.error for r in result.records if r.error]
            if mode == "live":
                statuses = [r.update_status for r in result.records if r.update_status is not None]
                update_ok, updates = sum(s == "ok" for s in statuses), len(statuses)
        return PackDemo(env_name, seed, f"{env_name}-s{seed}-live", rewards["live"], rewards["none"], update_ok, updates, errors)

    jobs = [one(env_name, config.first_pack_seed + k) for env_name in config.envs for k in range(config.packs)]
    return list(await asyncio.gather(*jobs))


def select(demos: list[PackDemo], min_gain: float) -> list[PackDemo]:
    """Packs whose later tasks the teacher's notes made solvable, with every update well formed.

    Raises :class:`TeacherError` when none is left, saying why (an empty data set is never trained on).
    """
    kept = [d for d in demos if not d.errors and d.updates and d.update_ok == d.updates and d.gain > min_gain]
    if kept:
        return kept
    failed = [d for d in demos if d.errors]
    if failed and len(failed) == len(demos):
        raise TeacherError(f"the teacher failed on every demonstration pack; first error: {failed[0].errors[0]}")
    malformed = sum(d.update_ok < d.updates for d in demos)
    gains = sorted(d.gain for d in demos)
    raise TeacherError(
        f"the teacher's notes never helped: 0 of {len(demos)} packs kept (a pack is kept when its reward at "
        f"positions 1.. is higher with the notes than without by more than {min_gain}, and every update held a "
        f"delimited block). {malformed} pack(s) had malformed updates; gains ranged {gains[0]:+.2f}..{gains[-1]:+.2f}. "
        "Use a stronger teacher, or an environment whose later tasks depend on earlier ones"
    )


def sft_rows(store: Store, kept: list[PackDemo]) -> list[dict[str, Any]]:
    """Prompt-completion rows (TRL's conversational format) from the kept ``live`` runs."""
    rows = []
    for demo in kept:
        for episode in store.episodes(demo.live_agent, limit=None):
            messages = [{"role": m["role"], "content": m["content"]} for m in episode.messages]
            if episode.kind == "update":
                rows.append({"prompt": messages[:-1], "completion": messages[-1:], "kind": "update",
                             "env": demo.env, "position": episode.position})
            elif episode.kind == "solve" and (episode.reward or 0) > 0:
                for k, message in enumerate(messages):
                    if message["role"] == "assistant":
                        rows.append({"prompt": messages[:k], "completion": [message], "kind": "solve",
                                     "env": demo.env, "position": episode.position})
    return rows


def check_output(config: DistillConfig, overwrite: bool) -> Path:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / CONFIG_FILE).is_file():
            raise OutputDirError(f"{out} is not empty and holds no training run; choose an empty or new directory")
        if not overwrite:
            raise OutputDirError(f"{out} already holds a training run; pass --overwrite to start over")
    return out


def distill(config: DistillConfig, *, overwrite: bool = False, command: Optional[str] = None) -> DistillResult:
    """Collect demonstrations, keep the useful ones and train a LoRA adapter on them (``train --sft``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    started = time.perf_counter()
    config.validate()
    out = check_output(config, overwrite)
    teachers = teacher_models(config)

    # 1-3: demonstrations (cheap for the oracle) before any weights load, so a useless teacher fails fast
    tmp = out.parent / f".{out.name}.demonstrations.db"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _remove_db(tmp)
    store = Store(str(tmp))
    try:
        try:
            demos = asyncio.run(collect(config, store, teachers))
        finally:
            for model in {id(m): m for m in teachers.values()}.values():
                model.close()  # a model teacher's worker or client is done once the demonstrations are in
        kept = select(demos, config.min_gain)
        rows = sft_rows(store, kept)
        if not rows:
            raise TeacherError("the kept packs gave no training rows")
    except BaseException:
        store.close()
        _remove_db(tmp)
        raise
    store.close()

    try:
        import torch

        from .cod_config import resolve_precision

        device, dtype = resolve_precision(
            config.device, config.dtype, cuda_available=torch.cuda.is_available(),
            bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        model, tokenizer = _load_student(config, dtype)
    except BaseException:
        _remove_db(tmp)  # the student could not load: leave nothing behind, the output directory as it was
        raise

    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{tmp}{suffix}").exists():
            os.replace(f"{tmp}{suffix}", out / f"{DEMO_DB}{suffix}")
    with open(out / ROWS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    config.save(out / CONFIG_FILE, command=command, device=device, dtype=dtype, packs_collected=len(demos),
                packs_kept=len(kept), rows=len(rows))

    before = _evaluate(config, model, tokenizer) if config.report else None
    steps = _train(config, model, tokenizer, rows, out, device, dtype)
    after = _evaluate(config, model, tokenizer) if config.report else None
    report_path = None
    if before is not None and after is not None:
        (out / "eval_before.json").write_text(json.dumps(before, indent=2) + "\n")
        (out / "eval_after.json").write_text(json.dumps(after, indent=2) + "\n")
        report_path = str(write_distill_report(out, config, before, after, len(demos), len(kept), len(rows), command))
    return DistillResult(
        output_dir=str(out), adapter_dir=str(out), packs_collected=len(demos), packs_kept=len(kept), rows=len(rows),
        steps=steps, seconds=time.perf_counter() - started, before=before, after=after, report_path=report_path,
    )


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _load_student(config: DistillConfig, dtype: str):
    from lifecycle_agent.models.local import load_pretrained

    from .cod_config import check_trainable_spec

    kind, path = check_trainable_spec(config.model)
    if kind == "smollm2":
        from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

        path = str(ensure_smollm2_cache())
    return load_pretrained(path, device="cpu", dtype=dtype)


def _train(config: DistillConfig, model, tokenizer, rows: list[dict], out: Path, device: str, dtype: str) -> int:
    """LoRA SFT with TRL's SFTTrainer; saves the adapter (in ``save_dtype``) into ``out``."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    target = config.lora_target.strip()
    peft_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=target if target == "all-linear" else [m.strip() for m in target.split(",") if m.strip()],
    )
    args = SFTConfig(
        output_dir=str(out / "sft"), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], seed=config.seed, max_length=config.max_length,
        completion_only_loss=True, use_cpu=device == "cpu", bf16=dtype == "bfloat16", fp16=dtype == "float16",
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                with open(out / METRICS_FILE, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Metrics()])
    trainer.train()
    trainer.model.eval()
    save_adapter(trainer.model, out, config.save_dtype)
    shutil.rmtree(out / "sft", ignore_errors=True)
    return trainer.state.global_step


def save_adapter(peft_model, out: Path, dtype: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` with the weights in ``dtype``."""
    import torch
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})


def _evaluate(config: DistillConfig, model, tokenizer) -> dict:
    """Reward by position (``live`` and ``none``) on the held-out packs with the student as it is now."""
    from lifecycle_agent.eval import aevaluate
    from lifecycle_agent.models.local import LocalModel

    envs = list(dict.fromkeys([*config.envs, *config.eval_envs]))
    policy = LocalModel(model, tokenizer, model_id=config.model, default_temperature=config.eval_temperature,
                        max_new_tokens=config.eval_max_new_tokens, max_batch_size=2 * config.eval_packs)
    was_training = model.training
    model.eval()
    try:
        return asyncio.run(aevaluate(
            envs, policy, packs=config.eval_packs, pack_size=config.held_out_pack_size, preset=config.preset,
            seeds=[config.eval_seed], modes=["live", "none"], out=None, concurrency=2 * config.eval_packs,
            temperature=config.eval_temperature, update_temperature=config.eval_temperature,
            max_new_tokens=config.eval_max_new_tokens, context_budget=config.context_budget,
            parse_policy="strict", prompt_set=config.prompt_set, plot=False,
        ))
    finally:
        policy.close()
        model.train(was_training)


def delimited_rate(mode: dict) -> Optional[float]:
    """Share of update episodes whose reply held a well-formed delimited block."""
    counts = mode.get("update_status") or {}
    total = sum(counts.values())
    return counts.get("ok", 0) / total if total else None


def write_distill_report(out: Path, config: DistillConfig, before: dict, after: dict, collected: int, kept: int,
                         rows: int, command: Optional[str]) -> Path:
    from lifecycle_agent.eval import position_cell

    seeds = config.eval_pack_seeds()
    lines = ["# Warm-start report (SFT)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Student `{config.model}` + LoRA (rank {config.lora_rank}, alpha {config.lora_alpha}, `{config.lora_target}`), "
        f"teacher `{config.teacher}`, prompt set `{config.prompt_set}`. Demonstrations: {collected} packs of "
        f"{config.pack_size} tasks on {', '.join(config.envs)}, {kept} kept, {rows} rows; {config.max_steps} steps of "
        f"{config.batch_size} rows at learning rate {config.learning_rate:g}.",
        "",
        f"Held-out packs: {config.eval_packs} per environment (pack seeds {seeds[0]}..{seeds[-1]}), "
        f"{config.held_out_pack_size} tasks each, temperature {config.eval_temperature:g}, strict parsing. "
        "Cells: mean reward [95% interval over packs, within the reward range].",
        "",
        "| environment | mode | position | before | after |",
        "|---|---|---|---|---|",
    ]
    for env, entry in after["environments"].items():
        for mode, data in entry["modes"].items():
            old = before["environments"][env]["modes"][mode]
            for j in range(len(data["by_position"])):
                lines.append(f"| {env} | {mode} | {j} | {position_cell(old, j)} | {position_cell(data, j)} |")
    lines += ["", "Update episodes with a well-formed delimited block (live):", ""]
    for env, entry in after["environments"].items():
        old, new = delimited_rate(before["environments"][env]["modes"]["live"]), delimited_rate(entry["modes"]["live"])
        fmt = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        lines.append(f"- {env}: before {fmt(old)}, after {fmt(new)}" + ("" if env in config.envs else " (never trained on)"))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
