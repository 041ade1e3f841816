"""The server's structure as a contract: one error table, routers per resource, one trip to the store
thread on the hot read path, and a malformed request refused before the store is asked."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lifecycle_agent.errors import (  # noqa: E402
    ContextBudgetError,
    FeedbackConflictError,
    LifecycleAgentError,
    ModelAuthError,
)
from lifecycle_agent.models.scripted import ScriptedModel  # noqa: E402
from lifecycle_agent.server import create_app  # noqa: E402
from lifecycle_agent.server.http_errors import (  # noqa: E402
    BODY_ERRORS,
    CONFLICT,
    ERROR_RESPONSES,
    ERROR_TABLE,
    MODEL_ERRORS,
    error_kind,
)
from lifecycle_agent.server.routes import ROUTERS  # noqa: E402
from lifecycle_agent.server.service import ModelTimeoutError  # noqa: E402
from lifecycle_agent.server.tenancy import AlreadyRatedError, UpdateFailedError, UpdateTimedOutError  # noqa: E402
from lifecycle_agent.store import Store  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = "key-a-0123456789abcdef"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("exc, status, type_, code", [
    (ModelTimeoutError("slow"), 504, "model_timeout", None),  # a ModelCallError, but the nearer entry wins
    (ModelAuthError("refused"), 502, "model_error", None),  # no entry of its own: its base class's
    (UpdateTimedOutError("slow", context_version=3), 504, "model_timeout", None),
    (UpdateFailedError("failed", context_version=3), 502, "model_error", None),
    (AlreadyRatedError("twice", context_version=3), 409, "conflict_error", "already_rated"),
    (ContextBudgetError("long", original_chars=9, budget=3, policy="reject"), 400, "invalid_request_error", None),
])
def test_an_error_takes_the_entry_of_the_nearest_class_in_the_table(exc, status, type_, code):
    kind = error_kind(exc)
    assert (kind.status, kind.type, kind.code) == (status, type_, code)


def test_an_error_the_table_does_not_know_has_no_entry():
    assert error_kind(LifecycleAgentError("new kind")) is None
    assert error_kind(KeyError("x")) is None
    assert isinstance(AlreadyRatedError("twice", context_version=1), FeedbackConflictError)


def test_every_status_in_the_table_is_documented_in_the_openapi_document():
    documented = {**ERROR_RESPONSES, **BODY_ERRORS, **CONFLICT, **MODEL_ERRORS}
    missing = {cls.__name__: kind.status for cls, kind in ERROR_TABLE.items() if kind.status not in documented}
    assert not missing


def test_each_router_holds_one_resource_and_together_they_serve_every_path(db_path):
    tags = [{t for r in router.routes for t in r.tags} for router in ROUTERS]
    assert tags == [{"operations"}, {"openai"}, {"agents"}, {"contexts"}, {"episodes"}]
    app = create_app(db_path, ScriptedModel(), [KEY])
    paths = set(app.openapi()["paths"])
    assert paths == {r.path for router in ROUTERS for r in router.routes}
    assert len(paths) == 16 and sum(len(r.methods) for router in ROUTERS for r in router.routes) == 19


async def test_reading_a_context_takes_one_trip_to_the_store_thread(db_path):
    store = Store(db_path)
    app = create_app(store, ScriptedModel(), [KEY])
    service = app.state.service
    trips = []
    real_db = service.db

    async def counted(fn, *args, **kwargs):
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real_db(fn, *args, **kwargs)

    headers = {"authorization": f"Bearer {KEY}"}
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         headers=headers) as c:
                assert (await c.post("/v1/agents", json={"agent_id": "bot", "context": "x"})).status_code == 201
                service.db = counted
                for url in ("/v1/agents/bot/context", "/v1/agents/bot/context?version=0"):
                    trips.clear()
                    r = await c.get(url)
                    assert r.status_code == 200 and r.json()["agent_id"] == "bot"
                    assert len(trips) == 1, trips
                trips.clear()
                assert (await c.get("/v1/agents/nobody/context")).status_code == 404
                assert len(trips) == 1, trips
    finally:
        store.close()


@pytest.mark.parametrize("method, url, body", [
    ("PUT", "/v1/agents/nobody/context", {"txt": "typo"}),
    ("POST", "/v1/agents/nobody/rollback", {"version": -1}),
    ("POST", "/v1/agents/nobody/feedback", {"completion_id": "not-a-completion"}),
    ("POST", "/v1/agents/nobody/fork", {}),
    ("GET", "/v1/agents/nobody/history?limit=0", None),
    ("GET", "/v1/agents/nobody/episodes/0", None),
])
async def test_a_malformed_request_is_400_before_the_store_is_asked_whether_the_agent_exists(db_path, method, url,
                                                                                          body):
    store = Store(db_path)
    app = create_app(store, ScriptedModel(), [KEY])
    service = app.state.service
    trips = []

    async def counted(fn, *args, **kwargs):
        trips.append(fn)
        raise AssertionError("the store was asked")

    try:
        async with app.router.lifespan_context(app):
            service.db = counted
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         headers={"authorization": f"Bearer {KEY}"}) as c:
                r = await c.request(method, url, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert trips == []
    finally:
        store.close()
