"""The runtime's own cost per episode: prompt building + parsing + store writes.

A zero-latency scripted model answers instantly, so everything measured is the
runtime itself. The agent solves N tasks (2N episodes: solve + update) on a real
SQLite file, and the cost is reported per episode for windows early and late in
the agent's life, to show it stays flat as the agent ages.

    python benchmarks/runtime_overhead.py            # 10,000 tasks = 20,000 episodes
    python benchmarks/runtime_overhead.py --tasks 2000

Targets: under 2 ms per episode; episode 10,000 costs what episode 100 costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END, LifecycleAgent, Task
from lifecycle_agent.models import CallableModel
from lifecycle_agent.models.scripted import is_update

NOTE = "The secret code of the apple is 417. Codes never change within a pack. " * 6


def zero_latency(messages):
    if is_update(messages):
        return f"Keeping the code.\n{CONTEXT_BEGIN}\n{NOTE}\n{CONTEXT_END}"
    return "Answer: 417"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks to solve (episodes = 2 x tasks)")
    parser.add_argument("--window", type=int, default=100, help="tasks per measurement window")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime_overhead.json"))
    args = parser.parse_args()

    tasks = [Task(prompt=f"What is the secret code of the apple? (#{i})", answer="417", id=f"t{i}") for i in range(args.tasks)]
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = LifecycleAgent(CallableModel(zero_latency), str(Path(tmp) / "bench.db"), "bench")
        started = time.perf_counter()
        agent.run(tasks, on_record=lambda record: stamps.append(time.perf_counter()))
        total = time.perf_counter() - started
        db_bytes = (Path(tmp) / "bench.db").stat().st_size
        agent.close()

    per_task = [b - a for a, b in zip([started] + stamps[:-1], stamps)]
    windows = {}
    for label, start in (("first", 0), ("at_100", 100), ("middle", args.tasks // 2), ("last", args.tasks - args.window)):
        chunk = per_task[start : start + args.window]
        if len(chunk) == args.window:
            windows[label] = {
                "from_episode": 2 * start,
                "ms_per_episode_mean": 1000 * statistics.fmean(chunk) / 2,
                "ms_per_episode_median": 1000 * statistics.median(chunk) / 2,
            }
    result = {
        "tasks": args.tasks,
        "episodes": 2 * args.tasks,
        "total_s": total,
        "ms_per_episode_overall": 1000 * total / (2 * args.tasks),
        "windows": windows,
        "late_over_early": windows["last"]["ms_per_episode_median"] / windows["at_100"]["ms_per_episode_median"]
        if "last" in windows and "at_100" in windows else None,
        "db_mib": db_bytes / 2**20,
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['episodes']} episodes in {total:.1f} s: {result['ms_per_episode_overall']:.3f} ms per episode overall")
    for label, w in windows.items():
        print(f"  {label:>7} (from episode {w['from_episode']:>6}): {w['ms_per_episode_median']:.3f} ms median, {w['ms_per_episode_mean']:.3f} ms mean")
    if result["late_over_early"] is not None:
        print(f"  late / early (median): {result['late_over_early']:.2f}x")
    print(f"  database: {result['db_mib']:.1f} MiB  ->  {args.out}")


if __name__ == "__main__":
    main()
