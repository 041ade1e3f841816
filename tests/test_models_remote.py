"""Remote model adapters against a real loopback HTTP server.

A tiny threaded ``http.server`` emulates ``POST /v1/chat/completions`` (plain JSON and SSE
streaming) with a programmable script per request: success, 429, 5xx, 401/403, 400, or a
sleep longer than the client timeout. Covered: :class:`OpenAIModel` (retries, error types and
messages, usage, sync + async, env var fallback, ``resolve_model``) and
:class:`AgentScopeModel` (agentscope 2.x ``OpenAIChatModel`` pointed at the same server,
custom ``ChatModelBase`` subclasses).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("tenacity")

from lifecycle_agent.errors import ModelAuthError, ModelCallError, ModelSpecError  # noqa: E402
from lifecycle_agent.models import Generation, resolve_model  # noqa: E402
from lifecycle_agent.models.openai_compat import PLACEHOLDER_API_KEY, OpenAIModel  # noqa: E402

pytestmark = pytest.mark.timeout(60)

USER = [{"role": "user", "content": "hi"}]


# --------------------------------------------------------------------------- server


class FakeChatServer:
    """Loopback OpenAI-compatible server. ``script`` holds one action per request:

    - ``("ok", text)``: a completion with ``text`` (usage 7 prompt / 3 completion tokens);
    - ``("status", code, message)`` or ``("status", code, message, headers, code_field)``;
    - ``("sleep", seconds)``: wait, then reply ``"late"`` (the client has usually given up).

    With an empty script every request succeeds with ``default_text``.
    """

    PROMPT_TOKENS = 7
    COMPLETION_TOKENS = 3

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict[str, Any]] = []
        self.default_text = "hello there"
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: expected in timeout tests

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.script = []
            self.requests = []

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        with self.lock:
            self.requests.append({"path": h.path, "body": body, "headers": {k.lower(): v for k, v in h.headers.items()}})
            action = self.script.pop(0) if self.script else ("ok", self.default_text)
        if h.path != "/v1/chat/completions":
            action = ("status", 404, f"no route {h.path}")
        if action[0] == "sleep":
            time.sleep(action[1])
            action = ("ok", "late")
        if action[0] == "status":
            code, message = action[1], action[2]
            headers = action[3] if len(action) > 3 else {}
            code_field = action[4] if len(action) > 4 else None
            payload = {"error": {"message": message, "type": "test_error", "param": None, "code": code_field}}
            self._send_json(h, code, payload, headers)
            return
        text = action[1]
        model = body.get("model", "?")
        if body.get("stream"):
            self._send_stream(h, model, text, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
            return
        self._send_json(
            h,
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": self.PROMPT_TOKENS,
                    "completion_tokens": self.COMPLETION_TOKENS,
                    "total_tokens": self.PROMPT_TOKENS + self.COMPLETION_TOKENS,
                },
            },
        )

    @staticmethod
    def _send_json(h, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data)

    def _send_stream(self, h, model: str, text: str, include_usage: bool) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("cache-control", "no-cache")
        h.send_header("connection", "close")
        h.end_headers()

        def event(obj: dict) -> None:
            h.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        base = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        half = len(text) // 2
        for piece in (text[:half], text[half:]):
            event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]})
        event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if include_usage:
            event(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": self.PROMPT_TOKENS,
                        "completion_tokens": self.COMPLETION_TOKENS,
                        "total_tokens": self.PROMPT_TOKENS + self.COMPLETION_TOKENS,
                    },
                }
            )
        h.wfile.write(b"data: [DONE]\n\n")
        h.wfile.flush()
        h.close_connection = True


@pytest.fixture(scope="module")
def _server():
    srv = FakeChatServer()
    yield srv
    srv.stop()


@pytest.fixture
def server(_server):
    _server.reset()
    yield _server
    _server.reset()


@pytest.fixture(autouse=True)
def _no_openai_env(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


def make_model(server: FakeChatServer, **kwargs) -> OpenAIModel:
    options = {"api_key": "sk-test", "retry_initial_wait": 0.01, "retry_max_wait": 0.05, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIModel("test-model", base_url=server.base_url, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- OpenAIModel: sync


def test_success_returns_text_usage_and_sends_request(server):
    model = make_model(server, default_temperature=0.4, max_tokens=16, extra_body={"top_k": 5})
    gen = model.generate([{"role": "system", "content": "be brief"}, *USER])
    assert isinstance(gen, Generation)
    assert gen.text == "hello there"
    assert (gen.prompt_tokens, gen.completion_tokens, gen.finish_reason) == (7, 3, "stop")
    assert gen.extra["attempts"] == 1
    assert model.model_id == "openai:test-model"
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "test-model"
    assert body["messages"] == [{"role": "system", "content": "be brief"}, *USER]
    assert body["temperature"] == 0.4 and body["max_tokens"] == 16 and body["top_k"] == 5
    model.close()


def test_per_call_temperature_and_max_new_tokens_override_defaults(server):
    model = make_model(server, default_temperature=0.4, max_tokens=16, max_tokens_field="max_completion_tokens")
    model.generate(USER, temperature=0.0, max_new_tokens=2)
    body = server.requests[0]["body"]
    assert body["temperature"] == 0.0
    assert body["max_completion_tokens"] == 2 and "max_tokens" not in body
    model.close()


def test_no_temperature_or_cap_sent_when_none_given(server):
    model = make_model(server)
    model.generate(USER)
    body = server.requests[0]["body"]
    assert "temperature" not in body and "max_tokens" not in body
    model.close()


def test_list_of_parts_content_is_sent_as_given_unless_flatten_parts(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    model = make_model(server)
    model.generate(parts)
    assert server.requests[-1]["body"]["messages"] == parts
    flat = make_model(server, flatten_parts=True)
    flat.generate(parts)
    assert server.requests[-1]["body"]["messages"] == [{"role": "user", "content": "a\nb"}]
    assert parts[0]["content"][0] == {"type": "text", "text": "a"}  # caller's list untouched
    model.close()
    flat.close()


def test_429_then_success_is_retried(server):
    server.script = [("status", 429, "rate limited")]
    model = make_model(server)
    gen = model.generate(USER)
    assert gen.text == "hello there"
    assert gen.extra["attempts"] == 2
    assert server.count == 2
    model.close()


def test_500_twice_then_success_is_retried(server):
    server.script = [("status", 500, "boom"), ("status", 502, "bad gateway")]
    model = make_model(server)
    gen = model.generate(USER)
    assert gen.text == "hello there" and gen.extra["attempts"] == 3
    assert server.count == 3
    model.close()


def test_timeout_then_success_is_retried(server):
    server.script = [("sleep", 1.5)]
    model = make_model(server, timeout=0.3)
    start = time.monotonic()
    gen = model.generate(USER)
    elapsed = time.monotonic() - start
    assert gen.text == "hello there" and gen.extra["attempts"] == 2
    assert server.count == 2
    assert elapsed < 1.4  # gave up on the slow request instead of waiting for it
    model.close()


def test_retry_after_header_is_honoured(server):
    server.script = [("status", 429, "slow down", {"retry-after": "0.3"})]
    model = make_model(server, retry_max_wait=1.0)
    start = time.monotonic()
    gen = model.generate(USER)
    assert gen.extra["attempts"] == 2
    assert time.monotonic() - start >= 0.3
    model.close()


def test_retries_exhausted_raise_model_call_error_naming_model_url_and_last_error(server):
    server.script = [("status", 503, f"overloaded #{i}") for i in range(3)]
    model = make_model(server, max_retries=2)
    with pytest.raises(ModelCallError) as info:
        model.generate(USER)
    assert not isinstance(info.value, ModelAuthError)
    message = str(info.value)
    assert "test-model" in message and server.base_url in message
    assert "3 attempt(s)" in message and "503" in message and "overloaded #2" in message
    assert server.count == 3
    model.close()


def test_max_retries_zero_makes_one_request(server):
    server.script = [("status", 500, "boom")]
    model = make_model(server, max_retries=0)
    with pytest.raises(ModelCallError, match="1 attempt"):
        model.generate(USER)
    assert server.count == 1
    model.close()


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_raise_model_auth_error_without_retry(server, status):
    server.script = [("status", status, "invalid api key")]
    model = make_model(server)
    with pytest.raises(ModelAuthError) as info:
        model.generate(USER)
    message = str(info.value)
    assert f"endpoint {server.base_url} refused the API key ({status})" in message
    assert "OPENAI_API_KEY" in message and "--model-api-key" in message and "invalid api key" in message
    assert server.count == 1
    model.close()


def test_400_raises_model_call_error_with_server_message_without_retry(server):
    server.script = [("status", 400, "context length exceeded: 9000 > 8192")]
    model = make_model(server)
    with pytest.raises(ModelCallError) as info:
        model.generate(USER)
    assert not isinstance(info.value, ModelAuthError)
    message = str(info.value)
    assert "(400)" in message and "context length exceeded: 9000 > 8192" in message
    assert "test-model" in message and server.base_url in message
    assert server.count == 1
    model.close()


def test_404_hints_at_model_name_and_base_url(server):
    model = OpenAIModel("test-model", base_url=server.base_url.removesuffix("/v1"), api_key="k", max_retries=0)
    with pytest.raises(ModelCallError, match=r"\(404\).*ends in /v1"):
        model.generate(USER)
    model.close()


def test_insufficient_quota_429_is_not_retried(server):
    server.script = [("status", 429, "You exceeded your current quota", {}, "insufficient_quota")]
    model = make_model(server)
    with pytest.raises(ModelCallError, match="quota"):
        model.generate(USER)
    assert server.count == 1
    model.close()


def test_connection_refused_is_retried_then_explained():
    model = OpenAIModel(
        "m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, retry_initial_wait=0.01, timeout=2.0
    )
    with pytest.raises(ModelCallError) as info:
        model.generate(USER)
    message = str(info.value)
    assert "2 attempt(s)" in message and "APIConnectionError" in message and "--base-url" in message
    model.close()


def test_close_is_idempotent_and_blocks_later_calls(server):
    model = make_model(server)
    model.generate(USER)
    model.close()
    model.close()
    with pytest.raises(ModelCallError, match="closed"):
        model.generate(USER)


# --------------------------------------------------------------------------- OpenAIModel: async


def test_async_success_and_retry(server):
    server.script = [("status", 429, "rate limited"), ("status", 500, "boom")]
    model = make_model(server)

    async def main():
        return await model.agenerate(USER, temperature=0.1, max_new_tokens=3)

    gen = asyncio.run(main())
    assert gen.text == "hello there" and gen.extra["attempts"] == 3
    assert (gen.prompt_tokens, gen.completion_tokens) == (7, 3)
    assert server.requests[-1]["body"]["temperature"] == 0.1
    assert server.requests[-1]["body"]["max_tokens"] == 3
    model.close()


def test_async_timeout_then_success(server):
    server.script = [("sleep", 1.5)]
    model = make_model(server, timeout=0.3)
    gen = asyncio.run(model.agenerate(USER))
    assert gen.text == "hello there" and gen.extra["attempts"] == 2
    model.close()


def test_async_errors_match_sync(server):
    model = make_model(server)
    server.script = [("status", 401, "bad key")]
    with pytest.raises(ModelAuthError, match="refused the API key"):
        asyncio.run(model.agenerate(USER))
    server.script = [("status", 422, "unprocessable thing")]
    with pytest.raises(ModelCallError, match="unprocessable thing"):
        asyncio.run(model.agenerate(USER))
    server.script = [("status", 500, "x")] * 2
    with pytest.raises(ModelCallError, match="2 attempt"):
        asyncio.run(make_model(server, max_retries=1).agenerate(USER))
    assert server.count == 4
    model.close()


def test_async_works_across_event_loops_and_concurrently(server):
    model = make_model(server)
    for _ in range(3):  # asyncio.run per call: each loop gets its own client
        assert asyncio.run(model.agenerate(USER)).text == "hello there"

    async def many():
        return await asyncio.gather(*(model.agenerate(USER) for _ in range(5)))

    gens = asyncio.run(many())
    assert [g.text for g in gens] == ["hello there"] * 5
    assert server.count == 8
    model.close()


def test_aclose_closes_the_loop_client(server):
    model = make_model(server)

    async def main():
        await model.agenerate(USER)
        await model.aclose()

    asyncio.run(main())
    with pytest.raises(ModelCallError, match="closed"):
        model.generate(USER)


# --------------------------------------------------------------------------- OpenAIModel: config


def test_env_var_fallback(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    model = OpenAIModel("env-model", retry_initial_wait=0.01)
    assert model.base_url == server.base_url
    assert model.generate(USER).text == "hello there"
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-from-env"
    model.close()


def test_explicit_arguments_beat_env_vars(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    model = OpenAIModel("m", base_url=server.base_url, api_key="sk-arg")
    model.generate(USER)
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-arg"
    model.close()


def test_base_url_without_key_uses_placeholder(server):
    model = OpenAIModel("local-model", base_url=server.base_url)
    assert model.generate(USER).text == "hello there"
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"
    model.close()


def test_no_key_and_no_base_url_is_a_clear_spec_error():
    with pytest.raises(ModelSpecError) as info:
        OpenAIModel("gpt-4o-mini")
    message = str(info.value)
    assert "OPENAI_API_KEY" in message and "api_key" in message and "--base-url" in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens_field": "tokens"}, "max_tokens_field"),
    ],
)
def test_invalid_options_are_spec_errors(kwargs, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        OpenAIModel("m", base_url="http://127.0.0.1:1/v1", **kwargs)


def test_resolve_model_openai_spec(server):
    model = resolve_model("openai:spec-model", base_url=server.base_url, api_key="sk-x", retry_initial_wait=0.01)
    assert isinstance(model, OpenAIModel)
    assert model.model_id == "openai:spec-model"
    server.script = [("status", 500, "once")]
    gen = model.generate(USER)
    assert gen.text == "hello there" and gen.extra["attempts"] == 2
    assert server.requests[-1]["body"]["model"] == "spec-model"
    model.close()


def test_importing_the_package_does_not_import_openai_or_agentscope():
    code = (
        "import sys, lifecycle_agent, lifecycle_agent.models, lifecycle_agent.errors\n"
        "bad = [m for m in ('openai', 'agentscope') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- agentscope
# agentscope is an optional extra: these tests skip (and only these) when it is missing.


@pytest.fixture(scope="module")
def ags():
    """agentscope 2.x names plus three tiny ChatModelBase subclasses used below."""
    pytest.importorskip("agentscope", minversion="2.0")
    from types import SimpleNamespace

    from agentscope.credential import CredentialBase, OpenAICredential
    from agentscope.message import TextBlock, ThinkingBlock
    from agentscope.model import ChatModelBase, ChatResponse, ChatUsage, OpenAIChatModel
    from pydantic import BaseModel

    class Params(BaseModel):
        temperature: float | None = None

    class FixedModel(ChatModelBase):
        """A minimal agentscope 2.x model: a fixed reply with thinking + text blocks."""

        def __init__(self):
            super().__init__(credential=CredentialBase(), model="fixed", parameters=Params(), stream=False)
            self.seen: list = []

        async def _call_api(self, model_name, messages, tools=None, tool_choice=None, **kwargs):
            self.seen.append((messages, self.parameters.temperature, kwargs))
            return ChatResponse(
                content=[ThinkingBlock(thinking="let me think"), TextBlock(text="The answer"), TextBlock(text="is 42.")],
                is_last=True,
                usage=ChatUsage(input_tokens=11, output_tokens=2, time=0.01),
            )

    class StreamingFixedModel(FixedModel):
        """Streams two text deltas (agentscope 2.x: chunks are deltas, not cumulative)."""

        def __init__(self):
            super().__init__()
            self.stream = True

        async def _call_api(self, model_name, messages, tools=None, tool_choice=None, **kwargs):
            async def gen():
                for piece in ("str", "eamed"):
                    yield ChatResponse(content=[TextBlock(text=piece, id="t")], is_last=False)

            return gen()

    class FailingModel(FixedModel):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        async def _call_api(self, *args, **kwargs):
            raise self.exc

    def openai_chat(server: FakeChatServer, **kwargs):
        """agentscope 2.x OpenAIChatModel pointed at the loopback server."""
        return OpenAIChatModel(
            credential=OpenAICredential(api_key="sk-as", base_url=server.base_url),
            model="as-model",
            max_retries=0,
            **kwargs,
        )

    return SimpleNamespace(
        FixedModel=FixedModel,
        StreamingFixedModel=StreamingFixedModel,
        FailingModel=FailingModel,
        openai_chat=openai_chat,
    )


def _adapter():
    from lifecycle_agent.models.agentscope_model import AgentScopeModel

    return AgentScopeModel


@pytest.mark.parametrize("stream", [True, False])
def test_agentscope_openai_chat_model_against_loopback(server, ags, stream):
    inner = ags.openai_chat(server, stream=stream)
    model = resolve_model(inner, close_model=True)
    assert isinstance(model, _adapter())
    assert model.model_id == "agentscope:as-model"
    gen = model.generate([{"role": "system", "content": "be brief"}, *USER], temperature=0.25, max_new_tokens=9)
    assert gen.text == "hello there"
    assert (gen.prompt_tokens, gen.completion_tokens) == (7, 3)
    assert gen.finish_reason == "completed"
    [req] = server.requests
    body = req["body"]
    assert req["headers"]["authorization"] == "Bearer sk-as"
    assert body["model"] == "as-model" and body["stream"] is stream
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", [{"type": "text", "text": "be brief"}]),
        ("user", [{"type": "text", "text": "hi"}]),
    ]
    assert body["temperature"] == 0.25 and body["max_completion_tokens"] == 9
    # per-call overrides do not leak into the wrapped model
    assert inner.parameters.temperature is None and inner.parameters.max_tokens is None
    model.generate(USER)
    assert "temperature" not in server.requests[-1]["body"]
    model.close()
    assert inner.client.is_closed()
    with pytest.raises(ModelCallError, match="closed"):
        model.generate(USER)


def test_agentscope_sync_and_async_across_loops(server, ags):
    model = _adapter()(ags.openai_chat(server), default_temperature=0.5, close_model=True)
    assert model.generate(USER).text == "hello there"
    for _ in range(2):
        assert asyncio.run(model.agenerate(USER)).text == "hello there"

    async def inside_a_running_loop():
        sync = model.generate(USER)  # a blocking call from async code must not deadlock
        many = await asyncio.gather(*(model.agenerate(USER) for _ in range(4)))
        return [sync, *many]

    gens = asyncio.run(inside_a_running_loop())
    assert [g.text for g in gens] == ["hello there"] * 5
    assert all(r["body"]["temperature"] == 0.5 for r in server.requests)
    assert server.count == 8
    model.close()
    model.close()


def test_agentscope_run_in_caller_loop(server, ags):
    model = _adapter()(ags.openai_chat(server), run_in_caller_loop=True, close_model=True)

    async def main():
        gen = await model.agenerate(USER)
        model.close()  # schedules the client's close on this loop
        await asyncio.sleep(0)
        return gen

    assert asyncio.run(main()).text == "hello there"


def test_agentscope_parts_content_becomes_text_blocks(server, ags):
    model = _adapter()(ags.openai_chat(server, stream=False), close_model=True)
    model.generate([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}])
    model.close()
    assert server.requests[-1]["body"]["messages"][0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]


def test_agentscope_http_errors_become_model_errors(server, ags):
    model = _adapter()(ags.openai_chat(server, stream=False), close_model=True)
    server.script = [("status", 401, "bad key")]
    with pytest.raises(ModelAuthError, match="401"):
        model.generate(USER)
    server.script = [("status", 400, "bad request body")]
    with pytest.raises(ModelCallError, match="bad request body"):
        asyncio.run(model.agenerate(USER))
    model.close()


def test_custom_chat_model_base_fixed_response(ags):
    inner = ags.FixedModel()
    model = resolve_model(inner, call_kwargs={"seed": 1})
    assert isinstance(model, _adapter()) and model.model_id == "agentscope:fixed"
    gen = model.generate(
        [{"role": "system", "content": "sys"}, *USER, {"role": "assistant", "content": "hey"}],
        temperature=0.7,
        max_new_tokens=5,
    )
    assert gen.text == "The answer\nis 42."  # text blocks joined by newlines, thinking left out
    assert gen.extra["reasoning"] == "let me think"
    assert (gen.prompt_tokens, gen.completion_tokens) == (11, 2)
    msgs, temperature, kwargs = inner.seen[0]
    assert [(m.role, m.get_text_content()) for m in msgs] == [("system", "sys"), ("user", "hi"), ("assistant", "hey")]
    assert temperature == 0.7 and kwargs == {"seed": 1}  # no parameters.max_tokens -> cap ignored
    assert inner.parameters.temperature is None
    assert asyncio.run(model.agenerate(USER)).text == "The answer\nis 42."


def test_custom_streaming_model_deltas_are_joined(ags):
    assert _adapter()(ags.StreamingFixedModel()).generate(USER).text == "streamed"


def test_custom_model_that_raises_becomes_model_call_error(ags):
    model = _adapter()(ags.FailingModel(RuntimeError("backend exploded")))
    with pytest.raises(ModelCallError) as info:
        model.generate(USER)
    assert "agentscope:fixed" in str(info.value) and "RuntimeError: backend exploded" in str(info.value)
    with pytest.raises(ModelCallError, match="backend exploded"):
        asyncio.run(model.agenerate(USER))


def test_custom_model_auth_status_becomes_model_auth_error(ags):
    exc = RuntimeError("denied")
    exc.status_code = 403
    with pytest.raises(ModelAuthError, match="403"):
        _adapter()(ags.FailingModel(exc)).generate(USER)


def test_unsupported_roles_and_parts_are_explained(ags):
    from lifecycle_agent.models.agentscope_model import to_agentscope_msgs

    model = _adapter()(ags.FixedModel())
    with pytest.raises(ModelCallError, match="role 'tool'"):
        model.generate([{"role": "tool", "content": "x"}])
    with pytest.raises(ModelCallError, match="image_url"):
        to_agentscope_msgs([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_agentscope_model_rejects_non_agentscope_objects(ags):
    with pytest.raises(ModelSpecError, match="ChatModelBase"):
        _adapter()(object())
