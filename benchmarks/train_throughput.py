"""Trainer throughput: our CoD trainer vs TRL's stock GRPOTrainer, same model, batch shape and LoRA.

Both train the same model with the same LoRA config, temperature, completion budget and
number of completions per optimizer step:

- ours: ``packs_per_step x group_size`` CoD rollouts of ``pack_size`` tasks, i.e.
  ``packs x G x (2S - 1)`` model calls per step, made by LifecycleAgent over one batched
  local model (each rollout's calls are sequential; the G x packs rollouts are batched);
- stock: TRL's GRPOTrainer on the same number of prompts, built by the runtime for the same
  kind of rollout (solve and update prompts in episode order, so prompt lengths match), with
  its own generation: every completion of the step in one ``generate`` call; ``num_generations = G``.

Reported per trainer: seconds per optimizer step, completion tokens per second (generated
completion tokens / step time; the first step is warm-up and not counted) and peak memory
(process max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU). Each trainer runs in its
own process so the peaks are separate.

    python benchmarks/train_throughput.py                                  # SmolLM2 on CPU, G=4 S=2
    python benchmarks/train_throughput.py --random-llama tiny --steps 1    # seconds: checks the script
    python benchmarks/train_throughput.py --random-llama 0.5b --device cuda --group-size 8 --pack-size 4 \\
        --max-new-tokens 128 --steps 5                                     # the GPU measurement (bf16)

Goal: ratio (ours / stock tokens per second) near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

#: Random Llama shapes: ``tiny`` for a seconds-long check, ``0.5b`` for the GPU measurement (~0.49B parameters).
LLAMA_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(hidden_size=1024, intermediate_size=5120, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4),
}


def build_random_llama(shape: str, directory: Path) -> Path:
    """A randomly initialised Llama of a named shape with the SmolLM2 tokenizer, saved to ``directory``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_cache()), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **LLAMA_SHAPES[shape],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


class StepClock:
    """Records the wall time of every optimizer step and the logs of each step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.begins, self.ends, self.logs = [], [], []

            def on_step_begin(self, args, state, control, **kwargs):
                self.begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.logs.append(dict(logs))

        return _Clock()


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(clock, tokens_per_step: list[float], device: str) -> dict:
    """Seconds per step and completion tokens per second over the steps after the first (warm-up)."""
    durations = [end - begin for begin, end in zip(clock.begins, clock.ends)]
    timed = list(zip(durations, tokens_per_step))[1:] or list(zip(durations, tokens_per_step))
    seconds = sum(d for d, _ in timed)
    tokens = sum(t for _, t in timed)
    return {
        "steps_timed": len(timed),
        "seconds_per_step": round(seconds / len(timed), 3),
        "completion_tokens_per_step": round(tokens / len(timed), 1),
        "completion_tokens_per_second": round(tokens / seconds, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "step_seconds": [round(d, 3) for d in durations],
    }


def run_ours(args, model_spec: str, device: str) -> dict:
    from trainer.cod_config import CoDConfig
    from trainer.cod_trainer import train

    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        config = CoDConfig(
            output_dir=str(Path(tmp) / "run"), model=model_spec, envs=["fact-recall"], max_steps=args.steps + 1,
            group_size=args.group_size, pack_size=args.pack_size, packs_per_step=args.packs_per_step,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, learning_rate=1e-5,
            lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, save_steps=10**6, report=False, progress=False,
            keep_rollouts=False, device=device, loss_type="cod", gradient_checkpointing=args.gradient_checkpointing,
        )
        train(config, callbacks=[clock])
    tokens = [log["tokens/completion"] for log in clock.logs]
    result = measure(clock, tokens, device)
    result["completions_per_step"] = args.packs_per_step * args.group_size * (2 * args.pack_size - 1)
    result["prompt_tokens_per_step"] = round(sum(log["tokens/prompt"] for log in clock.logs[1:]) / max(1, len(clock.logs) - 1), 1)
    result["rollout_seconds_per_step"] = round(
        sum(log["time/rollout_s"] for log in clock.logs[1:]) / max(1, len(clock.logs) - 1), 3
    )
    return result


def runtime_prompts(count: int, pack_size: int) -> list[list[dict]]:
    """``count`` prompts exactly as the runtime builds them during a CoD rollout on fact-recall.

    A scripted note-taking agent runs packs of ``pack_size`` tasks (no update after the last
    task, as in training); its solve and update prompts, in episode order, are what the
    stock trainer gets, so both trainers see the same mix of prompt lengths.
    """
    from lifecycle_agent import LifecycleAgent, envs
    from lifecycle_agent.models.scripted import ScriptedModel
    from lifecycle_agent.store import Store

    prompts, seed = [], 0
    with Store(":memory:") as store:
        while len(prompts) < count:
            agent = LifecycleAgent(ScriptedModel(), store, f"prompts-{seed}")
            agent.run(envs.make("fact-recall").pack(seed, pack_size).tasks, update_after_last=False)
            for episode in agent.episodes(limit=None):
                prompts.append([m for m in episode.messages[:-1]])  # drop the reply: the prompt of its one turn
            seed += 1
    return prompts[:count]


def run_stock(args, model_path: str, device: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lifecycle_agent.models.local import load_pretrained
    from trainer.cod_config import resolve_precision

    device, dtype = resolve_precision(device, None, cuda_available=torch.cuda.is_available(),
                                      bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    completions = args.packs_per_step * args.group_size * (2 * args.pack_size - 1)
    unique = completions // args.group_size
    model, tokenizer = load_pretrained(model_path, device="cpu", dtype=dtype)
    clock = StepClock()

    def fact_reward(completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    with tempfile.TemporaryDirectory() as tmp:
        grpo = GRPOConfig(
            output_dir=tmp, max_steps=args.steps + 1, learning_rate=1e-5, per_device_train_batch_size=completions,
            num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=args.temperature,
            top_k=0, top_p=1.0, loss_type="dapo", beta=0.0, logging_steps=1, save_strategy="no", report_to="none",
            bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu",
            activation_checkpointing=args.gradient_checkpointing,
            disable_dropout=True, disable_tqdm=True, seed=0, shuffle_dataset=False,
        )
        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM")
        dataset = Dataset.from_list([{"prompt": p} for p in runtime_prompts(unique * (args.steps + 1), args.pack_size)])
        trainer = GRPOTrainer(model=model, reward_funcs=fact_reward, args=grpo, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[clock])
        trainer.train()
    tokens = [log["completions/mean_length"] * completions for log in clock.logs]
    result = measure(clock, tokens, device)
    result["completions_per_step"] = completions
    seen = [log["num_tokens"] for log in clock.logs]  # prompt + completion tokens seen so far
    prompt = [b - a - t for a, b, t in zip(seen, seen[1:], tokens[1:])]
    result["prompt_tokens_per_step"] = round(sum(prompt) / len(prompt), 1) if prompt else None
    return result


def worker(args) -> None:
    """Run one trainer in this process and print its result as one JSON line."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_llama:
            path = str(build_random_llama(args.random_llama, Path(tmp) / "model"))
            spec = f"hf:{path}"
        else:
            from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

            path, spec = str(ensure_smollm2_cache()), "smollm2"
        result = run_ours(args, spec, device) if args.worker == "ours" else run_stock(args, path, device)
    print("RESULT " + json.dumps(result), flush=True)


def worker_argv(args, which: str) -> list[str]:
    """The options of this run, for a worker process running one trainer."""
    argv = ["--worker", which, "--steps", str(args.steps), "--group-size", str(args.group_size),
            "--pack-size", str(args.pack_size), "--packs-per-step", str(args.packs_per_step),
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
            "--lora-rank", str(args.lora_rank)]
    if args.random_llama:
        argv += ["--random-llama", args.random_llama]
    if args.device:
        argv += ["--device", args.device]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    argv.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-llama", choices=sorted(LLAMA_SHAPES), help="a randomly initialised Llama instead of SmolLM2")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (one warm-up step more is run)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--pack-size", type=int, default=2)
    parser.add_argument("--packs-per-step", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads for both trainers (default: one per core)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing in both trainers (default on, as in both trainers' defaults)")
    parser.add_argument("--which", choices=["both", "ours", "stock"], default="both")
    parser.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    parser.add_argument("--worker", choices=["ours", "stock"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    results = {}
    for which in (["ours", "stock"] if args.which == "both" else [args.which]):
        proc = subprocess.run([sys.executable, __file__, *worker_argv(args, which)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the {which} trainer failed (exit {proc.returncode})")
        results[which] = json.loads(lines[-1][len("RESULT "):])
        r = results[which]
        print(f"{which:>5}: {r['seconds_per_step']:.2f} s/step, {r['completion_tokens_per_second']:.1f} completion tok/s, "
              f"{r['completion_tokens_per_step']:.0f} completion + {r['prompt_tokens_per_step']} prompt tok/step, "
              f"peak {r['peak_memory_mb']:.0f} MB", flush=True)
    report = {
        "benchmark": "train_throughput",
        "model": f"random-llama-{args.random_llama}" if args.random_llama else "smollm2",
        "device": args.device or "auto",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "shape": {"group_size": args.group_size, "pack_size": args.pack_size, "packs_per_step": args.packs_per_step,
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "lora_rank": args.lora_rank,
                  "timed_steps": args.steps, "threads": args.threads,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "results": results,
    }
    if "ours" in results and "stock" in results:
        report["ratio_tokens_per_second"] = round(
            results["ours"]["completion_tokens_per_second"] / results["stock"]["completion_tokens_per_second"], 3
        )
        print(f"ratio (ours / stock completion tokens per second): {report['ratio_tokens_per_second']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
