"""S-MagNorm and the retention brake (spec §3): the properties the spec asks tests to pin down, for every mode."""

import math

import pytest
import torch

from secura import NORM_MODES, SecuraConfig
from secura.magnorm import brake_can_fire, combine_moments, gated_add, magnitude_scale, s_magnorm, summarise_stats

SCALE_INVARIANT = ("mean", "rank", "max")
MAGNITUDE_AWARE = ("reference", "absolute", "trust")


pytestmark = pytest.mark.usefixtures("single_thread")


def cfg(mode="mean", **kwargs):
    return SecuraConfig(magnorm_norm=mode, **kwargs)


def sample(shape=(3, 5, 16), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), 0.1 * torch.randn(shape, generator=g, dtype=dtype)


def increment(y0, dy, config, brake=None):
    """ΔY/S alone (added to zeros, so no rounding against Y0)."""
    return gated_add(torch.zeros_like(y0), y0, dy, config, brake_channels=brake)[0]


def stats_of(y0, dy, config, brake=None):
    """Run the op with every token recorded and summarise its statistics."""
    _, acc = gated_add(y0, y0, dy, config, brake_channels=brake, token_mask=torch.ones(dy.shape[:-1], dtype=bool))
    return summarise_stats(acc)


def reference_s(y0, dy, norm, s=6.0, eps=1e-6):
    """The §3 formula of the scale-invariant gates written out plainly, per token."""
    rel = dy.abs() / (y0.abs() + eps)
    if norm == "mean":
        rel_hat, c = rel / rel.mean(-1, keepdim=True), 1.0
    elif norm == "max":
        rel_hat, c = rel / rel.amax(-1, keepdim=True), 0.5
    else:
        rel_hat, c = rel.argsort(-1).argsort(-1).to(rel.dtype) / (rel.shape[-1] - 1), 0.5
    return 2 - torch.sigmoid(s * (rel_hat - c))


@pytest.mark.parametrize("norm", SCALE_INVARIANT)
def test_matches_the_spec_formula(norm):
    y0, dy = sample()
    config = cfg(norm, brake_decay=1.0)
    s = reference_s(y0, dy, norm)
    torch.testing.assert_close(magnitude_scale(y0, dy, config), s)
    torch.testing.assert_close(s_magnorm(y0, dy, config), y0 + dy / s)
    assert s.min() >= 1 and s.max() <= 2


def test_magnitude_aware_modes_match_their_formulas():
    y0, dy = sample()
    rel = dy.abs() / (y0.abs() + 1e-6)
    torch.testing.assert_close(magnitude_scale(y0, dy, cfg("reference")), 2 - torch.sigmoid(6 * rel))
    rms = y0.square().mean(-1, keepdim=True).sqrt()
    rel_abs = dy.abs() / (y0.abs() + 1e-6 * rms)
    expected = 1 + 9 * torch.sigmoid(6 * (rel_abs / 0.2 - 1))
    torch.testing.assert_close(magnitude_scale(y0, dy, cfg("absolute")), expected)
    r = dy.norm(dim=-1, keepdim=True) / (y0.norm(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(s_magnorm(y0, dy, cfg("trust")), y0 + dy * 0.2 * torch.tanh(r / 0.2) / r)


@pytest.mark.parametrize("norm", SCALE_INVARIANT)
def test_scale_invariant_modes_ignore_the_overall_size_of_the_update(norm):
    """The documented limit of §3 (docs/results.md): S damps a 100× larger drift by the same factor."""
    y0, dy = sample()
    config = cfg(norm, brake_decay=1.0)
    torch.testing.assert_close(magnitude_scale(y0, 100 * dy, config), magnitude_scale(y0, dy, config))


@pytest.mark.parametrize("norm", MAGNITUDE_AWARE)
def test_magnitude_aware_modes_respond_to_the_size_of_the_update(norm):
    """Issue 16 §2: S (and so the share of ΔY that is applied) differs between ΔY and 100·ΔY."""
    y0, dy = sample()
    config = cfg(norm, brake_decay=1.0)
    small, large = magnitude_scale(y0, dy, config), magnitude_scale(y0, 100 * dy, config)
    assert (large - small).abs().max() > 0.1
    applied_small = (s_magnorm(y0, dy, config) - y0).norm() / dy.norm()
    applied_large = (s_magnorm(y0, 100 * dy, config) - y0).norm() / (100 * dy).norm()
    if norm == "reference":  # 2 − σ(s·L): large relative changes pass whole, small ones are damped up to 1.5×
        assert applied_large > 1.1 * applied_small
    else:  # absolute, trust: a large change is held back more
        assert applied_large < 0.9 * applied_small


def test_trust_bounds_the_change_of_every_token_whatever_its_size():
    y0, dy = sample((64, 32))
    config = cfg("trust", magnorm_tau=0.3)
    for scale in (1e-3, 1.0, 1e3, 1e6):
        change = increment(y0, scale * dy, config)
        ratio = change.norm(dim=-1) / y0.norm(dim=-1)
        assert ratio.max() <= 0.3 * (1 + 1e-5)
    small = increment(y0, 1e-4 * dy, config)
    torch.testing.assert_close(small, 1e-4 * dy, rtol=1e-6, atol=0)  # tiny changes pass (almost) whole


def test_normalisations_on_a_hand_made_token():
    y0 = torch.ones(1, 4, dtype=torch.float64)
    dy = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64) * 1e-2
    sig = torch.sigmoid
    expected = {
        "mean": 2 - sig(6 * (torch.tensor([[0.4, 0.8, 1.2, 1.6]], dtype=torch.float64) - 1)),
        "max": 2 - sig(6 * (torch.tensor([[0.25, 0.5, 0.75, 1.0]], dtype=torch.float64) - 0.5)),
        "rank": 2 - sig(6 * (torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]], dtype=torch.float64) - 0.5)),
        "reference": 2 - sig(6 * dy),
    }
    for norm, s in expected.items():
        torch.testing.assert_close(magnitude_scale(y0, dy, cfg(norm)), s, rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm", NORM_MODES)
def test_zero_delta_gives_y0_exactly(norm):
    y0, _ = sample(dtype=torch.float32)
    y0[0, 0, :3] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        y = y0.to(dtype)
        assert torch.equal(s_magnorm(y, torch.zeros_like(y), cfg(norm)), y)


def test_magnorm_off_is_plain_addition():
    y0, dy = sample()
    assert torch.equal(s_magnorm(y0, dy, SecuraConfig(magnorm="off")), y0 + dy)


@pytest.mark.parametrize("norm", ("mean", "max", "reference", "absolute", "trust"))
def test_continuous_in_delta(norm):
    y0, dy = sample()
    direction = torch.randn_like(dy)
    config = cfg(norm)
    base = s_magnorm(y0, dy, config)
    gaps = [(s_magnorm(y0, dy + eps * direction, config) - base).abs().max().item() for eps in (1e-4, 1e-6, 1e-8)]
    assert gaps[0] < 1e-2 and gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50


@pytest.mark.parametrize("norm", ("mean", "rank", "max", "reference"))
def test_change_is_between_half_and_all_of_delta(norm):
    y0, dy = sample()
    for scale in (1.0, 1e-3, 1e-9):
        change = increment(y0, scale * dy, cfg(norm, brake_decay=1.0))
        assert torch.all(change.abs() <= scale * dy.abs())
        assert torch.all(change.abs() >= 0.5 * scale * dy.abs())


def test_absolute_change_is_between_one_over_s_max_and_all_of_delta():
    y0, dy = sample()
    for scale in (1e3, 1.0, 1e-9):
        change = increment(y0, scale * dy, cfg("absolute", brake_decay=1.0))
        assert torch.all(change.abs() <= scale * dy.abs() * (1 + 1e-12))
        assert torch.all(change.abs() >= scale * dy.abs() / 10 * (1 - 1e-12))


@pytest.mark.parametrize("norm", NORM_MODES)
def test_each_token_is_independent_of_the_rest_of_the_batch(norm):
    y0, dy = sample(dtype=torch.float32)
    config = cfg(norm, brake_ratio=0.0, brake_threshold=1.9 if norm != "absolute" else 1.5)  # brake on some tokens
    brake = torch.zeros(16, dtype=torch.bool)
    brake[:5] = True
    full = s_magnorm(y0, dy, config, brake_channels=brake)
    alone = s_magnorm(y0[1:2, 2:3], dy[1:2, 2:3], config, brake_channels=brake)
    assert torch.equal(full[1:2, 2:3], alone)
    y0_other, dy_other = y0.clone(), dy.clone()
    y0_other[0] *= 1e6
    dy_other[2] *= 1e3
    y0_other[1, :2] = 0
    dy_other[1, 3:] *= -50
    assert torch.equal(s_magnorm(y0_other, dy_other, config, brake_channels=brake)[1, 2], full[1, 2])


@pytest.mark.parametrize("norm", NORM_MODES)
def test_no_nan_for_zero_or_tiny_y0_and_delta(norm):
    config = cfg(norm)
    cases = [
        (torch.zeros(2, 8), torch.randn(2, 8)),
        (torch.full((2, 8), 1e-30), torch.full((2, 8), 1e-30)),
        (torch.randn(2, 8), torch.full((2, 8), 1e-38)),
        (torch.zeros(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)),
        (torch.zeros(2, 8, dtype=torch.float16), torch.full((2, 8), 6e-8, dtype=torch.float16)),
    ]
    for y0, dy in cases:
        y = s_magnorm(y0, dy, config)
        s = magnitude_scale(y0, dy, config)
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        assert s.min() >= 1


def test_s_is_a_constant_of_the_backward_except_under_trust():
    y0, dy = sample()
    y0.requires_grad_(True)
    dy.requires_grad_(True)
    config = cfg("mean", brake_decay=1.0)
    s_magnorm(y0, dy, config).sum().backward()
    torch.testing.assert_close(dy.grad, 1 / magnitude_scale(y0, dy, config))
    torch.testing.assert_close(y0.grad, torch.ones_like(y0))
    y0.grad = dy.grad = None
    trust = cfg("trust", magnorm_tau=0.05)
    s_magnorm(y0, dy, trust).sum().backward()
    assert not torch.allclose(dy.grad, 1 / magnitude_scale(y0, dy, trust))  # the tanh factor's own derivative
    assert not torch.allclose(y0.grad, torch.ones_like(y0))


def test_trust_stops_the_gradient_along_a_saturated_direction():
    """Far outside the trust region, growing ΔY along itself no longer changes the output: no gradient."""
    y0, dy = sample((4, 16))
    dy = (1e4 * dy).requires_grad_(True)
    out = s_magnorm(y0, dy, cfg("trust"))
    (grad,) = torch.autograd.grad(out, dy, grad_outputs=dy.detach())  # derivative along ΔY itself
    along = (grad * dy.detach()).sum(-1) / dy.detach().square().sum(-1)
    assert along.abs().max() < 1e-6


def test_brake_fires_deterministically_on_tokens_with_uniformly_large_change():
    out = 8
    y0 = torch.linspace(1.0, 2.0, out).repeat(2, 1)
    dy = torch.empty_like(y0)
    dy[0] = 0.5 * y0[0]  # uniform relative change: max norm → L̂ = 1 → S ≈ 1.047 ≤ m everywhere
    dy[1] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])  # concentrated change: most S ≈ 1.95
    brake = torch.zeros(out, dtype=torch.bool)
    brake[[1, 5]] = True
    config = cfg("max", brake_threshold=1.2, brake_ratio=0.9, brake_decay=0.5)
    y = s_magnorm(y0, dy, config, brake_channels=brake)
    s = magnitude_scale(y0, dy, config)
    damp = torch.ones_like(dy)
    damp[0, [1, 5]] = 0.5
    torch.testing.assert_close(y, y0 + dy * damp / s)
    assert stats_of(y0, dy, config, brake)["brake_rate"] == 0.5
    unbraked = s_magnorm(y0, dy, cfg("max", brake_decay=1.0), brake_channels=brake)
    assert torch.equal(unbraked[1], y[1]) and not torch.equal(unbraked[0], y[0])


def test_absolute_brake_fires_for_a_large_change_and_never_for_a_tiny_one():
    y0, dy = sample((32, 16))
    config = cfg("absolute", magnorm_tau=0.2, brake_ratio=0.5, brake_decay=0.5)
    brake = torch.ones(16, dtype=torch.bool)
    assert stats_of(y0, 100 * dy, config, brake)["brake_rate"] == 1.0
    assert stats_of(y0, 1e-3 * dy, config, brake)["brake_rate"] == 0.0
    large = s_magnorm(y0, 100 * dy, config, brake_channels=brake)
    torch.testing.assert_close(large, y0 + 0.5 * 100 * dy / magnitude_scale(y0, 100 * dy, config))


def test_with_defaults_the_brake_cannot_fire_under_mean_or_rank():
    # ≥ 90% of a token above 1.23 × its own mean is impossible, whatever the data; ranks are fixed
    y0, dy = sample((64, 32))
    brake = torch.ones(32, dtype=torch.bool)
    for norm in ("mean", "rank"):
        assert not brake_can_fire(cfg(norm), 32)
        assert stats_of(y0, dy, cfg(norm), brake)["brake_rate"] == 0.0
    assert brake_can_fire(cfg("max"), 32)  # θ ≈ 0.73: a nearly uniform token reaches it
    assert brake_can_fire(cfg("reference"), 32) and brake_can_fire(cfg("absolute"), 32)


def test_stats_match_s_over_the_recorded_tokens_only():
    y0, dy = sample((4, 10), dtype=torch.float32)
    config = cfg("rank", brake_decay=1.0)
    mask = torch.tensor([True, False, True, True])
    _, acc = gated_add(y0, y0, dy, config, token_mask=mask)
    got = summarise_stats(acc)
    s = magnitude_scale(y0, dy, config)[mask].flatten().double()
    assert got["elements"] == 30 and got["tokens"] == 3
    assert math.isclose(got["s_mean"], s.mean().item(), rel_tol=1e-6)
    assert math.isclose(got["s_std"], s.std(unbiased=False).item(), rel_tol=1e-5)
    assert math.isclose(got["frac_le_m"], (s <= 1.2).double().mean().item())
    assert math.isclose(got["frac_ge_1_8"], (s >= 1.8).double().mean().item())
    assert gated_add(y0, y0, dy, config)[1] is None  # no mask, nothing recorded


def test_stats_accumulate_across_calls_like_one_call():
    config = cfg("mean")
    parts = [sample((4, 10), seed=seed, dtype=torch.float32) for seed in range(3)]
    total = None
    for y0, dy in parts:
        _, acc = gated_add(y0, y0, dy, config, token_mask=torch.ones(4, dtype=bool))
        total = acc if total is None else combine_moments(total, acc)
    y0 = torch.cat([p[0] for p in parts])
    dy = torch.cat([p[1] for p in parts])
    _, whole = gated_add(y0, y0, dy, config, token_mask=torch.ones(12, dtype=bool))
    for key, value in summarise_stats(whole).items():
        assert math.isclose(summarise_stats(total)[key], value, rel_tol=1e-6), key
    empty = torch.zeros_like(whole)
    assert torch.equal(combine_moments(empty, whole), whole)


def test_constant_s_reads_as_zero_std():
    y0 = torch.randn(16, 64)
    assert stats_of(y0, torch.zeros_like(y0), cfg("mean"))["s_std"] == 0.0
