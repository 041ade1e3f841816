"""``lifecycle-agent serve``: the agents of a database over HTTP (OpenAI-compatible)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.panel import Panel

from . import app
from .common import DB_OPTION, MODEL_OPTION, THREADS_OPTION, apply_threads, err_console, load_model


@app.command("serve")
def serve(
    db: str = DB_OPTION,
    model: str = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (beyond loopback only with API keys)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    api_key: Optional[list[str]] = typer.Option(
        None, "--tenant-key", "--api-key", help="A key clients must send, one per tenant (repeat for several tenants). "
                                "Default: LIFECYCLE_AGENT_API_KEYS (comma-separated). None: local-only mode.",
    ),
    model_base_url: Optional[str] = typer.Option(None, "--model-base-url", help="Endpoint of an openai: model spec."),
    model_api_key: Optional[str] = typer.Option(None, "--model-api-key", help="Key of an openai: model spec (default: OPENAI_API_KEY)."),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1, help="Larger request bodies get 413."),
    model_timeout: float = typer.Option(120.0, "--model-timeout", min=0.001, help="Seconds one model call may take before 504."),
    drain_timeout: float = typer.Option(60.0, "--drain-timeout", min=0.0, help="Seconds shutdown waits for running episodes."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error (JSON lines on stderr)."),
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Serve the agents of a database over HTTP: OpenAI-compatible chat completions (model = agent id),
    feedback that updates the agent's context, and REST for agents, contexts and episodes."""
    from ..server import KeyRing, check_bind, keys_from_env
    from ..server import serve as run_server

    keys = list(api_key) if api_key else keys_from_env()
    check_bind(host, keys)
    KeyRing(keys)
    if not keys:
        err_console.print(Panel(
            f"[bold]LOCAL-ONLY MODE[/]: no API keys configured, so there is [bold]no authentication[/].\n"
            f"Listening on {escape(host)}:{port} and answering loopback clients only.\n"
            "Give --tenant-key KEY (or LIFECYCLE_AGENT_API_KEYS) to serve other machines.",
            title="lifecycle-agent serve", border_style="bold yellow",
        ))
    apply_threads(threads)
    chat_model = load_model(model, model_base_url, model_api_key)
    try:
        run_server(
            db, chat_model, host=host, port=port, api_keys=keys, max_body_bytes=max_body_bytes,
            model_timeout_s=model_timeout, drain_timeout_s=drain_timeout, log_level=log_level,
        )
    finally:
        chat_model.close()
