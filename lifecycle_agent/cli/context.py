"""``lifecycle-agent context ...`` and ``lifecycle-agent agents``: inspect and manage stored contexts."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..agent import edit_context
from ..errors import ContextFormatError
from ..store import DEFAULT_BUSY_TIMEOUT, LOCK_ATTEMPTS, Store
from . import app
from .common import AGENT_OPTION, DB_OPTION, JSON_OPTION, console, print_json

context_app = typer.Typer(help="Show, compare, roll back, fork, export and import agent contexts.", no_args_is_help=True, rich_markup_mode=None)
agents_app = typer.Typer(help="List and delete agents.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(context_app, name="context")
app.add_typer(agents_app, name="agents")


BUSY_TIMEOUT_OPTION = typer.Option(
    DEFAULT_BUSY_TIMEOUT,
    "--busy-timeout",
    min=0.0,
    help=f"Seconds one write attempt waits while another process holds the database lock; a write makes "
    f"{LOCK_ATTEMPTS} attempts, so a locked database fails after about {LOCK_ATTEMPTS} x this.",
)


def open_store(db: str, busy_timeout: float, *, create: bool = False) -> Store:
    """The store behind a command; commands that only read or change agents never create a database."""
    return Store(db, busy_timeout=busy_timeout, create=create)


def _read_text(file: Path, what: str) -> str:
    """A UTF-8 text file given on the command line (a byte-order mark is ignored), with errors that name it."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ContextFormatError(f"{what} {file} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ContextFormatError(
            f"{what} {file} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def _print_truncation(note: Optional[str]) -> None:
    """Say so when the budget cut the copied context (the note records it)."""
    if note and "truncated" in note:
        console.print(f"[yellow]over the context budget:[/] {escape(note)}", highlight=False)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@context_app.command("show")
def show(
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to show (default: current)."),
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Print an agent's context (current or a given version)."""
    store = open_store(db, busy_timeout)
    ctx = store.head(agent) if version is None else store.get_version(agent, version)
    if as_json:
        print_json(ctx.model_dump())
        return
    console.print(f"[bold]{agent}[/] context version {ctx.version} ({len(ctx.text)} chars, {ctx.source})", highlight=False)
    console.print(ctx.text or "(empty)", markup=False, highlight=False)


@context_app.command("history")
def history(
    db: str = DB_OPTION, agent: str = AGENT_OPTION, as_json: bool = JSON_OPTION, busy_timeout: float = BUSY_TIMEOUT_OPTION
) -> None:
    """List every context version, oldest first."""
    versions = open_store(db, busy_timeout).history(agent)
    if as_json:
        print_json([v.model_dump() for v in versions])
        return
    table = Table(title=f"context history of {agent}")
    for column in ("version", "created", "source", "chars", "episode", "note", "start of text"):
        table.add_column(column)
    for v in versions:
        preview = v.text.replace("\n", " ")
        table.add_row(
            str(v.version), _when(v.created_at), v.source, str(len(v.text)),
            "" if v.episode_id is None else str(v.episode_id), escape(v.note or ""),
            escape((preview[:50] + "...") if len(preview) > 50 else preview),
        )
    console.print(table)


@context_app.command("diff")
def diff(
    a: int = typer.Argument(..., help="Older version."),
    b: Optional[int] = typer.Argument(None, help="Newer version (default: current)."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Unified diff between two context versions."""
    store = open_store(db, busy_timeout)
    b = store.head(agent).version if b is None else b
    text = store.diff(agent, a, b)
    if as_json:
        print_json({"agent_id": agent, "a": a, "b": b, "diff": text})
    else:
        console.print(text or f"versions {a} and {b} are identical", markup=False, highlight=False)


@context_app.command("rollback")
def rollback(
    version: int = typer.Argument(..., help="Version to make current again."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Make an old version current by appending a copy of it (nothing is deleted; the budget applies)."""
    new = open_store(db, busy_timeout).rollback(agent, version)
    if as_json:
        print_json(new.model_dump())
    else:
        console.print(f"{agent}: version {new.version} is now a copy of version {version}")
        _print_truncation(new.note)


@context_app.command("fork")
def fork(
    to: str = typer.Option(..., "--to", help="Id of the new agent."),
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to fork at (default: current)."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Create a new agent starting from this agent's context at a version (the budget applies)."""
    store = open_store(db, busy_timeout)
    info = store.fork(agent, to, version)
    if as_json:
        print_json(info.model_dump())
    else:
        console.print(f"created agent {to} from {agent} at version {info.forked_at_version}")
        _print_truncation(store.head(to).note)


@context_app.command("set")
def set_context(
    file: Path = typer.Option(..., "--file", "-f", help="Text file holding the new context ('-' for stdin)."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Write a context by hand (recorded as an edit; over-long text is refused)."""
    import sys

    text = sys.stdin.read() if str(file) == "-" else _read_text(file, "context file")
    store = open_store(db, busy_timeout)
    new = edit_context(store, agent, text, note=f"set from {file}")
    if as_json:
        print_json(new.model_dump())
    else:
        console.print(f"{agent}: wrote context version {new.version} ({len(text)} chars)")


@context_app.command("export")
def export(
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
    as_json: bool = typer.Option(
        False, "--json", help="The export is JSON either way; with --out, print the result as JSON too."
    ),
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Export an agent's settings and context versions as JSON."""
    data = open_store(db, busy_timeout).export_agent(agent)
    if out is None:
        print_json(data)
        return
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if as_json:
        print_json({"agent_id": agent, "out": str(out), "versions": len(data["versions"])})
    else:
        console.print(f"exported {len(data['versions'])} versions of {agent} to {out}")


@context_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A JSON file written by 'context export'."),
    db: str = typer.Option(
        "lifecycle-agent.db", "--db", help="An SQLite file (created if missing) or postgresql://user@host/dbname."
    ),
    agent: Optional[str] = typer.Option(None, "--agent", "-a", help="Id for the imported agent (default: the exported id)."),
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Import an exported agent as a new agent (refuses an existing id)."""
    try:
        data = json.loads(_read_text(file, "export file"))
    except json.JSONDecodeError as exc:
        raise ContextFormatError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise ContextFormatError(
            f"{file}: the JSON is nested too deeply to be an export file (an export is an object of settings "
            "and a list of versions)"
        ) from None
    info = open_store(db, busy_timeout, create=True).import_agent(data, agent)
    if as_json:
        print_json(info.model_dump())
    else:
        console.print(f"imported agent {info.agent_id} with {info.head_version + 1} context versions")


@agents_app.command("list")
def list_agents(db: str = DB_OPTION, as_json: bool = JSON_OPTION, busy_timeout: float = BUSY_TIMEOUT_OPTION) -> None:
    """List the agents in a database."""
    store = open_store(db, busy_timeout)
    infos = store.list_agents()
    if as_json:
        print_json([i.model_dump() for i in infos])
        return
    table = Table(title=f"agents in {db}")
    for column in ("agent", "created", "context version", "context chars", "episodes", "forked from"):
        table.add_column(column)
    for info in infos:
        head = store.head(info.agent_id)
        forked = f"{info.forked_from}@v{info.forked_at_version}" if info.forked_from else ""
        table.add_row(
            info.agent_id, _when(info.created_at), str(info.head_version), str(len(head.text)),
            str(store.count_episodes(info.agent_id)), forked,
        )
    console.print(table)


@agents_app.command("delete")
def delete_agent(
    db: str = DB_OPTION,
    agent: str = typer.Option(..., "--agent", "-a", help="Agent id to delete."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
    busy_timeout: float = BUSY_TIMEOUT_OPTION,
) -> None:
    """Delete an agent with its contexts and episodes (irreversible)."""
    store = open_store(db, busy_timeout)
    store.get_agent(agent)
    # the question goes to stderr so that stdout stays pure JSON with --json
    if not yes and not typer.confirm(f"delete agent {agent} and all its episodes?", err=True):
        raise typer.Abort()
    store.delete_agent(agent)
    if as_json:
        print_json({"agent_id": agent, "deleted": True})
    else:
        console.print(f"deleted agent {agent}")
