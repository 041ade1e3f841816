"""Request guard (body-size limit, request ids) and structured request logs.

Both are plain ASGI middleware: a request pays for a few dict look-ups, not for a
second framework layer. Request logs are JSON lines through the ``logging`` module
(logger ``lifecycle_agent.server.access``): method, path, status, duration, agent id,
tenant tag and request id. Headers (and so API keys) are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from starlette.exceptions import HTTPException

access_log = logging.getLogger("lifecycle_agent.server.access")


def too_large(limit: int) -> str:
    return f"request body is over the limit of {limit} bytes; send less or raise the server's --max-body-bytes"


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` with 413, adds ``x-request-id``, logs one JSON line per request."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = os.urandom(6).hex()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = {"code": 500, "sent": False}
        limit = self.max_body_bytes

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:  # refused before reading a byte of it
                body = error_body(too_large(limit), "request_too_large")
                await send_wrapper({
                    "type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")],
                })
                await send_wrapper({"type": "http.response.body", "body": body})
                return
            received = 0

            async def receive_wrapper():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:  # an HTTPException: FastAPI turns other errors raised here into 400
                        raise HTTPException(413, too_large(limit))
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={"http": {
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status["code"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                        "agent_id": state.get("agent_id"),
                        "tenant": state.get("tenant"),
                        "request_id": request_id,
                    }},
                )


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        http = getattr(record, "http", None)
        if http:
            entry.update(http)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """Send the server's logs (requests, errors, lifecycle) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level must be debug, info, warning or error, got {level!r}")
    for name in ("lifecycle_agent", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
