"""``lifecycle-agent eval``: learning curves (reward by position) for context modes on the same packs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..eval import EvalError, EvalProgress, check_resume, evaluate, parse_names, table_rows
from ..eval_config import EvalConfig
from . import app
from .common import (
    API_KEY_OPTION, BASE_URL_OPTION, JSON_OPTION, MODEL_OPTION, THREADS_OPTION, apply_threads, check_model_spec,
    config_option, console, err_console, load_model, print_json,
)


def parse_options(items: list[str], env_names: list[str]) -> dict[str, dict[str, Any]]:
    """``--option KEY=VALUE`` (VALUE read as JSON, else as text) for every environment."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"--option {item!r}: expected KEY=VALUE, e.g. --option size=5")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip()] = value
    return {name: dict(options) for name in env_names} if options else {}


def report_tables(report: dict[str, Any]) -> list[Table]:
    """One rich table per environment (the cells of report.md; means only on a narrow terminal)."""
    tables = []
    for env in report["environments"]:
        # intervals and token columns need about 13 characters per position: narrower terminals get the means
        compact = console.width < 60 + 15 * report["environments"][env]["pack_size"]
        header, rows = table_rows(report, env, compact=compact)
        table = Table(title=f"{env} · {report['model']['id']} · preset {report['settings']['preset']}")
        for column in header:
            table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


@app.command("eval")
def eval_command(
    env: str = typer.Option(..., "--env", "-e", help="Environment name(s), comma-separated; package.module:factory works."),
    model: str = MODEL_OPTION,
    base_url: Optional[str] = BASE_URL_OPTION,
    api_key: Optional[str] = API_KEY_OPTION,
    packs: int = config_option(EvalConfig, "packs"),
    pack_size: Optional[int] = config_option(EvalConfig, "pack_size", "--pack-size", "-S"),
    preset: str = config_option(EvalConfig, "preset"),
    seeds: str = config_option(EvalConfig, "seeds"),
    modes: str = config_option(EvalConfig, "modes"),
    out: Path = config_option(EvalConfig, "out", "--out", "-o", default=...),
    concurrency: int = config_option(EvalConfig, "concurrency", "--concurrency", "-c"),
    temperature: Optional[float] = config_option(EvalConfig, "temperature"),
    update_temperature: Optional[float] = config_option(EvalConfig, "update_temperature"),
    prompt_set: Optional[str] = config_option(EvalConfig, "prompt_set"),
    max_new_tokens: Optional[int] = config_option(EvalConfig, "max_new_tokens"),
    context_budget: Optional[int] = config_option(EvalConfig, "context_budget"),
    parse_policy: Optional[str] = config_option(EvalConfig, "parse_policy"),
    option: list[str] = typer.Option([], "--option", help="Environment option KEY=VALUE for every --env (repeatable)."),
    plot: bool = config_option(EvalConfig, "plot", "--plot/--no-plot"),
    threads: Optional[int] = THREADS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Mean reward by position for live / frozen / none context and Ralph packing, with 95% intervals."""
    env_names = parse_names(env)
    config = EvalConfig.of(  # every check that needs no model, before the (possibly slow) model load
        env_names, packs=packs, pack_size=pack_size, preset=preset, seeds=seeds, modes=modes, out=out,
        concurrency=concurrency, temperature=temperature, update_temperature=update_temperature,
        max_new_tokens=max_new_tokens, context_budget=context_budget, parse_policy=parse_policy,
        prompt_set=prompt_set, env_options=parse_options(option, env_names), plot=plot,
    )
    check_resume(config)
    check_model_spec(model)
    if not as_json:
        err_console.print(f"loading model {model} ...")
    apply_threads(threads)
    chat_model = load_model(model, base_url, api_key)
    progress = Progress(
        TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), console=err_console, transient=True, disable=as_json,
    )
    bar = progress.add_task("eval", total=None, status="")

    piped = not err_console.is_terminal  # no live bar in a pipe or a log file: print a line now and then instead
    every = config.pack_size or 4  # a progress line about once a pack

    def on_progress(event: EvalProgress) -> None:
        reward = "" if event.record is None or event.record.reward is None else f" reward {event.record.reward:.2f}"
        progress.update(bar, completed=event.done, total=event.total, status=f"{event.env} {event.mode}{reward}")
        if piped and not as_json and (event.done % every == 0 or event.done == event.total):
            err_console.print(f"eval: {event.done}/{event.total} tasks ({event.env} {event.mode})", highlight=False)

    try:
        with progress:
            report = evaluate(config, chat_model, on_progress=on_progress)
    finally:
        chat_model.close()
    if as_json:
        print_json(report)
        return
    for table in report_tables(report):
        console.print(table)
    for error in report["errors"]:
        err_console.print(f"[red]pack error:[/] {error['env']} {error['mode']} seed {error['seed']} pack {error['pack']}: {error['error']}", highlight=False)
    written = ["report.json", "report.md"] + (["curve.png"] if plot else [])
    console.print(f"wrote {', '.join(str(out / name) for name in written)} ({report['timing']['wall_seconds']:.1f} s)")
