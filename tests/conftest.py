"""Shared fixtures. Heavy fixtures (real SmolLM2, tiny local models) live in their own modules."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def db_path(tmp_path):
    """A fresh SQLite file path in a temporary directory."""
    return str(tmp_path / "agents.db")


@pytest.fixture
def scripted():
    """A deterministic note-taking model: keeps feedback as notes, answers by looking them up."""
    from lifecycle_agent.models.scripted import ScriptedModel

    return ScriptedModel()


@pytest.fixture
def make_agent(db_path, scripted):
    """Factory for agents over the scripted model and the test database."""
    from lifecycle_agent import LifecycleAgent

    created = []

    def factory(agent_id="a1", model=None, **kwargs):
        agent = LifecycleAgent(model or scripted, db_path, agent_id, **kwargs)
        created.append(agent)
        return agent

    yield factory
    for agent in created:
        agent.close()


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (see tests/helpers/postgres.py); skips with the reason when none starts."""
    from helpers import postgres

    server = postgres.start()
    if isinstance(server, str):
        pytest.skip(f"PostgreSQL tests skipped: {server}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database on the session's server."""
    return pg_server.fresh_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    """The database of a store test on each backend: an SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "agents.db")
    return request.getfixturevalue("pg_url")
