"""``report.md`` and ``report.png``: base vs trained policy on held-out packs, and the training curves.

The held-out results are eval-harness reports (:func:`lifecycle_agent.eval.aevaluate`, mode
``live``); this module only lays them side by side.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

MODE = "live"


def live(report: dict[str, Any], env: str) -> Optional[dict[str, Any]]:
    """The ``live`` mode summary of one environment in an eval-harness report (``None`` when absent)."""
    entry = report.get("environments", {}).get(env)
    return entry["modes"].get(MODE) if entry else None


def parse_failure_rate(summary: dict[str, Any]) -> Optional[float]:
    """Share of update episodes whose reply held no delimited context block (status other than ``ok``)."""
    counts = summary.get("update_status") or {}
    total = sum(counts.values())
    return None if total == 0 else 1 - counts.get("ok", 0) / total


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``eval/ENV/posJ`` and ``eval/ENV/mean`` of a held-out evaluation (for metrics.jsonl and loggers)."""
    metrics = {}
    for env in report.get("environments", {}):
        summary = live(report, env)
        for j, value in enumerate(summary["by_position"]):
            if value is not None:
                metrics[f"eval/{env}/pos{j}"] = value
        if summary.get("mean_reward") is not None:
            metrics[f"eval/{env}/mean"] = summary["mean_reward"]
    return metrics


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (unreadable lines skipped; a missing file is empty)."""
    file = Path(path)
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_report(path: str | Path, before: dict, after: dict, metrics: list[dict], history: list[dict], window: int = 5) -> Path:
    """Held-out reward by position (base vs trained, 95% bands), training reward by position per step,
    and, when evaluated during training, held-out reward by position per step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained_points = [h for h in history if not h.get("base")]
    panels = 3 if len(trained_points) > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4))
    left, right = axes[0], axes[1]
    for env in after.get("environments", {}):
        for report, style, label in ((before, "--", "base"), (after, "-", "trained")):
            summary = live(report, env)
            if summary is None:
                continue
            positions = list(range(len(summary["by_position"])))
            means = [math.nan if v is None else v for v in summary["by_position"]]
            (line,) = left.plot(positions, means, linestyle=style, marker="o", label=f"{env} {label}")
            low = [math.nan if lo is None else lo for lo, _ in summary["ci95"]]
            high = [math.nan if hi is None else hi for _, hi in summary["ci95"]]
            left.fill_between(positions, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
    left.set_title("Held-out packs: reward by position")
    left.set_xlabel("position in pack")
    left.set_ylabel("mean reward (95% CI)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=8)

    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in metrics:
        if "loss" not in record:
            continue
        for key, value in record.items():
            if key.startswith("reward/") and "/pos" in key and isinstance(value, (int, float)):
                curves[key[len("reward/"):]].append((record["step"], value))
    for name, points in sorted(curves.items()):
        values = [p[1] for p in points]
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(values))]
        right.plot([p[0] for p in points], smooth, label=name)
    right.set_title(f"Training rollouts (moving mean of {window} steps)")
    right.set_xlabel("optimizer step")
    right.set_ylabel("mean reward by position")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves:
        right.legend(fontsize=8)

    if panels == 3:
        ax = axes[2]
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for point in history:
            for env in point.get("environments", {}):
                for j, value in enumerate(live(point, env)["by_position"]):
                    if value is not None:
                        series[f"{env}/pos{j}"].append((point["step"], value))
        for name, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_title("Held-out packs during training")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean reward by position")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(output_dir: str | Path, config, before: dict, after: dict, command: Optional[str] = None) -> Path:
    """Write ``report.md`` (settings, base vs trained by position, parse failures, the plot) into ``output_dir``."""
    from lifecycle_agent.eval import position_cell

    out = Path(output_dir)
    plot_report(out / "report.png", before, after, read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval_history.jsonl"))
    seeds = config.eval_pack_seeds()
    lines = ["# Training report", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Model `{config.model}` with a LoRA adapter (rank {config.lora_rank}, alpha {config.lora_alpha}, "
        f"`{config.lora_target}`); loss `{config.loss_type}`; {after.get('step', config.max_steps)} optimizer steps of "
        f"{config.packs_per_step} pack(s) x {config.group_size} rollouts, pack size {config.pack_size}, `{config.packing}` packing; "
        f"learning rate {config.learning_rate:g}; sampling temperature {config.temperature:g}.",
        "",
        f"Held-out packs: {config.eval_packs} per environment (pack seeds {seeds[0]}..{seeds[-1]}, never trained on), "
        f"{config.held_out_pack_size} tasks each, context mode `live`, temperature {config.held_out_temperature:g}. "
        "Base = the same model with the adapter disabled, on the same packs. "
        "Cells: mean reward [95% confidence interval over packs, within the reward range].",
        "",
        "## Mean reward by position on held-out packs",
        "",
        "| environment | position | base | trained | change |",
        "|---|---|---|---|---|",
    ]
    for env in after.get("environments", {}):
        trained, base = live(after, env), live(before, env)
        for j, value in enumerate(trained["by_position"]):
            old = base["by_position"][j] if base and j < len(base["by_position"]) else None
            change = "-" if old is None or value is None else f"{value - old:+.3f}"
            lines.append(f"| {env} | {j} | {position_cell(base, j) if base else '-'} | {position_cell(trained, j)} | {change} |")
        old_mean, new_mean = (base or {}).get("mean_reward"), trained.get("mean_reward")
        change = "-" if old_mean is None or new_mean is None else f"{new_mean - old_mean:+.3f}"
        lines.append(f"| {env} | mean | {_num(old_mean)} | {_num(new_mean)} | {change} |")
    lines += ["", "Update episodes without a delimited context block (penalised in training):", ""]
    for env in after.get("environments", {}):
        base = live(before, env)
        lines.append(
            f"- {env}: base {_num(parse_failure_rate(base) if base else None)} -> "
            f"trained {_num(parse_failure_rate(live(after, env)))}"
        )
    lines += ["", "![held-out reward by position and training curves](report.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"
