"""Shared helpers of the trainer tests (no tests here): a test environment, token-recording fakes, a tiny model.

``reply-length`` rewards each reply by its length, so even a random model gives rollouts
with different rewards (non-zero advantages). ``TokenScriptedModel`` is the scripted
note-taking policy with made-up token ids and log-probs, for rollout tests without torch.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import pytest

from lifecycle_agent import envs
from lifecycle_agent.envs.base import Environment, EnvTask
from lifecycle_agent.models.base import ChatModel, Generation
from lifecycle_agent.models.scripted import ScriptedModel, is_update
from lifecycle_agent.tasks import StepResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ReplyLengthTask(EnvTask):
    """Reward = (characters of the reply mod 10) / 9, so even random replies differ; ``turns`` model calls per task."""

    def __init__(self, pack, index, task_id):
        super().__init__(pack, index, task_id)
        self.max_turns = int(pack.env.options["turns"])
        self.calls = 0

    def start(self) -> str:
        return f"Task {self.index}: write one short sentence about the sea."

    def step(self, action: str) -> StepResult:
        self.calls += 1
        reward = (len(action.strip()) % 10) / 9
        if self.calls < self.max_turns:
            return StepResult("Now write one more sentence.", None, False, None)
        return StepResult("", reward, True, f"Your reply had {len(action.strip())} characters.")

    def oracle_action(self) -> str:
        return "x" * 9


class ReplyLength(Environment):
    name = "reply-length"
    description = "Rewards replies by their length mod 10 (a test environment with varied rewards)."
    defaults: dict[str, Any] = {"turns": 1}

    def hidden_facts(self, rng):
        return {}

    def make_task(self, pack, index, task_id):
        return ReplyLengthTask(pack, index, task_id)


envs.register("reply-length", ReplyLength, overwrite=True)


def fake_ids(text: str) -> list[int]:
    """Deterministic made-up token ids of a text (one per word)."""
    return [zlib.crc32(word.encode()) % 1000 for word in text.split()] or [0]


class TokenScriptedModel(ChatModel):
    """The scripted note-taking policy, recording made-up prompt/completion ids and log-probs."""

    model_id = "token-scripted"
    trainable = True

    def __init__(self, update_format: bool = True):
        self.inner = ScriptedModel()
        self.update_format = update_format
        self.calls = 0

    def generate(self, messages, *, temperature=None, max_new_tokens=None) -> Generation:
        self.calls += 1
        reply = self.inner.generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)
        text = reply.text
        if not self.update_format and is_update(messages):
            text = "\n".join(line for line in text.splitlines() if "<<<" not in line)
        prompt = fake_ids(" ".join(str(m.get("content")) for m in messages))
        completion = fake_ids(text)
        return Generation(text, len(prompt), len(completion), prompt, completion, [-0.5] * len(completion))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' barriers cost more
    than the work; import this fixture into a module to run its torch code on one thread (restored after)."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2-135M-Instruct directory (its tokenizer serves the tiny model too)."""
    pytest.importorskip("torch")
    from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

    return ensure_smollm2_cache()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_path):
    """A saved tiny random Llama (2 layers, hidden 64, 2048-token context) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(4321)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("tiny-llama-trainer")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def tiny_config(output_dir, tiny_llama, **overrides):
    """A fast CoDConfig on the tiny model and the reply-length environment."""
    from trainer.cod_config import CoDConfig

    options = dict(
        output_dir=str(output_dir), model=f"hf:{tiny_llama}", envs=["reply-length"], max_steps=2, group_size=2,
        pack_size=2, max_new_tokens=12, learning_rate=1e-2, eval_packs=2, save_steps=1, progress=False,
        report=False, device="cpu", keep_rollouts=True,
    )
    options.update(overrides)
    return CoDConfig(**options)
