"""The two batch schedulers of the engine's worker thread; they share the request intake,
the out-of-memory rule, sampling (:func:`.sampling.sample_rows`) and how a row is answered.

- :class:`_Continuous` (the default wherever the model's cache allows it): one decode loop
  over a changing set of rows. A request that arrives while others are decoding joins the
  batch at the next token, and a row that ends is answered at once and leaves the batch.
- :class:`_Static`: a batch is ONE left-padded ``model.generate`` call and every row waits
  for the longest; for models whose cache cannot be merged row by row (sliding-window,
  hybrid and state-space caches).

The out-of-memory rule, for both: a forward pass over several rows that runs out of memory
lowers the batch cap to half the rows that failed (plus those still running) and re-queues
them with their tokens so far (re-prefilled later: recomputed, not restarted); a single row
that runs out of memory fails. Any other failure fails the rows of that pass.
"""

from __future__ import annotations

import collections
import queue
import time
from typing import Any

from ...errors import ModelCallError
from ..base import Generation
from .engine import _STOP, _Engine, _is_oom, _Row
from .sampling import generate_hooks, neutral_generation_kwargs, row_temperatures, sample_rows


class _Scheduler:
    """Request intake (a queue drained into ``waiting``), the out-of-memory rule and answering rows."""

    def __init__(self, engine: _Engine, q: queue.SimpleQueue):
        self.engine = engine
        self.q = q
        self.cap = engine.max_batch_size
        self.waiting: "collections.deque[_Row]" = collections.deque()
        self.rows: list[_Row] = []  # rows in the running batch
        self.stopping = False
        self.device = next(engine.model.parameters()).device

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
            held = self.rows + self._in_flight() + list(self.waiting)
            for row in held:
                if not row.request.future.done():
                    row.request.future.set_exception(self.engine.call_error(exc, len(held)))
            self.rows, self.waiting = [], collections.deque()
            raise

    def _step(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> list[_Row]:
        """Rows taken off ``waiting`` but not yet in ``rows`` (failed with the worker, if it dies)."""
        return []

    # ---- intake

    def _enqueue(self, request) -> None:
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

    def _take(self, n: int) -> list[_Row]:
        return [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]

    # ---- failures

    def _fail(self, exc: BaseException, failed: list[_Row]) -> None:
        """The out-of-memory rule (see the module docstring), else fail ``failed``; re-raises non-Exceptions."""
        running = len(self.rows)
        if _is_oom(exc) and (len(failed) > 1 or running):
            self.cap = max(1, running + len(failed) // 2)
            self.waiting.extendleft(reversed(failed))
            self.engine.count(preemptions=len(failed))
            return
        for row in failed:
            row.request.future.set_exception(self.engine.call_error(exc, len(failed)))
        if not isinstance(exc, Exception):
            raise exc

    # ---- answers

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
        engine.count(completion_tokens=len(row.tokens))
        request.future.set_result(generation)


class _Static(_Scheduler):
    """Each step serves up to ``cap`` waiting rows with one ``model.generate`` call (left padding)."""

    def _step(self) -> None:
        batch = self._take(self.cap)
        try:
            finishes = self._generate(batch)
        except BaseException as exc:
            for row in batch:  # a re-queued row starts over
                row.tokens, row.logprobs = [], []
            self._fail(exc, batch)
            return
        for row, finish in zip(batch, finishes):
            self._answer(row, finish)

    def _generate(self, batch: list[_Row]) -> list[str]:
        """Fill every row's tokens and log-probs; return each row's finish reason."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        engine = self.engine
        RowSampler, RowBudget = generate_hooks()
        n = len(batch)
        prompt_len = max(len(r.request.prompt_ids) for r in batch)
        input_ids = torch.full((n, prompt_len), engine.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, prompt_len), dtype=torch.long)
        for i, row in enumerate(batch):  # left padding
            length = len(row.request.prompt_ids)
            input_ids[i, prompt_len - length:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
            attention_mask[i, prompt_len - length:] = 1
        temps, greedy = row_temperatures(batch)
        budgets = torch.tensor([r.request.max_new_tokens for r in batch], dtype=torch.long)
        sampler = RowSampler(temps.to(self.device), greedy.to(self.device))
        kwargs = dict(neutral_generation_kwargs())
        kwargs.update(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=int(budgets.max()),
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([RowBudget(budgets.to(self.device), prompt_len)]),
            pad_token_id=engine.pad_id,
        )
        if engine.eos_ids:
            kwargs["eos_token_id"] = list(engine.eos_ids)
        with engine.forward_lock():
            out = engine.model.generate(**kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        completions = sequences[:, prompt_len:].cpu()
        logprobs = torch.stack(sampler.logprobs, dim=1).float().cpu() if sampler.logprobs else torch.zeros((n, 0))
        eos = set(engine.eos_ids)
        finishes = []
        for i, row in enumerate(batch):
            tokens = completions[i, : row.request.max_new_tokens].tolist()
            finish = "length"
            for j, token in enumerate(tokens):
                if token in eos:
                    tokens = tokens[: j + 1]
                    finish = "stop"
                    break
            row.tokens, row.logprobs, row.peak = tokens, logprobs[i, : len(tokens)].tolist(), n
            if len(row.logprobs) != len(tokens):
                raise ModelCallError(
                    f"model {engine.name}: recorded {len(row.logprobs)} log-probs for {len(tokens)} tokens "
                    "(the model's generate() bypassed the logits processor)"
                )
            finishes.append(finish)
        prompt_tokens = sum(len(row.request.prompt_ids) for row in batch)
        engine.count(generate_calls=1, requests=n, prompt_tokens=prompt_tokens, prompt_tokens_computed=prompt_tokens)
        engine.note_batch(n)
        return finishes


class _Continuous(_Scheduler):
    """One decode loop over a changing set of rows.

    Each step either *admits* waiting requests (one forward pass over their prompts,
    left-padded; their key/value caches are then merged into the running batch's cache) or
    *decodes* one token for every running row. A row that ends (EOS or its budget) is
    answered at once and dropped from the cache. Rows keep their own positions
    (``position_ids``) and the attention mask hides the left padding, so a row's output does
    not depend on its batch mates. A failed decode pass drops the running cache (it may be
    half-updated): every running row is failed, or re-queued under the out-of-memory rule.
    """

    def __init__(self, engine: _Engine, q: queue.SimpleQueue):
        super().__init__(engine, q)
        self.cache = None
        self.mask = None  # [rows, cache length] long
        self.admitting: list[_Row] = []

    def _in_flight(self) -> list[_Row]:
        return self.admitting

    def _step(self) -> None:
        free = self.cap - len(self.rows)
        if self.waiting and free > 0:
            self.admitting = self._take(free)
            self._admit(self.admitting)
            self.admitting = []
        elif self.rows:
            self._decode()

    # ---- forward passes

    def _forward(self, phase: str, cache: Any, **kwargs):
        engine = self.engine
        if engine._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        kwargs[engine._cache_keyword] = cache
        started = time.perf_counter()
        with engine.forward_lock():
            out = engine.model(use_cache=True, **kwargs)
            logits = out.logits[:, -1, :].float()
        engine.count(forward_passes=1, **{f"{phase}_seconds": time.perf_counter() - started})
        # the output field follows the same rename as the keyword
        new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return logits, new_cache

    def _admit(self, new: list[_Row]) -> None:
        try:
            if self.engine.prefix_cache.enabled:
                logits, cache, mask = self._prefill_each(new)
            else:
                logits, cache, mask = self._prefill_together(new)
        except BaseException as exc:
            self._fail(exc, new)  # the running rows are untouched
            return
        self._merge(cache, mask)
        self.rows.extend(new)
        self.engine.count(generate_calls=1, requests=sum(1 for row in new if not row.tokens),
                          prompt_tokens=sum(len(row.request.prompt_ids) for row in new if not row.tokens))
        self._sample_and_finish(logits, new, offset=len(self.rows) - len(new))

    def _prefill_together(self, new: list[_Row]):
        """One forward pass over the rows' sequences, left-padded: ``(logits, cache, mask)``."""
        import torch
        from transformers import DynamicCache

        seqs = [row.sequence for row in new]
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(new), width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, seq in enumerate(seqs):  # left padding
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(
            "prefill", DynamicCache(), input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
        )
        self.engine.count(prompt_tokens_computed=sum(len(seq) for seq in seqs))
        return logits, cache, mask.to(self.device)

    def _prefill_each(self, new: list[_Row]):
        """Row by row, each starting from the prefix cache's longest match: ``(logits, cache, mask)``.

        Row by row because rows resume from different prefix lengths (and on CPU a batched
        prefill is no faster than one row after another). Each row's states are stored as
        soon as they are computed, so a later row of the same admission already reuses them.
        """
        import torch
        from transformers import DynamicCache

        prefixes = self.engine.prefix_cache
        version = prefixes.current_version()
        all_logits, cache, mask = [], None, None
        for row in new:
            seq = row.sequence
            start, layers = prefixes.lookup(seq, version)
            past = DynamicCache()
            for index, (keys, values) in enumerate(layers or ()):
                past.update(keys, values, index)
            logits, row_cache = self._forward(
                "prefill", past, input_ids=torch.tensor([seq[start:]], dtype=torch.long, device=self.device),
                attention_mask=torch.ones((1, len(seq)), dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, len(seq), dtype=torch.long, device=self.device)[None],
            )
            self.engine.count(prompt_tokens_computed=len(seq) - start)
            prefixes.store(seq, [(layer.keys, layer.values) for layer in row_cache.layers], version)
            row.version = version
            all_logits.append(logits)
            row_mask = torch.ones((1, len(seq)), dtype=torch.long, device=self.device)
            cache, mask = _merged(cache, mask, row_cache, row_mask)
        return torch.cat(all_logits, 0), cache, mask

    def _decode(self) -> None:
        import torch

        rows = self.rows
        last = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(row.sequence) - 1] for row in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=self.mask.dtype, device=self.device)], 1)
        try:
            logits, self.cache = self._forward(
                "decode", self.cache, input_ids=last, attention_mask=self.mask, position_ids=positions
            )
        except BaseException as exc:
            self.cache = self.mask = None
            self.rows = []
            self._fail(exc, rows)
            return
        self._sample_and_finish(logits, rows, offset=0)

    # ---- cache bookkeeping

    def _merge(self, cache, mask) -> None:
        """Append the admitted rows' cache to the running one."""
        self.cache, self.mask = _merged(self.cache, self.mask, cache, mask)

    def _store_finished(self, row: _Row, index: int) -> None:
        """Keep a finished row's states (its prompt and reply but the last token) in the prefix cache:
        the next episode of its pack usually starts with them."""
        prefixes = self.engine.prefix_cache
        if not prefixes.enabled or row.version is None or prefixes.current_version() != row.version:
            return
        length = len(row.sequence) - 1  # the last token was sampled, not yet fed: it has no states
        layers = [(layer.keys[index:index + 1, :, -length:, :].clone(),
                   layer.values[index:index + 1, :, -length:, :].clone()) for layer in self.cache.layers]
        prefixes.store(row.sequence[:length], layers, row.version)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` in the cache; trim columns that are padding for every row left."""
        import torch

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
        temps, greedy = row_temperatures(rows)
        tokens, chosen = sample_rows(logits, temps.to(logits.device), greedy.to(logits.device))
        size = len(self.rows)
        self.engine.note_batch(size)
        eos = set(self.engine.eos_ids)
        done: set[int] = set()
        for i, (row, token, lp) in enumerate(zip(rows, tokens.tolist(), chosen.tolist())):
            row.tokens.append(int(token))
            row.logprobs.append(float(lp))
            row.peak = max(row.peak, size)
            if token in eos or len(row.tokens) >= row.request.max_new_tokens:
                done.add(offset + i)
                self._store_finished(row, offset + i)
                self._answer(row, "stop" if token in eos else "length")
        if done:
            self._drop([i for i in range(len(self.rows)) if i not in done])
            self.rows = [row for i, row in enumerate(self.rows) if i not in done]


def _merged(cache, mask, added, added_mask):
    """``(cache, mask)`` of the rows of ``cache`` followed by those of ``added``, the shorter left-padded."""
    import torch

    if cache is None:
        return added, added_mask
    old_len, new_len = mask.shape[1], added_mask.shape[1]
    width = max(old_len, new_len)

    def pad(t, n):
        return t if n == 0 else torch.nn.functional.pad(t, (0, 0, n, 0))

    for old, new in zip(cache.layers, added.layers):
        old.keys = torch.cat([pad(old.keys, width - old_len), pad(new.keys, width - new_len)], 0)
        old.values = torch.cat([pad(old.values, width - old_len), pad(new.values, width - new_len)], 0)
    mask = torch.cat([
        torch.nn.functional.pad(mask, (width - old_len, 0)),
        torch.nn.functional.pad(added_mask, (width - new_len, 0)),
    ], 0)
    return cache, mask


SCHEDULERS = {"continuous": _Continuous, "static": _Static}
