"""S-MagNorm and the retention brake (spec §3): the properties the spec asks tests to pin down."""

import math

import pytest
import torch

from secura.magnorm import MagNormSettings, MagNormStats, magnitude_scale, s_magnorm, scaled_delta

NORMS = ("mean", "rank", "max")


pytestmark = pytest.mark.usefixtures("single_thread")


def sample(shape=(3, 5, 16), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), 0.1 * torch.randn(shape, generator=g, dtype=dtype)


def reference_s(y0: torch.Tensor, dy: torch.Tensor, norm: str, s: float = 6.0, eps: float = 1e-6) -> torch.Tensor:
    """The §3 formula written out plainly, per token."""
    rel = dy.abs() / (y0.abs() + eps)
    if norm == "mean":
        rel_hat, c = rel / rel.mean(-1, keepdim=True), 1.0
    elif norm == "max":
        rel_hat, c = rel / rel.amax(-1, keepdim=True), 0.5
    else:
        rel_hat, c = rel.argsort(-1).argsort(-1).to(rel.dtype) / (rel.shape[-1] - 1), 0.5
    return 2 - torch.sigmoid(s * (rel_hat - c))


@pytest.mark.parametrize("norm", NORMS)
def test_matches_the_spec_formula(norm):
    y0, dy = sample()
    settings = MagNormSettings(norm=norm, decay=1.0)
    s = reference_s(y0, dy, norm)
    torch.testing.assert_close(magnitude_scale(y0, dy, settings), s)
    torch.testing.assert_close(s_magnorm(y0, dy, settings), y0 + dy / s)
    assert s.min() >= 1 and s.max() <= 2


@pytest.mark.parametrize("norm", NORMS)
def test_s_ignores_the_overall_size_of_the_update(norm):
    """A documented limit of §3 (docs/results.md): every normalisation divides out the update's scale,
    so S damps a 100x larger drift by the same factor as a small one; step size alone bounds drift."""
    y0, dy = sample()
    settings = MagNormSettings(norm=norm, decay=1.0)
    torch.testing.assert_close(magnitude_scale(y0, 100 * dy, settings), magnitude_scale(y0, dy, settings))


def test_normalisations_on_a_hand_made_token():
    y0 = torch.ones(1, 4, dtype=torch.float64)
    dy = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64) * 1e-2
    sig = torch.sigmoid
    expected = {
        "mean": 2 - sig(6 * (torch.tensor([[0.4, 0.8, 1.2, 1.6]], dtype=torch.float64) - 1)),
        "max": 2 - sig(6 * (torch.tensor([[0.25, 0.5, 0.75, 1.0]], dtype=torch.float64) - 0.5)),
        "rank": 2 - sig(6 * (torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]], dtype=torch.float64) - 0.5)),
    }
    for norm, s in expected.items():
        torch.testing.assert_close(magnitude_scale(y0, dy, MagNormSettings(norm=norm)), s, rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_zero_delta_gives_y0_exactly(norm):
    y0, _ = sample(dtype=torch.float32)
    y0[0, 0, :3] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        y = y0.to(dtype)
        assert torch.equal(s_magnorm(y, torch.zeros_like(y), MagNormSettings(norm=norm)), y)


def test_magnorm_off_is_plain_addition():
    y0, dy = sample()
    assert torch.equal(s_magnorm(y0, dy, MagNormSettings(norm="off")), y0 + dy)


@pytest.mark.parametrize("norm", ("mean", "max"))
def test_continuous_in_delta(norm):
    y0, dy = sample()
    direction = torch.randn_like(dy)
    settings = MagNormSettings(norm=norm)
    base = s_magnorm(y0, dy, settings)
    gaps = [(s_magnorm(y0, dy + eps * direction, settings) - base).abs().max().item() for eps in (1e-4, 1e-6, 1e-8)]
    assert gaps[0] < 1e-2 and gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50


@pytest.mark.parametrize("norm", NORMS)
def test_change_is_bounded_by_delta_so_continuous_at_zero(norm):
    y0, dy = sample()
    for scale in (1.0, 1e-3, 1e-9):
        change = scaled_delta(y0, scale * dy, MagNormSettings(norm=norm, decay=1.0))
        assert torch.all(change.abs() <= scale * dy.abs())
        assert torch.all(change.abs() >= 0.5 * scale * dy.abs())


@pytest.mark.parametrize("norm", NORMS)
def test_each_token_is_independent_of_the_rest_of_the_batch(norm):
    y0, dy = sample(dtype=torch.float32)
    settings = MagNormSettings(norm=norm, ratio=0.0, threshold=1.9)  # brake active on some tokens
    brake = torch.zeros(16, dtype=torch.bool)
    brake[:5] = True
    full = s_magnorm(y0, dy, settings, brake_channels=brake)
    alone = s_magnorm(y0[1:2, 2:3], dy[1:2, 2:3], settings, brake_channels=brake)
    assert torch.equal(full[1:2, 2:3], alone)
    y0_other, dy_other = y0.clone(), dy.clone()
    y0_other[0] *= 1e6
    dy_other[2] *= 1e3
    y0_other[1, :2] = 0
    dy_other[1, 3:] *= -50
    assert torch.equal(s_magnorm(y0_other, dy_other, settings, brake_channels=brake)[1, 2], full[1, 2])


@pytest.mark.parametrize("norm", NORMS)
def test_no_nan_for_zero_or_tiny_y0_and_delta(norm):
    settings = MagNormSettings(norm=norm)
    cases = [
        (torch.zeros(2, 8), torch.randn(2, 8)),
        (torch.full((2, 8), 1e-30), torch.full((2, 8), 1e-30)),
        (torch.randn(2, 8), torch.full((2, 8), 1e-38)),
        (torch.zeros(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)),
        (torch.zeros(2, 8, dtype=torch.float16), torch.full((2, 8), 6e-8, dtype=torch.float16)),
    ]
    for y0, dy in cases:
        y = s_magnorm(y0, dy, settings)
        s = magnitude_scale(y0, dy, settings)
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        assert s.min() >= 1 and s.max() <= 2


def test_gradient_flows_through_delta_only_and_is_one_over_s():
    y0, dy = sample()
    y0.requires_grad_(True)
    dy.requires_grad_(True)
    settings = MagNormSettings(norm="mean", decay=1.0)
    s_magnorm(y0, dy, settings).sum().backward()
    torch.testing.assert_close(dy.grad, 1 / magnitude_scale(y0, dy, settings))
    torch.testing.assert_close(y0.grad, torch.ones_like(y0))


def test_brake_fires_deterministically_on_tokens_with_uniformly_large_change():
    out = 8
    y0 = torch.linspace(1.0, 2.0, out).repeat(2, 1)
    dy = torch.empty_like(y0)
    dy[0] = 0.5 * y0[0]  # uniform relative change: max norm → L̂ = 1 → S ≈ 1.047 ≤ m everywhere
    dy[1] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])  # concentrated change: most S ≈ 1.95
    brake = torch.zeros(out, dtype=torch.bool)
    brake[[1, 5]] = True
    settings = MagNormSettings(norm="max", threshold=1.2, ratio=0.9, decay=0.5)
    stats = MagNormStats()
    y = s_magnorm(y0, dy, settings, brake_channels=brake, stats=stats)
    s = magnitude_scale(y0, dy, settings)
    damp = torch.ones_like(dy)
    damp[0, [1, 5]] = 0.5
    torch.testing.assert_close(y, y0 + dy * damp / s)
    assert torch.equal(y, s_magnorm(y0, dy, settings, brake_channels=brake))
    assert stats.as_dict()["brake_rate"] == 0.5
    unbraked = s_magnorm(y0, dy, MagNormSettings(norm="max", decay=1.0), brake_channels=brake)
    assert torch.equal(unbraked[1], y[1]) and not torch.equal(unbraked[0], y[0])


def test_with_defaults_the_brake_cannot_fire_under_mean_normalisation():
    # ≥ 90% of a token above 1.23 × its own mean is impossible, whatever the data
    y0, dy = sample((64, 32))
    stats = MagNormStats()
    s_magnorm(y0, dy, MagNormSettings(norm="mean"), brake_channels=torch.ones(32, dtype=torch.bool), stats=stats)
    assert stats.as_dict()["brake_rate"] == 0.0


def test_stats_accumulate_reset_and_toggle():
    stats = MagNormStats()
    settings = MagNormSettings(norm="rank", decay=1.0)
    all_s = []
    for seed in range(3):
        y0, dy = sample((4, 10), seed=seed, dtype=torch.float32)
        s_magnorm(y0, dy, settings, stats=stats)
        all_s.append(magnitude_scale(y0, dy, settings).flatten().double())
    s = torch.cat(all_s)
    got = stats.as_dict()
    assert got["elements"] == 120 and got["tokens"] == 12
    assert math.isclose(got["s_mean"], s.mean().item(), rel_tol=1e-6)
    assert math.isclose(got["s_std"], s.std(unbiased=False).item(), rel_tol=1e-5)
    assert math.isclose(got["frac_le_m"], (s <= 1.2).double().mean().item())
    assert math.isclose(got["frac_ge_1_8"], (s >= 1.8).double().mean().item())
    stats.reset()
    assert math.isnan(stats.as_dict()["s_mean"])
    stats.enabled = False
    scaled_delta(*sample((2, 4)), settings, stats=stats)
    assert stats.as_dict()["elements"] == 0


def test_constant_s_reads_as_zero_std():
    stats = MagNormStats()
    for _ in range(5):
        y0 = torch.randn(16, 64)
        s_magnorm(y0, torch.zeros_like(y0), MagNormSettings(norm="mean"), stats=stats)
    assert stats.as_dict()["s_std"] == 0.0


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="norm must be one of"):
        MagNormSettings(norm="median")
