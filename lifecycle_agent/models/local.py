"""A local transformers causal LM (optionally with a PEFT adapter), batched across callers.

Several agents usually share one local model. Every :meth:`LocalModel.generate` /
:meth:`LocalModel.agenerate` call is tokenized in the caller, then handed to one
background worker thread per loaded model (the *engine*). The worker takes the first
waiting request, waits at most ``batch_wait_ms`` for more (up to ``max_batch_size``),
and runs them as ONE left-padded ``model.generate`` call. Rows of a batch may use
different temperatures and token budgets: both are applied per row (a logits processor
scales each row by its own temperature, greedy rows take their argmax; a stopping
criterion ends each row at its own budget), so a batch never has to be split.

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
import concurrent.futures
import contextlib
import functools
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass
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
LOCAL_OPTIONS = ("model_id", "default_temperature", "max_new_tokens", "max_batch_size", "batch_wait_ms", "num_threads")

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
    ):
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
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self._generate_lock = threading.Lock()  # one generate() at a time, even across a worker restart
        # re-entrant: a dropped view's finalizer (release) may run from GC while this thread holds it
        self._lock = threading.RLock()
        self._queue: Optional[queue.SimpleQueue] = None
        self._worker: Optional[threading.Thread] = None
        self._views = 0
        self._stats = {"generate_calls": 0, "requests": 0, "largest_batch": 0, "completion_tokens": 0}

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
            if len(live) > 1 and type(exc).__name__ == "OutOfMemoryError":
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
        max_batch_size: most requests merged into one ``generate`` call.
        batch_wait_ms: after the first waiting request, how long (milliseconds) the worker
            waits for more before it starts a batch.
        num_threads: if set, the worker thread calls ``torch.set_num_threads(num_threads)``
            when it starts (note: torch's intra-op pool is process-wide). ``None`` leaves
            torch's default (one thread per core).

    Calls from many threads or coroutines are served by one worker thread in batches
    (see the module docstring). :meth:`share` makes another view on the same weights and
    worker with different defaults; :meth:`close` stops the worker once every view is closed.
    """

    trainable = True

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
                ``max_batch_size``, ``batch_wait_ms``, ``num_threads``).
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
        """Counters of the shared worker: ``generate_calls``, ``requests``, ``largest_batch``, ``completion_tokens``."""
        return self._engine.stats

    @property
    def closed(self) -> bool:
        return self._closed

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
