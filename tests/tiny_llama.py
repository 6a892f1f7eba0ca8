"""The tiny Llama the adapter tests share: its config, its seeded weights once per module, a fresh copy per test."""
from __future__ import annotations

import pytest
import torch
import transformers

LLAMA = transformers.LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=300,
)


@pytest.fixture(scope="module")
def llama_state():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(LLAMA).state_dict()


def llama(state, dtype=torch.float32):
    model = transformers.LlamaForCausalLM(LLAMA)
    model.load_state_dict(state)
    return model.to(dtype).eval()
