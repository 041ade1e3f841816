"""The ``lifecycle-agent`` command line: a thin layer over the library.

Every command parses its options, calls the same functions an application calls,
and prints. Each command group lives in its own module of this package.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from typer.exceptions import TyperException
from rich.markup import escape

from ..errors import LifecycleAgentError
from .common import err_console

app = typer.Typer(
    name="lifecycle-agent",
    help="Deploy and train long-lifecycle agents that rewrite their own context after every task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on ``app`` when imported.
from . import context as _context  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401
from . import envs as _envs  # noqa: E402,F401
from . import eval as _eval  # noqa: E402,F401
from . import ralph as _ralph  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lifecycle-agent`` console script."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lifecycle-agent", standalone_mode=False)
    except TyperException as exc:
        if hasattr(exc, "show"):
            exc.show()
        else:
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except (LifecycleAgentError, ValueError, KeyError, OSError) as exc:
        if os.environ.get("LIFECYCLE_AGENT_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
