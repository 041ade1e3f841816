"""The local engine's prefix cache: identical outputs and log-probs with and without it, fewer prompt
tokens computed, a memory bound, and invalidation on every weight or adapter change."""

from __future__ import annotations

import pytest

from fixtures_local import lora_dir, smollm2_dir, tiny_dir  # noqa: F401

import torch  # noqa: E402  (fixtures_local skips the module when torch is missing)

from lifecycle_agent.errors import ModelSpecError
from lifecycle_agent.models.local import LocalModel

SYSTEM = {"role": "system", "content": "You keep notes between tasks. " * 6}
#: a pack-like sequence: shared system prompt, then a task, then its update episode extending it
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Task 1: what colour is the sky?"}],
    [SYSTEM, {"role": "user", "content": "Task 2: what colour is grass?"}],
    [SYSTEM, {"role": "user", "content": "Task 1: what colour is the sky?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Update your notes."}],
]


def replies(model, conversations=CONVERSATIONS, max_new_tokens=8):
    return [model.generate(messages, temperature=0, max_new_tokens=max_new_tokens) for messages in conversations]


def assert_same(cached, plain, abs_tol=1e-5):
    for a, b in zip(cached, plain):
        assert a.prompt_ids == b.prompt_ids
        assert a.completion_ids == b.completion_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=abs_tol)


def pair(model, tokenizer, **options):
    """A cached and an uncached LocalModel over the same weights."""
    return (LocalModel(model, tokenizer, max_new_tokens=8, **options),
            LocalModel(model, tokenizer, max_new_tokens=8, prefix_cache_mb=0, **options))


@pytest.fixture
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval(), AutoTokenizer.from_pretrained(str(tiny_dir))


def test_identical_outputs_and_fewer_prompt_tokens(tiny):
    cached, plain = pair(*tiny)
    try:
        first = replies(cached)
        again = replies(cached)  # every prompt now fully cached but its last token
        expected = replies(plain)
        assert_same(first, expected)
        assert_same(again, expected)
        stats, base = cached.stats, plain.stats
        assert base["prompt_tokens_computed"] == base["prompt_tokens"] and stats["prompt_tokens"] == 2 * base["prompt_tokens"]
        assert base["prefix_cache_hits"] == 0 and base["prefix_cache_entries"] == 0
        assert stats["prefix_cache_hits"] >= 5
        # the first round reuses the system prompt, the second computes one token per prompt
        assert stats["prompt_tokens_computed"] < base["prompt_tokens_computed"] + len(CONVERSATIONS)
        assert stats["prompt_tokens_computed"] <= stats["prompt_tokens"] // 2
        assert stats["prompt_tokens_computed"] + stats["prefix_cache_tokens_reused"] == stats["prompt_tokens"]
    finally:
        cached.close()
        plain.close()


def test_sampled_logprobs_match_a_fresh_forward_pass(tiny):
    model, tokenizer = tiny
    cached = LocalModel(model, tokenizer, max_new_tokens=8)
    try:
        replies(cached)
        gen = cached.generate(CONVERSATIONS[2], temperature=0.8)
        assert cached.stats["prefix_cache_hits"] >= 1
        ids = torch.tensor([gen.prompt_ids + gen.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        p = len(gen.prompt_ids)
        lp = torch.log_softmax(logits[p - 1: p - 1 + gen.completion_tokens] / 0.8, -1)
        expected = lp.gather(1, torch.tensor(gen.completion_ids)[:, None]).squeeze(1).tolist()
        assert gen.logprobs == pytest.approx(expected, abs=1e-4)
    finally:
        cached.close()


def test_concurrent_rows_of_one_admission_share_prefixes(tiny):
    import threading

    cached, plain = pair(*tiny, batch_wait_ms=200)
    try:
        results = [None] * 3
        barrier = threading.Barrier(3)

        def call(i):
            barrier.wait()
            results[i] = cached.generate(CONVERSATIONS[i], temperature=0, max_new_tokens=8)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert_same(results, replies(plain))
        assert cached.stats["prefix_cache_hits"] >= 2  # rows 2 and 3 reuse row 1's system prompt
        assert cached.stats["prompt_tokens_computed"] < plain.stats["prompt_tokens_computed"]
    finally:
        cached.close()
        plain.close()


def test_a_finished_reply_is_cached_for_the_next_episode(tiny):
    cached, _ = pair(*tiny)
    _.close()
    try:
        first = cached.generate(CONVERSATIONS[0], temperature=0, max_new_tokens=8)
        reused_before = cached.stats["prefix_cache_tokens_reused"]
        follow_up = first.prompt_ids + first.completion_ids[:-1] + [first.completion_ids[-1]]
        # what the engine stores: the prompt and the reply but its last token
        n, layers = cached._engine.prefix_cache.lookup(follow_up, cached._engine.prefix_cache.current_version())
        assert n == len(first.prompt_ids) + len(first.completion_ids) - 1 and layers is not None
        assert cached.stats["prefix_cache_tokens_reused"] == reused_before + n
    finally:
        cached.close()


def test_optimizer_step_and_weight_loads_invalidate(tiny):
    model, tokenizer = tiny
    cached, plain = pair(model, tokenizer)
    try:
        replies(cached)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
        loss.backward()
        optimizer.step()
        model.eval()
        assert_same(replies(cached), replies(plain))
        assert cached.stats["prefix_cache_invalidations"] == 1
        state = {k: v * 1.01 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        assert_same(replies(cached), replies(plain))
        assert cached.stats["prefix_cache_invalidations"] == 2
    finally:
        cached.close()
        plain.close()


def test_adapter_update_switch_and_disable_invalidate(tiny_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    peft_model = PeftModel.from_pretrained(base, str(lora_dir), is_trainable=True).eval()
    cached, plain = pair(peft_model, tokenizer)
    try:
        before = replies(cached)
        with torch.no_grad():  # an adapter update, as an optimizer step makes it
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.3)
        after = replies(cached)
        assert_same(after, replies(plain))
        assert after[0].logprobs != pytest.approx(before[0].logprobs, abs=1e-3)  # the update changed the policy
        with peft_model.disable_adapter():
            assert_same(replies(cached), replies(plain))
        assert_same(replies(cached), replies(plain))
        peft_model.load_adapter(str(lora_dir), adapter_name="other")
        peft_model.set_adapter("other")
        assert_same(replies(cached), replies(plain))
        assert cached.stats["prefix_cache_invalidations"] >= 4
    finally:
        cached.close()
        plain.close()


def test_memory_bound_evicts_least_recently_used(tiny):
    model, tokenizer = tiny
    # the tiny model's states take 2 layers x 2 (k, v) x 2 heads x 8 dims x 4 bytes = 256 bytes per token
    small = LocalModel(model, tokenizer, max_new_tokens=4, prefix_cache_mb=60 * 256 / 2**20)
    try:
        replies(small, max_new_tokens=4)
        stats = small.stats
        assert stats["prefix_cache_mb"] <= 60 * 256 / 2**20
        assert stats["prefix_cache_entries"] <= 1
        small.clear_prefix_cache()
        assert small.stats["prefix_cache_entries"] == 0
    finally:
        small.close()


@pytest.mark.parametrize("bad", [-1, "big", None, True, float("nan")])
def test_bad_prefix_cache_mb_is_a_clear_error(tiny, bad):
    with pytest.raises(ModelSpecError, match="prefix_cache_mb must be a number >= 0"):
        LocalModel(*tiny, prefix_cache_mb=bad)


def test_static_scheduling_has_no_prefix_cache(tiny):
    static = LocalModel(*tiny, scheduling="static", max_new_tokens=4)
    try:
        replies(static, max_new_tokens=4)
        stats = static.stats
        assert stats["prompt_tokens_computed"] == stats["prompt_tokens"] > 0
        assert stats["prefix_cache_hits"] == 0
    finally:
        static.close()


@pytest.mark.slow
def test_smollm2_identical_with_and_without_the_cache(smollm2_dir):
    from lifecycle_agent.models import smollm2

    cached = smollm2.load_smollm2(device="cpu", max_new_tokens=24)
    plain = smollm2.load_smollm2(device="cpu", max_new_tokens=24, prefix_cache_mb=0)
    try:
        a = replies(cached, max_new_tokens=24)
        b = replies(plain, max_new_tokens=24)
        assert_same(a, b, abs_tol=1e-4)
        assert cached.stats["prefix_cache_hits"] >= 2
        assert cached.stats["prompt_tokens_computed"] < plain.stats["prompt_tokens_computed"]
    finally:
        cached.close()
        plain.close()
        smollm2.clear_process_cache()
