"""The API's routers, one per resource; :func:`~lifecycle_agent.server.create_app` includes them in this order."""

from __future__ import annotations

from . import agents, contexts, episodes, openai, operations

ROUTERS = (operations.router, openai.router, agents.router, contexts.router, episodes.router)

__all__ = ["ROUTERS"]
