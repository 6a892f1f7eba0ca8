"""Continual-learning strategies: what happens around training, task after task.

A strategy is a small object with hooks that the trainer calls at fixed
points; every hook has a no-op default so each strategy overrides only what
it needs. The trainer never branches on the strategy's name.

Order of calls, per task::

    before_task(model, task_index, task_name)
    for each batch:
        mixed = mix_batch(batch)          # ER: append replay rows
        observe(batch)                    # ER: reservoir-sample the task's own rows (batch or mixed)
        outputs = model(**mixed, output_hidden_states=strategy.needs_hidden_states)
        loss = outputs.loss + (extra_loss(model, mixed, outputs) or 0)
        loss.backward(); optimizer.step()
        after_optimizer_step(model, step)  # I-LoRA: EMA of the long-term copy
    after_task(model, task_batches, task_index)   # EWC: Fisher; I-LoRA: consolidate

``model`` is always the unwrapped model (no DDP wrapper). The parameters a
strategy works on are the trainable ones (``requires_grad``), keyed by their
names in ``model.named_parameters()``. ``state_dict()`` holds only tensors
and plain Python values, so it can go into a checkpoint as it is.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

Batch = dict[str, Tensor]

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

    def before_task(self, model: nn.Module, task_index: int, task_name: str) -> None:
        pass

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

    def before_task(self, model: nn.Module, task_index: int, task_name: str) -> None:
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

    def before_task(self, model: nn.Module, task_index: int, task_name: str) -> None:
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
