"""``lifecycle-agent run``: an agent over a task file or a built-in environment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..agent import LifecycleAgent, RunResult, TaskRecord
from ..errors import TaskFormatError
from ..store import check_agent_id
from . import app
from .common import (
    AGENT_OPTION, API_KEY_OPTION, BASE_URL_OPTION, DB_OPTION, JSON_OPTION, MODEL_OPTION, THREADS_OPTION, apply_threads,
    check_model_spec, console, err_console, load_model, print_json,
)
from .context import BUSY_TIMEOUT_OPTION, open_store


def build_tasks(
    tasks_file: Optional[Path], env: Optional[str], preset: str, seed: int, n: Optional[int], packing: str,
    instance: Optional[int] = None,
):
    """The task list for ``run``: a validated JSONL file or one pack of an environment."""
    if (tasks_file is None) == (env is None):
        raise typer.BadParameter("give exactly one of --tasks FILE.jsonl or --env NAME", param_hint="--tasks/--env")
    if tasks_file is not None:
        from ..tasks import load_tasks_jsonl

        tasks = load_tasks_jsonl(tasks_file)
        return tasks[:n] if n is not None else tasks
    from .. import envs

    return envs.make(env, preset=preset).pack(seed=seed, size=n or 8, packing=packing, instance=instance).tasks


def _short(text: Optional[str], width: int = 40) -> str:
    """A one-line, markup-safe preview (model text may contain ``[...]`` that rich would parse)."""
    text = (text or "").replace("\n", " ").strip()
    return escape(text if len(text) <= width else text[: width - 3] + "...")


def _update_tokens(result: RunResult, store) -> int:
    """Completion tokens of the run's update episodes (records count the solve episodes' own)."""
    total = 0
    for r in result.records:
        if r.update_episode_id is not None and store is not None:
            total += store.get_episode(r.update_episode_id).completion_tokens or 0
    return total


def task_prompt(store, record: TaskRecord) -> str:
    """The first observation of a record's solve episode (what the task asked)."""
    if record.solve_episode_id is None:
        return ""
    messages = store.get_episode(record.solve_episode_id).messages
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def summary_table(result: RunResult, store=None) -> Table:
    table = Table(title=f"run {result.run_id} of agent {result.agent_id}")
    for column in ("pos", "task", "reward", "answer", "update", "context v", "chars", "status"):
        table.add_column(column)
    for r in result.records:
        table.add_row(
            str(r.position), _short(r.task_id, 36), "-" if r.reward is None else f"{r.reward:.2f}", _short(r.answer, 24),
            r.update_status or "-", str(r.new_context_version if r.new_context_version is not None else r.context_version),
            str(r.context_chars), r.status if r.status == "ok" else f"[red]{r.status}[/]",
        )
    mean = result.mean_reward
    solve_tokens = sum((r.completion_tokens or 0) for r in result.records)
    update_tokens = _update_tokens(result, store)
    failed = len(result.failed)
    rewarded = sum(1 for r in result.records if (r.reward or 0) > 0)
    table.caption = (
        f"{len(result.records) - failed} completed ({rewarded} with reward > 0), {len(result.skipped)} already done, "
        f"{failed} failed; mean reward {'-' if mean is None else f'{mean:.3f}'}; "
        f"{solve_tokens + update_tokens} completion tokens ({solve_tokens} solving, {update_tokens} writing context)"
    )
    return table


@app.command("run")
def run(
    tasks: Optional[Path] = typer.Option(None, "--tasks", "-t", help="JSONL task file (one JSON object with 'prompt' per line)."),
    env: Optional[str] = typer.Option(None, "--env", "-e", help="Built-in environment name (or package.module:factory)."),
    preset: str = typer.Option("train", "--preset", help="Environment preset (with --env)."),
    seed: int = typer.Option(0, "--seed", help="Pack seed (with --env): which hidden facts the tasks share."),
    packing: str = typer.Option(
        "cod", "--packing",
        help="cod (distinct related tasks), ralph_sample (task 0 repeated; ralph is the same) or ralph_full (--instance J repeated).",
    ),
    instance: Optional[int] = typer.Option(None, "--instance", help="With --packing ralph_full: which task of the pack is repeated (default 0)."),
    n: Optional[int] = typer.Option(None, "-n", "--num-tasks", min=1, help="Tasks to run (default: whole file, or 8 with --env)."),
    model: str = MODEL_OPTION,
    base_url: Optional[str] = BASE_URL_OPTION,
    api_key: Optional[str] = API_KEY_OPTION,
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature (default: the model's)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Longest reply per model call, tokens (default: the model's)."),
    context_budget: Optional[int] = typer.Option(None, "--context-budget", min=1, help="Context budget, characters (stored with the agent)."),
    parse_policy: Optional[str] = typer.Option(None, "--parse-policy", help="lenient or strict (stored with the agent)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed task."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Solve tasks again even if this agent completed them."),
    show_context: bool = typer.Option(False, "--show-context", help="Also print the whole context after every task (it is always printed at the end)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print no per-task lines, only the closing table and context."),
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Run an agent over tasks, updating its context after each one. Rerun the same command to resume."""
    if parse_policy is not None and parse_policy not in ("lenient", "strict"):
        raise typer.BadParameter("must be lenient or strict", param_hint="--parse-policy")
    check_agent_id(agent)
    check_model_spec(model)
    task_list = build_tasks(tasks, env, preset, seed, n, packing, instance)
    # everything that can be checked cheaply is checked before the (possibly slow) model load
    with open_store(db, busy_timeout, create=True) as store:
        if not no_resume and store.has_agent(agent) and all(
            store.task_state(agent, t.id)[0] == "done" for t in task_list
        ):
            _nothing_to_do(store, agent, [t.id for t in task_list], as_json)
            return
        if not as_json:
            err_console.print(f"loading model {model} ...")
        apply_threads(threads)
        chat_model = load_model(model, base_url, api_key)
        lifecycle = LifecycleAgent(
            chat_model, store, agent, temperature=temperature, max_new_tokens=max_new_tokens,
            context_budget=context_budget, parse_policy=parse_policy,
        )
        _run_and_report(lifecycle, task_list, agent, fail_fast, no_resume, show_context and not quiet, as_json, quiet)


def _nothing_to_do(store, agent: str, task_ids: list[str], as_json: bool) -> None:
    """Every task was completed by an earlier run: say so without loading the model (no run is recorded)."""
    head = store.head(agent)
    if as_json:
        print_json({"run_id": None, "agent_id": agent, "records": [], "skipped": task_ids, "stopped": None,
                    "mean_reward": None, "context": head.text, "context_version": head.version})
        return
    console.print(f"all {len(task_ids)} task(s) already completed by agent {agent}: nothing to do, the model was "
                  "not loaded (use --no-resume to solve them again)")
    console.print(f"context (version {head.version}):")
    console.print(Panel(Text(head.text or "(empty)")))


def task_lines(lifecycle: LifecycleAgent, record: TaskRecord) -> Text:
    """What one task showed: the prompt, the answer, reward and feedback, and the context version it wrote."""
    reward = "-" if record.reward is None else f"{record.reward:.2f}"
    text = Text()
    text.append(f"task {record.position}", style="bold")
    text.append(f"  (solved with context v{record.context_version})\n")
    text.append("  prompt:   ", style="dim")
    text.append(task_prompt(lifecycle.store, record).strip() + "\n")
    text.append("  answer:   ", style="dim")
    text.append((record.answer or "-").strip() + "\n")
    text.append("  reward:   ", style="dim")
    text.append(reward, style="green" if (record.reward or 0) > 0 else "red")
    text.append("\n  feedback: ", style="dim")
    text.append((record.feedback or "-").strip() + "\n")
    text.append("  context:  ", style="dim")
    if record.status == "failed":
        text.append(f"failed: {record.error}", style="red")
    elif record.new_context_version is not None:
        text.append(f"v{record.new_context_version} written ({record.context_chars} chars, update {record.update_status})")
    else:
        text.append(f"unchanged (update {record.update_status or 'not run'})")
    return text


def _run_and_report(
    lifecycle: LifecycleAgent, task_list: list, agent: str, fail_fast: bool, no_resume: bool, show_context: bool, as_json: bool,
    quiet: bool = False,
) -> None:
    """Run the tasks and print the outcome: one JSON document, or progress, panels and the closing table."""
    if as_json:
        result = lifecycle.run(task_list, fail_fast=fail_fast, resume=not no_resume)
        print_json(
            {
                **result.model_dump(),
                "mean_reward": result.mean_reward,
                "context": lifecycle.context,
                "context_version": lifecycle.context_version,
            }
        )
        raise typer.Exit(1 if result.failed else 0)

    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=console, transient=True,
    )

    def on_record(record: TaskRecord) -> None:
        progress.advance(bar)
        reward = "-" if record.reward is None else f"{record.reward:.2f}"
        progress.update(bar, status=f"last reward {reward}")
        if quiet:
            return
        progress.console.print(task_lines(lifecycle, record))
        if show_context and record.status == "ok":
            version = record.new_context_version if record.new_context_version is not None else lifecycle.context_version
            progress.console.print(Panel(Text(lifecycle.context or "(empty)"), title=f"context v{version}", title_align="left"))

    with progress:
        bar = progress.add_task(f"agent {agent}", total=len(task_list), status="")
        result = lifecycle.run(task_list, fail_fast=fail_fast, resume=not no_resume, on_record=on_record)
        progress.update(bar, completed=len(task_list))
    if result.skipped:
        console.print(f"{len(result.skipped)} task(s) already completed by agent {agent}: skipped (use --no-resume to solve them again)")
    console.print(summary_table(result, lifecycle.store))
    console.print(f"final context (version {lifecycle.context_version}, {time.perf_counter() - started:.1f} s):")
    console.print(Panel(Text(lifecycle.context or "(empty)")))
    if result.stopped:
        err_console.print(f"[red]stopped:[/] {escape(result.stopped)}")
    raise typer.Exit(1 if result.failed else 0)


__all__ = ["run", "build_tasks", "summary_table", "TaskFormatError"]
