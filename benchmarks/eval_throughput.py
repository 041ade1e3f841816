"""Throughput of ``lifecycle-agent eval``.

1. The harness's own cost: episodes per second of :func:`lifecycle_agent.eval.evaluate`
   with the zero-latency scripted model, over every built-in environment and all four
   modes (SQLite on disk, as in a real eval).
2. Batching: completion tokens per second of an eval driven by SmolLM2-135M at
   concurrency 1 vs 8 (packs share one batched local model), and their ratio; next to
   it, the ceiling: 8 equal requests one after another vs all at once.

Run: ``python benchmarks/eval_throughput.py [--skip-smollm2] [--threads N]``. Prints the
numbers and writes ``benchmarks/results/eval_throughput.json``. On a machine whose cores
other processes also use, ``--threads 1`` gives steadier numbers (torch threads that
compete for busy cores slow every step down).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifecycle_agent import envs  # noqa: E402
from lifecycle_agent.eval import evaluate  # noqa: E402
from lifecycle_agent.models.scripted import ScriptedModel  # noqa: E402

RESULT = Path(__file__).parent / "results" / "eval_throughput.json"


def scripted_throughput(repeats: int = 3) -> dict:
    """Episodes (solve + update) per second of a scripted eval over all built-in environments."""
    names = [row["name"] for row in envs.describe()]
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = evaluate(names, ScriptedModel(), packs=4, pack_size=4, seeds=[1, 2], out=tmp, concurrency=8, plot=False)
            wall = time.perf_counter() - started
        episodes = report["timing"]["episodes_in_db"]
        tasks = sum(m["tasks"] for e in report["environments"].values() for m in e["modes"].values())
        runs.append({"wall_seconds": wall, "episodes": episodes, "tasks": tasks})
    best = min(runs, key=lambda r: r["wall_seconds"])
    return {
        "environments": names,
        "packs": 4, "pack_size": 4, "seeds": [1, 2], "modes": 4,
        "episodes": best["episodes"],
        "tasks": best["tasks"],
        "wall_seconds_best": round(best["wall_seconds"], 3),
        "wall_seconds_median": round(statistics.median(r["wall_seconds"] for r in runs), 3),
        "episodes_per_second": round(best["episodes"] / best["wall_seconds"], 1),
        "tasks_per_second": round(best["tasks"] / best["wall_seconds"], 1),
    }


def raw_batching(model, requests: int = 8, max_new_tokens: int = 32) -> dict:
    """Tokens per second of ``requests`` equal requests served one by one vs all at once (the ceiling)."""
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    rows = {}
    for concurrency in (1, requests):
        before = model.stats
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            generations = list(pool.map(
                lambda _: model.generate(messages, temperature=0.6, max_new_tokens=max_new_tokens), range(requests)
            ))
        wall = time.perf_counter() - started
        tokens = sum(g.completion_tokens for g in generations)
        rows[concurrency] = {
            "wall_seconds": round(wall, 2), "completion_tokens": tokens, "tokens_per_second": round(tokens / wall, 2),
            "generate_calls": model.stats["generate_calls"] - before["generate_calls"],
        }
    return {
        "requests": requests, "max_new_tokens": max_new_tokens,
        "sequential": rows[1], "batched": rows[requests],
        "tokens_per_second_ratio": round(rows[requests]["tokens_per_second"] / rows[1]["tokens_per_second"], 2),
    }


def smollm2_throughput(packs: int = 8, budgets: tuple[int, ...] = (48, 96), threads: int | None = None) -> dict:
    """Completion tokens per second of SmolLM2 evals (fact-recall, live) at concurrency 1 and 8, per token budget."""
    from lifecycle_agent.models.smollm2 import load_smollm2

    model = load_smollm2(num_threads=threads) if threads else load_smollm2()
    model.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)  # warm up
    result = {
        "env": "fact-recall", "mode": "live", "packs": packs, "pack_size": 2, "temperature": 0.6,
        "torch_threads": threads or "default", "by_max_new_tokens": {},
    }
    for budget in budgets:
        result["by_max_new_tokens"][str(budget)] = _eval_pair(model, packs, budget)
    result["raw_batching"] = raw_batching(model)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    model.close()
    return result


def _eval_pair(model, packs: int, max_new_tokens: int) -> dict:
    rows = {}
    for concurrency in (1, 8):
        before = model.stats
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = evaluate(
                "fact-recall", model, packs=packs, pack_size=2, seeds=[1], modes="live", out=tmp,
                concurrency=concurrency, max_new_tokens=max_new_tokens, temperature=0.6, plot=False,
            )
            wall = time.perf_counter() - started
        after = model.stats
        live = report["environments"]["fact-recall"]["modes"]["live"]
        tokens = after["completion_tokens"] - before["completion_tokens"]
        prompt_tokens = round(live["prompt_tokens_per_task"] * live["tasks"])
        calls = after["requests"] - before["requests"]
        rows[concurrency] = {
            "wall_seconds": round(wall, 2),
            "model_calls": calls,
            "generate_calls": after["generate_calls"] - before["generate_calls"],
            "mean_batch": round(calls / max(1, after["generate_calls"] - before["generate_calls"]), 2),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 2),
            "episodes_per_second": round(calls / wall, 3),
            "mean_reward": live["mean_reward"],
        }
    return {
        "concurrency_1": rows[1],
        "concurrency_8": rows[8],
        "tokens_per_second_ratio_8_vs_1": round(rows[8]["tokens_per_second"] / rows[1]["tokens_per_second"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-smollm2", action="store_true", help="Measure only the scripted harness cost.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for SmolLM2 (default: torch's choice).")
    args = parser.parse_args()
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "scripted": scripted_throughput(),
    }
    s = result["scripted"]
    print(f"scripted eval: {s['episodes']} episodes ({s['tasks']} tasks) in {s['wall_seconds_best']} s "
          f"= {s['episodes_per_second']} episodes/s, {s['tasks_per_second']} tasks/s")
    if not args.skip_smollm2:
        result["smollm2"] = smollm2_throughput(threads=args.threads)
        m = result["smollm2"]
        for budget, pair in m["by_max_new_tokens"].items():
            for c in (1, 8):
                row = pair[f"concurrency_{c}"]
                print(f"smollm2 eval, max_new_tokens {budget}, concurrency {c}: {row['completion_tokens']} completion "
                      f"tokens ({row['prompt_tokens']} prompt tokens) in {row['wall_seconds']} s = "
                      f"{row['tokens_per_second']} tokens/s ({row['model_calls']} calls in {row['generate_calls']} batches)")
            print(f"  ratio 8 vs 1: {pair['tokens_per_second_ratio_8_vs_1']}x")
        raw = m["raw_batching"]
        print(f"ceiling, 8 equal requests: {raw['sequential']['tokens_per_second']} tokens/s one by one, "
              f"{raw['batched']['tokens_per_second']} tokens/s batched = {raw['tokens_per_second_ratio']}x")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
