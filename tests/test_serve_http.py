"""The server over real loopback HTTP (uvicorn): the openai client, agentscope, httpx, restart, shutdown, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from lifecycle_agent.models.scripted import ScriptedModel, is_update  # noqa: E402
from lifecycle_agent.server import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(90)

KEY = "key-http-0123456789abcdef"
APPLE = "What is the secret code of the apple?"
LIFECYCLE_AGENT = [sys.executable, "-c", "from lifecycle_agent.cli import main; main()"]


class SlowScripted(ScriptedModel):
    """Solve replies take ``delay`` seconds (awaited), to have episodes in flight."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def agenerate(self, messages, *, temperature=None, max_new_tokens=None):
        if not is_update(messages):
            await asyncio.sleep(self.delay)
        return self.generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the test server did not stop"

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()


@pytest.fixture
def live(db_path):
    with LiveServer(create_app(db_path, ScriptedModel(), [KEY])) as server:
        yield server


def rest(server: LiveServer, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def client(server: LiveServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def rate(server: LiveServer, completion_id: str, feedback: str = "The code of the apple is 42.", agent: str = "bot"):
    with rest(server) as h:
        return h.post(f"/v1/agents/{agent}/feedback", json={"completion_id": completion_id, "reward": 0.0, "feedback": feedback})


def create(server: LiveServer, agent_id: str = "bot", **settings) -> None:
    with rest(server) as h:
        assert h.post("/v1/agents", json={"agent_id": agent_id, **settings}).status_code == 201


# ------------------------------------------------------------------------------------ the openai client


def test_openai_client_lists_the_agents_as_models(live):
    create(live, "bot")
    create(live, "helper")
    assert sorted(m.id for m in client(live).models.list()) == ["bot", "helper"]
    assert client(live).models.retrieve("bot").id == "bot"


def test_openai_client_chat_then_feedback_teaches_the_agent(live):
    create(live)
    oa = client(live)
    first = oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}])
    assert first.choices[0].message.content.endswith("Answer: 0") and first.usage.total_tokens > 0
    updated = rate(live, first.id)
    assert updated.status_code == 200 and updated.json()["version"] == 1
    second = oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}])
    assert second.choices[0].message.content.endswith("Answer: 42")


def test_openai_client_streaming_gives_the_whole_reply_and_a_ratable_id(live):
    create(live, context=f"{APPLE} -> 42")
    stream = client(live).chat.completions.create(
        model="bot", messages=[{"role": "user", "content": APPLE}], stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("Answer: 42")
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.total_tokens > 0
    assert rate(live, chunks[0].id).status_code == 200


def test_async_openai_client_runs_concurrent_completions(live):
    create(live, context=f"{APPLE} -> 42")

    async def main():
        oa = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(*(
            oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}]) for _ in range(16)))
        await oa.close()
        return replies

    replies = asyncio.run(main())
    assert len({r.id for r in replies}) == 16
    assert all(r.choices[0].message.content.endswith("Answer: 42") for r in replies)


def test_openai_client_with_a_wrong_key_raises_authentication_error(live):
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        client(live, key="wrong-key-0123456789abcdef").models.list()


def test_openai_client_for_an_unknown_agent_raises_not_found(live):
    with pytest.raises(openai.NotFoundError, match="no agent 'ghost'"):
        client(live).chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])


def test_openai_client_with_a_bad_request_raises_bad_request(live):
    create(live)
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client(live).chat.completions.create(model="bot", messages=[{"role": "system", "content": "hi"}])


def test_50_parallel_feedbacks_over_http_land_as_50_successive_versions(live):
    create(live)
    oa = client(live)
    ids = [oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}]).id for _ in range(50)]

    async def rate_all():
        async with httpx.AsyncClient(base_url=live.url, headers={"authorization": f"Bearer {KEY}"}, timeout=60) as h:
            return await asyncio.gather(*(
                h.post("/v1/agents/bot/feedback", json={"completion_id": cid, "reward": 1.0, "feedback": f"Fact {i}."})
                for i, cid in enumerate(ids)))

    results = asyncio.run(rate_all())
    with rest(live) as h:
        history = h.get("/v1/agents/bot/history", params={"limit": 1000}).json()
    accepted = [r for r in results if r.status_code == 200]
    assert len(accepted) == 50 and history["total"] - 1 == len(accepted)
    assert sorted(r.json()["version"] for r in accepted) == list(range(1, 51))


# ------------------------------------------------------------------------------------ agentscope


@pytest.mark.parametrize("stream", [False, True])
def test_agentscope_openai_chat_model_pointed_at_the_server(live, stream):
    pytest.importorskip("agentscope")
    from agentscope.credential import OpenAICredential
    from agentscope.message import Msg, TextBlock
    from agentscope.model import OpenAIChatModel

    create(live, context=f"{APPLE} -> 42")
    model = OpenAIChatModel(credential=OpenAICredential(api_key=KEY, base_url=live.url + "/v1"), model="bot",
                            max_retries=0, stream=stream)

    async def call():
        result = await model([Msg(name="user", role="user", content=[TextBlock(text=APPLE)])])
        if not stream:
            return result
        last = None
        async for last in result:
            pass
        return last

    response = asyncio.run(call())
    text = "".join(b.text for b in response.content if getattr(b, "type", None) == "text")
    assert text.endswith("Answer: 42")
    assert response.id.startswith("chatcmpl-") and response.usage.input_tokens > 0
    assert rate(live, response.id).status_code == 200


# ------------------------------------------------------------------------------------ lifecycle


def test_restart_on_the_same_database_keeps_every_agent_and_context(db_path):
    with LiveServer(create_app(db_path, ScriptedModel(), [KEY])) as first:
        create(first, "bot")
        create(first, "other", context="other's note")
        oa = client(first)
        for fact in ("The code of the apple is 42.", "The code of the pear is 7."):
            completion = oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}])
            assert rate(first, completion.id, fact).status_code == 200
        pending = oa.chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}]).id
        with rest(first) as h:
            before = {a: h.get(f"/v1/agents/{a}/history").json()["data"] for a in ("bot", "other")}
    with LiveServer(create_app(db_path, ScriptedModel(), [KEY])) as second:
        with rest(second) as h:
            after = {a: h.get(f"/v1/agents/{a}/history").json()["data"] for a in ("bot", "other")}
            assert sorted(a["agent_id"] for a in h.get("/v1/agents").json()["data"]) == ["bot", "other"]
        assert after == before and len(after["bot"]) == 3
        reply = client(second).chat.completions.create(model="bot", messages=[{"role": "user", "content": APPLE}])
        assert reply.choices[0].message.content.endswith("Answer: 42")
        assert rate(second, pending).status_code == 200  # a completion served before the restart is still ratable


def test_shutdown_finishes_episodes_in_flight(db_path):
    server = LiveServer(create_app(db_path, SlowScripted(delay=0.5), [KEY])).__enter__()
    create(server)
    results = []

    def ask():
        results.append(client(server).chat.completions.create(model="bot", messages=[{"role": "user", "content": "hi"}]))

    callers = [threading.Thread(target=ask) for _ in range(3)]
    for t in callers:
        t.start()
    time.sleep(0.2)
    server.stop()
    for t in callers:
        t.join(10)
    assert len(results) == 3 and all(r.choices[0].message.content for r in results)
    from lifecycle_agent.store import Store

    with Store(db_path) as store:
        assert store.count_episodes(store.list_agents()[0].agent_id, "solve") == 3


# ------------------------------------------------------------------------------------ the CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("serve did not become healthy within 60 s")


def test_cli_serve_in_local_only_mode_says_so_and_stops_cleanly_on_sigterm(db_path):
    port = free_port()
    env = {**os.environ, "LIFECYCLE_AGENT_API_KEYS": ""}
    proc = subprocess.Popen([*LIFECYCLE_AGENT, "serve", "--db", db_path, "--model", "scripted", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        assert httpx.post(url + "/v1/agents", json={"agent_id": "bot"}).status_code == 201
        # a forwarding header does not make a loopback peer look remote (nor a remote one local)
        forwarded = httpx.get(url + "/v1/agents/bot/context", headers={"x-forwarded-for": "8.8.8.8"})
        assert forwarded.status_code == 200, forwarded.text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn finishes its shutdown, then re-raises the signal so the exit status tells it was stopped
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "LOCAL-ONLY MODE" in err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    requests = [entry for entry in logs if entry["logger"] == "lifecycle_agent.server.access"]
    assert any(r["path"] == "/v1/agents" and r["status"] == 201 and r["agent_id"] == "bot" for r in requests)
    assert any(entry["message"] == "server stopped" for entry in logs)


def test_cli_serve_with_keys_from_the_environment_requires_them(db_path):
    port = free_port()
    env = {**os.environ, "LIFECYCLE_AGENT_API_KEYS": f"{KEY}, other-key-0123456789abcdef"}
    proc = subprocess.Popen([*LIFECYCLE_AGENT, "serve", "--db", db_path, "--model", "scripted", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        anonymous = httpx.get(url + "/v1/agents")
        keyed = httpx.get(url + "/v1/agents", headers={"authorization": f"Bearer {KEY}"})
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert anonymous.status_code == 401 and keyed.status_code == 200
    assert "LOCAL-ONLY" not in err and KEY not in err


def test_cli_serve_refuses_a_public_address_without_keys(db_path):
    env = {**os.environ, "LIFECYCLE_AGENT_API_KEYS": ""}
    result = subprocess.run([*LIFECYCLE_AGENT, "serve", "--db", db_path, "--model", "scripted", "--host", "0.0.0.0"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in " ".join(result.stderr.split())
    assert not Path(db_path).exists()


def test_cli_serve_refuses_a_short_key(db_path):
    result = subprocess.run([*LIFECYCLE_AGENT, "serve", "--db", db_path, "--model", "scripted", "--api-key", "abc"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "at least 16 characters" in " ".join(result.stderr.split())
