"""The SECURA layer: ``ΔW = C (U + A B) R`` computed factorised, added through S-MagNorm (spec §2–§4)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .config import SecuraConfig
from .cur import brake_channel_count, important_output_channels, init_core_a
from .cur_layer import AdapterBuffers, CurLayer
from .magnorm import STATS_SIZE, combine_moments, gated_add
from .merges import MERGE_STRATEGIES, MergeIntoBase, MergeIntoCore


class SecuraLayer(CurLayer):
    """SECURA on one ``nn.Linear`` or transformers ``Conv1D``; one entry per adapter name in every container.

    Trained: ``secura_A`` (frozen when ``merge_every`` is 1: B is zero at every forward, so A gets no gradient),
    ``secura_B``, ``secura_bias``. Saved besides: ``secura_rows``/``secura_cols`` and ``secura_U`` (the merged
    core: U_L for M2, the core folded into the base weight for M1), always fp32 (fp64 on an fp64 base). Rebuilt,
    never saved: C, R, ``secura_brake`` (the h most important output channels), M1's ``secura_applied`` and
    ``secura_residual``, and ``secura_stats`` (S statistics of the training tokens, see
    :func:`secura.magnorm_token_mask`).

    M1 merges live in the base weight itself: disabling, deleting or unloading an M1 adapter removes only its live
    part (A·B, b_Δ).
    """

    prefix = "secura_"
    adapter_layer_names = ("secura_A", "secura_B", "secura_bias")
    other_param_names = (
        "secura_rows",
        "secura_cols",
        "secura_C",
        "secura_R",
        "secura_built",
        "secura_U",
        "secura_brake",
        "secura_applied",
        "secura_residual",
        "secura_stats",
        "secura_config",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SecuraConfig, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.secura_A = nn.ParameterDict({})
        self.secura_B = nn.ParameterDict({})
        self.secura_bias = nn.ParameterDict({})
        self.secura_U = AdapterBuffers(persistent=True)
        self.secura_brake = AdapterBuffers(persistent=False)
        self.secura_applied = AdapterBuffers(persistent=False)
        self.secura_residual = AdapterBuffers(persistent=False)
        self.secura_stats = AdapterBuffers(persistent=False)
        self.secura_config: dict[str, SecuraConfig] = {}
        self.token_mask: Optional[torch.Tensor] = None  # set by secura.magnorm_token_mask around training forwards
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed=seed)

    def merge_strategy(self, adapter_name: str) -> MergeIntoCore | MergeIntoBase:
        return MERGE_STRATEGIES[self.secura_config[adapter_name].merge_strategy]

    # ----------------------------------------------------------------------------------------------- creation

    def create_core(self, adapter_name: str, config: SecuraConfig, k: int, seed: int) -> None:
        """A from the SVD of the intersection block, B = 0, U = 0, b_Δ = 0."""
        weight = self.weight_out_in()
        device = weight.device
        self.secura_config[adapter_name] = config
        rows, cols = self.cur_rows[adapter_name], self.cur_cols[adapter_name]
        self.secura_A[adapter_name] = nn.Parameter(init_core_a(weight, rows, cols, config.r, seed))
        self.secura_B[adapter_name] = nn.Parameter(torch.zeros(config.r, k, device=device))
        if config.delta_bias:
            self.secura_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        core_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.secura_U[adapter_name] = torch.zeros(k, k, device=device, dtype=core_dtype)
        self.secura_stats[adapter_name] = torch.zeros(STATS_SIZE, device=device, dtype=torch.float64)
        self.merge_strategy(adapter_name).create(self, adapter_name)

    @torch.no_grad()
    def build_frozen(self, adapter_name: str) -> None:
        """C and R, and the brake's mask of the h most important output channels."""
        super().build_frozen(adapter_name)
        weight = self.weight_out_in()
        h = brake_channel_count(self.out_features, self.cur_rows[adapter_name].numel())
        mask = torch.zeros(self.out_features, dtype=torch.bool, device=weight.device)
        mask[important_output_channels(weight, h)] = True
        self.secura_brake[adapter_name] = mask

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_a_without_gradient()

    def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_a_without_gradient()

    def _freeze_a_without_gradient(self) -> None:
        """With ``merge_every = 1`` B is zero at every forward, so A's gradient is exactly zero: keep it out of the
        optimiser (no Adam state, no weight decay shrinking it). U then grows inside the column space of A."""
        for name, a in self.secura_A.items():
            if self.secura_config[name].merge_every == 1:
                a.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ forward

    def core(self, adapter_name: str) -> torch.Tensor:
        return self.merge_strategy(adapter_name).unmerged_core(self, adapter_name)

    def delta_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        return self.secura_bias[adapter_name] if adapter_name in self.secura_bias else None

    def add_adapter_output(self, adapter_name: str, x: torch.Tensor, base: torch.Tensor,
                           result: torch.Tensor) -> torch.Tensor:
        """``result + ΔY/S`` against the strategy's ``Y0`` (§4); M1's b_Δ joins the frozen side."""
        strategy = self.merge_strategy(adapter_name)
        dy = strategy.delta_output(self, adapter_name, x)
        y0, acc = base, result
        bias = self.delta_bias(adapter_name)
        if bias is not None and strategy.bias_in_base:
            y0 = base + bias.to(base.dtype)
            acc = y0 if result is base else result + bias.to(result.dtype)
        elif bias is not None:
            dy = dy + bias.to(dy.dtype)
        out, stats = gated_add(acc, y0, dy, self.secura_config[adapter_name],
                               brake_channels=self.secura_brake[adapter_name], token_mask=self._stats_mask(x))
        if stats is not None:
            acc_stats = self.secura_stats[adapter_name]
            acc_stats.copy_(combine_moments(acc_stats, stats.to(acc_stats.device)))
        return out

    def _stats_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The training-token mask for this input, or None outside :func:`secura.magnorm_token_mask`."""
        mask = self.token_mask
        if mask is None:
            return None
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"secura.magnorm_token_mask: the mask has shape {tuple(mask.shape)} but this SECURA layer sees "
                f"tokens of shape {tuple(x.shape[:-1])}; pass the attention mask of the batch being trained on."
            )
        return mask

    # ---------------------------------------------------------------------------------------- merges (§4)

    @torch.no_grad()
    def fold_live_update(self, adapter_names: Optional[list[str]] = None, optimizer: Any = None) -> None:
        """Fold the live A·B into the merged core (M2: U; M1: U and the base weight) and zero B in place.

        B's optimiser state is dropped only when the config asks for it (then ``optimizer`` is required).
        """
        for name in self.active_adapters if adapter_names is None else adapter_names:
            if name not in self.secura_A:
                continue
            if name in self.merged_adapters:
                raise RuntimeError(f"Adapter '{name}' is merged into the base (peft merge); unmerge it first.")
            u, a, b = self.secura_U[name], self.secura_A[name], self.secura_B[name]
            if hasattr(a, "full_tensor"):  # FSDP2 shards a frozen A (only trained weights stay whole): gather it
                a = a.full_tensor()
            ab = a.to(u.dtype) @ b.to(u.dtype)
            self.merge_strategy(name).fold(self, name, ab)
            b.zero_()
            if self.secura_config[name].reset_b_optimizer_state:
                if optimizer is None:
                    raise ValueError(
                        f"SecuraConfig.reset_b_optimizer_state is set for adapter '{name}': pass the optimizer "
                        "to the merge call (merge_step / end_task)."
                    )
                optimizer.state.pop(b, None)

    def check_rebuild(self, adapter_name: str, base_weight_loaded: bool) -> None:
        if isinstance(self.merge_strategy(adapter_name), MergeIntoBase) and (
            (base_weight_loaded and bool(self.secura_U[adapter_name].any()))
            or bool(self.secura_applied[adapter_name].any())
        ):
            raise RuntimeError(
                f"Cannot rebuild C and R of M1 adapter '{adapter_name}' from a base weight that already holds its "
                "merges; load the adapter onto a fresh copy of the original base model."
            )

    def after_load(self, adapter_name: str, base_weight_loaded: bool) -> None:
        self.merge_strategy(adapter_name).after_load(self, adapter_name, base_weight_loaded)

    def check_mergeable(self, adapter_name: str) -> None:
        """peft's merge drops S-MagNorm, so it is exact only when the norm is off or gates nothing."""
        config = self.secura_config[adapter_name]
        if config.magnorm == "off" or config.approximate_merge:
            return
        strategy = self.merge_strategy(adapter_name)
        gated = bool(self.core(adapter_name).any())
        bias = self.delta_bias(adapter_name)
        if bias is not None and not strategy.bias_in_base:
            gated = gated or bool(bias.any())
        if gated:
            raise ValueError(
                f"Cannot merge SECURA adapter '{adapter_name}' exactly: S-MagNorm is on and gates "
                f"{strategy.gated_part}, so the adapted layer is not W + ΔW. Keep the adapter live, or set "
                "approximate_merge=True in its config to fold it with the norm dropped (S = 1)."
            )

    def __repr__(self) -> str:
        return "secura." + super().__repr__()
