"""SECURA tuner layer: ``ΔW = C (U + A B) R`` computed factorised, gated by S-MagNorm (spec §2–§4)."""

from __future__ import annotations

import warnings
from collections.abc import KeysView
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SecuraConfig
from .cur import brake_channel_count, important_output_channels, init_core_a, resolve_rank, select_cur_indices
from .magnorm import MagNormSettings, MagNormStats, scaled_delta


class FrozenBuffers(nn.Module):
    """Adapter-keyed, non-persistent buffers (C, R, masks) that follow ``.to()`` but are never saved.

    Deliberately not a ``BufferDict``: peft's ``autocast_adapter_dtype`` upcasts BufferDict entries to fp32, while C
    and R must stay in the base dtype (they are copies of the base weight and as large as a rank-k LoRA).
    """

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def keys(self) -> KeysView[str]:
        return self._buffers.keys()


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D stores its weight as (in, out)
        return in_features, out_features, True
    raise TypeError(f"Unsupported layer type {type(layer).__name__}: only nn.Linear and transformers Conv1D.")


def init_tuner_state(layer: BaseTunerLayer, base_layer: nn.Module, kwargs: dict[str, Any]) -> None:
    """What every CUR tuner layer (SECURA, CUR-LoRA) starts with: its base layer, peft's flags, its shape."""
    layer.base_layer = base_layer
    layer._disable_adapters = False
    layer.merged_adapters = []
    layer.kwargs = kwargs
    layer.in_features, layer.out_features, layer.fan_in_fan_out = linear_shape(layer.get_base_layer())


def weight_out_in(layer: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The layer's weight as an ``out × in`` view (no copy)."""
    weight = layer.weight
    return weight.T if fan_in_fan_out else weight


def cur_factors(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = W[:, cols]`` and ``R = W[rows, :]`` as detached copies in the weight's dtype and device."""
    with torch.no_grad():
        rows, cols = rows.to(weight.device), cols.to(weight.device)
        return weight[:, cols].detach().contiguous(), weight[rows, :].detach().contiguous()


def magnorm_settings(config: SecuraConfig) -> MagNormSettings:
    return MagNormSettings(
        norm=config.magnorm_norm if config.magnorm == "on" else "off",
        sigmoid_scale=config.sigmoid_scale,
        threshold=config.threshold,
        ratio=config.ratio,
        decay=config.decay,
        eps=config.magnorm_eps,
    )


def _before_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    module._base_in_load = f"{prefix}base_layer.weight" in state_dict


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.sync_after_load(base_weight_loaded=module._base_in_load)
    module._base_in_load = False


class SecuraLayer(BaseTunerLayer):
    """State and math of SECURA on one linear layer; one entry per adapter name in every container.

    Saved (persistent): ``secura_A``, ``secura_B``, ``secura_bias`` (trainable), ``secura_rows``/``secura_cols``
    (CUR indices) and ``secura_U`` (accumulated core: U_L for M2, the core folded into the base weight for M1).
    Rebuilt from the base weight, never saved: ``secura_C``, ``secura_R`` (base dtype), ``secura_brake`` (mask of
    the h most important output channels) and, for M1, ``secura_applied`` (the core currently folded into the base).

    M1 merges live in the base weight itself (``W = W0 + C U R``): disabling, deleting or unloading an M1 adapter
    removes only its live part (A·B, b_Δ). A saved M1 adapter re-applies ``C U R`` when loaded onto the original
    base; that one fold equals the many training-time folds up to the base dtype's rounding.
    """

    adapter_layer_names = ("secura_A", "secura_B", "secura_bias")
    other_param_names = (
        "secura_rows",
        "secura_cols",
        "secura_U",
        "secura_C",
        "secura_R",
        "secura_built",
        "secura_brake",
        "secura_applied",
        "secura_config",
        "secura_magnorm",
        "secura_stats",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        init_tuner_state(self, base_layer, kwargs)
        self.secura_A = nn.ParameterDict({})
        self.secura_B = nn.ParameterDict({})
        self.secura_bias = nn.ParameterDict({})
        self.secura_rows = BufferDict({}, persistent=True)
        self.secura_cols = BufferDict({}, persistent=True)
        self.secura_U = BufferDict({}, persistent=True)
        self.secura_C = FrozenBuffers()
        self.secura_R = FrozenBuffers()
        self.secura_built = FrozenBuffers()  # the indices C and R were built from
        self.secura_brake = FrozenBuffers()
        self.secura_applied = FrozenBuffers()
        self.secura_config: dict[str, SecuraConfig] = {}
        self.secura_magnorm: dict[str, MagNormSettings] = {}
        self.secura_stats: dict[str, MagNormStats] = {}

    # ----------------------------------------------------------------------------------------------- creation

    def update_layer(self, adapter_name: str, config: SecuraConfig, seed: int = 0) -> None:
        """Select C and R, initialise A from the SVD of the intersection block, B = 0, U = 0."""
        k = resolve_rank(config.k, self.out_features, self.in_features, clamp=config.clamp_rank)
        weight = self._weight()
        rows, cols = select_cur_indices(
            weight, k, sample=config.cur_selection == "sample", seed=seed, clamp=config.clamp_rank
        )
        self.secura_rows[adapter_name] = rows
        self.secura_cols[adapter_name] = cols
        self.secura_config[adapter_name] = config
        self.secura_magnorm[adapter_name] = magnorm_settings(config)
        self.secura_stats[adapter_name] = MagNormStats()
        self._build_frozen(adapter_name)
        self.secura_A[adapter_name] = nn.Parameter(init_core_a(weight, rows, cols, config.r, seed))
        self.secura_B[adapter_name] = nn.Parameter(torch.zeros(config.r, k, device=weight.device))
        self.secura_U[adapter_name] = torch.zeros(k, k, device=weight.device)
        if config.merge_strategy == "M1":
            self.secura_applied[adapter_name] = torch.zeros(k, k, device=weight.device)
        if config.delta_bias:
            self.secura_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, device=weight.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _weight(self) -> torch.Tensor:
        return weight_out_in(self.get_base_layer(), self.fan_in_fan_out)

    @torch.no_grad()
    def _build_frozen(self, adapter_name: str) -> None:
        """(Re)build C, R and the brake mask from the current base weight and the stored indices."""
        weight = self._weight()
        rows, cols = self.secura_rows[adapter_name], self.secura_cols[adapter_name]
        self.secura_C[adapter_name], self.secura_R[adapter_name] = cur_factors(weight, rows, cols)
        self.secura_built[adapter_name] = torch.stack([rows, cols]).to(weight.device)
        h = brake_channel_count(self.out_features, rows.numel())
        mask = torch.zeros(self.out_features, dtype=torch.bool, device=weight.device)
        mask[important_output_channels(weight, h)] = True
        self.secura_brake[adapter_name] = mask

    # ------------------------------------------------------------------------------------------------ the math

    def _is_m1(self, adapter_name: str) -> bool:
        return self.secura_config[adapter_name].merge_strategy == "M1"

    def _core(self, adapter_name: str) -> torch.Tensor:
        """The k × k core whose effect is *not* in the base weight: A B (M1) or U + A B (M2)."""
        ab = self.secura_A[adapter_name] @ self.secura_B[adapter_name]
        if self._is_m1(adapter_name):
            return ab
        return self.secura_U[adapter_name].to(ab.dtype) + ab

    def _delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ (U + A B)ᵀ Cᵀ`` right to left (U only for M2); never materialises ΔW.

        The k × k core is formed once per call (k²·r flops) when that is cheaper per token (k² instead of
        2·k·r [+ k²]); only M1 with r < k/2 applies ``Bᵀ`` and ``Aᵀ`` one after the other.
        """
        a, b = self.secura_A[adapter_name], self.secura_B[adapter_name]
        c, r = self.secura_C[adapter_name], self.secura_R[adapter_name]
        h = F.linear(self._cast_input_dtype(x, r.dtype), r).to(a.dtype)  # n × k
        if self._is_m1(adapter_name) and 2 * b.shape[0] < b.shape[1]:
            z = F.linear(F.linear(h, b), a)  # · Bᵀ (n × r) · Aᵀ (n × k)
        else:
            z = F.linear(h, self._core(adapter_name).to(h.dtype))  # · (U + A B)ᵀ (n × k)
        return F.linear(z.to(c.dtype), c)  # n × out

    def _increment(self, adapter_name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output: ``ΔY / S`` against the right ``Y0`` (§4), plus M1's b_Δ."""
        dy = self._delta_output(adapter_name, x)
        y0, frozen = base, None
        if adapter_name in self.secura_bias:
            bias = self.secura_bias[adapter_name]
            if self._is_m1(adapter_name):
                # M1: b_Δ is never reset, so it belongs to the current model; the norm gates only the live A·B
                frozen = bias.to(base.dtype)
                y0 = base + frozen
            else:
                dy = dy + bias.to(dy.dtype)  # M2: b_Δ is part of the total drift the norm damps
        increment = scaled_delta(
            y0, dy, self.secura_magnorm[adapter_name],
            brake_channels=self.secura_brake[adapter_name], stats=self.secura_stats[adapter_name],
        )
        return increment if frozen is None else increment + frozen

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of the part not yet in the base weight, in the base layer's layout and dtype (without the norm)."""
        c, r = self.secura_C[adapter_name], self.secura_R[adapter_name]
        core = self._core(adapter_name).float()
        delta = (c.float() @ core) @ r.float()
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    # ---------------------------------------------------------------------------------- SECURA merges (§4)

    @torch.no_grad()
    def secura_merge(self, adapter_names: Optional[list[str]] = None, optimizer: Any = None) -> None:
        """Fold the live A·B into the accumulated core and reset B to zero.

        M2: ``U_L ← U_L + A B`` (base untouched). M1: ``W ← W + C A B R`` and ``U ← U + A B`` (U records what the
        base now holds, so a saved M1 adapter can rebuild the merged model from the original base). B is zeroed in
        place, so optimiser references stay valid; its optimiser state is dropped only when the config asks for it.
        """
        for name in self.active_adapters if adapter_names is None else adapter_names:
            if name not in self.secura_A:
                continue
            if name in self.merged_adapters:
                raise RuntimeError(f"Adapter '{name}' is merged into the base (peft merge); unmerge it first.")
            b = self.secura_B[name]
            ab = (self.secura_A[name] @ b).float()
            if self._is_m1(name):
                self._fold_into_base(name, ab)
                self.secura_applied[name].add_(ab)
            self.secura_U[name].add_(ab.to(self.secura_U[name].dtype))
            b.zero_()
            if self.secura_config[name].reset_b_optimizer_state:
                if optimizer is None:
                    raise ValueError(
                        f"SecuraConfig.reset_b_optimizer_state is set for adapter '{name}': pass the optimizer "
                        "to the merge call (merge_step / end_task / secura_merge)."
                    )
                optimizer.state.pop(b, None)

    def _fold_into_base(self, adapter_name: str, core: torch.Tensor) -> None:
        """``W ← W + C · core · R`` in the base dtype, as one GEMM (no fp32 copy of W)."""
        weight = self.get_base_layer().weight.data
        c = self.secura_C[adapter_name].to(weight.device)
        r = self.secura_R[adapter_name].to(weight.device)
        left = (c.float() @ core.to(weight.device)).to(weight.dtype)  # out × k
        if self.fan_in_fan_out:
            weight.addmm_(r.T, left.T)
        else:
            weight.addmm_(left, r)

    @torch.no_grad()
    def sync_after_load(self, base_weight_loaded: bool = False) -> None:
        """Re-establish the invariants after ``load_state_dict``.

        C and R follow the loaded indices. For M1 the base weight must hold exactly the loaded core U: an
        adapter-only load (peft's ``from_pretrained``/``load_adapter``) folds ``C (U − applied) R`` into the base;
        a full-model load that also brought the base weight is taken as already merged.
        """
        for name in list(self.secura_rows.keys()):
            m1 = name in self.secura_applied
            loaded = torch.stack([self.secura_rows[name], self.secura_cols[name]])
            built = self.secura_built[name]
            if built.is_meta or not torch.equal(built, loaded.to(built.device)):
                merged_in_base = base_weight_loaded and bool(self.secura_U[name].any())
                if m1 and (merged_in_base or bool(self.secura_applied[name].any())):
                    raise RuntimeError(
                        f"Cannot rebuild C and R of M1 adapter '{name}' from a base weight that already holds its "
                        "merges; load the adapter onto a fresh copy of the original base model."
                    )
                self._build_frozen(name)
            if m1:
                applied, core = self.secura_applied[name], self.secura_U[name]
                pending = core.to(applied) - applied
                if not base_weight_loaded and bool(pending.any()):
                    self._fold_into_base(name, pending)
                applied.copy_(core)

    # --------------------------------------------------------------------------------- peft merge / unmerge

    def _check_exact_fold(self, adapter_name: str) -> None:
        """peft's merge drops S-MagNorm, so it is exact only when the norm is off or gates nothing."""
        cfg = self.secura_config[adapter_name]
        if cfg.magnorm == "off" or cfg.approximate_merge:
            return
        gated = bool(self._core(adapter_name).any())
        if not self._is_m1(adapter_name) and adapter_name in self.secura_bias:
            gated = gated or bool(self.secura_bias[adapter_name].any())
        if gated:
            live = "the live A·B (call secura.end_task first)" if self._is_m1(adapter_name) else "U_L + A·B"
            raise ValueError(
                f"Cannot merge SECURA adapter '{adapter_name}' exactly: S-MagNorm is on and gates {live}, so the "
                "adapted layer is not W + ΔW. Keep the adapter live, or set approximate_merge=True in its config to "
                "fold it with the norm dropped (S = 1)."
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapter into the base weight and bias for peft's ``merge_and_unload``."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.secura_A:
                continue
            self._check_exact_fold(name)
            bias = self.secura_bias[name] if name in self.secura_bias else None
            if bias is not None and base.bias is None and bool(bias.any()):
                raise ValueError(
                    f"Cannot merge adapter '{name}': it trained b_Δ but the base layer has no bias to fold it into."
                )
            with torch.no_grad():
                weight = base.weight.data + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = weight
                if bias is not None and base.bias is not None:
                    base.bias.data = base.bias.data + bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.secura_A:
                    continue
                base.weight.data -= self.get_delta_weight(name)
                if name in self.secura_bias and base.bias is not None:
                    base.bias.data -= self.secura_bias[name].to(base.bias.dtype)


class Linear(nn.Module, SecuraLayer):
    """SECURA on an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, weight stored transposed)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SecuraConfig, seed: int = 0, **kwargs):
        super().__init__()
        SecuraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed=seed)
        self._base_in_load = False
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer(x, *args, **kwargs)
        result = base
        for name in self.active_adapters:
            if name in self.secura_A:
                result = result + self._increment(name, x, base)
        return result.to(base.dtype)

    def __repr__(self) -> str:
        return "secura." + super().__repr__()
