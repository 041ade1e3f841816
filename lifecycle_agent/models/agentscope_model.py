"""Any agentscope 2.x ``ChatModelBase`` (OpenAI, DashScope, Anthropic, Ollama, ... or your own).

agentscope 2.x models are async callables::

    response = await model(messages: list[Msg], tools=None, tool_choice=None, **kwargs)

``response`` is a ``ChatResponse`` (``content``: a list of blocks such as ``TextBlock`` /
``ThinkingBlock`` / ``ToolCallBlock``; ``usage``: ``ChatUsage(input_tokens, output_tokens,
time)``; ``finished_reason``: ``"completed"`` or ``"interrupted"``), or, when the model was
built with ``stream=True`` (the default for most providers), an async generator of
``ChatResponse`` deltas whose last item (``is_last=True``) is the complete reply. The model's
own formatter turns ``Msg`` objects into the provider's wire format, so this adapter only
builds ``Msg`` objects from plain ``{"role", "content"}`` dicts and joins the reply's text
blocks with newlines (thinking blocks are kept out of the text).

Event loops: an agentscope model holds an async HTTP client whose connections belong to
the event loop that opened them (reusing it from another loop fails with "Event loop is
closed"). So by default every call, sync or async, runs on one process-wide background
loop thread; ``agenerate`` awaits it without blocking the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import logging
import threading
from typing import Any, Optional

from ..errors import ModelAuthError, ModelCallError, ModelSpecError
from .base import ChatModel, Generation

__all__ = ["AgentScopeModel", "to_agentscope_msgs"]

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


class AgentScopeModel(ChatModel):
    """Adapter for an agentscope 2.x ``ChatModelBase`` instance.

    Args:
        model: The agentscope model, e.g.
            ``OpenAIChatModel(credential=OpenAICredential(api_key=..., base_url=...), model="...")``.
        default_temperature: Temperature used when a call passes none (default ``None``:
            the model's own ``parameters.temperature``).
        run_in_caller_loop: ``False`` (default): every call runs on a shared background
            event loop thread, which works whatever loops the callers use (including
            ``asyncio.run`` per call). ``True``: :meth:`agenerate` awaits the model directly
            in the caller's loop; use it only when the model is also used by your own
            agentscope code on that one long-lived loop.
        call_kwargs: Extra keyword arguments passed to every model call (forwarded by
            agentscope to the provider API, e.g. ``{"top_p": 0.9}`` for OpenAI).
        close_model: Whether :meth:`close` also closes the wrapped model's HTTP client
            (``model.client.close()``, awaited on the loop that used it). Default ``False``:
            the model belongs to the caller and stays usable.

    Per-call ``temperature`` / ``max_new_tokens`` override the model's
    ``parameters.temperature`` / ``parameters.max_tokens`` for that call only (on a shallow
    copy of the model, so concurrent calls do not interfere). A model whose ``Parameters``
    lacks those fields ignores them.

    The reply's ``finish_reason`` is agentscope's ``finished_reason`` (``"completed"``);
    token counts come from ``ChatResponse.usage`` (``input_tokens`` / ``output_tokens``).
    Thinking text goes to ``Generation.extra["reasoning"]``, tool calls to
    ``extra["tool_calls"]``.
    """

    def __init__(
        self,
        model: Any,
        *,
        default_temperature: Optional[float] = None,
        run_in_caller_loop: bool = False,
        call_kwargs: Optional[dict[str, Any]] = None,
        close_model: bool = False,
    ) -> None:
        if not _is_chat_model_base(model):
            raise ModelSpecError(
                f"AgentScopeModel needs an agentscope ChatModelBase instance (e.g. "
                f"agentscope.model.OpenAIChatModel), got {type(model).__name__}"
            )
        _require_agentscope_2()
        name = getattr(model, "model", None)
        if not isinstance(name, str) or not name:
            name = type(model).__name__
        self.model = model
        self.model_id = f"agentscope:{name}"
        self.default_temperature = default_temperature
        self.run_in_caller_loop = run_in_caller_loop
        self.call_kwargs = dict(call_kwargs or {})
        self.close_model = close_model
        self._warned_params: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ calls

    def generate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Reply to ``messages`` (blocking).

        Runs on the shared background loop (or, with ``run_in_caller_loop=True`` and no loop
        running in this thread, with ``asyncio.run``). Raises :class:`ModelCallError`
        (:class:`ModelAuthError` for a 401/403 from the provider).
        """
        self._check_open()
        coro = self._call(messages, temperature, max_new_tokens)
        if self.run_in_caller_loop and not _loop_running_here():
            return asyncio.run(coro)
        return _SharedLoop.get().run_sync(coro, self.model_id)

    async def agenerate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Async twin of :meth:`generate`; never blocks the caller's event loop."""
        self._check_open()
        coro = self._call(messages, temperature, max_new_tokens)
        if self.run_in_caller_loop:
            return await coro
        return await _SharedLoop.get().run_async(coro)

    async def _call(self, messages: list[dict], temperature: Optional[float], max_new_tokens: Optional[int]) -> Generation:
        temp = temperature if temperature is not None else self.default_temperature
        try:
            msgs = to_agentscope_msgs(messages, model_id=self.model_id)
            model = self._model_for_call(temp, max_new_tokens)
            result = await model(msgs, **self.call_kwargs)
            response = await _final_response(result)
        except ModelCallError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        return self._to_generation(response)

    def _model_for_call(self, temperature: Optional[float], max_new_tokens: Optional[int]) -> Any:
        """The wrapped model, or a shallow copy whose ``parameters`` carry this call's overrides."""
        params = getattr(self.model, "parameters", None)
        fields = getattr(type(params), "model_fields", None) or {}
        update: dict[str, Any] = {}
        for field, value in (("temperature", temperature), ("max_tokens", max_new_tokens)):
            if value is None:
                continue
            if field not in fields:
                if field not in self._warned_params:
                    self._warned_params.add(field)
                    log.warning(
                        "model %s: %s has no parameters.%s; the per-call value is ignored",
                        self.model_id,
                        type(self.model).__name__,
                        field,
                    )
                continue
            if getattr(params, field, None) != value:
                update[field] = value
        if not update:
            return self.model
        clone = copy.copy(self.model)
        clone.parameters = params.model_copy(update=update)
        return clone

    def _translate(self, exc: BaseException) -> ModelCallError:
        where = f"agentscope model {self.model_id} ({type(self.model).__name__})"
        status = getattr(exc, "status_code", None)
        if status in (401, 403):
            return ModelAuthError(
                f"{where}: the provider refused the credentials ({status}): {exc}; "
                "check the api_key of the model's credential"
            )
        return ModelCallError(f"{where} raised {type(exc).__name__}: {exc}")

    def _to_generation(self, response: Any) -> Generation:
        if not hasattr(response, "content"):
            raise ModelCallError(
                f"agentscope model {self.model_id} returned {type(response).__name__}; expected a ChatResponse"
            )
        reason = getattr(response, "finished_reason", None)
        reason = str(reason.value if hasattr(reason, "value") else reason) if reason is not None else None
        if reason == "interrupted":
            raise ModelCallError(f"agentscope model {self.model_id}: the call was interrupted (cancelled) before it finished")
        texts, thinking, tool_calls = _split_blocks(response.content)
        extra: dict[str, Any] = {}
        if thinking:
            extra["reasoning"] = "\n".join(thinking)
        if tool_calls:
            extra["tool_calls"] = tool_calls
        if getattr(response, "id", None):
            extra["response_id"] = response.id
        usage = getattr(response, "usage", None)
        return Generation(
            text="\n".join(texts),  # as agentscope's Msg.get_text_content joins blocks
            prompt_tokens=getattr(usage, "input_tokens", None) if usage is not None else None,
            completion_tokens=getattr(usage, "output_tokens", None) if usage is not None else None,
            finish_reason=reason,
            extra=extra,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ModelCallError(f"model {self.model_id} was closed; wrap the agentscope model again")

    def close(self) -> None:
        """Refuse later calls; with ``close_model=True`` also close the wrapped model's HTTP
        client. The shared loop thread (a daemon) serves every adapter and keeps running.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.close_model:
            return
        client = getattr(self.model, "client", None)
        closer = getattr(client, "close", None) or getattr(client, "aclose", None)
        if not callable(closer):
            return
        try:
            result = closer()
            if inspect.isawaitable(result):
                if not self.run_in_caller_loop:
                    _SharedLoop.get().run_sync(result, self.model_id)
                elif _loop_running_here():
                    asyncio.get_running_loop().create_task(result)
                else:
                    asyncio.run(result)
        except Exception as exc:  # closing is best effort
            log.debug("closing the client of %s failed: %s", self.model_id, exc)


# ---------------------------------------------------------------------- conversion


def to_agentscope_msgs(messages: list[dict], *, model_id: str = "agentscope") -> list[Any]:
    """Plain ``[{"role", "content"}]`` dicts -> agentscope 2.x ``Msg`` objects.

    Roles must be ``system`` / ``user`` / ``assistant``; ``content`` is a string or a list
    of text parts (``{"type": "text", "text": ...}`` or plain strings), one ``TextBlock``
    per part. The sender ``name`` is the role.
    """
    from agentscope.message import Msg, TextBlock

    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ModelCallError(f"model {model_id}: message {index} is {type(message).__name__}, expected a dict")
        role = message.get("role")
        if role not in _ROLES:
            raise ModelCallError(
                f"model {model_id}: message {index} has role {role!r}; agentscope models take "
                f"{', '.join(_ROLES)}"
            )
        content = message.get("content")
        if content is None:
            parts: list[str] = [""]
        elif isinstance(content, str):
            parts = [content]
        else:
            parts = []
            for part in content:
                if isinstance(part, str):
                    parts.append(part)
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part, dict) and isinstance(part.get("content"), str):
                    parts.append(part["content"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ModelCallError(
                        f"model {model_id}: message {index} has a {kind!r} content part; only text parts "
                        "are converted for agentscope models"
                    )
            if not parts:
                parts = [""]
        out.append(Msg(name=role, role=role, content=[TextBlock(text=p) for p in parts]))
    return out


def _block_field(block: Any, name: str) -> Any:
    if isinstance(block, dict):
        return block.get(name)
    return getattr(block, name, None)


def _split_blocks(content: Any) -> tuple[list[str], list[str], list[dict]]:
    """Text, thinking and tool-call pieces of a ChatResponse's content."""
    if isinstance(content, str):
        return [content], [], []
    texts: list[str] = []
    thinking: list[str] = []
    tool_calls: list[dict] = []
    for block in content or []:
        kind = _block_field(block, "type")
        if kind == "text":
            texts.append(_block_field(block, "text") or "")
        elif kind == "thinking":
            thinking.append(_block_field(block, "thinking") or "")
        elif kind in ("tool_call", "tool_use"):
            tool_calls.append(
                {
                    "id": _block_field(block, "id"),
                    "name": _block_field(block, "name"),
                    "input": _block_field(block, "input"),
                }
            )
    return texts, thinking, tool_calls


async def _final_response(result: Any) -> Any:
    """A ChatResponse, or the complete reply of a stream of ChatResponse deltas."""
    if inspect.isawaitable(result) and not hasattr(result, "__aiter__"):
        result = await result
    if not hasattr(result, "__aiter__"):
        return result
    final = None
    deltas: list[str] = []
    last = None
    async for chunk in result:
        last = chunk
        if getattr(chunk, "is_last", False):
            final = chunk
        else:
            texts, _, _ = _split_blocks(getattr(chunk, "content", None))
            deltas.extend(texts)
    if final is not None:
        return final
    if last is None:
        raise ModelCallError("agentscope model stream ended without any response")
    # A stream without a closing is_last chunk: keep the accumulated text deltas.
    from agentscope.message import TextBlock

    last = copy.copy(last)
    last.content = [TextBlock(text="".join(deltas))]
    return last


def _is_chat_model_base(obj: Any) -> bool:
    return any(
        cls.__name__ == "ChatModelBase" and cls.__module__.startswith("agentscope")
        for cls in type(obj).__mro__
    )


def _require_agentscope_2() -> None:
    import agentscope

    version = getattr(agentscope, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 2:
        raise ModelSpecError(
            f"AgentScopeModel needs agentscope>=2.0 (installed: {version}); "
            "upgrade with: pip install -U 'agentscope>=2'"
        )


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------- shared loop


class _SharedLoop:
    """One daemon thread running one event loop for every agentscope call in the process."""

    _instance: Optional["_SharedLoop"] = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lifecycle-agent-agentscope-loop", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> "_SharedLoop":
        with cls._instance_lock:
            inst = cls._instance
            if inst is None or not inst.thread.is_alive() or inst.loop.is_closed():
                inst = cls._instance = cls()
            return inst

    def run_sync(self, coro: Any, model_id: str) -> Any:
        if threading.current_thread() is self.thread:
            coro.close()
            raise ModelCallError(
                f"model {model_id}: generate() was called from inside the agentscope loop thread "
                "(it would deadlock); use `await model.agenerate(...)` there"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def run_async(self, coro: Any) -> Any:
        if asyncio.get_running_loop() is self.loop:
            return await coro
        future: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wrap_future(future)
