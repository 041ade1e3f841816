"""Sampling: the one rule that picks a row's next token and records its log-prob.

Each row is sampled from ``softmax(logits / T)`` at its own temperature ``T`` (greedy rows,
``T <= 0``, take the argmax and record their log-prob at ``T = 1``), and the recorded
log-prob is ``log_softmax(logits / T)`` of the token chosen. Nothing else touches the
logits: the model's own ``generation_config`` knobs (top-k, top-p, repetition penalty, ...)
are switched off, so the recorded log-probs are those of the policy that sampled, which
is what the trainer's ratio ``exp(logp_new - logp_rollout)`` needs. Both schedulers use
:func:`sample_rows`; the static one reaches it through ``model.generate``'s logits
processor hook (:func:`generate_hooks`).
"""

from __future__ import annotations

import functools

#: generate() settings that switch off every sampling/penalty knob a model's
#: generation_config may carry, so the only logits processing is ours.
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


def row_temperatures(requests):
    """``(temperatures, greedy)`` tensors of ``requests`` (anything with ``.temperature``; ``<= 0`` is greedy)."""
    import torch

    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in requests], dtype=torch.float32)
    greedy = torch.tensor([r.temperature <= 0 for r in requests], dtype=torch.bool)
    return temps, greedy


def sample_rows(logits, temps, greedy):
    """The next token of every row and its log-prob: ``(tokens [rows], logprobs [rows])``.

    ``logits`` is ``[rows, vocab]``; ``temps`` and ``greedy`` are per-row tensors on the same device.
    """
    import torch

    logits = logits.float()
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        sampled = torch.multinomial(logp.exp(), 1).squeeze(1)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


@functools.lru_cache(maxsize=1)
def neutral_generation_kwargs() -> dict:
    """:data:`_NEUTRAL_GENERATION` restricted to the keys this transformers version knows."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k)}


@functools.lru_cache(maxsize=1)
def generate_hooks():
    """``(RowSampler, RowBudget)``: the logits processor and stopping criterion that make
    ``model.generate`` sample with :func:`sample_rows` and end each row at its own budget."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class RowSampler(LogitsProcessor):
        """Chooses each row's token with :func:`sample_rows`, records its log-prob, and hands generate()
        scores that allow only that token (generate's own sampling then cannot pick another)."""

        def __init__(self, temps, greedy):
            self.temps = temps
            self.greedy = greedy
            self.logprobs: list = []

        def __call__(self, input_ids, scores):
            tokens, logprobs = sample_rows(scores, self.temps, self.greedy)
            self.logprobs.append(logprobs)
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, tokens[:, None], 0.0)

        def __deepcopy__(self, memo):  # generate() must never record into a copy
            return self

    class RowBudget(StoppingCriteria):
        """Ends each row at its own ``max_new_tokens``."""

        def __init__(self, budgets, prompt_len):
            self.budgets = budgets
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.prompt_len) >= self.budgets

        def __deepcopy__(self, memo):
            return self

    return RowSampler, RowBudget
