"""SECURA's two merge strategies (spec §4): where the folded core lives and what S-MagNorm compares against.

Both fold the live update ``A·B`` every ``merge_every`` steps and at the end of a task, then zero B. They differ in
three places, each a method here: the adapter output ``ΔY`` (:meth:`delta_output`), where the merged core goes
(:meth:`fold`) and what a load must redo (:meth:`after_load`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .layer import SecuraLayer

FULL_PRECISION = (torch.float32, torch.float64)


class MergeIntoCore:
    """M2: ``U ← (1 − λ)·U + A·B``; the base weight is never modified.

    ``ΔY = x Rᵀ (U + A·B)ᵀ Cᵀ (+ b_Δ)`` is the whole change from the pretrained layer and ``Y0`` its original output,
    so S-MagNorm sees the total drift. λ (``core_decay``) = 0 is the plain sum.
    """

    name: ClassVar[str] = "M2"
    bias_in_base: ClassVar[bool] = False  # b_Δ is part of ΔY: the norm damps it with the rest
    gated_part: ClassVar[str] = "U_L + A·B"

    def create(self, layer: SecuraLayer, adapter_name: str) -> None:
        pass

    def unmerged_core(self, layer: SecuraLayer, adapter_name: str) -> torch.Tensor:
        a, b = layer.secura_A[adapter_name], layer.secura_B[adapter_name]
        ab = a @ b
        return layer.secura_U[adapter_name].to(ab.dtype) + ab

    def delta_output(self, layer: SecuraLayer, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The k × k core is formed once per call (k² per token instead of 2·k·r + k²)."""
        h = layer.project(adapter_name, x)
        core = self.unmerged_core(layer, adapter_name)
        return layer.expand(adapter_name, F.linear(h.to(core.dtype), core))

    def fold(self, layer: SecuraLayer, adapter_name: str, ab: torch.Tensor) -> None:
        u = layer.secura_U[adapter_name]
        decay = layer.secura_config[adapter_name].core_decay
        if decay:
            u.mul_(1.0 - decay)
        u.add_(ab)

    def after_load(self, layer: SecuraLayer, adapter_name: str, base_weight_loaded: bool) -> None:
        pass


class MergeIntoBase:
    """M1: ``W ← W + C·A·B·R`` and ``U ← U + A·B`` (U records what the base holds, so a saved adapter rebuilds it).

    ``Y0`` is the current merged layer (with b_Δ) and ``ΔY`` only the live ``A·B``. On a bf16/fp16 base the fold
    keeps an fp32 remainder the size of W (``secura_residual``, not saved): each fold adds to ``W + remainder``
    in fp32, writes what W can represent and carries the rest, so W tracks ``W0 + C·U·R`` to within half a step
    of its dtype however small each increment is, and a reload (one fold of U) gives the same W.
    """

    name: ClassVar[str] = "M1"
    bias_in_base: ClassVar[bool] = True  # b_Δ is never reset, so it belongs to the current model
    gated_part: ClassVar[str] = "the live A·B (call secura.end_task first)"

    def create(self, layer: SecuraLayer, adapter_name: str) -> None:
        u = layer.secura_U[adapter_name]
        layer.secura_applied[adapter_name] = torch.zeros_like(u)  # the part of U this base weight holds

    def unmerged_core(self, layer: SecuraLayer, adapter_name: str) -> torch.Tensor:
        return layer.secura_A[adapter_name] @ layer.secura_B[adapter_name]

    def delta_output(self, layer: SecuraLayer, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``· Bᵀ`` then ``· Aᵀ`` when r < k/2 (cheaper than forming A·B); otherwise the k × k core once."""
        a, b = layer.secura_A[adapter_name], layer.secura_B[adapter_name]
        h = layer.project(adapter_name, x).to(a.dtype)
        z = F.linear(F.linear(h, b), a) if 2 * b.shape[0] < b.shape[1] else F.linear(h, a @ b)
        return layer.expand(adapter_name, z)

    def fold(self, layer: SecuraLayer, adapter_name: str, ab: torch.Tensor) -> None:
        self.fold_into_base(layer, adapter_name, ab)
        layer.secura_applied[adapter_name].add_(ab)
        layer.secura_U[adapter_name].add_(ab)

    @staticmethod
    def fold_into_base(layer: SecuraLayer, adapter_name: str, core: torch.Tensor) -> None:
        """``W ← W + C · core · R``: one GEMM into W (fp32/fp64), or through the fp32 remainder (bf16/fp16)."""
        weight = layer.get_base_layer().weight.data
        c = layer.cur_c[adapter_name].to(device=weight.device, dtype=core.dtype)
        r = layer.cur_r[adapter_name].to(device=weight.device, dtype=core.dtype)
        left = c @ core.to(weight.device)  # out × k
        if weight.dtype in FULL_PRECISION:
            _add_product(weight, left.to(weight.dtype), r.to(weight.dtype), layer.fan_in_fan_out)
            return
        residuals = layer.secura_residual
        target = weight.float()
        if adapter_name in residuals:
            target.add_(residuals[adapter_name])
        _add_product(target, left.float(), r.float(), layer.fan_in_fan_out)
        weight.copy_(target)
        residuals[adapter_name] = target.sub_(weight)

    def after_load(self, layer: SecuraLayer, adapter_name: str, base_weight_loaded: bool) -> None:
        """An adapter-only load folds the part of U the base lacks; a full load brings a merged W with it."""
        applied, core = layer.secura_applied[adapter_name], layer.secura_U[adapter_name]
        if base_weight_loaded:
            if adapter_name in layer.secura_residual:
                del layer.secura_residual[adapter_name]  # belongs to the weight that was replaced
        else:
            pending = core.to(applied.dtype) - applied
            if bool(pending.any()):
                self.fold_into_base(layer, adapter_name, pending)
        applied.copy_(core)


def _add_product(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, fan_in_fan_out: bool) -> None:
    """``weight += left @ right`` in place, for a weight stored ``out × in`` or, with fan_in_fan_out, ``in × out``."""
    if fan_in_fan_out:
        weight.addmm_(right.T, left.T)
    else:
        weight.addmm_(left, right)


MERGE_STRATEGIES: dict[str, MergeIntoCore | MergeIntoBase] = {"M1": MergeIntoBase(), "M2": MergeIntoCore()}
