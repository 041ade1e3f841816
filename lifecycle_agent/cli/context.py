"""``lifecycle-agent context ...`` and ``lifecycle-agent agents``: inspect and manage stored contexts."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ContextFormatError
from ..store import Store
from . import app
from .common import AGENT_OPTION, DB_OPTION, JSON_OPTION, console, print_json

context_app = typer.Typer(help="Show, compare, roll back, fork, export and import agent contexts.", no_args_is_help=True)
agents_app = typer.Typer(help="List and delete agents.", no_args_is_help=True)
app.add_typer(context_app, name="context")
app.add_typer(agents_app, name="agents")


def _open(db: str) -> Store:
    return Store(db, create=False)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@context_app.command("show")
def show(
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to show (default: current)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print an agent's context (current or a given version)."""
    store = _open(db)
    ctx = store.head(agent) if version is None else store.get_version(agent, version)
    if as_json:
        print_json(ctx.model_dump())
        return
    console.print(f"[bold]{agent}[/] context version {ctx.version} ({len(ctx.text)} chars, {ctx.source})", highlight=False)
    console.print(ctx.text or "(empty)", markup=False, highlight=False)


@context_app.command("history")
def history(db: str = DB_OPTION, agent: str = AGENT_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List every context version, oldest first."""
    versions = _open(db).history(agent)
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
) -> None:
    """Unified diff between two context versions."""
    store = _open(db)
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
) -> None:
    """Make an old version current by appending a copy of it (nothing is deleted)."""
    new = _open(db).rollback(agent, version)
    if as_json:
        print_json(new.model_dump())
    else:
        console.print(f"{agent}: version {new.version} is now a copy of version {version}")


@context_app.command("fork")
def fork(
    to: str = typer.Option(..., "--to", help="Id of the new agent."),
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to fork at (default: current)."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a new agent starting from this agent's context at a version."""
    info = _open(db).fork(agent, to, version)
    if as_json:
        print_json(info.model_dump())
    else:
        console.print(f"created agent {to} from {agent} at version {info.forked_at_version}")


@context_app.command("set")
def set_context(
    file: Path = typer.Option(..., "--file", "-f", help="Text file holding the new context ('-' for stdin)."),
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a context by hand (recorded as an edit; the budget applies)."""
    import sys

    from ..agent import AgentSettings
    from ..protocol import apply_budget

    text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    store = _open(db)
    settings = AgentSettings(**store.get_agent(agent).settings)
    if apply_budget(text, settings.context_budget, "reject").text is None:
        raise ContextFormatError(f"{file}: {len(text)} characters is over the context budget of {settings.context_budget}")
    new = store.write_context(agent, text, source="edit", note=f"set from {file}")
    if as_json:
        print_json(new.model_dump())
    else:
        console.print(f"{agent}: wrote context version {new.version} ({len(text)} chars)")


@context_app.command("export")
def export(
    db: str = DB_OPTION,
    agent: str = AGENT_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Export an agent's settings and context versions as JSON."""
    data = _open(db).export_agent(agent)
    if out is None:
        print_json(data)
    else:
        out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        console.print(f"exported {len(data['versions'])} versions of {agent} to {out}")


@context_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A JSON file written by 'context export'."),
    db: str = typer.Option("lifecycle-agent.db", "--db", help="SQLite database file (created if missing)."),
    agent: Optional[str] = typer.Option(None, "--agent", "-a", help="Id for the imported agent (default: the exported id)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import an exported agent as a new agent (refuses an existing id)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContextFormatError(f"export file {file} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ContextFormatError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    info = Store(db).import_agent(data, agent)
    if as_json:
        print_json(info.model_dump())
    else:
        console.print(f"imported agent {info.agent_id} with {info.head_version + 1} context versions")


@agents_app.command("list")
def list_agents(db: str = DB_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List the agents in a database."""
    store = _open(db)
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
) -> None:
    """Delete an agent with its contexts and episodes (irreversible)."""
    store = _open(db)
    store.get_agent(agent)
    if not yes and not typer.confirm(f"delete agent {agent} and all its episodes?"):
        raise typer.Abort()
    store.delete_agent(agent)
    console.print(f"deleted agent {agent}")
