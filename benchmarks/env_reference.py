"""Learnability of every environment that has a reference policy, and the harness's cost on it.

For each registered environment with ``has_reference_policy`` (built-in or added with
``envs.register``), on the same packs:

1. **oracle**: the mean reward of the environment's own oracle (it knows the hidden facts),
   next to the mean optimum; they must be equal.
2. **reference policy**: the observation-only note-writer and solver
   (:class:`~lifecycle_agent.models.teacher.ReferenceTeacher`) run through the real eval path
   (:func:`lifecycle_agent.eval.evaluate`, so :class:`~lifecycle_agent.LifecycleAgent`, the prompts,
   the update parser and the store) in modes ``live`` and ``none``: mean reward by position.
   ``late`` is the mean over the second half of the positions; ``live`` above ``none`` there is
   what the notes are worth.
3. **harness cost**: milliseconds per episode (solve or update) of an eval of the zero-latency
   scripted model over the same environment (``live`` mode, SQLite on disk): everything measured
   is the runtime, the prompts, the parsing, the store and the environment's own steps.

Run: ``python benchmarks/env_reference.py [--packs 64] [--preset train] [--env NAME,...] [--option KEY=VALUE]``
(``--option`` as on ``lifecycle-agent eval``, e.g. ``--env grid-navigation --option reveal_across_pack=false``).
Prints a table (``--markdown``: the table of docs/environments.md) and writes
``benchmarks/results/env_reference.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifecycle_agent import envs  # noqa: E402
from lifecycle_agent.cli.eval import parse_options  # noqa: E402
from lifecycle_agent.errors import LifecycleAgentError  # noqa: E402
from lifecycle_agent.eval import PACK_SEED_STRIDE, default_pack_size, evaluate  # noqa: E402
from lifecycle_agent.models.scripted import ScriptedModel  # noqa: E402
from lifecycle_agent.models.teacher import ReferenceTeacher  # noqa: E402
from lifecycle_agent.prompts import DEFAULT_PROMPT_SET  # noqa: E402

RESULT = Path(__file__).parent / "results" / "env_reference.json"
SEED = 1


def with_reference_policy() -> list[str]:
    """Every registered environment whose class has a reference policy."""
    return [name for name in envs.names() if getattr(envs.factory_for(name), "has_reference_policy", False)]


def oracle(env, packs: int, size: int) -> dict:
    """Mean oracle reward and mean optimum over the eval's packs (pack seeds as the eval numbers them)."""
    rewards, optima = [], []
    for k in range(packs):
        for task in env.pack(SEED * PACK_SEED_STRIDE + k, size).tasks:
            rewards.append(envs.play_oracle(task).reward)
            optima.append(task.optimum())
    return {"reward": statistics.fmean(rewards), "optimum": statistics.fmean(optima)}


def reference(env, packs: int, size: int, prompt_set: str) -> dict:
    """``live`` and ``none`` reward by position of the reference policy through the eval harness."""
    report = evaluate(
        env.name, ReferenceTeacher(env, prompt_set), packs=packs, pack_size=size, preset=env.preset, seeds=[SEED],
        modes="live,none", prompt_set=prompt_set, parse_policy="strict", env_options={env.name: env.options},
        concurrency=8, plot=False,
    )
    modes = report["environments"][env.name]["modes"]
    out = {}
    for mode in ("live", "none"):
        curve = modes[mode]["by_position"]
        out[mode] = {"by_position": curve, "ci95": modes[mode]["ci95"], "late": statistics.fmean(curve[size // 2:]),
                     "update_status": modes[mode]["update_status"]}
    out["late_gain"] = out["live"]["late"] - out["none"]["late"]
    return out


def harness_cost(env, packs: int, size: int) -> dict:
    """Milliseconds per episode of a scripted ``live`` eval on disk (best of 3)."""
    best = None
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = evaluate(env.name, ScriptedModel(), packs=packs, pack_size=size, preset=env.preset, seeds=[SEED],
                              modes="live", out=tmp, concurrency=8, plot=False, env_options={env.name: env.options})
            wall = time.perf_counter() - started
        episodes = report["timing"]["episodes_in_db"]
        ms = 1000 * wall / episodes
        best = ms if best is None else min(best, ms)
    return {"ms_per_episode": best, "episodes": episodes}


def measure(name: str, preset: str, packs: int, pack_size, prompt_set: str, options: dict) -> dict:
    env = envs.make(name, preset=preset, **options)
    size = pack_size or default_pack_size(env)
    return {
        "preset": preset, "options": options, "pack_size": size, "packs": packs,
        "oracle": oracle(env, packs, size),
        "reference": reference(env, packs, size, prompt_set),
        "harness": harness_cost(env, min(packs, 16), size),
    }


def table(results: dict, markdown: bool) -> str:
    header = ["environment", "S", "oracle / optimum", "live by position", "none by position", "late live", "late none",
              "ms/episode"]
    rows = []
    for name, r in results["environments"].items():
        ref = r["reference"]
        rows.append([
            name, str(r["pack_size"]), f"{r['oracle']['reward']:.3f} / {r['oracle']['optimum']:.3f}",
            " ".join(f"{v:.2f}" for v in ref["live"]["by_position"]),
            " ".join(f"{v:.2f}" for v in ref["none"]["by_position"]),
            f"{ref['live']['late']:.3f}", f"{ref['none']['late']:.3f}", f"{r['harness']['ms_per_episode']:.2f}",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default=None, help="environments, comma-separated (default: every one with a reference policy)")
    parser.add_argument("--preset", default="train", help="environment preset (default train)")
    parser.add_argument("--packs", type=int, default=64, help="packs per environment and mode (default 64)")
    parser.add_argument("--pack-size", type=int, default=None, help="tasks per pack (default: each environment's eval default)")
    parser.add_argument("--prompt-set", default=DEFAULT_PROMPT_SET, help=f"prompt set (default {DEFAULT_PROMPT_SET})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="environment option for every environment measured (repeatable)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/environments.md)")
    parser.add_argument("--out", type=Path, default=RESULT, help="JSON results (default benchmarks/results/env_reference.json)")
    args = parser.parse_args()
    if args.packs < 1 or (args.pack_size is not None and args.pack_size < 2):
        parser.error("--packs must be >= 1 and --pack-size >= 2")
    names = [n.strip() for n in args.env.split(",") if n.strip()] if args.env else with_reference_policy()
    missing = [n for n in names if not getattr(envs.factory_for(n), "has_reference_policy", False)]
    if missing:
        parser.error(f"no reference policy: {', '.join(missing)}; environments with one: {', '.join(with_reference_policy())}")
    try:
        options = parse_options(args.option, names)
        for name in names:
            envs.make(name, preset=args.preset, **options.get(name, {}))  # unknown options: a clear error now
    except LifecycleAgentError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    results = {
        "settings": {"preset": args.preset, "packs": args.packs, "seed": SEED, "prompt_set": args.prompt_set,
                     "parse_policy": "strict", "options": [item for item in args.option]},
        "environments": {},
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    for name in names:
        results["environments"][name] = measure(name, args.preset, args.packs, args.pack_size, args.prompt_set,
                                                options.get(name, {}))
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.markdown))
    shown = args.out.resolve().relative_to(Path.cwd().resolve()) if args.out.resolve().is_relative_to(Path.cwd().resolve()) else args.out.name
    print(f"wrote {shown}")


if __name__ == "__main__":
    main()
