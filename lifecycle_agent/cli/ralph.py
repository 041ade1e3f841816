"""``lifecycle-agent ralph``: run a coding agent in a loop on a repository; ``ralph status`` shows the loop.

Text from the agent, the model, the check or a person (errors, check output, file names,
notes) is printed as plain text, never read as Rich markup: ``[/INST]`` in a reply prints
as it is.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..ralph import IterationInfo, LoopEvent, LoopResult, LoopStatus, RalphConfig, check_setup, loop_status, run_loop
from ..ralph.status import plural
from . import app
from .common import (
    API_KEY_OPTION, BASE_URL_OPTION, JSON_OPTION, config_option, console, err_console, load_model, print_json,
)

ralph_app = typer.Typer(
    short_help="Run a coding agent in a loop on a git repository until a check passes; `ralph status` shows it.",
    help=(
        "Run a coding agent again and again on a git repository until a check passes; only its notes carry over. "
        "`lifecycle-agent ralph --repo DIR --check CMD ...` runs the loop (rerun to resume); "
        "`lifecycle-agent ralph status --repo DIR` shows it."
    ),
)
app.add_typer(ralph_app, name="ralph")



def _short(text: Optional[str], width: int = 60) -> str:
    text = (text or "").replace("\n", " ").strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_cell(info: IterationInfo) -> str:
    """The check column as markup (the error text escaped)."""
    if info.status == "failed":
        return f"[red]error[/]: {escape(_short(info.error, 40))}"
    if info.check_passed:
        return "[green]passed[/]"
    if info.check_timed_out:
        return "[red]timed out[/]"
    return f"[red]exit {info.check_exit_code}[/]"


def iterations_table(infos: list[IterationInfo], title: str) -> Table:
    table = Table(title=title)
    for column in ("iter", "check", "changed", "notes v", "tokens", "time", "commit", "last check line"):
        table.add_column(column)
    for info in infos:
        last_line = next((line for line in reversed(info.check_output.splitlines()) if line.strip()), "")
        table.add_row(
            str(info.iteration), _check_cell(info), str(len(info.progress_files)),
            "-" if info.notes_version is None else str(info.notes_version),
            "-" if info.tokens is None else str(info.tokens),
            "-" if info.duration_s is None else f"{info.duration_s:.1f} s",
            (info.commit or "-")[:8], Text(_short(last_line, 50)),
        )
    return table


def _progress_handler(progress: Progress, bar) -> "callable":
    last_check = {"text": "not run yet"}

    def on_event(event: LoopEvent) -> None:
        if event.kind == "check":
            last_check["text"] = event.message.split(": ", 1)[-1]
            progress.console.print(Text(event.message, style="dim"))
        elif event.kind == "iteration_start":
            progress.update(bar, description=escape(f"{event.message} · last check: {last_check['text']}"))
        elif event.kind == "iteration_end":
            info = event.info
            if info is not None and info.status == "ok":
                last_check["text"] = info.check_verdict or "-"
                changed = ", ".join(info.progress_files[:4]) or "no file changed"
                notes = f"notes v{info.notes_version}" if info.notes_version is not None else "notes unchanged"
                progress.console.print(
                    f"iteration {event.iteration} · {event.elapsed_s:.0f} s elapsed · check {_check_cell(info)} · "
                    f"{escape(changed)} · {notes} · commit {(info.commit or '-')[:8]}"
                )
            else:
                progress.console.print(Text(event.message, style="red"))
        elif event.kind in ("setup", "resume", "notes_edit", "notes"):
            progress.console.print(Text(event.message, style="yellow"))
        elif event.kind == "interrupted":
            progress.console.print(Text(event.message, style="red"))

    return on_event


def _notices_to_stderr(event: LoopEvent) -> None:
    """With --json, stdout holds the result only: what a person must be told goes to stderr."""
    if event.kind in ("setup", "notes", "notes_edit", "interrupted"):
        err_console.print(Text(event.message, style="yellow"))


def _field_option(name: str, *aliases: str, required: bool = False) -> Any:
    """The option of :class:`RalphConfig` field ``name`` (flag ``--name-with-dashes`` and ``aliases``)."""
    # the loop's required fields are optional flags of the callback, which also runs before `ralph status`
    return config_option(RalphConfig, name, f"--{name.replace('_', '-')}", *aliases,
                         **({"default": ...} if required else {}))


@ralph_app.callback(invoke_without_command=True)
def ralph(
    ctx: typer.Context,
    repo: Optional[Path] = _field_option("repo", "-r"),
    prompt: Path = _field_option("prompt", "-p"),
    check: Optional[str] = _field_option("check", "-c"),
    mode: Optional[str] = _field_option("mode"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Model spec of the built-in tool agent, or with --agent-cmd the model that writes the notes "
        "(default without --agent-cmd: smollm2).",
    ),
    agent_cmd: Optional[str] = _field_option("agent_cmd"),
    max_iterations: int = _field_option("max_iterations", "-n"),
    max_minutes: float = _field_option("max_minutes"),
    max_tokens: Optional[int] = _field_option("max_tokens"),
    notes_file: str = _field_option("notes_file"),
    max_no_progress: int = _field_option("max_no_progress"),
    max_same_failure: int = _field_option("max_same_failure"),
    completion_marker: Optional[str] = _field_option("completion_marker"),
    check_timeout: float = _field_option("check_timeout"),
    agent_timeout: Optional[float] = _field_option("agent_timeout"),
    command_timeout: float = _field_option("command_timeout"),
    max_turns: int = _field_option("max_turns"),
    output_chars: int = _field_option("output_chars"),
    context_budget: Optional[int] = _field_option("context_budget"),
    temperature: Optional[float] = _field_option("temperature"),
    max_new_tokens: Optional[int] = _field_option("max_new_tokens"),
    allow_dirty: bool = _field_option("allow_dirty"),
    db: Optional[Path] = _field_option("db"),
    agent_id: str = _field_option("agent_id", "--agent", "-a"),
    base_url: Optional[str] = BASE_URL_OPTION,
    api_key: Optional[str] = API_KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the loop. Exit code 0 only when the check passed; 1 when a limit or breaker stopped it; 2 on errors."""
    if ctx.invoked_subcommand is not None:
        return
    if repo is None:
        raise typer.BadParameter("give the repository with --repo DIR", param_hint="--repo")
    if check is None:
        raise typer.BadParameter("give the check command, e.g. --check 'pytest -q'", param_hint="--check")
    config = RalphConfig.build(**RalphConfig.fields_in(locals()))  # the parameters are named after the fields
    with_model = model is not None or config.mode == "builtin"
    check_setup(config=config, with_model=with_model)  # before loading a model: its errors come first
    chat_model = None
    if with_model:
        spec = model or "smollm2"
        if not as_json:
            err_console.print(f"loading model {escape(spec)} ...")
        chat_model = load_model(spec, base_url, api_key)
    try:
        if as_json:
            result = run_loop(config=config, model=chat_model, on_event=_notices_to_stderr)
            print_json(result.model_dump())
        else:
            result = _run_with_progress(config, chat_model)
    finally:
        if chat_model is not None:
            chat_model.close()
    raise typer.Exit(0 if result.passed else 1)


def _run_with_progress(config: RalphConfig, model: Any) -> LoopResult:
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console, transient=True,
    )
    with progress:
        bar = progress.add_task("starting", total=None)
        result = run_loop(config=config, model=model, on_event=_progress_handler(progress, bar))
    ran = result.iterations[-result.iterations_run :] if result.iterations_run else []
    if ran:
        console.print(iterations_table(ran, f"ralph loop on {escape(result.repo)}"))
    console.print(Panel(Text(result.notes or "(no notes)"), title=f"notes (version {result.notes_version})",
                        title_align="left"))
    colour = "green" if result.passed else "red"
    tokens = f" · {result.tokens} model tokens in all" if result.tokens else ""
    console.print(
        f"[{colour}]stopped ({result.stop_reason}):[/] {escape(result.message)} · "
        f"{plural(len(result.iterations), 'iteration')} in all · {result.elapsed_s:.1f} s{tokens}",
    )
    return result


def _when(ts: Optional[float]) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def print_status(status: LoopStatus) -> None:
    console.print(f"[bold]ralph loop[/] of agent {escape(status.agent_id)} on {escape(str(status.repo))} "
                  f"(database {escape(str(status.db))})")
    if status.in_progress:
        state = status.in_progress
        since = time.time() - (state.get("started_at") or time.time())
        if state.get("running"):
            console.print(f"[yellow]iteration {escape(str(state['iteration']))} is running[/] "
                          f"(pid {escape(str(state.get('pid')))}, for {since:.0f} s)")
        else:
            console.print(f"[yellow]iteration {escape(str(state['iteration']))} was interrupted[/]: rerun the loop to "
                          "resume it")
    if status.iterations:
        console.print(iterations_table(status.iterations, plural(len(status.iterations), "iteration")))
    else:
        console.print("no iteration has finished yet")
    if status.runs:
        runs = Table(title="runs")
        for column in ("run", "started", "finished", "stop reason"):
            runs.add_column(column)
        for run in status.runs:
            reason = f"{run.stop_reason} (killed: no loop holds the lock)" if run.stale else run.stop_reason
            runs.add_row(run.run_id, _when(run.started_at), _when(run.finished_at), Text(reason))
        console.print(runs)
    history = Table(title="notes history")
    for column in ("version", "created", "source", "chars", "note", "start of text"):
        history.add_column(column)
    for version in status.notes_history:
        history.add_row(
            str(version.version), _when(version.created_at), Text(version.source), str(len(version.text)),
            Text(version.note or ""), Text(_short(version.text, 50)),
        )
    console.print(history)
    console.print(Panel(Text(status.notes or "(no notes)"), title=f"notes (version {status.notes_version})",
                        title_align="left"))


@ralph_app.command("status")
def status(
    repo: Path = _field_option("repo", "-r", required=True),
    db: Optional[Path] = _field_option("db"),
    agent_id: str = _field_option("agent_id", "--agent", "-a"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Iterations, check results, runs and the notes history of the loop on a repository (safe while it runs)."""
    result = loop_status(repo, db=db, agent_id=agent_id)
    if as_json:
        print_json({**result.model_dump(), "passed": result.passed})
    else:
        print_status(result)
