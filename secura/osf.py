"""OSF, Orthogonal Subspace Fine-tuning (Nayak et al., "Sculpting Subspaces", arXiv 2504.07097), for a stream.

peft's tuner (`peft.OSFConfig`, ``peft/tuners/osf/``) does one task: each adapted weight is split by SVD into
its top ``effective_rank`` singular directions (frozen) and the rest (``U_low``, ``S_low``, ``V_low``, trained),
and the gradients of ``U_low`` and ``V_low`` are projected off the frozen directions. The continual recipe is
peft's ``examples/orthogonal_subspace_learning/`` (README, "Progressive Capacity Allocation" and "Between
tasks"): after each task the task's update is merged into the weight, the merged weight is decomposed again,
and the next task preserves a larger rank (the example: 0.3, 0.5, 0.7 of ``min(out, in)`` for three tasks).
Here the preserved rank of task t is ``effective_rank + (t − 1) · rank_growth`` (defaults: the example's
schedule), for ``effective_rank`` and for every ``rank_pattern`` entry, a fraction at most 1.

Two things peft leaves to its caller, done here:

* **The merge between tasks.** The example script calls ``model.unload()``; with peft 0.22's layer, whose
  forward adds the delta to an untouched base weight, that would drop the task's update, so the update is
  merged (peft's ``merge``) as the example's README says, then the layer is decomposed again in place
  (peft's ``OSFModel._create_and_replace``, which resolves fractions and ``rank_pattern`` as peft does).
* **Exactness under AdamW.** peft projects the *gradient*; AdamW divides each coordinate by its own second
  moment, so its step leaves the orthogonal complement (on the tiny test model 20% of the update's size
  lands in the frozen directions within 20 steps). `project_factors` projects ``U_low`` and ``V_low`` back
  after every optimiser step, so the frozen directions of every weight stay what they were (to float
  rounding): ``U_highᵀ ΔW = 0`` and ``ΔW V_highᵀ = 0``.

State (`osf_state_dict`): every tensor of every OSF layer (the weight it decomposed, peft's trained factors
and frozen decomposition) and the task it was decomposed for, so a fresh model takes any stage's state
exactly (`load_osf_state_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft import OSFConfig
from peft.tuners.osf.layer import OSFLayer
from torch import Tensor, nn

TASK_KEY = "osf_task"
USER_FIELDS = ("effective_rank", "rank_pattern", "rank_growth")


def _is_fraction(value: object) -> bool:
    return isinstance(value, float) and 0 < value <= 1


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class ContinualOsfConfig(OSFConfig):
    """peft's OSF config plus how the preserved rank grows from task to task (peft's continual example)."""

    effective_rank: Optional[Union[int, float]] = field(
        default=0.3, metadata={"help": "Preserved rank of the first task: a fraction in (0, 1] of min(out, in), or a "
                                       "count of singular directions (peft's example starts at 0.3)."})
    rank_growth: Union[int, float] = field(
        default=0.2, metadata={"help": "Added to every preserved rank after each task, in the same unit (a fraction "
                                       "for fractions, a count for counts); 0 keeps the rank. The example: 0.2."})

    def __post_init__(self) -> None:
        super().__post_init__()
        values = {"effective_rank": self.effective_rank,
                  **{f"rank_pattern[{k!r}]": v for k, v in (self.rank_pattern or {}).items()}}
        for name, value in values.items():
            if not (_is_fraction(value) or _is_count(value)):
                raise ValueError(f"ContinualOsfConfig.{name} must be a fraction in (0, 1] or a positive integer, "
                                 f"got {value!r}.")
        growth = self.rank_growth
        fractions = [_is_fraction(v) for v in values.values()]
        if all(fractions):
            ok = isinstance(growth, (int, float)) and not isinstance(growth, bool) and 0 <= growth < 1
            unit = "a number in [0, 1) (the ranks are fractions)"
        elif not any(fractions):
            ok = isinstance(growth, int) and not isinstance(growth, bool) and growth >= 0
            unit = "an integer >= 0 (the ranks are counts)"
        else:
            ok, unit = False, "of one unit: give effective_rank and rank_pattern all as fractions or all as counts"
        if not ok:
            raise ValueError(f"ContinualOsfConfig.rank_growth must be {unit}, got {growth!r}.")

    def rank_at(self, value: int | float, task: int) -> int | float:
        """The preserved rank ``value`` grows to by task ``task`` (1-based); fractions stop at 1."""
        grown = value + (task - 1) * self.rank_growth
        return min(1.0, float(grown)) if _is_fraction(value) else int(grown)

    def for_task(self, task: int) -> OSFConfig:
        """peft's config for decomposing the weights at the start of task ``task``."""
        pattern = {k: self.rank_at(v, task) for k, v in (self.rank_pattern or {}).items()} or None
        return OSFConfig(task_type=self.task_type, target_modules=self.target_modules,
                         effective_rank=self.rank_at(self.effective_rank, task), rank_pattern=pattern)


def osf_layers(model: nn.Module) -> dict[str, OSFLayer]:
    """The OSF layers of a peft model by their name under the transformers model (peft's ``current_key``)."""
    inner = model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, OSFLayer)}


def _config(model: nn.Module) -> ContinualOsfConfig:
    config = model.peft_config[model.active_adapter]
    if not isinstance(config, ContinualOsfConfig):
        raise TypeError(f"not a continual OSF model: its config is a {type(config).__name__}")
    return config


def current_task(model: nn.Module) -> int:
    """The task the model's layers are decomposed for (1 after wrapping)."""
    return getattr(model, TASK_KEY, 1)


@torch.no_grad()
def decompose_for_task(model: nn.Module, task: int, merge: bool) -> None:
    """Decompose every OSF layer again for task ``task``; ``merge`` first folds the current update into the weight.

    Through peft's own in-place path for an existing OSF layer (``OSFModel._create_and_replace`` calls
    ``update_layer``, which decomposes the layer's current weight); the old factors' gradient hooks go first.
    """
    adapter = model.active_adapter
    config = _config(model).for_task(task)
    tuner = model.base_model
    inner = tuner.model
    for name, layer in osf_layers(model).items():
        if merge:
            layer.merge(adapter_names=[adapter])
            layer.merged_adapters.remove(adapter)  # the merged update now lives in the weight decomposed below
        layer._detach_hooks()
        parent_name, _, child = name.rpartition(".")
        tuner._create_and_replace(config, adapter, layer, child, inner.get_submodule(parent_name), name)
    setattr(model, TASK_KEY, task)


def start_task(model: nn.Module, task: int) -> None:
    """Before task ``task``: merge the previous task's update and preserve the task's larger rank.

    Idempotent: a model already decomposed for ``task`` (a resumed stage, the first task) is left as it is.
    """
    begun = current_task(model)
    if begun == task:
        return
    if begun != task - 1:
        raise ValueError(f"OSF: task {task} cannot start on a model decomposed for task {begun}; tasks follow "
                         f"each other")
    decompose_for_task(model, task, merge=True)


@torch.no_grad()
def project_factors(model: nn.Module) -> None:
    """Put every ``U_low`` and ``V_low`` back into the orthogonal complement of its frozen subspace.

    With the same stored factors as peft's gradient hooks: ``U_high`` where it is kept, else (a square
    factor) ``U_low``'s initial value, which then spans the complement exactly; likewise for V.
    """
    adapter = model.active_adapter
    for layer in osf_layers(model).values():
        params = layer.osf_svd_params[adapter]
        u, v = params["U_low"], params["V_low"]
        if adapter in layer._osf_U_high:
            u_high = layer._osf_U_high[adapter]
            u.sub_(u_high @ (u_high.T @ u))
        else:
            u_init = layer._osf_U_low_init[adapter]
            u.copy_(u_init @ (u_init.T @ u))
        if adapter in layer._osf_V_high:
            v_high = layer._osf_V_high[adapter]
            v.sub_((v @ v_high.T) @ v_high)
        else:
            v_init = layer._osf_V_low_init[adapter]
            v.copy_((v @ v_init.T) @ v_init)


def osf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of every OSF layer (base weight and bias, factors, frozen decomposition) and the task."""
    state = {f"{name}.{key}": tensor for name, layer in osf_layers(model).items()
             for key, tensor in _layer_tensors(layer).items()}
    state[TASK_KEY] = torch.tensor(current_task(model))
    return state


def _layer_tensors(layer: OSFLayer) -> dict[str, Tensor]:
    tensors = dict(layer.named_parameters())
    tensors.update(layer.named_buffers())  # peft keeps the frozen decomposition in non-persistent buffers
    return tensors


@torch.no_grad()
def load_osf_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore `osf_state_dict` into a wrapped model, decomposed for any task (a fresh one: task 1).

    A model decomposed for another task than the state's is decomposed for it first (for the shapes), then
    every tensor is copied; one already at the state's task keeps its base weights, which a stage never
    changes (a stage's best state restored under FSDP, whose base weights are sharded).
    """
    if TASK_KEY not in state:
        raise KeyError(f"OSF state lacks {TASK_KEY!r}: not a state of method osf")
    task = int(state[TASK_KEY])
    same_task = current_task(model) == task
    if not same_task:
        decompose_for_task(model, task, merge=False)
    layers = osf_layers(model)
    unexpected = sorted(k for k in state if k != TASK_KEY and not any(k.startswith(f"{n}.") for n in layers))
    if unexpected:
        raise KeyError(f"adapter state has keys the model lacks: {unexpected[:5]}")
    for name, layer in layers.items():
        for key, tensor in _layer_tensors(layer).items():
            if same_task and key.startswith("base_layer."):
                continue
            saved = state.get(f"{name}.{key}")
            if saved is None:
                raise KeyError(f"adapter state lacks {name}.{key}")
            if saved.shape != tensor.shape:
                raise ValueError(f"{name}.{key}: shape {tuple(saved.shape)} in the state, {tuple(tensor.shape)} "
                                 f"on this model for OSF task {task}")
            tensor.copy_(saved)
