"""The engine: one loaded model + tokenizer + the worker thread that batches every caller's requests.

Callers tokenize in their own thread (:meth:`_Engine.encode`) and hand the prompt to the
worker (:meth:`_Engine.submit`), which runs one of the schedulers of :mod:`.schedulers`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from ...errors import ModelCallError, ModelSpecError
from ...protocol import flatten_content
from .loading import _context_limit, _eos_ids
from .prefix_cache import PrefixCache

_STOP = object()
#: batch scheduling policies of the engine (see the package docstring).
SCHEDULING = ("auto", "continuous", "static")


@dataclass
class _Request:
    prompt_ids: list[int]
    temperature: float  # <= 0 means greedy
    max_new_tokens: int
    future: concurrent.futures.Future


@dataclass
class _Row:
    """A request held by a scheduler (its tokens so far, kept across a re-prefill)."""

    request: _Request
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    peak: int = 0  # most rows that shared a step with this one
    version: Any = None  # the weights version its cached states were computed with (prefix cache)

    @property
    def sequence(self) -> list[int]:
        return self.request.prompt_ids + self.tokens

    @property
    def temperature(self) -> float:
        return self.request.temperature


def _cache_keyword(params: Any) -> Optional[str]:
    """The forward keyword that takes the key/value cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name still works there, with a deprecation
    warning, until its removal)."""
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _base_model(model: Any) -> Any:
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def supports_continuous(model: Any) -> Optional[str]:
    """``None`` when the continuous scheduler can drive ``model``; otherwise why not (one line).

    It needs a decoder-only model whose forward takes ``position_ids`` and a key/value cache
    (``cache`` in transformers 5.24+, ``past_key_values`` before) and whose cache is a plain
    full-attention ``DynamicCache`` (rows are merged and dropped by concatenating and indexing
    its key/value tensors). Sliding-window, hybrid and state-space caches are served by the
    static scheduler.
    """
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    try:
        params = inspect.signature(_base_model(model).forward).parameters
    except (TypeError, ValueError):
        return "the model's forward signature cannot be inspected"
    missing = [name for name in ("position_ids", "attention_mask") if name not in params]
    if _cache_keyword(params) is None:
        missing.append("cache (or past_key_values)")
    if missing:
        return f"the model's forward takes no {', '.join(missing)}"
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=getattr(config, "get_text_config", lambda **_: config)(decoder=True))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the static scheduler
        return f"no DynamicCache for this config ({type(exc).__name__}: {exc})"
    kinds = {type(layer) for layer in getattr(cache, "layers", [])}
    if not kinds or kinds != {DynamicLayer}:
        return "its cache is not a plain full-attention DynamicCache (" + ", ".join(sorted(k.__name__ for k in kinds)) + ")"
    return None


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


@contextlib.contextmanager
def _eval_mode(model):
    """Generate without dropout even when the trainer left the model in train mode; restore every flag after."""
    modules = list(model.modules()) if callable(getattr(model, "modules", None)) else []
    flags = [m.training for m in modules]
    if any(flags):
        for m in modules:
            m.training = False
    try:
        yield
    finally:
        if any(flags):
            for m, flag in zip(modules, flags):
                m.training = flag


class _Engine:
    """One loaded model + tokenizer + the batching worker thread; shared by :class:`LocalModel` views.

    The worker thread starts on the first request and stops when the last view is closed
    (it restarts if a new view is opened later, e.g. from the SmolLM2 process cache).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        num_threads: Optional[int] = None,
        scheduling: str = "auto",
        prefix_cache_mb: float = 256,
    ):
        if scheduling not in SCHEDULING:
            raise ModelSpecError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {scheduling!r}")
        if int(max_batch_size) < 1:
            raise ModelSpecError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if float(batch_wait_ms) < 0:
            raise ModelSpecError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if num_threads is not None and int(num_threads) < 1:
            raise ModelSpecError(f"num_threads must be >= 1 or None, got {num_threads}")
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or not prefix_cache_mb >= 0:
            raise ModelSpecError(f"prefix_cache_mb must be a number >= 0 (MiB; 0 switches the cache off), got {prefix_cache_mb!r}")
        if not callable(getattr(model, "generate", None)):
            raise ModelSpecError(f"{type(model).__name__} has no generate(): pass a transformers causal LM")
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise ModelSpecError(f"{type(tokenizer).__name__} is not a transformers tokenizer (no apply_chat_template)")
        if not getattr(tokenizer, "chat_template", None):
            raise ModelSpecError(
                f"the tokenizer of {name} has no chat template: set tokenizer.chat_template "
                "(a Jinja template) before wrapping it in LocalModel"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.num_threads = None if num_threads is None else int(num_threads)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = self._pad_id()
        self.context_limit = _context_limit(model)
        why_not = supports_continuous(model) if scheduling != "static" else "static scheduling was asked for"
        if scheduling == "continuous" and why_not:
            raise ModelSpecError(f"{name}: continuous scheduling is not available: {why_not}; use scheduling='static'")
        #: the policy in use: ``continuous`` or ``static`` (``auto`` resolved).
        self.scheduling = "static" if why_not else "continuous"
        self.scheduling_note = why_not
        self._logits_to_keep = False
        self._cache_keyword: Optional[str] = None
        if self.scheduling == "continuous":
            params = inspect.signature(_base_model(model).forward).parameters
            self._logits_to_keep = "logits_to_keep" in params
            self._cache_keyword = _cache_keyword(params)
        #: key/value states of prompt prefixes already computed (continuous scheduling only; see prefix_cache.py)
        self.prefix_cache = PrefixCache(model, prefix_cache_mb if self.scheduling == "continuous" else 0)
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self._generate_lock = threading.Lock()  # one forward/generate at a time, even across a worker restart
        # re-entrant: a dropped view's finalizer (release) may run from GC while this thread holds it
        self._lock = threading.RLock()
        self._queue: Optional[queue.SimpleQueue] = None
        self._worker: Optional[threading.Thread] = None
        self._views = 0
        self._stats = {"generate_calls": 0, "requests": 0, "largest_batch": 0, "completion_tokens": 0,
                       "forward_passes": 0, "preemptions": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                       "prompt_tokens": 0, "prompt_tokens_computed": 0}

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        return int(pad)

    # ---- views / lifecycle

    def acquire(self) -> None:
        with self._lock:
            self._views += 1

    def release(self, wait: bool = True) -> None:
        with self._lock:
            self._views = max(0, self._views - 1)
            if self._views:
                return
            q, worker = self._queue, self._worker
            self._queue = self._worker = None
        if q is not None:
            q.put(_STOP)  # requests queued before this are still served
            if wait and worker is not None and worker is not threading.current_thread():
                worker.join()

    @property
    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats)
        stats.update(self.prefix_cache.stats)
        return stats

    def count(self, **increments) -> None:
        with self._lock:
            for key, value in increments.items():
                self._stats[key] += value

    def note_batch(self, size: int) -> None:
        with self._lock:
            self._stats["largest_batch"] = max(self._stats["largest_batch"], size)

    # ---- caller side

    def encode(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ModelCallError(f"model {self.name}: messages must be a non-empty list of {{role, content}} dicts")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ModelCallError(
                    f"model {self.name}: message {i} must be a dict with a string 'role', got {message!r:.80}"
                )
            chat.append({"role": message["role"], "content": flatten_content(message.get("content"))})
        try:
            with self._tok_lock:
                if messages[-1].get("prefill") is True and chat[-1]["role"] == "assistant":
                    # a prefilled reply (marked by the runtime): the model continues the final assistant message;
                    # a conversation that merely ends with an assistant turn gets a new reply as before
                    text = self.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
                else:
                    text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as exc:
            raise ModelCallError(
                f"model {self.name}: the chat template could not render these messages ({type(exc).__name__}: {exc})"
            ) from exc
        ids = [int(t) for t in ids]
        if not ids:
            raise ModelCallError(f"model {self.name}: the chat template produced an empty prompt")
        return ids

    def submit(self, prompt_ids: list[int], temperature: float, max_new_tokens: int) -> concurrent.futures.Future:
        if self.context_limit is not None:
            room = self.context_limit - len(prompt_ids)
            if room < 1:
                raise ModelCallError(
                    f"model {self.name}: the prompt is {len(prompt_ids)} tokens but the model's context is "
                    f"{self.context_limit} tokens; shorten the context budget or the transcript"
                )
            max_new_tokens = min(max_new_tokens, room)
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = _Request(prompt_ids, temperature, max_new_tokens, future)
        with self._lock:
            if self._views <= 0:
                raise ModelCallError(f"model {self.name} is closed")
            if self._worker is None or not self._worker.is_alive():
                self._queue = queue.SimpleQueue()
                self._worker = threading.Thread(
                    target=self._worker_main, args=(self._queue,), name=f"lifecycle-agent-batcher[{self.name}]",
                    daemon=True,
                )
                self._worker.start()
            self._queue.put(request)
        return future

    # ---- worker side

    def _worker_main(self, q: queue.SimpleQueue) -> None:
        from .schedulers import SCHEDULERS

        try:
            if self.num_threads is not None:
                import torch

                torch.set_num_threads(self.num_threads)
            SCHEDULERS[self.scheduling](self, q).run()
        except BaseException as exc:  # never leave a caller waiting on a dead worker
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and not item.future.done():
                    item.future.set_exception(self.call_error(exc, 1))
            raise

    def call_error(self, exc: BaseException, n: int) -> ModelCallError:
        if isinstance(exc, ModelCallError):
            err = ModelCallError(str(exc))
        else:
            err = ModelCallError(
                f"model {self.name}: batched generate of {n} request(s) failed: {type(exc).__name__}: {exc}"
            )
        err.__cause__ = exc
        return err

    def forward_lock(self):
        """Held around every forward pass / generate(): one at a time, without dropout, without autograd."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(self._generate_lock)
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_eval_mode(self.model))
        return stack
