"""Learning check: SmolLM2-135M + LoRA trained with CoD credit on fact-recall, on CPU, for about 30 minutes.

Runs the real command line (``python -m lifecycle_agent train --lora ...``), then reads the
run's held-out evaluations (base = adapter disabled vs trained, the same held-out packs) and
its per-step training rewards. Not a CI test: run it on a quiet machine.

    python benchmarks/train_learning.py                     # ~30 min of training + two held-out evaluations
    python benchmarks/train_learning.py --dry-run           # 2 steps, 2 held-out packs: checks the pipeline
    python benchmarks/train_learning.py --update-docs       # also writes the results into docs/training.md

Writes ``benchmarks/results/train_learning.json`` and ``train_learning.png`` (the run's
report.png; a ``--dry-run`` writes its JSON into ``--output`` instead); the run itself stays
in ``--output`` (adapter, metrics.jsonl, report.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs" / "training.md"
BEGIN, END = "<!-- learning-check:begin -->", "<!-- learning-check:end -->"


def command(args: argparse.Namespace) -> list[str]:
    """The training command line of this check."""
    cmd = [
        "lifecycle-agent", "train", "--lora", "--model", "smollm2", "--env", "fact-recall", "--preset", args.preset,
        "--group-size", str(args.group_size), "--pack-size", str(args.pack_size), "--lr", str(args.lr),
        "--temperature", "0.6", "--max-new-tokens", str(args.max_new_tokens), "--eval-packs", str(args.eval_packs),
        "--steps", str(args.steps), "--save-every", "5", "--output", str(args.output), "--overwrite", "--device", "cpu",
    ]
    if args.minutes:
        cmd += ["--max-minutes", str(args.minutes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def summarize(output: Path) -> dict:
    """Base vs trained reward by position and the training curve of a finished run."""
    from trainer.report import live, parse_failure_rate, read_jsonl

    before = json.loads((output / "eval_before.json").read_text())
    after = json.loads((output / "eval_after.json").read_text())
    steps = [r for r in read_jsonl(output / "metrics.jsonl") if "loss" in r]
    env = "fact-recall"
    base, trained = live(before, env), live(after, env)
    return {
        "steps": len(steps),
        "train_seconds": round(sum(r.get("time/step_s", 0) for r in steps), 1),
        "seconds_per_step": round(sum(r.get("time/step_s", 0) for r in steps) / max(1, len(steps)), 1),
        "held_out": {
            "packs": base["n"][0],
            "base_by_position": base["by_position"],
            "trained_by_position": trained["by_position"],
            "base_ci95": base["ci95"],
            "trained_ci95": trained["ci95"],
            "base_parse_failure_rate": parse_failure_rate(base),
            "trained_parse_failure_rate": parse_failure_rate(trained),
        },
        "training_reward_by_position": {
            key.split("/")[-1]: [r[key] for r in steps if key in r]
            for key in sorted({k for r in steps for k in r if k.startswith(f"reward/{env}/pos")})
        },
        "parse_failure_rate_by_step": [r.get("update/parse_failure_rate") for r in steps],
    }


def markdown(result: dict) -> str:
    """The results section for docs/training.md."""
    h = result["held_out"]
    lines = [
        BEGIN,
        f"Measured {result['date']} on {result['machine']}: {result['summary']['steps']} optimizer steps in "
        f"{result['summary']['train_seconds'] / 60:.1f} min ({result['summary']['seconds_per_step']} s/step).",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Held-out packs ({h['packs']} packs, seeds never trained on), mean reward by position:",
        "",
        "| position | base | trained | change |",
        "|---|---|---|---|",
    ]
    for j, (b, t) in enumerate(zip(h["base_by_position"], h["trained_by_position"])):
        change = "-" if b is None or t is None else f"{t - b:+.3f}"
        lines.append(f"| {j} | {_num(b)} | {_num(t)} | {change} |")
    lines += [
        "",
        f"Update episodes without a delimited context block: base {_num(h['base_parse_failure_rate'])}, "
        f"trained {_num(h['trained_parse_failure_rate'])}.",
        "",
        "![learning check: held-out reward by position and the training curve](../benchmarks/results/train_learning.png)",
        END,
    ]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def update_docs(section: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(head + section + rest.split(END, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget (the run stops after the step that crosses it)")
    parser.add_argument("--steps", type=int, default=1000, help="upper bound on optimizer steps")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--pack-size", type=int, default=3)
    parser.add_argument("--preset", default="easy", help="fact-recall preset (easy: one item, asked again at every later position)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-packs", type=int, default=16)
    parser.add_argument("--output", type=Path, default=HERE.parent / "runs" / "learning-check")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: one per core; 1 on a shared CPU)")
    parser.add_argument("--dry-run", action="store_true", help="2 steps and 2 held-out packs, no time budget")
    parser.add_argument("--update-docs", action="store_true", help=f"write the results between the markers in {DOCS}")
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.eval_packs, args.minutes = 2, 2, 0

    cmd = command(args)
    printable = " ".join(shlex.quote(c) for c in cmd)
    print(printable, flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lifecycle_agent"] + cmd[1:], check=True)
    wall = time.perf_counter() - started

    summary = summarize(args.output)
    result = {
        "benchmark": "train_learning",
        "command": printable,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "wall_seconds": round(wall, 1),
        "summary": {k: summary[k] for k in ("steps", "train_seconds", "seconds_per_step")},
        "held_out": summary["held_out"],
        "training_reward_by_position": summary["training_reward_by_position"],
        "parse_failure_rate_by_step": summary["parse_failure_rate_by_step"],
    }
    target = args.output if args.dry_run else RESULTS  # a dry run leaves the published results alone
    target.mkdir(parents=True, exist_ok=True)
    (target / "train_learning.json").write_text(json.dumps(result, indent=2) + "\n")
    if (args.output / "report.png").is_file() and not args.dry_run:
        shutil.copyfile(args.output / "report.png", RESULTS / "train_learning.png")
    print(f"wrote {target / 'train_learning.json'}")
    section = markdown(result)
    print(section)
    if args.update_docs:
        if args.dry_run:
            raise SystemExit("--update-docs refuses a --dry-run: the docs report the full check")
        update_docs(section)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
