"""CUR-LoRA baseline (spec §5): ``ΔW = C U R`` with inverted-importance C and R, U (k × k, zero-init) trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import CurConfig
from .cur_layer import CurLayer, CurTuner

CURLORA_PEFT_TYPE = "CURLORA"


@dataclass
class CurLoraConfig(CurConfig):
    """Configuration of a CUR-LoRA adapter (needs ``import secura`` before loading, like SECURA)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CURLORA_PEFT_TYPE


class CurLoraLayer(CurLayer):
    """CUR-LoRA on one linear layer: the trainable ``curlora_U``; indices saved, C and R rebuilt at load."""

    prefix = "curlora_"
    adapter_layer_names = ("curlora_U",)
    other_param_names = ("curlora_rows", "curlora_cols", "curlora_C", "curlora_R", "curlora_built")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CurLoraConfig, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.curlora_U = nn.ParameterDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed=seed)

    def create_core(self, adapter_name: str, config: CurLoraConfig, k: int, seed: int) -> None:
        self.curlora_U[adapter_name] = nn.Parameter(torch.zeros(k, k, device=self.weight_out_in().device))

    def core(self, adapter_name: str) -> torch.Tensor:
        return self.curlora_U[adapter_name]

    def add_adapter_output(self, adapter_name: str, x: torch.Tensor, base: torch.Tensor,
                           result: torch.Tensor) -> torch.Tensor:
        u = self.curlora_U[adapter_name]
        z = F.linear(self.project(adapter_name, x).to(u.dtype), u)
        return result + self.expand(adapter_name, z).to(result.dtype)

    def __repr__(self) -> str:
        return "curlora." + super().__repr__()


class CurLoraModel(CurTuner):
    prefix: str = "curlora_"
    tuner_layer_cls = CurLoraLayer
    method_label = "CUR-LoRA"
