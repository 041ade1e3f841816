"""``lifecycle-agent envs``: list environments and look inside one."""

from __future__ import annotations

from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from .. import envs
from . import app
from .common import JSON_OPTION, console, print_json

envs_app = typer.Typer(help="Built-in and registered environments.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(envs_app, name="envs")


def _preset_summary(defaults: dict[str, Any], options: dict[str, Any]) -> str:
    changed = {k: v for k, v in options.items() if defaults.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


@envs_app.command("list")
def list_envs(as_json: bool = JSON_OPTION) -> None:
    """Every known environment with its presets and options."""
    rows = envs.describe()
    if as_json:
        print_json(rows)
        return
    # names never wrap; a narrow terminal (or a pipe, 80 columns) drops the presets and options columns
    wide = console.width >= 110
    table = Table(title="environments", show_lines=wide)
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    table.add_column("description", overflow="fold")
    if wide:
        table.add_column("presets", overflow="fold")
        table.add_column("options (defaults)", overflow="fold")
    for row in rows:
        # a curriculum preset that hints at hidden facts says so where every terminal shows it
        hint = f"\neasy preset hints: {row['easy_hints']}" if row.get("easy_hints") else ""
        cells = [row["name"], row["description"] + hint]
        if wide:
            presets = "\n".join(
                f"{name}: {_preset_summary(row['options'], values)}" for name, values in row["preset_options"].items()
            ) or "-"
            cells += [presets, ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"]
        table.add_row(*cells)
    console.print(table)
    if not wide:
        console.print("Presets and options: lifecycle-agent envs show NAME (or a terminal of 110+ columns, or --json).")
    console.print("Also: any package.module:factory (a callable returning a lifecycle_agent.envs.Environment).")


@envs_app.command("show")
def show_env(
    name: str = typer.Argument(..., help="Environment name or package.module:factory."),
    preset: str = typer.Option("train", "--preset", help="Preset."),
    seed: int = typer.Option(0, "--seed", help="Pack seed."),
    position: int = typer.Option(0, "--position", min=0, help="Which task of the pack (0 = first)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one task: the rules, its first observation, and the oracle playing it."""
    env = envs.make(name, preset=preset)
    task = env.pack(seed, position + 1).tasks[position]
    episode = envs.play_oracle(task)
    if as_json:
        print_json(
            {
                "env": name, "preset": preset, "seed": seed, "task_id": task.id, "instructions": env.instructions(),
                "turns": [{"observation": o, "action": a} for o, a in episode.transcript],
                "reward": episode.reward, "optimum": task.optimum(), "feedback": episode.feedback,
            }
        )
        return
    console.print(Panel(env.instructions() or "(no instructions)", title=f"{name} · rules", title_align="left"), markup=False)
    for turn, (observation, action) in enumerate(episode.transcript, 1):
        console.print(Panel(observation, title=f"turn {turn} · observation", title_align="left"), markup=False)
        console.print(Panel(action, title=f"turn {turn} · oracle action", title_align="left", style="cyan"), markup=False)
    console.print(f"oracle reward {episode.reward:.3f} (optimum {task.optimum():.3f})")
    console.print(Panel(episode.feedback or "(no feedback)", title="feedback", title_align="left"), markup=False)
