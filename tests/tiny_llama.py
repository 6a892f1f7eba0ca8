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


def byte_batch(seed: int, rows: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """Seeded byte-token rows for the tiny model, loss on their second half."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 259, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
