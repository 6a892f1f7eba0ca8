"""CUR selection with inverted importance, shared by SECURA and the CUR-LoRA baseline.

All functions take the weight in ``out × in`` layout and work on the weight's own
device, so selecting and initialising a layer never round-trips through the host.
"""

from __future__ import annotations

import zlib

import torch

DEFAULT_EPS = 1e-12
"""Norms are clamped by this before inversion, so zero rows/columns cannot give inf/NaN."""

EXTRA_COLUMN_NORM = 1e-2
"""Expected norm of the random columns of A beyond k (r > k): small, but never zero."""


def layer_seed(seed: int, module_key: str) -> int:
    """A per-layer seed that is stable across processes (crc32, not Python's salted ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(module_key.encode())) % (2**63)


def resolve_rank(k: int, out_features: int, in_features: int, *, clamp: bool = False) -> int:
    """Return the usable CUR rank, or raise a clear error when ``k`` cannot be selected."""
    limit = min(out_features, in_features)
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}.")
    if k > limit:
        if clamp:
            return limit
        raise ValueError(
            f"k={k} exceeds min(out, in) = min({out_features}, {in_features}) = {limit} for this layer; "
            f"lower k or set clamp_rank=True to clamp it to {limit}."
        )
    return k


def inverted_probabilities(norms: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``p = (1/‖·‖) / Σ (1/‖·‖)``: the least important rows/columns get the highest probability."""
    inv = norms.float().clamp_min(eps).reciprocal()
    return inv / inv.sum()


def _pick(p: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Top-k of ``p`` (ties by lower index) or, with a generator, k draws without replacement."""
    if generator is None:
        order = torch.sort(p, descending=True, stable=True).indices
        chosen = order[:k]
    else:
        chosen = torch.multinomial(p, k, replacement=False, generator=generator)
    return torch.sort(chosen).values


def select_cur_indices(
    weight: torch.Tensor,
    k: int,
    *,
    sample: bool = False,
    seed: int = 0,
    clamp: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``k`` rows and ``k`` columns of ``weight`` (out × in) by inverted norm.

    Returns ``(rows, cols)`` as sorted LongTensors on the weight's device. Deterministic top-k by default; with
    ``sample=True`` draws without replacement from the inverted probabilities with a generator seeded by ``seed``
    (rows first, then columns, from the same generator).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out × in), got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    k = resolve_rank(k, out_features, in_features, clamp=clamp)
    with torch.no_grad():
        w = weight.detach().float()
        p_rows = inverted_probabilities(torch.linalg.vector_norm(w, dim=1), eps)
        p_cols = inverted_probabilities(torch.linalg.vector_norm(w, dim=0), eps)
        generator = None
        if sample:
            generator = torch.Generator(device=weight.device)
            generator.manual_seed(seed)
        rows = _pick(p_rows, k, generator)
        cols = _pick(p_cols, k, generator)
    return rows, cols


def important_output_channels(weight: torch.Tensor, h: int) -> torch.Tensor:
    """Indices (sorted) of the ``h`` output channels with the largest row norms; ties go to the lower index."""
    if not 0 <= h <= weight.shape[0]:
        raise ValueError(f"h must be in [0, {weight.shape[0]}], got {h}.")
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight.detach().float(), dim=1)
        order = torch.sort(norms, descending=True, stable=True).indices
    return torch.sort(order[:h]).values


def brake_channel_count(out_features: int, k: int) -> int:
    """``h = max((out − k)//2, out//4)``: how many important channels the retention brake damps."""
    return max((out_features - k) // 2, out_features // 4)


def init_core_a(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, r: int, seed: int = 0) -> torch.Tensor:
    """Initial ``A`` (k × r, float32) from the SVD of the intersection block ``M = W[rows][:, cols]``.

    ``A = U_M[:, :r] · diag(√σ_r)``, rescaled so its singular values have RMS 1 (an O(1) operator, like an
    orthonormal basis, whatever the weight's scale). Columns beyond ``k`` (when ``r > k``) are small seeded random
    values: a zero column would never receive a gradient.
    """
    k = rows.numel()
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}.")
    with torch.no_grad():
        block = weight.detach()[rows][:, cols].float()
        u, sigma, _ = torch.linalg.svd(block, full_matrices=False)
        r_svd = min(r, k)
        a = u[:, :r_svd] * sigma[:r_svd].sqrt()
        norm = torch.linalg.matrix_norm(a)
        # an all-zero block falls back to the plain singular vectors (selected without a host sync)
        a = torch.where(norm > 0, a * (r_svd**0.5 / norm.clamp_min(DEFAULT_EPS)), u[:, :r_svd])
        if r > k:
            generator = torch.Generator(device=weight.device)
            generator.manual_seed(seed)
            extra = torch.randn(k, r - k, generator=generator, device=weight.device, dtype=torch.float32)
            a = torch.cat([a, extra * (EXTRA_COLUMN_NORM / k**0.5)], dim=1)
    return a.contiguous()  # collectives (DDP/FSDP broadcasts) need contiguous storage
