"""The public :class:`LocalModel`: views on one :class:`~.engine._Engine` behind the :class:`ChatModel` interface."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import weakref
from pathlib import Path
from typing import Any, Optional, Union

from ...errors import ModelCallError, ModelSpecError
from ..base import ChatModel
from .engine import _Engine
from .loading import load_pretrained

_KEEP = object()
#: keyword options of :class:`LocalModel` (what ``from_pretrained`` / ``resolve_model`` pass through).
LOCAL_OPTIONS = (
    "model_id", "default_temperature", "max_new_tokens", "max_batch_size", "batch_wait_ms", "num_threads", "scheduling",
    "prefix_cache_mb",
)


class LocalModel(ChatModel):
    """A transformers causal LM + tokenizer behind the :class:`ChatModel` interface.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), or a PEFT ``PeftModel``.
            Generation always runs in eval mode (no dropout); a model left in train mode (e.g.
            the trainer's policy) is switched to eval for each batch and every module's flag is
            restored afterwards, so do not run training forwards on it while a batch runs.
        tokenizer: its tokenizer; it must have a chat template.
        model_id: identifier stored with episodes; default ``hf:<config._name_or_path>``.
        default_temperature: sampling temperature when a call gives none; ``0`` = greedy.
        max_new_tokens: completion budget (tokens) when a call gives none.
        max_batch_size: most requests decoded together.
        batch_wait_ms: when the worker is idle and a request arrives, how long (milliseconds)
            it waits for more before it starts a batch.
        num_threads: if set, the worker thread calls ``torch.set_num_threads(num_threads)``
            when it starts (note: torch's intra-op pool is process-wide). ``None`` leaves
            torch's default (one thread per core).
        scheduling: ``"continuous"`` (a request joins the running batch at the next token
            and leaves it, answered, as soon as it ends), ``"static"`` (a batch is one
            ``model.generate`` call: nobody joins, every row waits for the longest), or
            ``"auto"`` (the default: continuous when the model's cache allows it, see
            :func:`supports_continuous`; the choice is in ``.scheduling``).
        prefix_cache_mb: memory bound (MiB) of the prefix cache: key/value states of prompts
            already computed, reused by later prompts that share a prefix (system prompt,
            instructions, a pack's earlier episodes), least recently used evicted first.
            Emptied automatically whenever the weights or the active adapter change.
            ``0`` switches it off. Continuous scheduling only.

    Calls from many threads or coroutines are served by one worker thread in batches
    (see the module docstring). :meth:`share` makes another view on the same weights and
    worker with different defaults; :meth:`close` stops the worker once every view is closed.
    """

    trainable = True
    supports_prefill = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: Optional[str] = None,
        default_temperature: Optional[float] = 0.6,
        max_new_tokens: int = 256,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        num_threads: Optional[int] = None,
        scheduling: str = "auto",
        prefix_cache_mb: float = 256,
    ):
        if model_id is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            model_id = f"hf:{name}" if name else "hf:local-model"
        engine = _Engine(
            model,
            tokenizer,
            name=model_id,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            num_threads=num_threads,
            scheduling=scheduling,
            prefix_cache_mb=prefix_cache_mb,
        )
        self._attach(engine, model_id=model_id, default_temperature=default_temperature, max_new_tokens=max_new_tokens)

    def _attach(self, engine: _Engine, *, model_id: str, default_temperature, max_new_tokens) -> None:
        self.default_temperature = _check_temperature(
            default_temperature, "default_temperature", allow_none=True, error=ModelSpecError
        )
        self.max_new_tokens = _check_budget(max_new_tokens, "max_new_tokens", error=ModelSpecError)
        self.model_id = model_id
        self._engine = engine
        self._closed = False
        engine.acquire()
        # a view dropped without close() still lets the worker stop (without waiting for it)
        self._finalizer = weakref.finalize(self, engine.release, False)

    @classmethod
    def _view(cls, engine: _Engine, *, model_id: str, default_temperature=0.6, max_new_tokens=256) -> "LocalModel":
        view = cls.__new__(cls)
        view._attach(engine, model_id=model_id, default_temperature=default_temperature, max_new_tokens=max_new_tokens)
        return view

    def share(
        self,
        *,
        model_id: Optional[str] = None,
        default_temperature: Any = _KEEP,
        max_new_tokens: Optional[int] = None,
    ) -> "LocalModel":
        """Another :class:`LocalModel` on the same weights and batching worker, with its own defaults.

        Requests of all views are batched together; each view is closed on its own. Arguments
        left out keep this view's values (``default_temperature=None`` means greedy by default).
        """
        if self._closed:
            raise ModelCallError(f"model {self.model_id} is closed; cannot share it")
        return type(self)._view(
            self._engine,
            model_id=model_id or self.model_id,
            default_temperature=self.default_temperature if default_temperature is _KEEP else default_temperature,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
        )

    # ---- loading

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        adapter: Union[str, Path, None] = None,
        device: Any = None,
        dtype: Any = None,
        *,
        model_id: Optional[str] = None,
        **options: Any,
    ) -> "LocalModel":
        """Load a local transformers model directory (never downloads), optionally with a PEFT adapter.

        Args:
            path: directory holding ``config.json``, the weights and the tokenizer files.
            adapter: directory saved by ``PeftModel.save_pretrained`` (``adapter_config.json``).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: cuda if available else cpu.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; default:
                float32 on CPU, bfloat16 (or float16) on GPU.
            model_id: default ``hf:PATH`` or ``hf:PATH@ADAPTER``.
            options: passed to :class:`LocalModel` (``default_temperature``, ``max_new_tokens``,
                ``max_batch_size``, ``batch_wait_ms``, ``num_threads``, ``scheduling``,
                ``prefix_cache_mb``).
        """
        unknown = sorted(set(options) - set(LOCAL_OPTIONS))
        if unknown:
            raise ModelSpecError(
                f"hf:{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(LOCAL_OPTIONS)}"
            )
        model, tokenizer = load_pretrained(path, adapter=adapter, device=device, dtype=dtype)
        if model_id is None:
            model_id = f"hf:{path}" + (f"@{adapter}" if adapter else "")
        return cls(model, tokenizer, model_id=model_id, **options)

    # ---- the ChatModel interface

    @property
    def model(self) -> Any:
        """The underlying transformers (or PEFT) model, shared by every view."""
        return self._engine.model

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def stats(self) -> dict:
        """Counters of the shared worker.

        ``requests``, ``completion_tokens``, ``largest_batch`` (most rows decoded together),
        ``generate_calls`` (static: ``model.generate`` calls; continuous: admissions, i.e.
        prompt forward passes), ``forward_passes`` (continuous only: admissions plus decode
        steps), ``prefill_seconds`` / ``decode_seconds`` (continuous only: time in admission
        and decode forward passes), ``preemptions`` (rows re-queued after an out-of-memory
        error), ``prompt_tokens`` (prompt tokens of the requests served) and
        ``prompt_tokens_computed`` (those a forward pass actually computed: fewer when the
        prefix cache is hit; a re-prefill counts again), and the prefix cache's
        ``prefix_cache_hits``, ``prefix_cache_tokens_reused``, ``prefix_cache_invalidations``
        (times it was emptied by a weights or adapter change), ``prefix_cache_entries`` and
        ``prefix_cache_mb`` (memory held now).
        """
        return self._engine.stats

    @property
    def closed(self) -> bool:
        return self._closed

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix state (never needed for correctness: weight and adapter changes are
        detected on their own; useful to free the memory)."""
        self._engine.prefix_cache.clear()

    @property
    def scheduling(self) -> str:
        """The batch scheduling in use: ``"continuous"`` or ``"static"``."""
        return self._engine.scheduling

    def _submit(self, messages, temperature, max_new_tokens) -> concurrent.futures.Future:
        if self._closed:
            raise ModelCallError(f"model {self.model_id} is closed; create a new one to generate")
        temp = self.default_temperature if temperature is None else temperature
        temp = _check_temperature(temp, "temperature", allow_none=True)
        budget = _check_budget(self.max_new_tokens if max_new_tokens is None else max_new_tokens, "max_new_tokens")
        prompt_ids = self._engine.encode(messages)
        return self._engine.submit(prompt_ids, 0.0 if temp is None else float(temp), budget)

    def generate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Reply to ``messages`` (blocks until the batch holding this request is done).

        ``temperature``: ``None`` uses ``default_temperature``; ``0`` (or a ``None`` default)
        decodes greedily. ``max_new_tokens``: completion budget in tokens (clamped to what the
        model's context leaves). Raises :class:`ModelCallError` on any failure.
        """
        future = self._submit(messages, temperature, max_new_tokens)
        return future.result()

    async def agenerate(
        self,
        messages: list[dict],
        *,
        temperature: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Generation:
        """Async twin of :meth:`generate`: the request joins the same batches, the event loop is not blocked."""
        future = self._submit(messages, temperature, max_new_tokens)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Release this view; the worker stops (after serving what was queued) when no view is left.

        Safe to call twice. The weights stay loaded as long as something references them.
        """
        if self._closed:
            return
        self._closed = True
        if self._finalizer.detach() is not None:
            self._engine.release(wait=True)

    def __enter__(self) -> "LocalModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_temperature(value, name: str, *, allow_none: bool, error=ModelCallError) -> Optional[float]:
    if value is None and allow_none:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number >= 0 (0 = greedy), got {value!r}") from None
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise error(f"{name} must be a finite number >= 0 (0 = greedy), got {value!r}")
    return value


def _check_budget(value, name: str, error=ModelCallError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be an integer >= 1 (tokens), got {value!r}")
    return value


# --------------------------------------------------------------------------- loading
