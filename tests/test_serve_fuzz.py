"""Fuzz the HTTP API from its own OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid; each response must be a
documented status with a body matching the documented schema, and never a 5xx. A
few agents and a completion exist so generated ids sometimes hit real data.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from lifecycle_agent.models.scripted import ScriptedModel  # noqa: E402
from lifecycle_agent.server import create_app  # noqa: E402
from lifecycle_agent.store import Store  # noqa: E402

KEY = "key-fuzz-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _app():
    store = Store(":memory:")
    app = create_app(store, ScriptedModel(), [KEY])
    from starlette.testclient import TestClient

    with TestClient(app, headers=AUTH) as c:
        for agent_id in ("a", "bot", "0"):
            c.post("/v1/agents", json={"agent_id": agent_id, "context": "The code of the apple is 42."})
        c.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "apple?"}]})
    return app


# A body over the size limit is rightly refused with 413 (documented), whatever else is wrong with it.
_NEGATIVE_OK = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", _app(),
    config=schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": _NEGATIVE_OK}}}),
)

#: Operations with rules JSON Schema cannot state, so a schema-valid body may rightly get 400:
#: a context over the agent's budget (create, edit), version numbers out of order (import),
#: a conversation without a user message (chat).
CROSS_FIELD_RULES = {
    "POST /v1/agents", "PUT /v1/agents/{agent_id}/context", "POST /v1/imports", "POST /v1/chat/completions",
}


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.timeout(120)
def test_api_conforms_to_its_openapi_document(case):
    excluded = [positive_data_acceptance] if case.operation.label in CROSS_FIELD_RULES else []
    case.call_and_validate(headers=AUTH, excluded_checks=excluded)
