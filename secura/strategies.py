"""Continual-learning strategies: what happens around training, task after task.

A strategy is a small object with hooks that the trainer calls at fixed
points; every hook has a no-op default so each strategy overrides only what
it needs. The trainer never branches on the strategy's name.

Order of calls, per task::

    before_task(model, task_index, task_name, task_batches)   # InfLoRA: A from the task's inputs
    for each batch:
        mixed = mix_batch(batch)          # ER: append replay rows
        observe(batch)                    # ER: reservoir-sample the task's own rows (batch or mixed)
        outputs = model(**mixed, output_hidden_states=strategy.needs_hidden_states)
        loss = outputs.loss + (extra_loss(model, mixed, outputs) or 0)
        loss.backward(); optimizer.step()
        after_optimizer_step(model, step)  # I-LoRA: EMA of the long-term copy
    after_task(model, task_batches, task_index)   # EWC: Fisher; I-LoRA: consolidate; InfLoRA: subspace

``model`` is always the unwrapped model (no DDP wrapper). The parameters a
strategy works on are the trainable ones (``requires_grad``), keyed by their
names in ``model.named_parameters()``. ``state_dict()`` holds only tensors
and plain Python values, so it can go into a checkpoint as it is.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from secura.task_lora import TaskLoraLinear, grow_subspace, inflora_a, input_covariances, task_lora_layers

Batch = dict[str, Tensor]
# A fresh iterator over the current task's training micro-batches (input_ids, attention_mask, labels).
TaskBatches = Callable[[], Iterator[Batch]]

# Right-padding values per batch key, as the shards are padded (see docs/architecture.md).
PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": -100}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimiser updates, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def pad_and_concat(batches: list[Batch]) -> Batch:
    """Stack batches row-wise, right-padding each to the longest sequence length.

    Tasks are tokenised to their own ``max_length``, so rows replayed from an
    earlier task can be longer or shorter than the current batch.
    """
    length = max(b["input_ids"].shape[1] for b in batches)
    out: Batch = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.shape[1] < length:
                t = nn.functional.pad(t, (0, length - t.shape[1]), value=PAD_VALUES.get(key, 0))
            parts.append(t)
        out[key] = torch.cat(parts, dim=0)
    return out


class Strategy:
    """Base class: every hook does nothing (plain sequential fine-tuning)."""

    name = ""
    # When True the trainer runs the forward with ``output_hidden_states=True``.
    needs_hidden_states = False
    # When True the method's adapter must be the per-task LoRA (`secura.task_lora`).
    needs_task_lora = False

    def before_task(self, model: nn.Module, task_index: int, task_name: str,
                    task_batches: TaskBatches | None = None) -> None:
        """Before the task's optimiser exists; called again on a resumed stage after its state was loaded."""

    def mix_batch(self, batch: Batch) -> Batch:
        return batch

    def observe(self, batch: Batch) -> None:
        pass

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> Tensor | None:
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_task(self, model: nn.Module, task_batches: Callable[[], Iterable[Batch]], task_index: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """The constructor arguments, for logging."""
        return {}


class Sequential(Strategy):
    """SEQ: fine-tune on each task in turn with nothing against forgetting (the lower bound)."""

    name = "seq"


class ExperienceReplay(Strategy):
    """ER: a bounded reservoir of earlier tasks' rows mixed into every new batch.

    Reservoir sampling (Vitter's algorithm R) keeps a uniform sample of every
    row observed so far, whatever the number or length of the tasks. Each
    batch of task ``t`` gets ``round(replay_ratio * batch_size)`` extra rows
    drawn from the rows of tasks ``< t`` (so the first task trains alone).
    All randomness comes from one seeded generator whose state is checkpointed.
    """

    name = "er"

    def __init__(self, buffer_size: int = 1000, replay_ratio: float = 0.5, seed: int = 0) -> None:
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        if replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {replay_ratio}")
        self.buffer_size = buffer_size
        self.replay_ratio = replay_ratio
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, list[Tensor]] = {}  # key -> one 1-D CPU tensor per stored row
        self.row_tasks: list[int] = []  # task index of each stored row
        self.seen = 0  # rows observed so far (the reservoir's n)
        self.task_index = 0
        self._mixed: tuple[int, int] | None = None  # (new rows, total rows) of the last mixed batch

    def describe(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "replay_ratio": self.replay_ratio, "seed": self.seed}

    def before_task(self, model: nn.Module, task_index: int, task_name: str,
                    task_batches: TaskBatches | None = None) -> None:
        self.task_index = task_index

    def mix_batch(self, batch: Batch) -> Batch:
        n_new = batch["input_ids"].shape[0]
        eligible = [i for i, t in enumerate(self.row_tasks) if t < self.task_index]
        n_replay = round(self.replay_ratio * n_new)
        if not eligible or n_replay == 0:
            self._mixed = None
            return batch
        if n_replay <= len(eligible):
            picks = torch.randperm(len(eligible), generator=self.generator)[:n_replay]
        else:
            picks = torch.randint(len(eligible), (n_replay,), generator=self.generator)
        device = batch["input_ids"].device
        # Rows of different earlier tasks can differ in length: each is its own one-row batch.
        replay = [{key: self.rows[key][eligible[i]].unsqueeze(0).to(device) for key in batch} for i in picks.tolist()]
        mixed = pad_and_concat([batch, *replay])
        self._mixed = (n_new, mixed["input_ids"].shape[0])
        return mixed

    def observe(self, batch: Batch) -> None:
        """Offer the task's own rows to the reservoir, never replayed ones.

        Accepts either the batch given to the last ``mix_batch`` or the batch
        it returned (the replayed rows, appended last, are then skipped).
        """
        n_rows = n_new = batch["input_ids"].shape[0]
        if self._mixed is not None:
            n_new, n_mixed = self._mixed
            if n_rows not in (n_new, n_mixed):
                raise ValueError(
                    f"observe() got {n_rows} rows; the last mix_batch() took {n_new} and returned {n_mixed}"
                )
            self._mixed = None
        # One transfer per key; each stored row is cloned so it does not pin (or checkpoint) the whole batch.
        new = {key: t[:n_new].detach().cpu() for key, t in batch.items()}
        for r in range(n_new):
            self.seen += 1
            if len(self.row_tasks) < self.buffer_size:
                self.row_tasks.append(self.task_index)
                for key, t in new.items():
                    self.rows.setdefault(key, []).append(t[r].clone())
                continue
            slot = int(torch.randint(self.seen, (1,), generator=self.generator))
            if slot < self.buffer_size:  # keep the row with probability buffer_size / seen
                self.row_tasks[slot] = self.task_index
                for key, t in new.items():
                    self.rows[key][slot] = t[r].clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": {key: list(ts) for key, ts in self.rows.items()},
            "row_tasks": list(self.row_tasks),
            "seen": self.seen,
            "task_index": self.task_index,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = {key: list(ts) for key, ts in state["rows"].items()}
        self.row_tasks = list(state["row_tasks"])
        self.seen = int(state["seen"])
        self.task_index = int(state["task_index"])
        self.generator.set_state(state["generator"])
        self._mixed = None


class EWC(Strategy):
    """Elastic weight consolidation with a diagonal Fisher, accumulated over tasks.

    At the end of each task the empirical Fisher ``F = mean_b (∂L_b/∂θ)²`` is
    computed over up to ``fisher_batches`` of the task's batches (batch-level
    gradients: one backward per batch, the usual cheap estimate for LLMs), added to
    the Fisher of the earlier tasks, and the current parameters become the
    anchor ``θ*``. The penalty is ``λ/2 · Σ_i F_i (θ_i − θ*_i)²`` (online EWC:
    one summed Fisher and the latest anchor, rather than one term per task).
    Under torch.distributed the Fisher is averaged over ranks so all ranks
    penalise the same thing.
    """

    name = "ewc"

    def __init__(self, ewc_lambda: float = 100.0, fisher_batches: int | None = 16) -> None:
        if ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        if fisher_batches is not None and fisher_batches < 1:
            raise ValueError(f"fisher_batches must be >= 1 or None (all batches), got {fisher_batches}")
        self.ewc_lambda = ewc_lambda
        self.fisher_batches = fisher_batches
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {"ewc_lambda": self.ewc_lambda, "fisher_batches": self.fisher_batches}

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> Tensor | None:
        if not self.fisher:
            return None
        params = trainable_parameters(model)
        terms = []
        for name, fisher in self.fisher.items():
            p = params[name]
            fisher, anchor = _to_device(self.fisher, name, p), _to_device(self.anchor, name, p)
            terms.append((fisher * (p - anchor).pow(2)).sum())
        return 0.5 * self.ewc_lambda * torch.stack(terms).sum()

    def after_task(self, model: nn.Module, task_batches: Callable[[], Iterable[Batch]], task_index: int) -> None:
        params = trainable_parameters(model)
        fisher = compute_fisher(model, params, task_batches(), self.fisher_batches)
        for name, f in fisher.items():
            previous = self.fisher.get(name)
            self.fisher[name] = f if previous is None else previous.to(f.device) + f
        self.anchor = {name: p.detach().clone() for name, p in params.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state["fisher"])
        self.anchor = dict(state["anchor"])


def compute_fisher(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Batch], max_batches: int | None
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: the mean over batches of the squared loss gradient.

    Runs in eval mode (no dropout noise in the estimate) and leaves ``.grad``
    as it found it, so the trainer's optimiser sees nothing of it.
    """
    saved_grads = {name: p.grad for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in itertools.islice(batches, max_batches):
            for p in params.values():
                p.grad = None
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float().pow(2)
            n += 1
    finally:
        model.train(was_training)
        for name, p in params.items():
            p.grad = saved_grads[name]
    if n == 0:
        raise ValueError("EWC: the task yielded no batches to estimate the Fisher from")
    for f in fisher.values():
        f /= n
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(f)
            f /= dist.get_world_size()
    return fisher


class ILoRA(ExperienceReplay):
    """I-LoRA (Ren et al., 2024): a working adapter and a slow, long-term EMA copy of it.

    * After every optimiser step: ``θ_long ← λ·θ_long + (1−λ)·θ_work`` (λ = ``ema_decay``).
    * Extra loss: ``consistency_weight · MSE(h_work, h_long)`` on the last hidden
      state over non-padding tokens, the long-term forward run without gradient
      (the long-term copy is a target, not a learner).
    * After each task the working copy is *set to* the long-term one. The paper
      evaluates and deploys the long-term (slow) learner; copying it into the
      model makes the evaluation after each task, checkpoints and saved
      adapters use it, and the next task's working memory starts from the
      consolidated point.

    The paper builds I-LoRA on experience replay and applies the consistency
    loss to replayed rows; here replay is optional (``buffer_size = 0``, the
    default, turns it off, as in the §5 baseline) and the consistency loss
    covers every row of the (mixed) batch.
    """

    name = "ilora"
    needs_hidden_states = True

    def __init__(
        self,
        ema_decay: float = 0.99,
        consistency_weight: float = 1.0,
        buffer_size: int = 0,
        replay_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size=buffer_size, replay_ratio=replay_ratio, seed=seed)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        self.ema_decay = ema_decay
        self.consistency_weight = consistency_weight
        self.long_term: dict[str, Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {"ema_decay": self.ema_decay, "consistency_weight": self.consistency_weight, **super().describe()}

    def before_task(self, model: nn.Module, task_index: int, task_name: str,
                    task_batches: TaskBatches | None = None) -> None:
        super().before_task(model, task_index, task_name)
        if not self.long_term:  # both copies start from the same initialisation
            self.long_term = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        for name, p in trainable_parameters(model).items():
            _to_device(self.long_term, name, p).lerp_(p.detach(), 1.0 - self.ema_decay)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> Tensor | None:
        if self.consistency_weight == 0 or not self.long_term:
            return None
        working = outputs.hidden_states[-1]
        params = trainable_parameters(model)
        long_params = {name: _to_device(self.long_term, name, p) for name, p in params.items()}
        with torch.no_grad():
            long_out = torch.func.functional_call(
                model,
                long_params,
                args=(),
                kwargs={
                    "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"],
                    "output_hidden_states": True,
                },
            )
        mask = batch["attention_mask"].unsqueeze(-1).to(working.dtype)
        squared = (working - long_out.hidden_states[-1]).pow(2) * mask
        mse = squared.sum() / (mask.sum() * working.shape[-1]).clamp_min(1)
        return self.consistency_weight * mse

    @torch.no_grad()
    def after_task(self, model: nn.Module, task_batches: Callable[[], Iterable[Batch]], task_index: int) -> None:
        for name, p in trainable_parameters(model).items():
            p.copy_(_to_device(self.long_term, name, p))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "long_term": dict(self.long_term)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.long_term = dict(state["long_term"])


# --- per-task LoRA methods (secura.task_lora) -------------------------------------------------------


def _current_layers(model: nn.Module, strategy: str) -> dict[str, TaskLoraLinear]:
    layers = task_lora_layers(model)
    if not layers:
        raise ValueError(f"strategy {strategy!r} needs the per-task LoRA adapter (methods olora, inflora, nlora)")
    return layers


def _fp32(like: Tensor):
    """Penalties on the adapter factors in fp32, also inside the trainer's bf16 autocast."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class OLoRA(Strategy):
    """O-LoRA (Wang et al., 2023): each task learns its LoRA in a subspace orthogonal to the earlier tasks'.

    Extra loss, over the adapted layers (official ``src/uie_trainer_lora.py``)::

        λ1 · Σ_layers Σ |A_past · A_newᵀ|  +  λ2 · Σ_layers (‖A_new‖₂ + ‖B_new‖₂)

    where ``A_past`` stacks every earlier task's A (elementwise absolute values of the overlap) and the norms are
    Frobenius norms of the new factors. On the first task there is no earlier A, so the overlap term is absent
    (the reference runs it with λ1 = 0). The reference adds the penalty once per optimiser step; the trainer
    adds it to each micro-batch's loss before dividing by ``grad_accum``, which is the same per step.
    """

    name = "olora"
    needs_task_lora = True

    def __init__(self, lambda_1: float = 0.5, lambda_2: float = 0.0) -> None:
        _check_non_negative(lambda_1=lambda_1, lambda_2=lambda_2)
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2

    def describe(self) -> dict[str, Any]:
        return {"lambda_1": self.lambda_1, "lambda_2": self.lambda_2}

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> Tensor | None:
        layers = list(_current_layers(model, self.name).values())
        terms = []
        with _fp32(layers[0].lora_A):
            if self.lambda_1 and layers[0].past_A.shape[0]:
                overlap = sum((layer.past_A @ layer.lora_A.float().T).abs().sum() for layer in layers)
                terms.append(self.lambda_1 * overlap)
            if self.lambda_2:
                norms = sum(layer.lora_A.float().norm() + layer.lora_B.float().norm() for layer in layers)
                terms.append(self.lambda_2 * norms)
        return sum(terms) if terms else None


class NLoRA(Strategy):
    """N-LoRA (Yang et al., COLING 2025): sparse task updates, so tasks collide on fewer parameters.

    Extra loss: ``λ · Σ_layers ‖B_new A_new‖₁``, the entrywise L1 norm of the new task's update, on the raw
    factors (without α/r, as the O-LoRA code base it builds on applies its penalties). The official code
    (``src/uie_trainer_lora.py``) multiplies the two factors in the other order, which only has matching
    shapes when a layer is square; this uses the intended ``ΔW = B·A`` (out × in), so non-square layers
    (grouped-query ``v_proj``) work too.
    """

    name = "nlora"
    needs_task_lora = True

    def __init__(self, l1_lambda: float = 0.4) -> None:
        _check_non_negative(l1_lambda=l1_lambda)
        self.l1_lambda = l1_lambda

    def describe(self) -> dict[str, Any]:
        return {"l1_lambda": self.l1_lambda}

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> Tensor | None:
        if not self.l1_lambda:
            return None
        layers = list(_current_layers(model, self.name).values())
        with _fp32(layers[0].lora_A):
            l1 = sum((layer.lora_B.float() @ layer.lora_A.float()).abs().sum() for layer in layers)
        return self.l1_lambda * l1


class InfLoRA(Strategy):
    """InfLoRA (Liang & Li, CVPR 2024), as its language-model port (``liangyanshuo/gainlora``) runs it.

    The adapter is the per-task LoRA with A frozen (method ``inflora``); only B trains.

    * Before each task: the adapted layers' inputs on the task's training batches give their covariance C;
      the new task's A is set to the top-r left singular directions of ``(I − M Mᵀ) C`` with rows of norm
      1/√3 (`secura.task_lora.inflora_a`), so B's updates cannot interfere with the subspace M of the earlier
      tasks' inputs.
    * After each task: M grows with the task's inputs (GPM, `secura.task_lora.grow_subspace`) up to the
      energy threshold ``ε_t = ε + (1 − ε)·(t − 1)/threshold_tasks`` (the port's schedule with its fixed 15
      tasks; ``threshold_tasks=None`` keeps ε fixed).

    M (one ``in × m`` matrix per adapted layer, on the CPU) and the last task whose A was set are the
    strategy's checkpointed state, so a resumed stage neither recomputes A nor grows M twice. Up to
    ``feature_batches`` micro-batches are read each time (the port reads about 1000 batches).
    """

    name = "inflora"
    needs_task_lora = True

    def __init__(self, threshold: float = 0.995, threshold_tasks: int | None = 15,
                 feature_batches: int | None = 100) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        for name, value in (("threshold_tasks", threshold_tasks), ("feature_batches", feature_batches)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.threshold = threshold
        self.threshold_tasks = threshold_tasks
        self.feature_batches = feature_batches
        self.subspace: dict[str, Tensor] = {}
        self.task = 0  # the last task whose A was set from its inputs

    def describe(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "threshold_tasks": self.threshold_tasks,
                "feature_batches": self.feature_batches}

    def threshold_at(self, task_index: int) -> float:
        if self.threshold_tasks is None:
            return self.threshold
        return self.threshold + (1 - self.threshold) * (task_index - 1) / self.threshold_tasks

    def before_task(self, model: nn.Module, task_index: int, task_name: str,
                    task_batches: TaskBatches | None = None) -> None:
        if self.task >= task_index:
            return  # a resumed stage: this task's A was set before its checkpoint and came back with it
        if task_batches is None:
            raise ValueError("InfLoRA sets A from the task's inputs: before_task needs task_batches")
        layers = _current_layers(model, self.name)
        covariances = input_covariances(model, layers, task_batches(), self.feature_batches)
        for name, layer in layers.items():
            covariance = covariances[name]
            subspace = self.subspace.get(name, covariance.new_zeros(covariance.shape[0], 0))
            layer.set_current_a(inflora_a(covariance, subspace, layer.r))
        self.task = task_index

    def after_task(self, model: nn.Module, task_batches: Callable[[], Iterable[Batch]], task_index: int) -> None:
        layers = _current_layers(model, self.name)
        covariances = input_covariances(model, layers, task_batches(), self.feature_batches)
        threshold = self.threshold_at(task_index)
        for name, covariance in covariances.items():
            subspace = self.subspace.get(name, covariance.new_zeros(covariance.shape[0], 0))
            self.subspace[name] = grow_subspace(subspace, covariance, threshold).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"subspace": dict(self.subspace), "task": self.task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.subspace = dict(state["subspace"])
        self.task = int(state["task"])


def _to_device(store: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
    """``store[name]`` on ``like``'s device, moved there once (state loaded from a checkpoint sits on the CPU)."""
    t = store[name]
    if t.device != like.device:
        t = store[name] = t.to(like.device)
    return t


STRATEGIES: dict[str, type[Strategy]] = {
    "seq": Sequential,
    "er": ExperienceReplay,
    "ewc": EWC,
    "ilora": ILoRA,
    "olora": OLoRA,
    "nlora": NLoRA,
    "inflora": InfLoRA,
}


def build_strategy(name: str, args: dict[str, Any] | None = None) -> Strategy:
    """A strategy by registered name; unknown names or arguments are errors that list the valid ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    args = dict(args or {})
    valid = [p for p in inspect.signature(STRATEGIES[name].__init__).parameters if p != "self"]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for strategy {name!r}; valid: {valid}")
    return STRATEGIES[name](**args)
