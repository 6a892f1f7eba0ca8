"""CUR-LoRA baseline (spec §5): ``ΔW = C U R`` with inverted-importance C and R, U (k × k, zero-init) trained."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import check_choice, check_positive_int, check_targeting
from .cur import layer_seed, resolve_rank, select_cur_indices
from .layer import FrozenBuffers, cur_factors, init_tuner_state, linear_shape, weight_out_in

CURLORA_PEFT_TYPE = "CURLORA"


@dataclass
class CurLoraConfig(PeftConfig):
    """Configuration of a CUR-LoRA adapter (needs ``import secura`` before loading, like SECURA)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to adapt (names, suffixes or a regex), as in LoRA."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    k: int = field(default=150, metadata={"help": "CUR rank: rows/columns selected; U is k × k."})
    cur_selection: str = field(default="topk", metadata={"help": "'topk' (deterministic) or 'sample' (seeded)."})
    cur_seed: int = field(default=0, metadata={"help": "Seed for 'sample' selection (mixed per layer)."})
    clamp_rank: bool = field(default=False, metadata={"help": "Clamp k to min(out, in) instead of raising."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Set automatically per layer type (Conv1D)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CURLORA_PEFT_TYPE
        check_targeting(self)
        check_positive_int(type(self).__name__, "k", self.k)
        check_choice(type(self).__name__, "cur_selection", self.cur_selection, ("topk", "sample"))


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.sync_after_load()


class CurLoraLayer(BaseTunerLayer):
    """CUR-LoRA state on one linear layer: trainable ``curlora_U``, saved indices, C and R rebuilt at load."""

    adapter_layer_names = ("curlora_U",)
    other_param_names = ("curlora_rows", "curlora_cols", "curlora_C", "curlora_R")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        init_tuner_state(self, base_layer, kwargs)
        self.curlora_U = nn.ParameterDict({})
        self.curlora_rows = BufferDict({}, persistent=True)
        self.curlora_cols = BufferDict({}, persistent=True)
        self.curlora_C = FrozenBuffers()
        self.curlora_R = FrozenBuffers()

    def update_layer(self, adapter_name: str, config: CurLoraConfig, seed: int = 0) -> None:
        k = resolve_rank(config.k, self.out_features, self.in_features, clamp=config.clamp_rank)
        weight = weight_out_in(self.get_base_layer(), self.fan_in_fan_out)
        rows, cols = select_cur_indices(weight, k, sample=config.cur_selection == "sample", seed=seed)
        self.curlora_rows[adapter_name], self.curlora_cols[adapter_name] = rows, cols
        self.curlora_C[adapter_name], self.curlora_R[adapter_name] = cur_factors(weight, rows, cols)
        self.curlora_U[adapter_name] = nn.Parameter(torch.zeros(k, k, device=weight.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def sync_after_load(self) -> None:
        """C and R are never saved: rebuild them from the (untouched) base weight and the loaded indices."""
        if self.merged:
            return  # the base holds merged updates: C and R stay as built
        weight = weight_out_in(self.get_base_layer(), self.fan_in_fan_out)
        for name in list(self.curlora_rows.keys()):
            self.curlora_C[name], self.curlora_R[name] = cur_factors(
                weight, self.curlora_rows[name], self.curlora_cols[name]
            )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        c, r, u = self.curlora_C[adapter_name], self.curlora_R[adapter_name], self.curlora_U[adapter_name]
        delta = (c.float() @ u.float()) @ r.float()
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.curlora_U:
                continue
            weight = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.weight.data = weight
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.curlora_U:
                self.get_base_layer().weight.data -= self.get_delta_weight(name)


class CurLoraLinear(nn.Module, CurLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CurLoraConfig, seed: int = 0, **kwargs):
        super().__init__()
        CurLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed=seed)
        self.register_load_state_dict_post_hook(_after_load)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.curlora_U:
                continue
            u, c, r = self.curlora_U[name], self.curlora_C[name], self.curlora_R[name]
            h = F.linear(self._cast_input_dtype(x, r.dtype), r).to(u.dtype)  # x Rᵀ, then · Uᵀ · Cᵀ
            result = result + F.linear(F.linear(h, u).to(c.dtype), c).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "curlora." + super().__repr__()


class CurLoraModel(BaseTuner):
    prefix: str = "curlora_"
    tuner_layer_cls = CurLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        seed = layer_seed(config.cur_seed, current_key)
        try:
            if isinstance(target, CurLoraLayer):
                target.update_layer(adapter_name, config, seed=seed)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            linear_shape(base)  # type check with a clear error
            new_module = CurLoraLinear(target, adapter_name, config, seed=seed)
        except ValueError as err:
            raise ValueError(f"CUR-LoRA cannot adapt '{current_key}': {err}") from err
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
