"""An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama, LM Studio, ...).

Uses the official ``openai`` SDK with the SDK's own retries switched off; retries are done
here with ``tenacity`` (exponential backoff with jitter, honouring ``Retry-After``) so the
policy is the same on the sync and async paths and the final error names the model, the
endpoint and the last failure:

- retried: 429 rate limits (not ``insufficient_quota``), 5xx, timeouts, connection errors;
- never retried: 401/403 -> :class:`~lifecycle_agent.errors.ModelAuthError`, any other 4xx ->
  :class:`~lifecycle_agent.errors.ModelCallError` carrying the server's message.

This module imports ``openai`` and ``tenacity`` at import time; ``lifecycle_agent`` imports it
only when an ``openai:MODEL`` spec (or :class:`OpenAIModel`) is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import weakref
from typing import Any, Optional

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from ..errors import ModelAuthError, ModelCallError, ModelSpecError
from .base import ChatModel, Generation, copy_messages

__all__ = ["OpenAIModel", "PLACEHOLDER_API_KEY", "DEFAULT_OPENAI_BASE_URL"]

log = logging.getLogger(__name__)

#: Sent as the API key when a ``base_url`` is given but no key: local servers ignore it.
PLACEHOLDER_API_KEY = "not-needed"
#: Where requests go when neither ``base_url`` nor ``OPENAI_BASE_URL`` is set.
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

_MAX_ERROR_BODY = 500  # characters of a server error message kept in our error messages


class OpenAIModel(ChatModel):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: The model name the endpoint knows (e.g. ``gpt-4o-mini``, or the name a local
            vLLM / llama.cpp server was started with).
        base_url: Endpoint root including ``/v1`` (e.g. ``http://127.0.0.1:8000/v1``).
            Default: ``$OPENAI_BASE_URL``, else OpenAI's own API.
        api_key: API key. Default: ``$OPENAI_API_KEY``; when a ``base_url`` is known but no
            key is, the placeholder :data:`PLACEHOLDER_API_KEY` is sent (local servers do not
            check it). With neither a key nor a base URL, :class:`ModelSpecError` is raised.
        timeout: Per-request timeout in seconds (default 60.0). A request that takes longer
            counts as a failed attempt and is retried.
        max_retries: Retries after the first attempt on 429 / 5xx / timeouts / connection
            errors (default 5, so at most 6 requests per call). 0 disables retries.
        default_temperature: Sampling temperature used when a call passes none (default
            ``None``: the endpoint's own default).
        max_tokens: Cap on generated tokens used when a call passes no ``max_new_tokens``
            (default ``None``: no cap sent).
        extra_body: Extra JSON fields merged into every request body (e.g.
            ``{"top_k": 20}`` for vLLM, or ``{"chat_template_kwargs": {...}}``).
        retry_initial_wait: First backoff in seconds (default 1.0); doubles each retry.
        retry_max_wait: Longest single backoff in seconds (default 30.0), also the cap on a
            server's ``Retry-After``.
        max_tokens_field: Request field that carries the token cap: ``"max_tokens"``
            (default; accepted by every OpenAI-compatible server) or
            ``"max_completion_tokens"`` (required by OpenAI's reasoning models).
        flatten_parts: Send list-of-parts message content as plain text (default ``False``:
            content is sent as given; set it for servers that only accept strings).
        organization: OpenAI organization id (default ``$OPENAI_ORG_ID`` via the SDK).
        default_headers: Extra HTTP headers sent with every request.

    Each reply is a :class:`Generation` with the token counts from the response's ``usage``
    and ``extra["attempts"]`` (requests made for this call, retries included).
    """

    def __init__(
        self,
        model: str,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        default_temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        extra_body: Optional[dict] = None,
        retry_initial_wait: float = 1.0,
        retry_max_wait: float = 30.0,
        max_tokens_field: str = "max_tokens",
        flatten_parts: bool = False,
        organization: Optional[str] = None,
        default_headers: Optional[dict[str, str]] = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ModelSpecError("OpenAIModel needs a model name, e.g. OpenAIModel('gpt-4o-mini')")
        if timeout is None or timeout <= 0:
            raise ModelSpecError(f"OpenAIModel timeout must be > 0 seconds, got {timeout!r}")
        if max_retries < 0:
            raise ModelSpecError(f"OpenAIModel max_retries must be >= 0, got {max_retries!r}")
        if max_tokens is not None and max_tokens <= 0:
            raise ModelSpecError(f"OpenAIModel max_tokens must be > 0 (or None), got {max_tokens!r}")
        if retry_initial_wait < 0 or retry_max_wait < 0:
            raise ModelSpecError("OpenAIModel retry_initial_wait and retry_max_wait must be >= 0 seconds")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ModelSpecError(
                f"OpenAIModel max_tokens_field must be 'max_tokens' or 'max_completion_tokens', "
                f"got {max_tokens_field!r}"
            )
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None:
                raise ModelSpecError(
                    f"model openai:{model}: no API key. Set OPENAI_API_KEY, or pass api_key= "
                    "(--model-api-key), or point at a local OpenAI-compatible server with base_url= "
                    "(--base-url / OPENAI_BASE_URL)"
                )
            api_key = PLACEHOLDER_API_KEY

        self.model = model
        self.model_id = f"openai:{model}"
        self.base_url = (base_url or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.default_temperature = default_temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body) if extra_body else None
        self.retry_initial_wait = float(retry_initial_wait)
        self.retry_max_wait = float(retry_max_wait)
        self.max_tokens_field = max_tokens_field
        self.flatten_parts = flatten_parts
        self._client_kwargs: dict[str, Any] = {
            "api_key": api_key,
            "base_url": self.base_url,
            "timeout": self.timeout,
            "max_retries": 0,  # retries are ours (tenacity), not the SDK's
            "organization": organization,
            "default_headers": default_headers,
        }
        self._client: Optional[openai.OpenAI] = None
        # httpx async connection pools are bound to the event loop that opened them, so
        # keep one AsyncOpenAI per loop (asyncio.run per call would break a shared one).
        self._async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient]" = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ clients

    @property
    def client(self) -> "openai.OpenAI":
        """The synchronous SDK client (created on first use, SDK retries disabled)."""
        with self._lock:
            self._check_open()
            if self._client is None:
                self._client = openai.OpenAI(**self._client_kwargs)
            return self._client

    async def _async_client(self) -> "openai.AsyncOpenAI":
        """This event loop's AsyncOpenAI, created on first use in the loop.

        The client is closed inside its loop when the loop shuts down (``asyncio.run``
        closes open async generators first, and a started :func:`_closer` is one), so a
        loop per call leaves no sockets behind.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            entry = self._async_clients.get(loop)
            if entry is not None:
                return entry.client
            client = openai.AsyncOpenAI(**self._client_kwargs)
            entry = self._async_clients[loop] = _LoopClient(client, _closer(client))
        await entry.closer.__anext__()  # runs to its `yield` at once; registers with the loop
        return client

    def _check_open(self) -> None:
        if self._closed:
            raise ModelCallError(f"model {self.model_id} at {self.base_url} was closed; create a new OpenAIModel")

    # ------------------------------------------------------------------ calls

    def generate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Reply to ``messages`` (blocking). Retries per the class policy.

        Raises :class:`ModelAuthError` on 401/403, :class:`ModelCallError` otherwise.
        """
        request = self._request(messages, temperature, max_new_tokens)
        client = self.client
        attempts = 0

        def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return client.chat.completions.create(**request)

        try:
            response = self._retrying(Retrying)(attempt)
        except Exception as exc:
            raise self._translate(exc, attempts) from exc
        return self._to_generation(response, attempts)

    async def agenerate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Native async twin of :meth:`generate` (``AsyncOpenAI``, same retry policy)."""
        request = self._request(messages, temperature, max_new_tokens)
        client = await self._async_client()
        attempts = 0

        async def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return await client.chat.completions.create(**request)

        try:
            response = await self._retrying(AsyncRetrying)(attempt)
        except Exception as exc:
            raise self._translate(exc, attempts) from exc
        return self._to_generation(response, attempts)

    def _request(self, messages: list[dict], temperature: Optional[float], max_new_tokens: Optional[int]) -> dict:
        msgs = copy_messages(messages)
        if self.flatten_parts:
            from ..protocol import flatten_content

            for msg in msgs:
                if not isinstance(msg.get("content"), str) and msg.get("content") is not None:
                    msg["content"] = flatten_content(msg["content"])
        request: dict[str, Any] = {"model": self.model, "messages": msgs}
        temp = temperature if temperature is not None else self.default_temperature
        if temp is not None:
            request["temperature"] = temp
        cap = max_new_tokens if max_new_tokens is not None else self.max_tokens
        if cap is not None:
            request[self.max_tokens_field] = cap
        if self.extra_body:
            request["extra_body"] = dict(self.extra_body)
        return request

    # ------------------------------------------------------------------ retry policy

    def _retrying(self, cls):
        return cls(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: exponential backoff with jitter, or the
        server's ``Retry-After`` when it asks for longer (both capped at ``retry_max_wait``)."""
        # retry n (1-based) waits initial * 2**(n-1) plus up to `initial` of random jitter
        exponent = min(state.attempt_number - 1, 60)
        backoff = self.retry_initial_wait * (2.0**exponent) + random.uniform(0.0, self.retry_initial_wait)
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = _retry_after_seconds(exc)
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(backoff, self.retry_max_wait)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "model %s at %s: attempt %d/%d failed (%s); retrying in %.2f s",
            self.model_id,
            self.base_url,
            state.attempt_number,
            self.max_retries + 1,
            _describe(exc),
            wait,
        )

    def _translate(self, exc: BaseException, attempts: int) -> Exception:
        """Map an SDK exception (after retries) to our error types with an actionable message."""
        where = f"model {self.model!r} at {self.base_url}"
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return ModelAuthError(
                f"endpoint {self.base_url} refused the API key ({exc.status_code}) for model {self.model!r}: "
                f"check OPENAI_API_KEY / --model-api-key ({_server_message(exc)})"
            )
        if isinstance(exc, openai.RateLimitError) and _is_quota_error(exc):
            return ModelCallError(
                f"{where}: quota exhausted (429 insufficient_quota): {_server_message(exc)}; "
                "check the account's billing or use another key"
            )
        if _is_retryable(exc):
            hint = ""
            if isinstance(exc, openai.APITimeoutError):
                hint = f"; raise timeout= (now {self.timeout:g} s) if the model is slow"
            elif isinstance(exc, openai.APIConnectionError):
                hint = "; is the server running and is the base URL (--base-url / OPENAI_BASE_URL) right?"
            return ModelCallError(
                f"{where} failed after {attempts} attempt(s) (max_retries={self.max_retries}): "
                f"last error: {_describe(exc)}{hint}"
            )
        if isinstance(exc, openai.APIStatusError):
            hint = ""
            if exc.status_code == 404:
                hint = "; check the model name and that the base URL ends in /v1"
            return ModelCallError(
                f"{where} rejected the request ({exc.status_code}): {_server_message(exc)}{hint}"
            )
        if isinstance(exc, ModelCallError):
            return exc
        return ModelCallError(f"{where}: call failed: {_describe(exc)}")

    # ------------------------------------------------------------------ response

    def _to_generation(self, response: Any, attempts: int) -> Generation:
        try:
            choices = response.choices
        except AttributeError:
            snippet = str(response)[:_MAX_ERROR_BODY]
            raise ModelCallError(
                f"model {self.model!r} at {self.base_url} returned a non-chat-completion response: {snippet!r}; "
                "is the base URL an OpenAI-compatible /v1 endpoint?"
            ) from None
        if not choices:
            raise ModelCallError(
                f"model {self.model!r} at {self.base_url} returned no choices (response id {getattr(response, 'id', None)!r})"
            )
        choice = choices[0]
        message = choice.message
        content = getattr(message, "content", None)
        if content is not None and not isinstance(content, str):
            from ..protocol import flatten_content

            content = flatten_content(content)
        text = content or ""
        extra: dict[str, Any] = {"attempts": attempts}
        if getattr(response, "id", None):
            extra["response_id"] = response.id
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        if isinstance(reasoning, str) and reasoning:
            extra["reasoning"] = reasoning
        refusal = getattr(message, "refusal", None)
        if refusal:
            extra["refusal"] = refusal
        usage = getattr(response, "usage", None)
        return Generation(
            text=text,
            prompt_tokens=getattr(usage, "prompt_tokens", None) if usage is not None else None,
            completion_tokens=getattr(usage, "completion_tokens", None) if usage is not None else None,
            finish_reason=getattr(choice, "finish_reason", None),
            extra=extra,
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the HTTP clients. Safe to call twice; later calls raise :class:`ModelCallError`.

        An async client whose event loop is still open is closed on that loop (scheduled, if
        the loop runs in another thread); one whose loop has already closed is dropped.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
            async_clients = list(self._async_clients.items())
            self._async_clients = weakref.WeakKeyDictionary()
        if client is not None:
            client.close()
        for loop, entry in async_clients:
            _close_loop_client(loop, entry)

    async def aclose(self) -> None:
        """Async :meth:`close`: also awaits the close of this loop's async client."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - only called from async code
            loop = None
        with self._lock:
            entry = self._async_clients.pop(loop, None) if loop is not None else None
        if entry is not None:
            await entry.closer.aclose()
        self.close()


class _LoopClient:
    """One event loop's AsyncOpenAI and the async generator that closes it."""

    __slots__ = ("client", "closer")

    def __init__(self, client: "openai.AsyncOpenAI", closer: Any) -> None:
        self.client = client
        self.closer = closer


async def _closer(client: "openai.AsyncOpenAI"):
    """Started once per loop; its ``finally`` closes ``client`` when the loop (or we) close it."""
    try:
        yield
    finally:
        try:
            await client.close()
        except Exception as exc:  # closing is best effort
            log.debug("closing AsyncOpenAI client failed: %s", exc)


def _close_loop_client(loop: asyncio.AbstractEventLoop, entry: _LoopClient) -> None:
    if loop.is_closed():
        return  # asyncio.run already closed it at loop shutdown
    try:
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(entry.closer.aclose(), loop)
        else:
            loop.run_until_complete(entry.closer.aclose())
    except Exception as exc:  # closing is best effort
        log.debug("closing AsyncOpenAI client failed: %s", exc)


def _is_retryable(exc: BaseException) -> bool:
    """429 (except quota exhaustion), 5xx, timeouts and connection errors are retried."""
    if isinstance(exc, openai.RateLimitError):
        return not _is_quota_error(exc)
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500
    return isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError))


def _is_quota_error(exc: BaseException) -> bool:
    return getattr(exc, "code", None) == "insufficient_quota"


def _retry_after_seconds(exc: Optional[BaseException]) -> Optional[float]:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except (TypeError, ValueError):
            continue
        if seconds >= 0:
            return seconds
    return None


def _server_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:_MAX_ERROR_BODY]
        if isinstance(error, str):
            return error[:_MAX_ERROR_BODY]
    message = getattr(exc, "message", None) or str(exc)
    return message[:_MAX_ERROR_BODY]


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, openai.APIStatusError):
        return f"{type(exc).__name__} ({exc.status_code}): {_server_message(exc)}"
    return f"{type(exc).__name__}: {str(exc)[:_MAX_ERROR_BODY]}"
