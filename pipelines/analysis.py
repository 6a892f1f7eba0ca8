"""The paper's analyses as loggable numbers: weight drift from the base and gradient norms.

Drift says how far fine-tuning moved each adapted layer (a retention proxy that
needs no evaluation); gradient norms per layer type show which adapter factors
actually learn (e.g. SECURA with merge-every-step trains only B).

Adapter drift uses each tuner layer's ``get_delta_weight(adapter)`` (peft LoRA,
SECURA, CUR-LoRA). Two cases need a snapshot instead (`snapshot_weights` before
training, `weight_drift` after): full fine-tuning, and adapters that merge
their update into the base weight as they train (SECURA M1), whose live delta
is zero after every merge. For DoRA, ``get_delta_weight`` is the low-rank part
only, without the magnitude rescaling. CorDA moved its initial update
``s·B₀A₀`` out of the base weight, so its drift is measured against
``W_res + s·B₀A₀``, the pretrained weight. OSF's delta is the current task's,
on the weight the task started from (earlier tasks are merged into it).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

DRIFT_STATS = ("spectral", "frobenius", "rel_spectral", "rel_frobenius")


def _drift_stats(delta: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """‖ΔW‖₂ and ‖ΔW‖_F, absolute and relative to the base weight's own norms."""
    delta, base = delta.detach().float().flatten(1), base.detach().float().flatten(1)
    spectral = torch.linalg.matrix_norm(delta, ord=2)
    frobenius = torch.linalg.matrix_norm(delta, ord="fro")
    base_spectral = torch.linalg.matrix_norm(base, ord=2)
    base_frobenius = torch.linalg.matrix_norm(base, ord="fro")
    values = torch.stack([
        spectral, frobenius,
        spectral / base_spectral.clamp_min(1e-12), frobenius / base_frobenius.clamp_min(1e-12),
    ]).tolist()
    return dict(zip(DRIFT_STATS, values))


def _short(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` → ``model.layers.0.self_attn.q_proj``."""
    return name.removeprefix("module.").removeprefix("base_model.model.")


def _has_adapter(module: nn.Module, adapter_name: str) -> bool:
    return any(adapter_name in getattr(module, attr, {}) for attr in getattr(module, "adapter_layer_names", ()))


@torch.no_grad()
def adapter_drift(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """Per adapted layer: spectral/Frobenius norm of ΔW, absolute and relative to the base weight.

    ``adapter_name`` defaults to the model's active adapter (``"default"``).
    A layer whose adapter is merged has W = W0 + ΔW, so W0 is recovered first.
    Costs one SVD per layer and weight (seconds for 4096²): log per stage, not per step.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = adapter_name or getattr(model, "active_adapter", None) or "default"
    drift: dict[str, dict[str, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        if not _has_adapter(module, adapter):
            continue
        delta = module.get_delta_weight(adapter)
        weight = module.get_base_layer().weight
        base = weight - delta if adapter in module.merged_adapters else weight
        initial = _corda_initial_delta(module, adapter)
        if initial is not None:
            delta, base = delta - initial, base + initial
        drift[_short(name)] = _drift_stats(delta, base)
    return drift


def _corda_initial_delta(module: nn.Module, adapter: str) -> torch.Tensor | None:
    """``s·B₀A₀`` of a CorDA layer (`secura.corda` keeps A₀, B₀ as buffers), else None."""
    from secura.corda import INIT_A, INIT_B

    if not hasattr(module, INIT_A):
        return None
    return module.scaling[adapter] * getattr(module, INIT_B) @ getattr(module, INIT_A)


def snapshot_weights(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of parameters (default: every matrix, i.e. ≥ 2-D) to measure drift against later."""
    wanted = set(names) if names is not None else None
    snapshot = {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if (wanted is None and param.dim() >= 2) or (wanted is not None and name in wanted)
    }
    if wanted is not None and wanted - snapshot.keys():
        raise KeyError(f"no such parameters: {sorted(wanted - snapshot.keys())}")
    return snapshot


@torch.no_grad()
def weight_drift(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per snapshotted matrix: drift of the current weight from its snapshot (full fine-tuning, M1)."""
    params = dict(model.named_parameters())
    missing = [name for name in snapshot if name not in params]
    if missing:
        raise KeyError(f"snapshot parameters not in the model: {missing[:5]}")
    return {
        _short(name).removesuffix(".weight"): _drift_stats(params[name].detach().cpu() - base, base)
        for name, base in snapshot.items()
        if base.dim() >= 2
    }


def summarize_drift(drift: Mapping[str, Mapping[str, float]], prefix: str = "drift") -> dict[str, float]:
    """Mean and max of each drift statistic over layers: ``drift/rel_spectral_mean`` etc."""
    if not drift:
        return {}
    summary: dict[str, float] = {}
    for stat in DRIFT_STATS:
        values = [layer[stat] for layer in drift.values()]
        summary[f"{prefix}/{stat}_mean"] = sum(values) / len(values)
        summary[f"{prefix}/{stat}_max"] = max(values)
    return summary


def _group(name: str, tuner_layers: list[str]) -> str:
    """``<layer>.<parameter>``: e.g. ``q_proj.lora_B`` inside a tuner layer, ``down_proj.weight`` otherwise."""
    for layer in tuner_layers:
        if name.startswith(layer + "."):
            return f"{layer.rsplit('.', 1)[-1]}.{name[len(layer) + 1:].split('.')[0]}"
    parts = name.split(".")
    return ".".join(parts[-2:])


@torch.no_grad()
def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of trainable parameters: ``total`` and one key per layer type.

    Groups pool all layers (``q_proj.lora_B`` over every block); keys are
    unprefixed (the caller adds e.g. ``grad_norm/``). One device
    sync for all values, so it is cheap to call every N steps after backward.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_layers = sorted(
        (name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)),
        key=len, reverse=True,
    )
    squares: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            squares.setdefault(_group(name, tuner_layers), []).append(param.grad.detach().float().pow(2).sum())
    if not squares:
        return {}
    groups = list(squares)
    sums = torch.stack([torch.stack(squares[g]).sum() for g in groups])
    values = torch.cat([sums.sum().unsqueeze(0), sums]).sqrt().tolist()
    return {"total": values[0], **dict(zip(groups, values[1:]))}
