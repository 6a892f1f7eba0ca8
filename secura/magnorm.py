"""S-MagNorm: the sigmoid-based magnitude norm of SECURA, with its retention brake (spec §3).

``Y = Y0 + ΔY / S`` with ``S = 2 − σ(s · (L̂ − c))`` computed per token from the relative magnitude
``L = |ΔY| / (|Y0| + eps)``. ``S`` is detached, every reduction runs over the last dimension only, so a token's
output never depends on other tokens or samples in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Normalisation = Literal["mean", "rank", "max", "off"]
NORMALISATIONS: tuple[str, ...] = ("mean", "rank", "max", "off")
HIGH_S = 1.8
"""Statistics report the fraction of elements with ``S ≥ HIGH_S`` (change damped towards half)."""


@dataclass(frozen=True)
class MagNormSettings:
    """Knobs of S-MagNorm for one adapter; ``norm="off"`` gives ``Y = Y0 + ΔY`` (the CABR-only ablation)."""

    norm: Normalisation = "mean"
    sigmoid_scale: float = 6.0
    threshold: float = 1.2
    ratio: float = 0.9
    decay: float = 0.99
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.norm not in NORMALISATIONS:
            raise ValueError(f"norm must be one of {NORMALISATIONS}, got {self.norm!r}.")


def combine_moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two stats accumulators ``[n, mean, M2, counts...]`` (Chan et al.'s parallel variance update)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    m2 = a[2] + b[2] + delta.square() * a[0] * b[0] / n
    return torch.cat([torch.stack([n, mean, m2]), a[3:] + b[3:]])


class MagNormStats:
    """Running statistics of ``S`` kept on the device: recording never synchronises with the host.

    The accumulator holds ``[elements, mean S, M2 = Σ(S − mean)², #(S ≤ m), #(S ≥ 1.8), tokens, tokens braked]``
    in float64; mean and M2 are merged with Chan's update, so a constant S reads as std 0, not rounding noise.
    """

    def __init__(self) -> None:
        self.enabled = True
        self._acc: torch.Tensor | None = None

    def reset(self) -> None:
        self._acc = None

    @torch.no_grad()
    def update(self, s: torch.Tensor, low: torch.Tensor, fired: torch.Tensor | None) -> None:
        """Add one forward's ``S`` (fp32), its ``S ≤ m`` mask and the per-token brake decisions."""
        if s.numel() == 0:
            return
        f64 = torch.float64
        mean = s.mean(dtype=f64)
        step = torch.stack(
            [
                s.new_full((), s.numel(), dtype=f64),
                mean,
                (s - mean.to(s.dtype)).square().sum(dtype=f64),
                low.sum().to(f64),
                (s >= HIGH_S).sum().to(f64),
                s.new_full((), s.numel() // max(s.shape[-1], 1), dtype=f64),
                fired.sum().to(f64) if fired is not None else s.new_zeros((), dtype=f64),
            ]
        )
        self._acc = step if self._acc is None else combine_moments(self._acc, step.to(self._acc.device))

    def totals(self) -> torch.Tensor | None:
        """The raw accumulator (float64, on the device), for aggregation with :func:`combine_moments`."""
        return self._acc

    @staticmethod
    def summarise(acc: torch.Tensor | None) -> dict[str, float]:
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

    def as_dict(self) -> dict[str, float]:
        return self.summarise(self._acc)


def normalise_(rel: torch.Tensor, norm: Normalisation) -> tuple[torch.Tensor, float]:
    """Per-token normalisation of the relative magnitude ``L`` (in place where possible); returns ``(L̂, c)``."""
    tiny = torch.finfo(rel.dtype).tiny
    if norm == "mean":
        return rel.div_(rel.mean(dim=-1, keepdim=True).clamp_min(tiny)), 1.0
    if norm == "max":
        return rel.div_(rel.amax(dim=-1, keepdim=True).clamp_min(tiny)), 0.5
    if norm == "rank":
        n = rel.shape[-1]
        order = torch.sort(rel, dim=-1, stable=True).indices  # ties ranked by channel index
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rel.device).expand_as(order))
        return ranks.to(rel.dtype).div_(max(n - 1, 1)), 0.5
    raise ValueError(f"unknown normalisation {norm!r}")


@torch.no_grad()
def magnitude_scale(y0: torch.Tensor, dy: torch.Tensor, settings: MagNormSettings) -> torch.Tensor:
    """``S = 2 − σ(s · (L̂ − c))``, detached, in float32 (float64 for float64 inputs); ``S ∈ [1, 2]``."""
    work = torch.promote_types(torch.promote_types(dy.dtype, y0.dtype), torch.float32)
    rel = dy.detach().abs().to(work)  # fresh buffers from here on, so the ops below run in place
    rel.div_(y0.detach().abs().to(work).add_(settings.eps))
    rel_hat, centre = normalise_(rel, settings.norm)
    return rel_hat.sub_(centre).mul_(-settings.sigmoid_scale).sigmoid_().add_(1.0)  # 2 − σ(t) = 1 + σ(−t)


def scaled_delta(
    y0: torch.Tensor,
    dy: torch.Tensor,
    settings: MagNormSettings,
    *,
    brake_channels: torch.Tensor | None = None,
    stats: MagNormStats | None = None,
) -> torch.Tensor:
    """The increment ``ΔY' / S`` (in ``y0``'s dtype), where ``ΔY'`` is ``ΔY`` after the retention brake.

    ``brake_channels`` is a bool mask over the output channels (the ``h`` most important ones). A token whose
    fraction of elements with ``S ≤ m`` exceeds ``ρ`` gets ``ΔY`` on those channels multiplied by ``d``. The
    gradient flows through ``ΔY`` only; ``ΔY = 0`` gives exactly zero.
    """
    if settings.norm == "off":
        return dy.to(y0.dtype)
    s = magnitude_scale(y0, dy, settings)
    with torch.no_grad():
        low = s <= settings.threshold
        fired = None
        if brake_channels is not None and settings.decay != 1.0:
            fired = low.sum(dim=-1, keepdim=True) > settings.ratio * s.shape[-1]
        if stats is not None and stats.enabled:
            stats.update(s, low, fired)
        gain = s.reciprocal_()  # 1/S, folded with the brake so ΔY is multiplied (and saved) once
        if fired is not None:
            gain.mul_(torch.where(fired & brake_channels, settings.decay, 1.0))
    return (dy * gain.to(dy.dtype)).to(y0.dtype)


def s_magnorm(
    y0: torch.Tensor,
    dy: torch.Tensor,
    settings: MagNormSettings,
    *,
    brake_channels: torch.Tensor | None = None,
    stats: MagNormStats | None = None,
) -> torch.Tensor:
    """``Y = Y0 + ΔY' / S`` (see :func:`scaled_delta`); ``norm="off"`` gives ``Y0 + ΔY``."""
    return y0 + scaled_delta(y0, dy, settings, brake_channels=brake_channels, stats=stats)
