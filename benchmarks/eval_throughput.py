"""Throughput of ``lifecycle-agent eval``.

1. The harness's own cost: episodes per second of :func:`lifecycle_agent.eval.evaluate`
   with the zero-latency scripted model, over every built-in environment and all four
   modes (SQLite on disk, as in a real eval).
2. Batching: completion tokens per second of the same eval driven by SmolLM2-135M at
   concurrency 1 vs 8 (packs share one batched local model), and their ratio.

Run: ``python benchmarks/eval_throughput.py [--skip-smollm2]``. Prints the numbers and
writes ``benchmarks/results/eval_throughput.json``.
"""

from __future__ import annotations

import argparse
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


def smollm2_throughput(packs: int = 8, max_new_tokens: int = 48) -> dict:
    """Completion tokens per second of a SmolLM2 eval (fact-recall, live) at concurrency 1 and 8."""
    from lifecycle_agent.models import resolve_model

    model = resolve_model("smollm2")
    model.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)  # warm up
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
        calls = after["requests"] - before["requests"]
        rows[concurrency] = {
            "wall_seconds": round(wall, 2),
            "model_calls": calls,
            "generate_calls": after["generate_calls"] - before["generate_calls"],
            "largest_batch": after["largest_batch"],
            "completion_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 2),
            "episodes_per_second": round(calls / wall, 3),
            "mean_reward": live["mean_reward"],
        }
    model.close()
    return {
        "env": "fact-recall", "mode": "live", "packs": packs, "pack_size": 2, "max_new_tokens": max_new_tokens,
        "temperature": 0.6,
        "concurrency_1": rows[1],
        "concurrency_8": rows[8],
        "tokens_per_second_ratio_8_vs_1": round(rows[8]["tokens_per_second"] / rows[1]["tokens_per_second"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-smollm2", action="store_true", help="Measure only the scripted harness cost.")
    args = parser.parse_args()
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "scripted": scripted_throughput(),
    }
    s = result["scripted"]
    print(f"scripted eval: {s['episodes']} episodes ({s['tasks']} tasks) in {s['wall_seconds_best']} s "
          f"= {s['episodes_per_second']} episodes/s, {s['tasks_per_second']} tasks/s")
    if not args.skip_smollm2:
        result["smollm2"] = smollm2_throughput()
        m = result["smollm2"]
        for c in (1, 8):
            row = m[f"concurrency_{c}"]
            print(f"smollm2 concurrency {c}: {row['completion_tokens']} tokens in {row['wall_seconds']} s = "
                  f"{row['tokens_per_second']} tokens/s (largest batch {row['largest_batch']})")
        print(f"ratio 8 vs 1: {m['tokens_per_second_ratio_8_vs_1']}x")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
