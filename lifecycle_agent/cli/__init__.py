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
    # plain help: option names never wrap or get cut on a narrow terminal (rich panels cut them at 80 columns)
    rich_markup_mode=None,
)

# Command modules register themselves on ``app`` when imported.
from . import context as _context  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401
from . import envs as _envs  # noqa: E402,F401
from . import eval as _eval  # noqa: E402,F401
from . import ralph as _ralph  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import db as _db  # noqa: E402,F401


#: Optional dependency (top-level module) -> the extra that installs it.
EXTRAS = {
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "httptools": "serve", "uvloop": "serve",
    "torch": "local", "transformers": "local", "peft": "local", "gguf": "local", "accelerate": "local",
    "safetensors": "local", "trl": "train", "datasets": "train", "agentscope": "agentscope",
}


def missing_extra_message(exc: ModuleNotFoundError, argv: list[str]) -> Optional[str]:
    """``error:`` text for an optional dependency that is not installed, or ``None`` for any other module."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    command = next((a for a in argv if not a.startswith("-")), "")
    if command == "train" and extra == "local":
        extra = "train"
    what = f"'lifecycle-agent {command}'" if command else "this command"
    return f"{what} needs {module}, which is not installed: pip install 'lifecycle-agent[{extra}]'"


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
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc, list(sys.argv[1:] if argv is None else argv))
        if message is None or os.environ.get("LIFECYCLE_AGENT_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        sys.exit(2)
    except (LifecycleAgentError, ValueError, KeyError, OSError) as exc:
        if os.environ.get("LIFECYCLE_AGENT_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
