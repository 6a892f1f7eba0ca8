"""S-MagNorm: how SECURA adds its adapter output ΔY to the frozen output Y0 (spec §3), as one fused op.

Every mode computes a divisor S from ``(Y0, ΔY)`` and returns ``acc + ΔY / S``; ``acc`` is the layer output so
far (``Y0`` itself for one adapter), so the increment is added in the same pass that divides by S. Modes
(``SecuraConfig.magnorm_norm``; the math is in docs/secura-method.md §3):

* ``mean``, ``rank``, ``max``: ``S = 2 − σ(s·(L̂ − c))`` with ``L = |ΔY|/(|Y0|+eps)`` normalised per token
  (scale-invariant: ``S(c·ΔY) = S(ΔY)``);
* ``reference``: ``S = 2 − σ(s·L)`` on the raw ``L`` (what the paper's reference code computes);
* ``absolute``: ``S = 1 + (S_max − 1)·σ(s·(L/τ − 1))``, ``L = |ΔY|/(|Y0| + eps·rms(Y0))``;
* ``trust``: per token ``ΔY' = ΔY·τ·tanh(r/τ)/r``, ``r = ‖ΔY‖/(‖Y0‖+eps)``, so ``‖ΔY'‖ ≤ τ(‖Y0‖+eps)``.

Gradients: in every mode but ``trust`` S is a constant of the backward (``∂Y/∂ΔY = 1/S``, ``∂Y/∂Y0 = 1``);
``trust`` is differentiated exactly, through ‖ΔY‖ and ‖Y0‖ too, so growth along a saturated direction stops
receiving gradient. The retention brake multiplies ``ΔY/S`` by ``d`` on the important output channels of a token
whose share of large changes exceeds ρ (not used by ``trust``).

Every reduction runs over the last dimension, so a token's output never depends on other tokens. The forward
works in one buffer, in place (eight elementwise passes and one row reduction for ``mean``, the increment added
by the last one), saves only what the backward needs (S; ``trust``: ΔY, Y0 and per-token scalars) and changes
no Python state, so ``torch.compile`` can trace and fuse it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SecuraConfig

HIGH_S = 1.8
"""Statistics report the fraction of elements with ``S ≥ HIGH_S`` (change damped towards half or more)."""

STATS_SIZE = 7
"""A statistics accumulator: ``[elements, mean S, Σ(S − mean)², #(S ≤ m), #(S ≥ 1.8), tokens, tokens braked]``."""


# ----------------------------------------------------------------------------------------------------- S


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64: the precision S is computed in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _relative_magnitude(y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig, out: torch.Tensor) -> torch.Tensor:
    """``L = |ΔY| / (|Y0| + eps)`` into ``out`` (``absolute``: eps relative to the token's RMS of Y0)."""
    if y0.dtype == out.dtype:
        torch.abs(y0, out=out)
    else:
        out.copy_(y0).abs_()
    if config.magnorm_norm == "absolute":
        rms = torch.linalg.vector_norm(out, dim=-1, keepdim=True).mul_(config.magnorm_eps / math.sqrt(out.shape[-1]))
        out.add_(rms.add_(torch.finfo(out.dtype).tiny))
    else:
        out.add_(config.magnorm_eps)
    return torch.div(dy, out, out=out).abs_()


def _sigmoid_argument_(rel: torch.Tensor, config: SecuraConfig) -> torch.Tensor:
    """In place: the t with ``S = 1 + σ(t)`` (sigmoid gates) or ``S = 1 + (S_max − 1)σ(t)`` (absolute)."""
    s, mode = config.sigmoid_scale, config.magnorm_norm
    if mode in ("mean", "max"):  # 2 − σ(s(L/mean − 1)) = 1 + σ(s − s·L/mean); max: centre ½
        finfo = torch.finfo(rel.dtype)
        scale = rel.mean(dim=-1, keepdim=True) if mode == "mean" else rel.amax(dim=-1, keepdim=True)
        coefficient = scale.clamp_min_(finfo.tiny).reciprocal_().mul_(-s).clamp_min_(-finfo.max)  # ΔY = 0: finite
        return torch.addcmul(rel.new_tensor(s if mode == "mean" else s / 2), rel, coefficient, out=rel)
    if mode == "rank":
        n = rel.shape[-1]
        order = torch.sort(rel, dim=-1, stable=True).indices  # ties ranked by channel index
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rel.device).expand_as(order))
        return rel.copy_(ranks).mul_(-s / max(n - 1, 1)).add_(s / 2)
    if mode == "reference":
        return rel.mul_(-s)
    if mode == "absolute":
        return torch.add(rel.new_tensor(-s), rel, alpha=s / config.magnorm_tau, out=rel)
    raise ValueError(f"unknown S-MagNorm mode {mode!r}")


def _scale_(rel: torch.Tensor, config: SecuraConfig) -> torch.Tensor:
    """In place: S from L."""
    s = _sigmoid_argument_(rel, config).sigmoid_()
    if config.magnorm_norm == "absolute":
        s.mul_(config.magnorm_s_max - 1.0)
    return s.add_(1.0)


def brake_can_fire(config: SecuraConfig, width: int) -> bool:
    """False when the brake provably never fires for tokens of ``width`` channels (then it is not evaluated).

    Under ``mean`` at most ``1/θ`` of a token's elements reach ``L̂ ≥ θ`` (Markov; ``L̂`` has mean 1); under
    ``max`` ``L̂ ≤ 1``; under ``rank`` the share above any θ is fixed by ``width``. ``m ≥ 2`` or ``m ≤ 1`` and
    the data-dependent modes are always evaluated.
    """
    mode, m, rho = config.magnorm_norm, config.brake_threshold, config.brake_ratio
    if config.magnorm == "off" or mode == "trust" or config.brake_decay == 1.0:
        return False
    if mode not in ("mean", "max", "rank") or not 1.0 < m < 2.0:
        return True
    logit = math.log((m - 1.0) / (2.0 - m))
    centre = 1.0 if mode == "mean" else 0.5
    theta = centre - logit / config.sigmoid_scale  # S ≤ m ⇔ L̂ ≥ θ
    margin = 1e-6
    if mode == "mean":
        return not (theta > 0 and 1.0 / theta < rho - margin)
    if mode == "max":
        return theta <= 1.0 + margin
    reachable = width - math.ceil(theta * (width - 1)) + 1  # ranks i/(width−1) ≥ θ, plus one for rounding
    return reachable > rho * width


def _divisor(
    y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig, brake: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """S with the brake folded in (the increment is ΔY/S), in the work dtype; and the statistics if weighted."""
    rel = _relative_magnitude(y0, dy, config, torch.empty(dy.shape, dtype=_work_dtype(y0, dy), device=dy.device))
    large = None
    if brake is not None and config.magnorm_norm == "absolute":
        large = (rel > config.magnorm_tau).sum(dim=-1, keepdim=True)
    s = _scale_(rel, config)
    if brake is not None and config.magnorm_norm != "absolute":
        large = (s <= config.brake_threshold).sum(dim=-1, keepdim=True)
    fired = None if large is None else large > config.brake_ratio * s.shape[-1]
    stats = None if weights is None else _elementwise_stats(s, weights, fired, config.brake_threshold)
    if fired is not None:
        s.div_(torch.where(fired & brake, config.brake_decay, 1.0))
    return s, stats


class _GatedAdd(torch.autograd.Function):
    """``acc + ΔY / S(Y0, ΔY)`` with S a constant of the backward: saves only S (in ΔY's dtype)."""

    @staticmethod
    def forward(ctx, acc, y0, dy, config, brake, weights):  # noqa: D102 - see the class
        s, stats = _divisor(y0, dy, config, brake, weights)
        out = torch.addcdiv(acc, dy, s, out=torch.empty_like(acc))
        ctx.save_for_backward(s.to(dy.dtype))
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):  # noqa: D102
        (s,) = ctx.saved_tensors
        grad_dy = torch.div(grad_out, s).to(s.dtype) if ctx.needs_input_grad[2] else None
        return grad_out, None, grad_dy, None, None, None


# ------------------------------------------------------------------------------------------------ trust region


def _chi(u: torch.Tensor) -> torch.Tensor:
    """``χ(u) = φ'(u)/u = (u·sech²u − tanh u)/u³`` for ``φ(u) = tanh(u)/u``; a series near 0 (float64)."""
    small = u < 1e-3
    safe = torch.where(small, torch.ones_like(u), u)
    exact = (safe / torch.cosh(safe).square() - torch.tanh(safe)) / safe.pow(3)
    series = -2.0 / 3.0 + 8.0 / 15.0 * u.square()
    return torch.where(small, series, exact)


def _trust_factors(y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig) -> tuple[torch.Tensor, ...]:
    """Per token (float64): ``u = r/τ``, ``φ = tanh(u)/u``, ``D = ‖Y0‖ + eps``, ``‖Y0‖``."""
    work = _work_dtype(y0, dy)
    norm_dy = torch.linalg.vector_norm(dy, dim=-1, dtype=work).double()
    norm_y0 = torch.linalg.vector_norm(y0, dim=-1, dtype=work).double()
    denominator = norm_y0 + config.magnorm_eps
    u = norm_dy / denominator / config.magnorm_tau
    phi = torch.where(u > 0, torch.tanh(u) / torch.where(u > 0, u, torch.ones_like(u)), torch.ones_like(u))
    return u, phi, denominator, norm_y0


class _TrustAdd(torch.autograd.Function):
    """``acc + φ(r)·ΔY`` per token, differentiated exactly (through ΔY and Y0)."""

    @staticmethod
    def forward(ctx, acc, y0, dy, config, weights):  # noqa: D102
        u, phi, denominator, norm_y0 = _trust_factors(y0, dy, config)
        out = torch.addcmul(acc, phi.to(_work_dtype(y0, dy)).unsqueeze(-1), dy, out=torch.empty_like(acc))
        stats = None
        if weights is not None:
            stats = _token_stats(phi.reciprocal(), weights, dy.shape[-1], config.brake_threshold)
        ctx.save_for_backward(y0 if ctx.needs_input_grad[1] else None, dy, u, phi, denominator, norm_y0)
        ctx.tau = config.magnorm_tau
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):  # noqa: D102
        y0, dy, u, phi, denominator, norm_y0 = ctx.saved_tensors
        work = _work_dtype(dy, grad_out)
        # a = ⟨ΔY, G⟩ per token; ∂r/∂ΔY = ΔY/(‖ΔY‖·D), ∂r/∂Y0 = −‖ΔY‖/D² · Y0/‖Y0‖, dφ/dr = φ'(u)/τ
        inner = torch.linalg.vecdot(dy.to(work), grad_out.to(work), dim=-1).double()
        coupling = inner * _chi(u)
        grad_dy = grad_y0 = None
        if ctx.needs_input_grad[2]:
            coefficient = coupling / (ctx.tau**2 * denominator.square())  # φ'(u)/(τ² u D²) · a
            grad_dy = torch.addcmul(grad_out * phi.to(grad_out.dtype).unsqueeze(-1),
                                    coefficient.to(dy.dtype).unsqueeze(-1), dy).to(dy.dtype)
        if ctx.needs_input_grad[1]:
            safe = torch.where(norm_y0 > 0, norm_y0, torch.ones_like(norm_y0))
            coefficient = torch.where(norm_y0 > 0, coupling * u.square() / (denominator * safe), 0.0)
            grad_y0 = y0 * (-coefficient).to(y0.dtype).unsqueeze(-1)  # Y0's own path is acc's gradient
        return grad_out, grad_y0, grad_dy, None, None


# -------------------------------------------------------------------------------------------------- public ops


def gated_add(
    acc: torch.Tensor,
    y0: torch.Tensor,
    dy: torch.Tensor,
    config: SecuraConfig,
    *,
    brake_channels: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``acc + ΔY/S`` in ``acc``'s dtype, with S from ``(Y0, ΔY)`` by ``config``'s mode; and S statistics.

    ``brake_channels``: bool mask over the output channels the retention brake may damp (None: no brake).
    ``token_mask``: bool, one entry per token (``dy.shape[:-1]``); when given, the statistics of S over the
    tokens it selects come back as a :data:`STATS_SIZE` float64 vector (else None).
    """
    shape, width = acc.shape, dy.shape[-1]
    weights = None
    if token_mask is not None:
        weights = token_mask.reshape(-1).to(torch.float64)
    if config.magnorm == "off":
        return acc + dy.to(acc.dtype), None
    acc2, y02, dy2 = acc.reshape(-1, width), y0.reshape(-1, width), dy.reshape(-1, width)
    if config.magnorm_norm == "trust":
        out, stats = _TrustAdd.apply(acc2, y02, dy2, config, weights)
    else:
        brake = brake_channels if brake_channels is not None and brake_can_fire(config, width) else None
        out, stats = _GatedAdd.apply(acc2, y02, dy2, config, brake, weights)
    return out.reshape(shape), stats


def s_magnorm(
    y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig, *, brake_channels: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``Y = Y0 + ΔY / S`` (see :func:`gated_add`); ``magnorm="off"`` gives ``Y0 + ΔY``."""
    return gated_add(y0, y0, dy, config, brake_channels=brake_channels)[0]


@torch.no_grad()
def magnitude_scale(y0: torch.Tensor, dy: torch.Tensor, config: SecuraConfig) -> torch.Tensor:
    """S before the brake, in the work dtype (for inspection and tests)."""
    if config.magnorm_norm == "trust":
        _, phi, _, _ = _trust_factors(y0, dy, config)
        return phi.reciprocal().to(_work_dtype(y0, dy)).unsqueeze(-1).expand(dy.shape)
    rel = torch.empty(torch.broadcast_shapes(y0.shape, dy.shape), dtype=_work_dtype(y0, dy), device=dy.device)
    return _scale_(_relative_magnitude(y0, dy, config, rel), config)


# ----------------------------------------------------------------------------------------------- statistics


def _elementwise_stats(
    s: torch.Tensor, weights: torch.Tensor, fired: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    """Statistics of S over the rows with weight 1 (per-row moments combined in float64; no host sync)."""
    f64 = torch.float64
    width = s.shape[-1]
    var, mean_rows = (t.to(f64) for t in torch.var_mean(s, dim=-1, correction=0))
    tokens = weights.sum()
    mean = (mean_rows * weights).sum() / tokens.clamp_min(1.0)
    m2 = width * ((var + (mean_rows - mean).square()) * weights).sum()
    low = ((s <= threshold).sum(dim=-1).to(f64) * weights).sum()
    high = ((s >= HIGH_S).sum(dim=-1).to(f64) * weights).sum()
    braked = (fired.reshape(-1).to(f64) * weights).sum() if fired is not None else torch.zeros_like(tokens)
    return torch.stack([tokens * width, mean, m2, low, high, tokens, braked])


def _token_stats(s: torch.Tensor, weights: torch.Tensor, width: int, threshold: float) -> torch.Tensor:
    """Statistics of a per-token S (``trust``), counted once per channel like the elementwise modes."""
    tokens = weights.sum()
    mean = (s * weights).sum() / tokens.clamp_min(1.0)
    m2 = width * ((s - mean).square() * weights).sum()
    low = width * ((s <= threshold).double() * weights).sum()
    high = width * ((s >= HIGH_S).double() * weights).sum()
    return torch.stack([tokens * width, mean, m2, low, high, tokens, torch.zeros_like(tokens)])


def combine_moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two statistics accumulators (Chan et al.'s parallel variance update); empty ones are neutral."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    share = b[0] / n.clamp_min(1.0)
    mean = a[1] + delta * share
    m2 = a[2] + b[2] + delta.square() * a[0] * share
    return torch.cat([torch.stack([n, mean, m2]), a[3:] + b[3:]])


def summarise_stats(acc: Optional[torch.Tensor]) -> dict[str, float]:
    """``s_mean``, ``s_std``, ``frac_le_m``, ``frac_ge_1_8``, ``brake_rate``, ``elements``, ``tokens``."""
    if acc is None or acc[0] == 0:
        nan = float("nan")
        return {"s_mean": nan, "s_std": nan, "frac_le_m": nan, "frac_ge_1_8": nan, "brake_rate": nan,
                "elements": 0, "tokens": 0}
    n, mean, m2, low, high, tokens, fired = acc.tolist()
    return {
        "s_mean": mean,
        "s_std": (m2 / n) ** 0.5,
        "frac_le_m": low / n,
        "frac_ge_1_8": high / n,
        "brake_rate": fired / tokens,
        "elements": int(n),
        "tokens": int(tokens),
    }
