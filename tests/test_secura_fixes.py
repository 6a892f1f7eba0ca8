"""Issue 16: the correctness fixes (§1) and the layer-level behaviour of the magnitude-aware modes (§2)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import nn

import secura
from secura import SecuraConfig
from secura.model import secura_layers
from tiny_llama import llama, llama_state  # noqa: F401 - llama_state is a fixture

QV = ["q_proj", "v_proj"]
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("single_thread")


def train_steps(model, opt, steps: int) -> None:
    """``steps`` optimiser steps on IDS, with SECURA's merge after each (as the trainer does)."""
    model.train()
    for step in range(1, steps + 1):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        secura.merge_step(model, step)


class OneLayer(nn.Module):
    def __init__(self, width: int = 256, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_of(model) -> secura.model.SecuraLayer:
    return next(secura_layers(model))


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers around each value of ``x`` (8 significant bits)."""
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


# ----------------------------------------------------------------------------------------- M1 on a bf16 base


def train_m1_bf16(lr: float, steps: int = 30):
    model = get_peft_model(OneLayer().to(torch.bfloat16),
                           SecuraConfig(k=32, r=16, target_modules=["proj"], merge_strategy="M1"))
    w0 = layer_of(model).get_base_layer().weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    target = torch.randn(64, 256, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        loss = (model(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        secura.merge_step(model, step)
    return model, w0


@pytest.mark.parametrize("lr", [1e-3, 1e-4])
def test_m1_on_a_bf16_base_applies_every_merged_increment(lr):
    """Increments below half a bf16 step used to round away while U recorded them (65% applied at lr 1e-3)."""
    model, w0 = train_m1_bf16(lr)
    layer = layer_of(model)
    weight = layer.get_base_layer().weight.detach()
    c, r, u = layer.secura_C["default"].float(), layer.secura_R["default"].float(), layer.secura_U["default"]
    recorded = c @ u @ r
    target = w0.float() + recorded
    assert recorded.abs().max() > 2 * bf16_ulp(target).median()  # the run moved W by bf16 steps
    assert torch.all((weight.float() - target).abs() <= 0.5 * bf16_ulp(target) * (1 + 1e-3))  # to bf16 precision


def test_m1_bf16_reload_reproduces_the_trained_weight(tmp_path):
    model, w0 = train_m1_bf16(1e-3)
    trained = layer_of(model).get_base_layer().weight.detach().clone()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(OneLayer().to(torch.bfloat16), tmp_path)
    reloaded = layer_of(loaded).get_base_layer().weight.detach()
    differ = reloaded != trained
    assert differ.float().mean() < 1e-3  # one fold of U vs thirty: equal but for rare fp32 ties
    assert torch.all((reloaded.float() - trained.float()).abs()[differ] <= bf16_ulp(trained)[differ])


# ------------------------------------------------------------------------------------ dtypes peft cannot touch


def test_core_stays_fp32_and_indices_int64_whatever_peft_casts(llama_state):
    model = get_peft_model(llama(llama_state, torch.bfloat16), SecuraConfig(k=16, r=8, target_modules=QV),
                           autocast_adapter_dtype=False)
    layer = layer_of(model)
    assert layer.secura_A["default"].dtype == torch.bfloat16  # peft's choice for the trained weights
    BaseTunerLayer._move_adapter_to_device_of_base_layer(layer, "default")  # peft's own move, without our override
    cast_adapter_dtype(model, "default", autocast_adapter_dtype=True)
    model.to(torch.bfloat16)
    for name in ("secura_rows", "secura_cols"):
        assert getattr(layer, name)["default"].dtype == torch.int64
    assert layer.secura_U["default"].dtype == torch.float32
    assert layer.secura_C["default"].dtype == torch.bfloat16  # C and R are copies of the base weight


def test_merges_accumulate_in_fp32_with_bf16_adapter_weights(llama_state):
    model = get_peft_model(llama(llama_state, torch.bfloat16), SecuraConfig(k=16, r=8, target_modules=QV),
                           autocast_adapter_dtype=False)
    layer = layer_of(model)
    a, b = layer.secura_A["default"], layer.secura_B["default"]
    expected = torch.zeros(16, 16)
    with torch.no_grad():
        for step in range(1, 6):
            b.copy_(1e-4 * torch.randn(b.shape))
            expected += a.float() @ b.float()
            secura.merge_step(model, step)
    assert layer.secura_U["default"].dtype == torch.float32
    torch.testing.assert_close(layer.secura_U["default"], expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------- A without gradient is frozen


def test_a_is_frozen_when_b_is_zero_at_every_forward(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=4, target_modules=QV))  # merge_every 1
    layer = layer_of(model)
    a0 = layer.secura_A["default"].detach().clone()
    for switch in (lambda: model.set_adapter("default"), lambda: model.base_model.enable_adapter_layers(),
                   lambda: model.base_model.set_requires_grad("default", True)):
        switch()
        assert not layer.secura_A["default"].requires_grad and layer.secura_B["default"].requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not layer.secura_A["default"] for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.5)
    train_steps(model, opt, 3)
    assert torch.equal(layer.secura_A["default"], a0)  # no weight decay on it either
    u = layer.secura_U["default"]
    assert u.abs().max() > 0
    q, _ = torch.linalg.qr(a0)  # U = Σ A·B_t grows inside the column space of A
    torch.testing.assert_close(q @ (q.T @ u), u, rtol=0, atol=1e-6)


def test_a_trains_when_merges_are_spaced(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=4, target_modules=QV, merge_every=3))
    layer = layer_of(model)
    a0 = layer.secura_A["default"].detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, opt, 3)
    assert layer.secura_A["default"].requires_grad and not torch.equal(layer.secura_A["default"], a0)


# -------------------------------------------------------------------------------------- mixed-adapter batches


def test_mixed_adapter_batches_are_refused_clearly(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(IDS, adapter_names=["default", "default"])
    cur = get_peft_model(llama(llama_state), secura.CurLoraConfig(k=16, target_modules=QV))
    with pytest.raises(ValueError, match="CUR-LoRA does not support mixed-adapter"):
        cur(IDS, adapter_names=["default", "default"])


# ------------------------------------------------------------------------------------------------ S statistics


def test_statistics_count_only_training_tokens_under_the_mask(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    with torch.no_grad():
        for layer in secura_layers(model):
            layer.secura_B["default"].normal_()
    mask = torch.ones_like(IDS)
    mask[0, 6:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    model.train()
    with secura.magnorm_token_mask(model, mask):
        model(IDS, attention_mask=mask, labels=IDS).loss.backward()
    stats = secura.magnorm_stats(model, reset=True)
    assert stats["tokens"] == 4 * int(mask.sum()) and stats["elements"] == 2 * int(mask.sum()) * (64 + 32)
    model.eval()
    with torch.no_grad():
        model(IDS, attention_mask=mask)  # an evaluation pass: outside the block, not recorded
    assert secura.magnorm_stats(model)["tokens"] == 0


def test_statistics_equal_those_of_the_unpadded_tokens_alone(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=["q_proj"]))
    layer = layer_of(model)
    with torch.no_grad():
        layer.secura_B["default"].normal_()
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    with secura.magnorm_token_mask(model, mask):
        layer(x)
    padded = secura.magnorm_stats(model, reset=True)
    kept = x[mask.bool()]
    with secura.magnorm_token_mask(model, torch.ones(kept.shape[:-1])):
        layer(kept)
    assert padded == pytest.approx(secura.magnorm_stats(model)) and padded["tokens"] == 7


def test_a_mask_of_the_wrong_shape_is_a_clear_error(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\).*tokens of shape \(2, 9\)"):
        with secura.magnorm_token_mask(model, torch.ones(2, 5)):
            model(IDS)
    assert all(layer.token_mask is None for layer in secura_layers(model))  # the block always cleans up


# ----------------------------------------------------------------------------------- magnitude-aware, layer


def test_trust_bounds_each_tokens_change_after_a_huge_core(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, magnorm_norm="trust",
                                                            magnorm_tau=0.2, delta_bias=True))
    g = torch.Generator().manual_seed(0)
    for layer in secura_layers(model):
        with torch.no_grad():
            for container in (layer.secura_U, layer.secura_bias):
                t = container["default"]
                t.copy_(torch.randn(t.shape, generator=g))
            layer.secura_U["default"].mul_(1e3)
        x = torch.randn(8, 7, layer.in_features, generator=g)
        with torch.no_grad():
            y, y0 = layer(x), layer.get_base_layer()(x)
        ratio = (y - y0).norm(dim=-1) / y0.norm(dim=-1)
        assert 0.19 < ratio.max() <= 0.2 * (1 + 1e-5)


def test_core_decay_zero_is_the_plain_sum_bit_for_bit(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, core_decay=0.0))
    layer = layer_of(model)
    expected = torch.zeros(16, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 5):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            expected.add_(layer.secura_A["default"] @ layer.secura_B["default"])
        secura.merge_step(model, step)
    assert torch.equal(layer.secura_U["default"], expected)


def test_core_decay_bounds_the_long_term_core():
    model = get_peft_model(OneLayer(64), SecuraConfig(k=16, r=8, target_modules=["proj"], core_decay=0.1))
    layer = layer_of(model)
    b = layer.secura_B["default"]
    constant = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ab_norm = float((layer.secura_A["default"] @ constant).norm())
        for step in range(1, 201):
            b.copy_(constant)
            secura.merge_step(model, step)
    assert float(layer.secura_U["default"].norm()) == pytest.approx(ab_norm / 0.1, rel=0.01)
