"""Per-task LoRA: one low-rank update per task, the earlier tasks' updates frozen and still active.

The structure shared by the O-LoRA, InfLoRA and N-LoRA baselines (methods ``olora``, ``inflora``,
``nlora`` in `secura.methods`; their loss terms and InfLoRA's subspace are strategies in
`secura.strategies`). Every adapted linear layer computes ``y = W x + s · Σ_t B_t A_t x`` with
``s = α / r``. Task t's factors train during task t only:

* the current task's ``lora_A`` (Kaiming-uniform, as peft's LoRA and the O-LoRA reference) and
  ``lora_B`` (zero) are parameters; InfLoRA freezes ``lora_A`` (``train_a=False``);
* the earlier tasks' factors are stacked into buffers, oldest first, as the O-LoRA reference keeps
  them (``past_A`` is (T·r) × in, ``past_B`` out × (T·r)): constants that get no gradient, that FSDP
  never shards (so a penalty can read them outside the forward) and that cost two matmuls whatever
  the number of tasks;
* ``tasks`` counts the tasks the layer has begun, so `TaskLoraLinear.start_task` is idempotent on a
  resumed stage and a saved state describes itself (a fresh model grows to it on load).

InfLoRA's arithmetic on the adapted layers' inputs (covariances, A from the projected covariance, the
subspace's growth) is here too, as plain functions on tensors.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import Tensor, nn

from .config import check_positive_int

STATE_KEYS = ("lora_A", "lora_B", "past_A", "past_B", "tasks")
USER_FIELDS = ("r", "lora_alpha", "lora_dropout")


@dataclass
class TaskLoraConfig(LoraConfig):
    """Each task's LoRA: peft's LoRA config (targets matched as peft does) with the O-LoRA reference's r and α.

    Only ``r``, ``lora_alpha`` and ``lora_dropout`` are the adapter's knobs (`USER_FIELDS`); it is not a peft
    tuner type, `inject_task_lora` builds the layers.
    """

    r: int = field(default=8, metadata={"help": "Rank of each task's update."})
    lora_alpha: float = field(default=32.0, metadata={"help": "Each update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input (O-LoRA: 0.1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(type(self).__name__, "r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"TaskLoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"TaskLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")


class TaskLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank update per task, all of them active."""

    def __init__(self, base_layer: nn.Linear, config: TaskLoraConfig, train_a: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        out_features, in_features = base_layer.weight.shape
        # Adapter factors stay fp32 whatever the base dtype (peft's default for LoRA too).
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory), requires_grad=train_a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.r, **factory))
        self.register_buffer("past_A", torch.zeros(0, in_features, **factory))
        self.register_buffer("past_B", torch.zeros(out_features, 0, **factory))
        self.register_buffer("tasks", torch.zeros((), dtype=torch.long, device=factory["device"]))
        self.reset_current()

    @torch.no_grad()
    def reset_current(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    @torch.no_grad()
    def start_task(self, task_index: int) -> None:
        """Make the current factors task ``task_index``'s (1-based), freezing the previous task's into the buffers.

        A layer that already holds this task (a resumed stage) is left as it is.
        """
        begun = int(self.tasks)
        if begun == task_index:
            return
        if task_index < 1 or begun != task_index - 1:
            raise ValueError(f"per-task LoRA: task {task_index} cannot start on an adapter that holds {begun} "
                             f"task(s); tasks are numbered from 1 and follow each other")
        if begun > 0:
            self.past_A = torch.cat([self.past_A, self.lora_A.detach().to(self.past_A)])
            self.past_B = torch.cat([self.past_B, self.lora_B.detach().to(self.past_B)], dim=1)
            self.reset_current()
        self.tasks.fill_(task_index)

    @torch.no_grad()
    def set_current_a(self, a: Tensor) -> None:
        self.lora_A.copy_(a)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # In the trained B's dtype (fp32): FSDP's bf16 policy casts the frozen, sharded factors (InfLoRA's A)
        # but not the replicated trainable ones, and a forward outside autocast must not mix the two.
        dtype = self.lora_B.dtype
        h = self.dropout(x.to(dtype))
        update = F.linear(F.linear(h, self.lora_A.to(dtype)), self.lora_B)
        if self.past_A.shape[0]:
            update = update + F.linear(F.linear(h, self.past_A.to(dtype)), self.past_B.to(dtype))
        return result + (self.scaling * update).to(result.dtype)

    def delta_weight(self) -> Tensor:
        """``ΔW = s · (B_past A_past + B A)``: what all tasks together add to the base weight (out × in)."""
        return self.scaling * (self.lora_B.detach() @ self.lora_A.detach() + self.past_B @ self.past_A)

    def adapter_state(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in STATE_KEYS}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor], prefix: str) -> None:
        """Grow to the saved number of tasks and take the saved factors (``prefix`` names the layer in errors)."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"adapter state lacks {[f'{prefix}.{key}' for key in missing]}")
        tasks, past_a, past_b = int(state["tasks"]), state["past_A"], state["past_B"]
        expected = {
            "lora_A": tuple(self.lora_A.shape),
            "lora_B": tuple(self.lora_B.shape),
            "past_A": (max(tasks - 1, 0) * self.r, self.lora_A.shape[1]),
            "past_B": (self.lora_B.shape[0], max(tasks - 1, 0) * self.r),
        }
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{prefix}.{key}: shape {tuple(state[key].shape)} in the state, {shape} expected for "
                                 f"{tasks} task(s) of rank {self.r} on this model")
        self.lora_A.copy_(state["lora_A"])
        self.lora_B.copy_(state["lora_B"])
        self.past_A = past_a.to(self.past_A).clone()
        self.past_B = past_b.to(self.past_B).clone()
        self.tasks.fill_(tasks)


def inject_task_lora(model: nn.Module, config: TaskLoraConfig, train_a: bool = True) -> nn.Module:
    """Freeze ``model`` and replace each targeted ``nn.Linear`` by a `TaskLoraLinear` (in place; returns it)."""
    names = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not names:
        raise ValueError(f"method.target_modules: no module of the model matches {config.target_modules!r}")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if type(module) is not nn.Linear:
            raise ValueError(f"method.target_modules: {name} is a {type(module).__name__}; "
                             f"the per-task LoRA adapts plain nn.Linear layers only")
        setattr(parent, child, TaskLoraLinear(module, config, train_a=train_a))
    return model


def task_lora_layers(model: nn.Module) -> dict[str, TaskLoraLinear]:
    """The per-task LoRA layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, TaskLoraLinear)}


def task_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {f"{name}.{key}": tensor for name, layer in task_lora_layers(model).items()
            for key, tensor in layer.adapter_state().items()}


def load_task_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore every task's factors into a model wrapped by `inject_task_lora` (fresh or mid-stream)."""
    layers = task_lora_layers(model)
    unexpected = sorted(key for key in state if key.rpartition(".")[0] not in layers)
    if unexpected:
        raise KeyError(f"adapter state has keys the model lacks: {unexpected[:5]}")
    for name, layer in layers.items():
        layer.load_adapter_state({key: state[f"{name}.{key}"] for key in STATE_KEYS if f"{name}.{key}" in state}, name)


# --- InfLoRA's subspace arithmetic -------------------------------------------------------------


@torch.no_grad()
def input_covariances(model: nn.Module, layers: dict[str, TaskLoraLinear], batches: Iterable[dict[str, Tensor]],
                      max_batches: int | None) -> dict[str, Tensor]:
    """``Σ x xᵀ`` (in × in, fp32) of each layer's inputs over the non-padding tokens of up to ``max_batches``.

    Runs the model in eval mode, without labels. Summed over ranks under torch.distributed, so every rank
    derives the same A and subspace. The model is moved to the batches' device first when it is elsewhere
    (before a stage the trainer has not placed it yet; it moves it there next anyway).
    """
    sums: dict[str, Tensor] = {}
    mask: list[Tensor] = []

    def recorder(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()[mask[0]].float()  # (tokens, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return record

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(batches, max_batches):
            device = batch["input_ids"].device
            if next(model.parameters()).device != device:
                model.to(device)
            mask[:] = [batch["attention_mask"].bool()]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("InfLoRA: the task yielded no batches to read the adapted layers' inputs from")
    if dist.is_available() and dist.is_initialized():
        for tensor in sums.values():
            dist.all_reduce(tensor)
    return sums


def _complement(subspace: Tensor) -> Tensor:
    """An orthonormal basis (d × (d − m)) of what the orthonormal columns of ``subspace`` (d × m) leave out."""
    d, m = subspace.shape
    if m == 0:
        return torch.eye(d, dtype=subspace.dtype, device=subspace.device)
    q, _ = torch.linalg.qr(subspace, mode="complete")
    return q[:, m:]


def inflora_a(covariance: Tensor, subspace: Tensor, r: int) -> Tensor:
    """InfLoRA's A (r × in): the top-r left singular directions of ``(I − M Mᵀ) C``, each row of norm 1/√3.

    As the official code, the covariance C of the task's inputs stands for the inputs themselves. Computed in
    an orthonormal basis Q of M's complement (``(I − M Mᵀ) C = Q (Qᵀ C)``), so the rows are orthogonal to M even
    where C has fewer than r directions outside it; rows beyond what the complement holds are zero.
    """
    basis = _complement(subspace.to(covariance))
    u, _, _ = torch.linalg.svd(basis.T @ covariance, full_matrices=False)
    a = (basis @ u[:, :r]).T / math.sqrt(3)
    if a.shape[0] < r:
        warnings.warn(f"InfLoRA: the stored subspace leaves {a.shape[0]} input direction(s) free, fewer than r = {r}; "
                      f"the remaining rows of A are zero", stacklevel=2)
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
    return a


def grow_subspace(subspace: Tensor, covariance: Tensor, threshold: float) -> Tensor:
    """GPM's update of the subspace M (in × m, orthonormal columns) with a task's input covariance C.

    Adds the fewest left singular directions of ``(I − M Mᵀ) C`` that bring the share of C's energy (its squared
    singular values, as the official code measures it) captured by M to ``threshold``; none when M already
    captures that much. The official code's first-task branch keeps one direction fewer than this rule (its
    ``+1`` is commented out); here every task follows the same rule.
    """
    subspace = subspace.to(covariance)
    total = torch.linalg.matrix_norm(covariance).pow(2)
    if total == 0:
        return subspace
    remaining = covariance - subspace @ (subspace.T @ covariance)
    u, s, _ = torch.linalg.svd(remaining, full_matrices=False)
    shares = s.pow(2) / total
    captured_before = (1 - shares.sum()) + torch.cumsum(shares, 0) - shares  # before adding direction i
    k = int((captured_before < threshold).sum())
    if k == 0:
        return subspace
    new = u[:, :k] - subspace @ (subspace.T @ u[:, :k])
    new, _ = torch.linalg.qr(new)
    return torch.cat([subspace, new], dim=1)[:, : covariance.shape[0]]
