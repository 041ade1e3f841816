"""Learning check: the embedded SmolLM2-135M learns to keep and use notes, on CPU.

Three stages, each the real command line:

1. warm start: ``lifecycle-agent train --sft`` (teacher ``oracle``, fact-recall only);
2. GRPO with per-episode credit from that adapter: ``lifecycle-agent train --lora --init-adapter``;
3. held-out evaluation of base, warm-started and warm-started+GRPO with ``lifecycle-agent eval``
   on the same packs (never trained on): fact-recall (trained) and preference (never trained on:
   the transfer check), modes ``live`` and ``none``, strict parsing.

Not a CI test: run it on a quiet machine.

    python benchmarks/train_learning.py                     # ~35-45 min on 2 CPU cores
    python benchmarks/train_learning.py --dry-run           # tiny: checks the pipeline in a few minutes
    python benchmarks/train_learning.py --ship --update-docs   # also installs the adapter as smollm2-cod
                                                                # and writes the results into docs/training.md

Writes ``benchmarks/results/train_learning.json``; the runs stay in ``--output``.
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
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = ROOT / "docs" / "training.md"
SHIPPED = ROOT / "lifecycle_agent" / "adapters" / "smollm2-cod"
BEGIN, END = "<!-- learning-check:begin -->", "<!-- learning-check:end -->"
ENVS = ("fact-recall", "preference")


def cli() -> list[str]:
    return [sys.executable, "-m", "lifecycle_agent"]


def sft_command(a: argparse.Namespace) -> list[str]:
    return cli() + [
        "train", "--sft", "--model", "smollm2", "--env", "fact-recall", "--teacher", "oracle",
        "--packs", str(a.sft_packs), "--pack-size", "4", "--steps", str(a.sft_steps), "--batch-size", "8",
        "--lr", str(a.sft_lr), "--lora-rank", "8", "--lora-alpha", "16", "--prompt-set", a.prompt_set,
        "--output", str(a.output / "sft"), "--overwrite", "--no-report", "--device", "cpu", "--threads", str(a.threads),
    ]


def grpo_command(a: argparse.Namespace) -> list[str]:
    return cli() + [
        "train", "--lora", "--model", "smollm2", "--init-adapter", str(a.output / "sft"), "--env", "fact-recall",
        "--preset", a.grpo_preset, "--eval-seed", "200",
        "--group-size", "4", "--pack-size", str(a.grpo_pack_size), "--lr", str(a.grpo_lr), "--temperature", "0.6",
        "--max-new-tokens", "64", "--steps", str(a.grpo_steps), "--max-minutes", str(a.grpo_minutes),
        "--prompt-set", a.prompt_set, "--save-every", "1000", "--output", str(a.output / "grpo"), "--overwrite",
        "--no-report", "--no-progress", "--device", "cpu", "--threads", str(a.threads),
    ]


def eval_command(a: argparse.Namespace, model: str, name: str) -> list[str]:
    return cli() + [
        "eval", "--env", ",".join(ENVS), "--model", model, "--packs", str(a.eval_packs), "--pack-size", "4",
        "--seeds", "100", "--modes", "live,none", "--out", str(a.output / f"eval-{name}"), "--concurrency",
        str(a.eval_packs), "--temperature", "0.6", "--max-new-tokens", "96", "--parse-policy", "strict",
        "--prompt-set", a.prompt_set, "--no-plot",
    ]


def run(cmd: list[str], log: Path) -> float:
    print("$", shlex.join(cmd[2:]), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code:
        sys.exit(f"command failed (exit {code}); see {log}")
    return time.perf_counter() - started


def mode_summary(report: dict, env: str, mode: str) -> dict:
    data = report["environments"][env]["modes"][mode]
    counts = data.get("update_status") or {}
    total = sum(counts.values())
    return {
        "by_position": data["by_position"], "ci95": data["ci95"], "n_packs": data.get("packs"),
        "delimited_rate": counts.get("ok", 0) / total if total else None, "update_status": counts,
    }


def end_line_rate(db: Path, env: str) -> dict:
    """Update episodes (live) whose reply wrote the end line itself, and the mean reply length in characters."""
    import sqlite3

    from lifecycle_agent.prompts import CONTEXT_END

    con = sqlite3.connect(str(db))
    rows = con.execute(
        "SELECT messages FROM episodes WHERE kind = 'update' AND agent_id LIKE ? AND agent_id LIKE '%.live'",
        (f"eval.{env}.%",),
    ).fetchall()
    con.close()
    replies = [json.loads(r[0])[-1]["content"] for r in rows]
    closed = sum(any(line.strip() == CONTEXT_END for line in reply.splitlines()) for reply in replies)
    return {"end_line_written": closed, "updates": len(replies),
            "mean_reply_chars": round(sum(map(len, replies)) / len(replies), 1) if replies else None}


def late(values: list) -> float:
    return (values[2] + values[3]) / 2


def summarize(a: argparse.Namespace, seconds: dict) -> dict:
    models = {}
    for name in ("base", "sft", "grpo"):
        path = a.output / f"eval-{name}" / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        models[name] = {env: {mode: mode_summary(report, env, mode) for mode in ("live", "none")} for env in ENVS}
        for env in ENVS:
            models[name][env]["live"].update(end_line_rate(path.parent / "eval.db", env))
    grpo_metrics = a.output / "grpo" / "metrics.jsonl"
    steps = [json.loads(line) for line in grpo_metrics.read_text().splitlines()] if grpo_metrics.is_file() else []
    return {
        "prompt_set": a.prompt_set, "eval_packs": a.eval_packs, "eval_pack_seeds": f"1000000..{1000000 + a.eval_packs - 1}",
        "sft": {"packs": a.sft_packs, "steps": a.sft_steps, "lr": a.sft_lr},
        "grpo": {"lr": a.grpo_lr, "minutes_cap": a.grpo_minutes, "preset": a.grpo_preset, "pack_size": a.grpo_pack_size,
                 "steps": len([s for s in steps if "loss" in s]),
                 "steps_with_zero_loss": len([s for s in steps if "loss" in s and s["loss"] == 0])},
        "seconds": seconds, "training_minutes": round((seconds.get("sft", 0) + seconds.get("grpo", 0)) / 60, 1),
        "models": models, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "commands": {"sft": shlex.join(["lifecycle-agent"] + sft_command(a)[3:]),
                     "grpo": shlex.join(["lifecycle-agent"] + grpo_command(a)[3:])},
    }


def cell(mode: dict, j: int) -> str:
    mean, (low, high) = mode["by_position"][j], mode["ci95"][j]
    if mean is None:
        return "-"
    return f"{mean:.2f}" if low is None else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def markdown(summary: dict) -> str:
    names = {"base": "base SmolLM2", "sft": "warm start (SFT)", "grpo": "SFT + GRPO"}
    lines = [
        f"Held-out packs: {summary['eval_packs']} per environment (pack seeds {summary['eval_pack_seeds']}, never "
        f"trained on), 4 tasks each, temperature 0.6, strict parsing, prompt set `{summary['prompt_set']}`. "
        f"Training time {summary['training_minutes']} min on {summary['machine']} (SFT {summary['sft']['steps']} steps, "
        f"GRPO {summary['grpo']['steps']} steps). Cells: mean reward [95% interval].",
        "",
        "| environment | model | mode | pos 0 | pos 1 | pos 2 | pos 3 | delimited updates | end line written |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env in ENVS:
        for name, model in summary["models"].items():
            for mode in ("live", "none"):
                m = model[env][mode]
                rate = "-" if m["delimited_rate"] is None else f"{m['delimited_rate']:.0%}"
                closed = f"{m['end_line_written']}/{m['updates']}" if m.get("updates") else "-"
                env_name = env + ("" if env == "fact-recall" else " (never trained on)")
                lines.append(f"| {env_name} | {names[name]} | {mode} | " + " | ".join(cell(m, j) for j in range(4))
                             + f" | {rate} | {closed} |")
    lines += ["", "![held-out reward by position: base, warm start, warm start + GRPO](../benchmarks/results/train_learning.png)",
              "", "Reproduce: `python benchmarks/train_learning.py` (commands below).", "", "```bash",
              summary["commands"]["sft"], summary["commands"]["grpo"], "```"]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Reward by position per environment: one colour per model, solid live, dotted none, 95% bands."""
    from matplotlib.figure import Figure

    names = {"base": "base", "sft": "warm start", "grpo": "warm start + GRPO"}
    figure = Figure(figsize=(12, 4.6))
    for ax, env in zip(figure.subplots(1, len(ENVS)), ENVS):
        for colour, (name, model) in zip(("tab:gray", "tab:blue", "tab:green"), summary["models"].items()):
            for mode, style, marker in (("live", "-", "o"), ("none", ":", "^")):
                data = model[env][mode]
                positions = list(range(len(data["by_position"])))
                ax.plot(positions, data["by_position"], linestyle=style, marker=marker, color=colour, linewidth=2,
                        markerfacecolor="none", markersize=8, label=f"{names[name]} · {mode}")
                lows = [lo if lo is not None else m for (lo, _), m in zip(data["ci95"], data["by_position"])]
                highs = [hi if hi is not None else m for (_, hi), m in zip(data["ci95"], data["by_position"])]
                ax.fill_between(positions, lows, highs, color=colour, alpha=0.08, linewidth=0)
        ax.set_title(env + ("" if env == "fact-recall" else " (never trained on)"), fontsize=12)
        ax.set_xlabel("position in pack")
        ax.set_ylabel("mean reward")
        ax.set_xticks(range(4))
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(f"held-out packs ({summary['eval_packs']} per environment), temperature 0.6", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def ship(a: argparse.Namespace, summary: dict, which: str) -> None:
    """Install the chosen run's adapter (and its config, metrics, report) as the packaged ``smollm2-cod``."""
    source = a.output / which
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    SHIPPED.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "metrics.jsonl"):
        if (source / name).is_file():
            shutil.copy2(source / name, SHIPPED / name)
    if which == "grpo":
        shutil.copy2(a.output / "sft" / "train_config.json", SHIPPED / "sft_config.json")
        shutil.copy2(a.output / "sft" / "metrics.jsonl", SHIPPED / "sft_metrics.jsonl")
    if (SHIPPED / "adapter_model.safetensors").stat().st_size > 5_500_000:
        _to_float16(SHIPPED / "adapter_model.safetensors")
    # the base is the embedded model, whatever cache path the training machine had
    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2"
    (SHIPPED / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("train_config.json", "sft_config.json"):
        if (SHIPPED / name).is_file() and str(Path.home()) in (SHIPPED / name).read_text():
            raise SystemExit(f"{name} holds a path of this machine; train with relative --output paths")
    (SHIPPED / "report.md").write_text(
        "# smollm2-cod\n\nSmolLM2-135M-Instruct + this LoRA adapter, trained by `python benchmarks/train_learning.py "
        f"--ship` (the `{which}` stage). Config: `train_config.json`; metrics: `metrics.jsonl`.\n\n"
        + "\n".join(line for line in markdown(summary).splitlines() if not line.startswith("![")) + "\n"
    )


def _to_float16(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("runs/learning"))
    p.add_argument("--prompt-set", default="cod-v2")
    p.add_argument("--sft-packs", type=int, default=48)
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--grpo-lr", type=float, default=5e-5)
    p.add_argument("--grpo-steps", type=int, default=100)
    # after the warm start every rollout of a train-preset pack of 4 scores alike (no advantage to learn
    # from); hard packs of 6 (3 items, 4-digit codes, each asked twice) still separate rollouts
    p.add_argument("--grpo-preset", default="hard")
    p.add_argument("--grpo-pack-size", type=int, default=6)
    p.add_argument("--grpo-minutes", type=float, default=12.0)
    p.add_argument("--eval-packs", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="sft,grpo,eval")
    p.add_argument("--ship", choices=["auto", "sft", "grpo"], nargs="?", const="auto", default=None)
    p.add_argument("--update-docs", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    if a.dry_run:
        a.sft_packs, a.sft_steps, a.grpo_steps, a.grpo_minutes, a.eval_packs = 4, 1, 1, 5.0, 2
    a.output.mkdir(parents=True, exist_ok=True)
    stages = set(a.stages.split(","))
    seconds_file = a.output / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    if "sft" in stages:
        seconds["sft"] = round(run(sft_command(a), a.output / "sft.log"), 1)
    if "grpo" in stages:
        seconds["grpo"] = round(run(grpo_command(a), a.output / "grpo.log"), 1)
    seconds_file.write_text(json.dumps(seconds))
    if "eval" in stages:
        for name, model in (("base", "smollm2"), ("sft", f"smollm2@{a.output / 'sft'}"), ("grpo", f"smollm2@{a.output / 'grpo'}")):
            if (a.output / ("sft" if name == "base" else name) / "adapter_config.json").is_file():
                seconds[f"eval_{name}"] = round(run(eval_command(a, model, name), a.output / f"eval-{name}.log"), 1)
                seconds_file.write_text(json.dumps(seconds))
    summary = summarize(a, seconds)
    text = json.dumps(summary, indent=2) + "\n"
    (a.output / "train_learning.json").write_text(text)
    if not a.dry_run:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "train_learning.json").write_text(text)
        if {"base", "sft"} <= set(summary["models"]):
            plot(summary, RESULTS / "train_learning.png")
    print(markdown(summary))
    if a.ship:
        which = a.ship
        if which == "auto":
            m = summary["models"]
            which = "grpo" if "grpo" in m and late(m["grpo"]["fact-recall"]["live"]["by_position"]) >= late(
                m["sft"]["fact-recall"]["live"]["by_position"]) else "sft"
        ship(a, summary, which)
        print(f"shipped the {which} adapter as smollm2-cod ({SHIPPED})")
    if a.update_docs and not a.dry_run:
        doc = DOCS.read_text()
        block = f"{BEGIN}\n{markdown(summary)}\n{END}"
        if BEGIN in doc and END in doc:
            doc = doc.split(BEGIN)[0] + block + doc.split(END, 1)[1]
        else:
            doc += "\n" + block + "\n"
        DOCS.write_text(doc)


if __name__ == "__main__":
    main()
