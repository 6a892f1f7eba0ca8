"""Checks that need the model's shape but not its weights, run before Ray starts.

A target module that matches nothing, or a CUR rank ``k`` larger than a layer,
would otherwise fail inside a worker after Ray's start-up, shard preparation
and the base model's evaluation. The model is built on the meta device from
its config (no weights read, no memory used), so the check takes a second.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from pipelines.models import ModelConfig


def model_skeleton(config: ModelConfig) -> nn.Module | None:
    """The model's modules on the meta device; None when its config cannot be read here (the load will say why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipelines.models import _resolve_gguf, build_tiny_model

    with torch.device("meta"):
        if config.source == "tiny":
            return build_tiny_model(config.tiny)
        try:
            if config.source == "gguf":
                folder, name = _resolve_gguf(config.path)
                model_config = AutoConfig.from_pretrained(folder, gguf_file=name)
            else:
                model_config = AutoConfig.from_pretrained(config.path, revision=config.revision,
                                                          trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError):
            return None
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear layer (nn.Linear, transformers Conv1D), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def check_method_fits_model(run) -> None:
    """Raise ValueError, naming the field and the layer, when the method's adapter cannot fit the model."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from secura.methods import ADAPTERS, METHODS

    method = run.method_config_obj()
    peft_config = ADAPTERS[METHODS[method.name].adapter].config(method.target_modules, dict(method.adapter))
    if peft_config is None:
        return
    skeleton = model_skeleton(run.model_config_obj())
    if skeleton is None:
        return
    shapes = {name: _linear_shape(module) for name, module in skeleton.named_modules()}
    matched = {name: shape for name, shape in shapes.items()
               if shape is not None and check_target_module_exists(peft_config, name)}
    if not matched:
        names = Counter(name.rsplit(".", 1)[-1] for name, shape in shapes.items() if shape is not None)
        raise ValueError(f"method.target_modules: {method.target_modules!r} matches no linear layer of the model "
                         f"({run.model.get('path') or run.model.get('source', 'tiny')}); its linear layers are "
                         f"named {', '.join(sorted(names))}")
    k = getattr(peft_config, "k", None)
    if isinstance(k, int) and not getattr(peft_config, "clamp_rank", False):
        too_small = sorted((name, shape) for name, shape in matched.items() if k > min(shape))
        if too_small:
            name, (out, inp) = too_small[0]
            raise ValueError(f"method.adapter.k: {k} exceeds min(out, in) of {len(too_small)} adapted layer(s), "
                             f"e.g. {name} ({out}×{inp}); lower k or set method.adapter.clamp_rank: true")
