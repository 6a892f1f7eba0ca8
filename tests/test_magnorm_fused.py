"""The fused S-MagNorm op against the unfused math it replaces (issue 14 item 3), and torch.compile tracing it.

The unfused reference lives only here: plain autograd ops, S computed under no_grad (a constant of the backward)
in every mode but ``trust``, which is differentiated through. Fused and unfused must agree to 1e-6 in float64, in
the output and in the gradients of ΔY and Y0, with the brake firing on some tokens.
"""

import pytest
import torch
import transformers
from peft import get_peft_model

import secura
from secura import NORM_MODES, SecuraConfig
from secura.magnorm import gated_add

pytestmark = pytest.mark.usefixtures("single_thread")


def unfused(y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig, brake: torch.Tensor) -> torch.Tensor:
    """docs/secura-method.md §3, written out."""
    mode, s, tau, eps = config.magnorm_norm, config.sigmoid_scale, config.magnorm_tau, config.magnorm_eps
    if config.magnorm == "off":
        return y0 + dy
    if mode == "trust":
        r = dy.norm(dim=-1, keepdim=True) / (y0.norm(dim=-1, keepdim=True) + eps)
        return y0 + dy * tau * torch.tanh(r / tau) / r
    with torch.no_grad():
        if mode == "absolute":
            rms = y0.square().mean(-1, keepdim=True).sqrt()
            rel = dy.abs() / (y0.abs() + eps * rms + torch.finfo(y0.dtype).tiny)
        else:
            rel = dy.abs() / (y0.abs() + eps)
        if mode == "mean":
            scale = 2 - torch.sigmoid(s * (rel / rel.mean(-1, keepdim=True) - 1))
        elif mode == "max":
            scale = 2 - torch.sigmoid(s * (rel / rel.amax(-1, keepdim=True) - 0.5))
        elif mode == "rank":
            ranks = rel.argsort(dim=-1, stable=True).argsort(dim=-1).to(rel.dtype) / (rel.shape[-1] - 1)
            scale = 2 - torch.sigmoid(s * (ranks - 0.5))
        elif mode == "reference":
            scale = 2 - torch.sigmoid(s * rel)
        else:
            scale = 1 + (config.magnorm_s_max - 1) * torch.sigmoid(s * (rel / tau - 1))
        large = rel > tau if mode == "absolute" else scale <= config.brake_threshold
        fired = large.sum(-1, keepdim=True) > config.brake_ratio * rel.shape[-1]
        gain = torch.where(fired & brake, config.brake_decay, 1.0) / scale
    return y0 + dy * gain


# knobs under which the brake fires on some tokens and not on others in each mode
BRAKING = {
    "mean": dict(brake_threshold=1.5, brake_ratio=0.3, brake_decay=0.5),
    "rank": dict(brake_threshold=1.5, brake_ratio=0.3, brake_decay=0.5),
    "max": dict(brake_threshold=1.9, brake_ratio=0.3, brake_decay=0.5),
    "reference": dict(brake_threshold=1.45, brake_ratio=0.5, brake_decay=0.5),
    "absolute": dict(magnorm_tau=0.05, brake_ratio=0.5, brake_decay=0.5),
    "trust": dict(magnorm_tau=0.05),
}


def inputs(seed=0, shape=(4, 6, 24)):
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape[:-1] + (1,), generator=g,
                                                                                 dtype=torch.float64)
    return y0, dy


@pytest.mark.parametrize("mode", NORM_MODES)
def test_fused_equals_unfused_in_output_and_gradients(mode):
    config = SecuraConfig(magnorm_norm=mode, **BRAKING[mode])
    brake = torch.zeros(24, dtype=torch.bool)
    brake[::3] = True
    y0, dy = inputs()
    grad = torch.randn_like(y0)
    results = []
    for op in ("fused", "unfused"):
        y0_, dy_ = y0.clone().requires_grad_(True), dy.clone().requires_grad_(True)
        if op == "fused":
            out, stats = gated_add(y0_, y0_, dy_, SecuraConfig(magnorm_norm=mode, **BRAKING[mode]),
                                   brake_channels=brake, token_mask=torch.ones(y0.shape[:-1], dtype=torch.bool))
        else:
            out, stats = unfused(y0_, dy_, config, brake), None
        out.backward(grad)
        results.append((out.detach(), y0_.grad, dy_.grad, stats))
    (out, g_y0, g_dy, stats), (ref, ref_y0, ref_dy, _) = results
    for got, want in ((out, ref), (g_y0, ref_y0), (g_dy, ref_dy)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    if mode != "trust":  # the comparison covers braked and unbraked tokens (under rank the brake is all or none)
        fired = stats[6].item()
        assert fired > 0 and (mode == "rank" or fired < 24)


@pytest.mark.parametrize("mode", NORM_MODES)
def test_fused_keeps_separate_running_output_and_reference(mode):
    """``acc`` (the output so far) and ``Y0`` (what S compares against) may differ: the second adapter's case."""
    config = SecuraConfig(magnorm_norm=mode, **BRAKING[mode])
    brake = torch.ones(24, dtype=torch.bool)
    y0, dy = inputs(seed=1)
    acc = y0 + 0.3
    out, _ = gated_add(acc, y0, dy, config, brake_channels=brake)
    torch.testing.assert_close(out, acc + (unfused(y0, dy, config, brake) - y0), rtol=1e-6, atol=1e-9)


def test_fused_off_mode_is_plain_addition_with_gradient_one():
    y0, dy = inputs()
    dy.requires_grad_(True)
    out, stats = gated_add(y0, y0, dy, SecuraConfig(magnorm="off"))
    out.sum().backward()
    assert stats is None and torch.equal(out, y0 + dy) and torch.equal(dy.grad, torch.ones_like(dy))


@pytest.mark.parametrize("mode", ("mean", "rank", "absolute", "trust"))
def test_a_secura_layer_compiles_in_one_graph_with_statistics(mode):
    """No Python state changes in the forward: dynamo traces a whole SECURA layer (fullgraph), forward and
    backward, inside the statistics block; outputs, gradients and recorded statistics equal eager mode's."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(transformers.LlamaForCausalLM(config),
                           SecuraConfig(k=8, r=4, target_modules=["q_proj"], magnorm_norm=mode, merge_every=2))
    layer = next(secura.model.secura_layers(model))
    with torch.no_grad():
        layer.secura_B["default"].normal_()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for run in (layer, compiled):
        secura.reset_magnorm_stats(model)
        with secura.magnorm_token_mask(model, mask):
            out = run(x)
        out.square().sum().backward()
        grad = layer.secura_B["default"].grad.clone()
        layer.secura_B["default"].grad = None
        results.append((out.detach(), grad, secura.magnorm_stats(model)))
    (eager, eager_grad, eager_stats), (got, got_grad, got_stats) = results
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(got_grad, eager_grad)
    assert got_stats == pytest.approx(eager_stats) and got_stats["tokens"] == 8
