"""A local transformers causal LM (optionally with a PEFT adapter), batched across callers.

Several agents usually share one local model. Every :meth:`LocalModel.generate` /
:meth:`LocalModel.agenerate` call is tokenized in the caller, then handed to one
background worker thread per loaded model (the *engine*), which batches the requests of
all callers. Two scheduling policies:

- ``continuous`` (the default wherever the model's cache allows it): the worker runs one
  decode loop. A request that arrives while others are decoding joins the batch at the
  next token (its prompt gets one forward pass, its key/value cache is merged into the
  running one), and a row that ends is answered at once and leaves the batch. Short
  replies (a solve episode's answer) no longer wait for long ones (an update episode's
  notes) in the same batch, and the agent behind them moves on to its next call.
- ``static``: the worker takes the first waiting request, waits at most
  ``batch_wait_ms`` for more (up to ``max_batch_size``) and runs them as ONE left-padded
  ``model.generate`` call; every row waits for the longest. Used for models whose cache
  cannot be merged row by row (sliding-window, hybrid and state-space caches).

Rows of a batch may use different temperatures and token budgets: both are applied per
row (each row's logits are scaled by its own temperature, greedy rows take their argmax,
each row ends at its own budget), so a batch never has to be split. Left padding with an
attention mask and per-row position ids make a row's output independent of its batch
mates (up to float rounding).

Every :class:`~lifecycle_agent.models.base.Generation` carries the prompt token ids,
the completion token ids (no padding; the EOS token included when the model produced
it) and one log-prob per completion token, computed from the raw logits as
``log_softmax(logits / T)`` at the row's sampling temperature ``T`` (``T = 1`` for
greedy rows). Sampling draws from exactly that distribution: the model's own
``generation_config`` sampling knobs (top-k, top-p, repetition penalty, ...) are
switched off, so the recorded log-probs are the log-probs of the policy that sampled,
which is what the trainer's ratio ``exp(logp_new - logp_rollout)`` needs.

torch and transformers are imported only when this module is used (``import
lifecycle_agent`` stays light); this module itself imports them lazily too, so that a
missing install gives a :class:`~lifecycle_agent.errors.ModelSpecError` saying what to
install instead of an ImportError from deep inside.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ModelCallError, ModelSpecError
from ..protocol import flatten_content
from .base import ChatModel, Generation

__all__ = ["LocalModel", "LOCAL_OPTIONS", "load_pretrained", "attach_adapter", "import_torch_stack", "parse_dtype", "pick_device"]

_INSTALL_HINT = "install the `local` extra: pip install 'lifecycle-agent[local]'"
_STOP = object()
_KEEP = object()
#: keyword options of :class:`LocalModel` (what ``from_pretrained`` / ``resolve_model`` pass through).
LOCAL_OPTIONS = (
    "model_id", "default_temperature", "max_new_tokens", "max_batch_size", "batch_wait_ms", "num_threads", "scheduling",
)
#: batch scheduling policies of the engine (see the module docstring).
SCHEDULING = ("auto", "continuous", "static")

#: generate() settings that switch off every sampling/penalty knob a model's
#: generation_config may carry, so the only logits processing is ours (see module docstring).
_NEUTRAL_GENERATION = {
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "watermarking_config": None,
    "min_length": 0,
    "min_new_tokens": None,
    "max_time": None,
    "stop_strings": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "use_cache": True,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}


# --------------------------------------------------------------------------- helpers


def import_torch_stack(what: str = "a local model"):
    """Import torch and transformers, or raise :class:`ModelSpecError` saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ModelSpecError(
            f"{what} needs torch and transformers, which are not importable ({exc}); {_INSTALL_HINT}"
        ) from None
    return torch, transformers


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def pick_device(device: Any = None) -> str:
    """``device`` as a string; ``None`` means ``cuda`` when a GPU is visible, else ``cpu``."""
    torch, _ = import_torch_stack()
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def parse_dtype(dtype: Any, device: str):
    """A ``torch.dtype`` for ``dtype`` (``"float32"``, ``"bf16"``, a ``torch.dtype``, ...).

    ``None`` / ``"auto"``: float32 on CPU (the measured setup, exact log-probs), bfloat16 on
    a GPU that supports it, else float16 on GPU.
    """
    torch, _ = import_torch_stack()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelSpecError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16 (or auto)")
    return getattr(torch, name)


def _dtype_kwarg(transformers) -> str:
    """transformers renamed ``torch_dtype=`` to ``dtype=`` in 4.56."""
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def _context_limit(model) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            pass
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


@functools.lru_cache(maxsize=1)
def _hook_classes():
    """The logits processor and stopping criterion used by every batch (built once, lazily)."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class RowSampler(LogitsProcessor):
        """Per-row temperature / greedy, and the log-prob of each sampled token.

        ``__call__`` sees the raw logits of the step (all other processors are switched off)
        and stores ``log_softmax(logits / T_row)``; :class:`RowBudget` (called right after the
        token is appended) gathers the log-prob of the token actually chosen.
        """

        def __init__(self, temps, greedy):
            self.temps = temps[:, None]
            self.greedy = greedy[:, None]
            self.any_greedy = bool(greedy.any())
            self.pending = None
            self.logprobs: list = []

        def __call__(self, input_ids, scores):
            scaled = scores / self.temps
            self.pending = torch.log_softmax(scaled, dim=-1)
            if self.any_greedy:
                onehot = torch.full_like(scaled, float("-inf"))
                onehot.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
                scaled = torch.where(self.greedy, onehot, scaled)
            return scaled

        def gather(self, tokens):
            if self.pending is not None:
                self.logprobs.append(self.pending.gather(1, tokens[:, None]).squeeze(1))
                self.pending = None

        def __deepcopy__(self, memo):  # generate() must never record into a copy
            return self

    class RowBudget(StoppingCriteria):
        """Ends each row at its own ``max_new_tokens``; also collects the sampled tokens' log-probs."""

        def __init__(self, sampler, budgets, prompt_len):
            self.sampler = sampler
            self.budgets = budgets
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            self.sampler.gather(input_ids[:, -1])
            return (input_ids.shape[1] - self.prompt_len) >= self.budgets

        def __deepcopy__(self, memo):
            return self

    return RowSampler, RowBudget


# --------------------------------------------------------------------------- engine


@dataclass
class _Request:
    prompt_ids: list[int]
    temperature: float  # <= 0 means greedy
    max_new_tokens: int
    future: concurrent.futures.Future


@dataclass
class _Row:
    """A request being decoded by the continuous scheduler (its tokens so far, kept across a re-prefill)."""

    request: _Request
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    peak: int = 0  # most rows that shared a step with this one

    @property
    def sequence(self) -> list[int]:
        return self.request.prompt_ids + self.tokens


def _cache_keyword(params: Any) -> Optional[str]:
    """The forward keyword that takes the key/value cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name still works there, with a deprecation
    warning, until its removal)."""
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def supports_continuous(model: Any) -> Optional[str]:
    """``None`` when the continuous scheduler can drive ``model``; otherwise why not (one line).

    It needs a decoder-only model whose forward takes ``position_ids`` and a key/value cache
    (``cache`` in transformers 5.24+, ``past_key_values`` before) and whose cache is a plain
    full-attention ``DynamicCache`` (rows are merged and dropped by concatenating and indexing
    its key/value tensors). Sliding-window, hybrid and state-space caches are served by the
    static scheduler.
    """
    import inspect

    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        params = inspect.signature(base.forward).parameters
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
    ):
        if scheduling not in SCHEDULING:
            raise ModelSpecError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {scheduling!r}")
        if int(max_batch_size) < 1:
            raise ModelSpecError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if float(batch_wait_ms) < 0:
            raise ModelSpecError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if num_threads is not None and int(num_threads) < 1:
            raise ModelSpecError(f"num_threads must be >= 1 or None, got {num_threads}")
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
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)
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
            import inspect

            base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
            params = inspect.signature(base.forward).parameters
            self._logits_to_keep = "logits_to_keep" in params
            self._cache_keyword = _cache_keyword(params)
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self._generate_lock = threading.Lock()  # one generate() at a time, even across a worker restart
        # re-entrant: a dropped view's finalizer (release) may run from GC while this thread holds it
        self._lock = threading.RLock()
        self._queue: Optional[queue.SimpleQueue] = None
        self._worker: Optional[threading.Thread] = None
        self._views = 0
        self._stats = {"generate_calls": 0, "requests": 0, "largest_batch": 0, "completion_tokens": 0,
                       "forward_passes": 0, "preemptions": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}

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
            return dict(self._stats)

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
        pending: list[_Request] = []
        try:
            if self.num_threads is not None:
                import torch

                torch.set_num_threads(self.num_threads)
            if self.scheduling == "continuous":
                _Continuous(self, q).run()
                return
            while True:
                item = q.get()
                if item is _STOP:
                    return
                pending = [item]
                stop = False
                deadline = time.monotonic() + self.batch_wait_s
                while len(pending) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    try:
                        item = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    pending.append(item)
                self._serve(pending)
                pending = []
                if stop:
                    return
        except BaseException as exc:  # never leave a caller waiting on a dead worker
            for request in pending:
                if not request.future.done():
                    request.future.set_exception(self._call_error(exc, len(pending)))
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and not item.future.done():
                    item.future.set_exception(self._call_error(exc, 1))
            raise

    def _call_error(self, exc: BaseException, n: int) -> ModelCallError:
        if isinstance(exc, ModelCallError):
            err = ModelCallError(str(exc))
        else:
            err = ModelCallError(
                f"model {self.name}: batched generate of {n} request(s) failed: {type(exc).__name__}: {exc}"
            )
        err.__cause__ = exc
        return err

    def _serve(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drops cancelled requests
        if live:
            self._serve_live(live)

    def _serve_live(self, live: list[_Request]) -> None:
        try:
            results = self._generate_batch(live)
        except BaseException as exc:
            if len(live) > 1 and _is_oom(exc):
                half = len(live) // 2  # a too-large batch: retry in halves
                self._serve_live(live[:half])
                self._serve_live(live[half:])
                return
            for request in live:
                request.future.set_exception(self._call_error(exc, len(live)))
            if not isinstance(exc, Exception):
                raise
            return
        for request, generation in zip(live, results):
            request.future.set_result(generation)

    def _generate_batch(self, batch: list[_Request]) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        RowSampler, RowBudget = _hook_classes()
        n = len(batch)
        device = next(self.model.parameters()).device
        prompt_len = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((n, prompt_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, prompt_len), dtype=torch.long)
        for i, request in enumerate(batch):  # left padding
            length = len(request.prompt_ids)
            input_ids[i, prompt_len - length :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[i, prompt_len - length :] = 1
        temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in batch], dtype=torch.float32)
        greedy = torch.tensor([r.temperature <= 0 for r in batch], dtype=torch.bool)
        budgets = torch.tensor([r.max_new_tokens for r in batch], dtype=torch.long)
        sampler = RowSampler(temps.to(device), greedy.to(device))
        budget = RowBudget(sampler, budgets.to(device), prompt_len)
        kwargs = dict(_neutral_generation_kwargs())
        kwargs.update(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=int(budgets.max()),
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([budget]),
            pad_token_id=self.pad_id,
        )
        if self.eos_ids:
            kwargs["eos_token_id"] = list(self.eos_ids)
        with self._generate_lock, torch.inference_mode(), _eval_mode(self.model):
            out = self.model.generate(**kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        completions = sequences[:, prompt_len:].cpu()
        if sampler.logprobs:
            logprobs = torch.stack(sampler.logprobs, dim=1).float().cpu()
        else:
            logprobs = torch.zeros((n, 0))
        eos = set(self.eos_ids)
        results = []
        for i, request in enumerate(batch):
            row = completions[i, : request.max_new_tokens].tolist()
            finish = "length"
            for j, token in enumerate(row):
                if token in eos:
                    row = row[: j + 1]
                    finish = "stop"
                    break
            row_logprobs = logprobs[i, : len(row)].tolist()
            if len(row_logprobs) != len(row):
                raise ModelCallError(
                    f"model {self.name}: recorded {len(row_logprobs)} log-probs for {len(row)} tokens "
                    "(the model's generate() bypassed the logits processor)"
                )
            with self._tok_lock:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
            results.append(
                Generation(
                    text=text,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=len(row),
                    prompt_ids=list(request.prompt_ids),
                    completion_ids=row,
                    logprobs=row_logprobs,
                    finish_reason=finish,
                    extra={"temperature": request.temperature if request.temperature > 0 else 0.0, "batch_size": n},
                )
            )
        with self._lock:
            self._stats["generate_calls"] += 1
            self._stats["requests"] += n
            self._stats["largest_batch"] = max(self._stats["largest_batch"], n)
            self._stats["completion_tokens"] += sum(g.completion_tokens or 0 for g in results)
        return results


class _Continuous:
    """The continuous scheduler: one decode loop over a changing set of rows.

    Each iteration either *admits* waiting requests (one forward pass over their prompts,
    left-padded; their key/value caches are then merged into the running batch's cache) or
    *decodes* one token for every running row. A row that ends (EOS or its budget) is
    answered at once and dropped from the cache, and a request that arrives while others
    are decoding joins at the next iteration instead of waiting for the batch to drain.
    Rows keep their own positions (``position_ids``) and the attention mask hides the
    left padding, so a row's output does not depend on its batch mates.

    On a failed forward pass: an admission failure fails only the rows being admitted; a
    decode failure fails every running row, except an out-of-memory error, which halves
    the batch cap and re-queues the rows with their tokens so far (they are re-prefilled
    later: recomputed, not restarted). A single row that runs out of memory fails.
    """

    def __init__(self, engine: "_Engine", q: queue.SimpleQueue):
        import torch

        self.torch = torch
        self.engine = engine
        self.q = q
        self.cap = engine.max_batch_size
        self.waiting: "collections.deque[_Row]" = collections.deque()
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # [rows, cache length] long
        self.admitting: list[_Row] = []
        self.stopping = False
        self.device = next(engine.model.parameters()).device

    # ---- the loop

    def run(self) -> None:
        try:
            while True:
                if not self.rows and not self.waiting:
                    if self.stopping or not self._wait_for_work():
                        return
                else:
                    self._drain_queue()
                self._step()
        except BaseException as exc:
            for row in self.rows + self.admitting + list(self.waiting):
                if not row.request.future.done():
                    row.request.future.set_exception(self.engine._call_error(exc, len(self.rows) or 1))
            self.rows, self.waiting = [], collections.deque()
            raise

    def _enqueue(self, request: _Request) -> None:
        if request.future.set_running_or_notify_cancel():  # drops cancelled requests
            self.waiting.append(_Row(request))

    def _wait_for_work(self) -> bool:
        """Idle: block for a request, then wait up to ``batch_wait_ms`` for batch mates. False on stop."""
        item = self.q.get()
        if item is _STOP:
            return False
        self._enqueue(item)
        deadline = time.monotonic() + self.engine.batch_wait_s
        while len(self.waiting) < self.cap:
            remaining = deadline - time.monotonic()
            try:
                item = self.q.get(timeout=remaining) if remaining > 0 else self.q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self.stopping = True
                break
            self._enqueue(item)
        return True

    def _drain_queue(self) -> None:
        while not self.stopping:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self.stopping = True  # serve what is queued and running, then stop
            else:
                self._enqueue(item)

    def _step(self) -> None:
        free = self.cap - len(self.rows)
        if self.waiting and free > 0:
            self.admitting = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            self._admit(self.admitting)
            self.admitting = []
        elif self.rows:
            self._decode()

    # ---- forward passes

    def _forward(self, phase: str, cache: Any, **kwargs):
        torch = self.torch
        engine = self.engine
        if engine._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        kwargs[engine._cache_keyword] = cache
        started = time.perf_counter()
        with engine._generate_lock, torch.inference_mode(), _eval_mode(engine.model):
            out = engine.model(use_cache=True, **kwargs)
            logits = out.logits[:, -1, :].float()
        with engine._lock:
            engine._stats["forward_passes"] += 1
            engine._stats[f"{phase}_seconds"] += time.perf_counter() - started
        # the output field follows the same rename as the keyword
        new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return logits, new_cache

    def _admit(self, new: list[_Row]) -> None:
        torch = self.torch
        engine = self.engine
        seqs = [row.sequence for row in new]
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(new), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, seq in enumerate(seqs):  # left padding
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        try:
            logits, cache = self._forward(
                "prefill", input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), cache=DynamicCache(),
            )
        except BaseException as exc:
            if _is_oom(exc) and (len(new) > 1 or self.rows):
                # too many rows at once: admit fewer (the running rows are untouched)
                self.cap = max(1, len(self.rows) + len(new) // 2)
                self.waiting.extendleft(reversed(new))
                self._count_preemption(len(new))
                return
            for row in new:
                row.request.future.set_exception(engine._call_error(exc, len(new)))
            if not isinstance(exc, Exception):
                raise
            return
        self._merge(cache, mask.to(self.device))
        self.rows.extend(new)
        with engine._lock:
            engine._stats["generate_calls"] += 1
            engine._stats["requests"] += sum(1 for row in new if not row.tokens)
        self._sample_and_finish(logits, new, offset=len(self.rows) - len(new))

    def _decode(self) -> None:
        torch = self.torch
        rows = self.rows
        last = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(row.sequence) - 1] for row in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=self.mask.dtype, device=self.device)], 1)
        try:
            logits, self.cache = self._forward(
                "decode", self.cache, input_ids=last, attention_mask=self.mask, position_ids=positions
            )
        except BaseException as exc:
            # a failed pass may leave the cache half-updated: it is dropped either way
            self.cache = self.mask = None
            self.rows = []
            if _is_oom(exc) and len(rows) > 1:
                self.cap = max(1, len(rows) // 2)
                self.waiting.extendleft(reversed(rows))  # re-prefilled with their tokens so far
                self._count_preemption(len(rows))
                return
            for row in rows:
                row.request.future.set_exception(self.engine._call_error(exc, len(rows)))
            if not isinstance(exc, Exception):
                raise
            return
        self._sample_and_finish(logits, rows, offset=0)

    def _count_preemption(self, n: int) -> None:
        with self.engine._lock:
            self.engine._stats["preemptions"] += n

    # ---- cache bookkeeping

    def _merge(self, cache, mask) -> None:
        """Append the admitted rows' cache to the running one, left-padding the shorter."""
        torch = self.torch
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t, n):
            return t if n == 0 else torch.nn.functional.pad(t, (0, 0, n, 0))

        for old, added in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([pad(old.keys, width - old_len), pad(added.keys, width - new_len)], 0)
            old.values = torch.cat([pad(old.values, width - old_len), pad(added.values, width - new_len)], 0)
        self.mask = torch.cat([
            torch.nn.functional.pad(self.mask, (width - old_len, 0)),
            torch.nn.functional.pad(mask, (width - new_len, 0)),
        ], 0)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` in the cache; trim columns that are padding for every row left."""
        torch = self.torch
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]
        self.mask = mask[:, start:]

    # ---- sampling

    def _sample_and_finish(self, logits, rows: list[_Row], offset: int) -> None:
        """Sample the next token of ``rows`` (logits row ``i`` is ``rows[i]``), answer the rows that end."""
        torch = self.torch
        engine = self.engine
        temps = torch.tensor([r.request.temperature if r.request.temperature > 0 else 1.0 for r in rows],
                             dtype=torch.float32, device=logits.device)
        greedy = torch.tensor([r.request.temperature <= 0 for r in rows], dtype=torch.bool, device=logits.device)
        scaled = logits / temps[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = torch.multinomial(logp.exp(), 1).squeeze(1)
            tokens = torch.where(greedy, tokens, sampled)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
        tokens = tokens.tolist()
        size = len(self.rows)
        with engine._lock:
            engine._stats["largest_batch"] = max(engine._stats["largest_batch"], size)
        eos = set(engine.eos_ids)
        done: set[int] = set()
        for i, (row, token, lp) in enumerate(zip(rows, tokens, chosen)):
            row.tokens.append(int(token))
            row.logprobs.append(float(lp))
            row.peak = max(row.peak, size)
            if token in eos or len(row.tokens) >= row.request.max_new_tokens:
                done.add(offset + i)
                self._answer(row, "stop" if token in eos else "length")
        if done:
            self._drop([i for i in range(len(self.rows)) if i not in done])
            self.rows = [row for i, row in enumerate(self.rows) if i not in done]

    def _answer(self, row: _Row, finish: str) -> None:
        engine = self.engine
        request = row.request
        with engine._tok_lock:
            text = engine.tokenizer.decode(row.tokens, skip_special_tokens=True)
        generation = Generation(
            text=text,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(row.tokens),
            prompt_ids=list(request.prompt_ids),
            completion_ids=list(row.tokens),
            logprobs=list(row.logprobs),
            finish_reason=finish,
            extra={"temperature": request.temperature if request.temperature > 0 else 0.0, "batch_size": row.peak},
        )
        with engine._lock:
            engine._stats["completion_tokens"] += len(row.tokens)
        request.future.set_result(generation)


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


@functools.lru_cache(maxsize=1)
def _neutral_generation_kwargs() -> dict:
    """:data:`_NEUTRAL_GENERATION` restricted to the keys this transformers version knows."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k)}


# --------------------------------------------------------------------------- public model


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
                ``max_batch_size``, ``batch_wait_ms``, ``num_threads``, ``scheduling``).
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
        and decode forward passes) and ``preemptions`` (continuous only: rows re-queued after
        an out-of-memory error).
        """
        return self._engine.stats

    @property
    def closed(self) -> bool:
        return self._closed

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


def load_pretrained(
    path: Union[str, Path],
    *,
    adapter: Union[str, Path, None] = None,
    device: Any = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory, on ``device`` in ``dtype``, in eval mode.

    With ``adapter`` the model is a ``PeftModel`` (the adapter is injected into a fresh copy
    of the base weights). Raises :class:`ModelSpecError` with what is wrong and what to do.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelSpecError(
            f"hf:{path}: no such directory {str(directory)!r}; pass a local transformers model directory "
            "(config.json, weights, tokenizer files). Models are never downloaded at run time."
        )
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ModelSpecError(
            f"hf:{path}: {str(directory)!r} is not a transformers model directory (no config.json in it); "
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    adapter_dir = _check_adapter_dir(adapter) if adapter else None
    torch, transformers = import_torch_stack(f"hf:{path}")
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(
            f"hf:{path}: cannot load the tokenizer from {str(directory)!r} ({type(exc).__name__}: {exc}); "
            "save it next to the model with tokenizer.save_pretrained(dir)"
        ) from exc
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, **{_dtype_kwarg(transformers): torch_dtype}
        )
    except Exception as exc:
        raise ModelSpecError(
            f"hf:{path}: cannot load a causal LM from {str(directory)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        model.to(dev)
    except Exception as exc:
        raise ModelSpecError(f"hf:{path}: cannot move the model to device {dev!r} ({type(exc).__name__}: {exc})") from exc
    model.eval()
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    return model, tokenizer


def _check_adapter_dir(adapter: Union[str, Path]) -> Path:
    directory = Path(adapter).expanduser()
    if not directory.is_dir():
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: no such directory; pass a PEFT adapter saved with "
            "PeftModel.save_pretrained(dir) (it holds adapter_config.json)"
        )
    if not (directory / "adapter_config.json").is_file():
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: not a PEFT adapter directory (no adapter_config.json in it); "
            "pass the directory written by PeftModel.save_pretrained(dir)"
        )
    return directory


def attach_adapter(model: Any, adapter: Union[str, Path]) -> Any:
    """Wrap ``model`` in a ``PeftModel`` with the adapter in ``adapter`` (inference mode, ``.eval()``)."""
    directory = _check_adapter_dir(adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelSpecError(f"adapter {str(adapter)!r}: loading a PEFT adapter needs peft; {_INSTALL_HINT}") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except Exception as exc:
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: cannot load it onto this base model ({type(exc).__name__}: {exc}); "
            "check that it was trained on the same base model"
        ) from exc
    peft_model.eval()
    return peft_model
