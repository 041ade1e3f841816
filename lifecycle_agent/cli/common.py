"""Shared CLI options and printing helpers."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DB_OPTION = typer.Option(
    "lifecycle-agent.db", "--db",
    help="Where the agents are stored: an SQLite file, or postgresql://user@host/dbname (the postgres extra).",
)
AGENT_OPTION = typer.Option("default", "--agent", "-a", help="Agent id.")
JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
MODEL_OPTION = typer.Option(
    "smollm2-cod",
    "--model",
    "-m",
    help="Model spec: smollm2-cod (default: SmolLM2 + the shipped adapter), smollm2[@ADAPTER_DIR] (untrained base), "
    "hf:PATH[@ADAPTER_DIR], openai:MODEL, py:package.module:callable, scripted.",
)
BASE_URL_OPTION = typer.Option(None, "--base-url", help="Base URL of an OpenAI-compatible endpoint (openai: specs).")
API_KEY_OPTION = typer.Option(
    None, "--model-api-key", "--api-key", help="API key for openai: specs (default: OPENAI_API_KEY).", envvar=None
)


_FIELD_DEFAULT = object()


def config_option(config_class: Any, name: str, *names: str, default: Any = _FIELD_DEFAULT, **options: Any) -> Any:
    """A typer option for field ``name`` of a pydantic config class: its default, help text and bounds come from
    the field, so the CLI never restates them. ``names`` are the flags (default ``--field-name``); ``default=...``
    makes the option required."""
    field = config_class.model_fields[name]
    if default is _FIELD_DEFAULT:
        default = None if field.default_factory is not None else field.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
    for bound in field.metadata:
        for ours, theirs in (("min", "ge"), ("max", "le")):
            value = getattr(bound, theirs, None)
            if value is not None and not isinstance(default, str):
                options.setdefault(ours, value)
    return typer.Option(default, *(names or ("--" + name.replace("_", "-"),)), help=field.description, **options)


def print_json(data: Any) -> None:
    """Write JSON to stdout (no colour, no wrapping: safe for pipes)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


THREADS_OPTION = typer.Option(
    None, "--threads", min=1, envvar="LIFECYCLE_AGENT_THREADS",
    help="torch CPU threads of a local model (default: one per core; 1 is often faster on a CPU shared with "
    "other jobs). Also LIFECYCLE_AGENT_THREADS.",
)


def apply_threads(threads: Optional[int]) -> None:
    """Set torch's CPU threads before a local model loads (nothing to do without torch: other models have none)."""
    if threads is None:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(threads))


def check_model_spec(spec: str) -> None:
    """The spec's form, checked before a command creates a database or loads a model."""
    from ..models import check_spec

    check_spec(spec)


def load_model(spec: str, base_url: Optional[str], api_key: Optional[str]):
    """Resolve a model spec, passing endpoint options only to the kinds that take them."""
    from ..models import resolve_model

    if spec.startswith("openai:"):
        return resolve_model(spec, base_url=base_url, api_key=api_key)
    if base_url or api_key:
        raise typer.BadParameter("--base-url/--api-key only apply to openai: model specs", param_hint="--base-url")
    return resolve_model(spec)
