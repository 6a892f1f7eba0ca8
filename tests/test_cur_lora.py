"""CUR-LoRA baseline: ΔW = C U R, U zero-init and the only trained matrix."""

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import secura  # noqa: F401  (registers the CURLORA peft type)
from secura import CurLoraConfig
from secura.cur import select_cur_indices
from secura.cur_lora import CurLoraLayer
from tiny_llama import llama, llama_state  # noqa: F401 - llama_state is a fixture

GPT2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=300)
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("single_thread")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def train(model, steps=3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_only_u_is_trained_and_starts_at_zero(llama_state):
    ref = logits(llama(llama_state))
    model = get_peft_model(llama(llama_state), CurLoraConfig(k=16, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".curlora_U." in n for n in trainable)
    assert all(torch.count_nonzero(p) == 0 and p.shape == (16, 16) for p in trainable.values())
    assert model.get_nb_trainable_parameters()[0] == 4 * 16 * 16
    assert torch.equal(logits(model), ref)


def test_uses_the_shared_cur_selection_and_factorised_delta(llama_state):
    model = get_peft_model(llama(llama_state), CurLoraConfig(k=8, target_modules=["v_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, CurLoraLayer))
    w = layer.get_base_layer().weight
    rows, cols = select_cur_indices(w, 8)
    assert torch.equal(layer.curlora_rows["default"], rows) and torch.equal(layer.curlora_cols["default"], cols)
    with torch.no_grad():
        layer.curlora_U["default"].normal_()
    x = torch.randn(3, 64)
    expected = x @ (w + w[:, cols] @ layer.curlora_U["default"] @ w[rows, :]).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_training_merge_and_round_trip(tmp_path, llama_state):
    model = get_peft_model(llama(llama_state), CurLoraConfig(k=16, target_modules=["q_proj", "v_proj"]))
    train(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(llama(llama_state)))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"curlora_U", "curlora_rows", "curlora_cols"}
    loaded = PeftModel.from_pretrained(llama(llama_state), tmp_path)
    assert torch.equal(logits(loaded), adapted)
    torch.testing.assert_close(logits(loaded.merge_and_unload()), adapted, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_and_rank_errors():
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(GPT2).eval()
    ref = logits(base)
    with pytest.raises(ValueError, match="clamp_rank"):
        get_peft_model(transformers.GPT2LMHeadModel(GPT2), CurLoraConfig(k=40, target_modules=["c_attn"]))
    model = get_peft_model(base, CurLoraConfig(k=8, target_modules=["c_attn"]))
    assert torch.equal(logits(model), ref)
    train(model, steps=2)
    adapted = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), adapted, rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match=r"CurLoraConfig\.k"):
        CurLoraConfig(k=0)
    with pytest.raises(ValueError, match=r"CurLoraConfig\.cur_selection"):
        CurLoraConfig(cur_selection="random")
    assert CurLoraConfig().peft_type == "CURLORA"
