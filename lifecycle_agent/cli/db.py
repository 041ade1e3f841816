"""``lifecycle-agent db ...``: whole-store operations (copy a store between SQLite and PostgreSQL)."""

from __future__ import annotations

import typer

from ..errors import StoreError
from ..store import Store
from . import app
from .common import JSON_OPTION, console, print_json

db_app = typer.Typer(help="Whole-store operations.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")


@db_app.command("migrate")
def migrate(
    source: str = typer.Option(..., "--from", help="The store to copy: an SQLite file or a postgresql:// URL."),
    target: str = typer.Option(..., "--to", help="An empty store to copy into: a postgresql:// URL or an SQLite file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy a whole store (agents, context versions, episodes, runs) into an empty one, e.g. SQLite to PostgreSQL.

    Stop the processes writing the source first. The target must be empty; a failed copy leaves it empty.
    """
    if source == target:
        raise StoreError(f"--from and --to are the same database ({source}); give a new, empty target")
    with _open("--from", source, create=False) as src, _open("--to", target) as dst:
        counts = src.copy_to(dst)
    if as_json:
        print_json({"from": src.path, "to": dst.path, "copied": counts})
    else:
        copied = ", ".join(f"{n} {table}" for table, n in counts.items())
        console.print(f"copied {copied} from {src.path} to {dst.path}")


def _open(option: str, db: str, *, create: bool = True) -> Store:
    """A side of the copy; its errors name the option that gave it."""
    try:
        return Store(db, create=create)
    except StoreError as exc:
        raise type(exc)(f"{option}: {str(exc).replace(' (check --db)', '')}") from None
