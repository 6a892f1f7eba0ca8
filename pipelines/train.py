"""One continual-learning stage on Ray Train: `train_loop_per_worker` reads like
a plain PyTorch loop; everything method-specific goes through `secura.methods.Method`.

What a stage checkpoint holds (adapter state only, never base weights):
``adapter.safetensors`` (rank 0), ``strategy-rank{r}.pt`` (every rank: ER
buffers and Fisher estimates are per worker), and, mid-stage, ``trainer.pt``
with the optimiser state and step so a restarted worker group resumes where
it stopped.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
TRAINER_FILE = "trainer.pt"
SHUFFLE_BUFFER_ROWS = 4096  # Ray Data local shuffle on the first pass over a shard


class NonFiniteLossError(RuntimeError):
    """Raised by the driver when a stage reported a NaN/inf loss."""


@dataclass
class StageSpec:
    """What the driver tells every worker about the stage it runs."""

    index: int  # 1-based position of the task in the stream
    task: str
    init_state_dir: str | None  # the previous stage's checkpoint (None: fresh adapter)
    stage_run_id: str | None  # the MLflow nested run of this stage
    tracking_uri: str | None
    train_rows: int


def strategy_file(rank: int) -> str:
    return f"strategy-rank{rank}.pt"


def save_stage_state(folder: Path, method, model, rank: int, trainer_state: dict[str, Any] | None) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (every rank must call it: FSDP gathers)."""
    from pipelines.parallel import gather_adapter_state

    tensors = gather_adapter_state(model, method)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_FILE))
    torch.save(method.strategy.state_dict(), folder / strategy_file(rank))
    if trainer_state is not None and rank == 0:
        torch.save(trainer_state, folder / TRAINER_FILE)


def load_stage_state(folder: Path, method, model, rank: int) -> dict[str, Any] | None:
    """Restore adapter and strategy from ``folder``; returns the trainer state if it has one."""
    method.load_adapter_state(model, load_file(str(folder / ADAPTER_FILE)))
    rank_file = folder / strategy_file(rank)
    if not rank_file.exists():
        rank_file = folder / strategy_file(0)
    if rank_file.exists():
        method.strategy.load_state_dict(torch.load(rank_file, weights_only=True))
    trainer_file = folder / TRAINER_FILE
    return torch.load(trainer_file, weights_only=False) if trainer_file.exists() else None


def steps_for_stage(train: dict[str, Any], train_rows: int, num_workers: int) -> int:
    """Optimiser steps of one stage: fixed steps, or epochs over the worker's shard."""
    if train.get("steps_per_task"):
        return int(train["steps_per_task"])
    per_step = train["batch_size"] * train["grad_accum"] * num_workers
    return max(1, math.ceil(float(train["epochs_per_task"]) * train_rows / per_step))


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut right padding beyond the batch's longest row: shards pad to the task's max_length."""
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :length] for k, v in batch.items()}


def _micro_batches(make_iter: Callable[[int], Iterable[dict]], count: int) -> Iterator[dict]:
    """``count`` micro-batches, cycling over the shard as many epochs as needed (``make_iter(epoch)``)."""
    produced, epoch = 0, 0
    while produced < count:
        empty = True
        for batch in make_iter(epoch):
            empty = False
            yield batch
            produced += 1
            if produced >= count:
                return
        if empty:
            raise ValueError("the task's train shard is empty for this worker")
        epoch += 1


def shuffle_seed(run_seed: int, stage: int, epoch: int) -> int:
    """The row order of one pass over a task: the run's seed decides which rows a short stage sees."""
    return (run_seed * 1_000_003 + stage * 1_009 + epoch) % 2**31


def _permuted_batches(columns: dict[str, torch.Tensor], batch_size: int, seed: int,
                      device: torch.device) -> Iterator[dict]:
    rows = len(next(iter(columns.values())))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    for start in range(0, rows, batch_size):
        index = order[start:start + batch_size]
        yield {k: v[index].to(device) for k, v in columns.items()}


class _MlflowStepLogger:
    """Per-step metrics from rank 0 into the stage's nested MLflow run; tracking
    hiccups are reported, never fatal to training."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.client = None
        self.run_id = run_id
        if enabled and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:  # noqa: BLE001 - tracking must not kill a training stage
            print(f"[secura] warning: MLflow logging failed at step {step}: {err}")


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def read_train_columns(path: str) -> dict[str, torch.Tensor]:
    """A train shard folder as int64 tensors (Ray writes fixed-shape columns as a tensor extension type)."""
    import numpy
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = {}
    for name in ("input_ids", "attention_mask", "labels"):
        column = table.column(name).combine_chunks()
        array = column.to_numpy_ndarray() if hasattr(column, "to_numpy_ndarray") else column.to_numpy(zero_copy_only=False)
        columns[name] = torch.as_tensor(numpy.stack(array) if array.dtype == object else array, dtype=torch.long)
    return columns


class StageContext:
    """What the loop needs from its runner: rank, device, data, reporting.

    `RayTrainContext` is the real one (inside a `TorchTrainer` worker);
    `LocalContext` runs the same loop in the current process, for sweeps of
    small models where a trainer's start-up would dominate, and for tests.
    """

    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        raise NotImplementedError

    def batches(self, batch_size: int, seed: int) -> Iterable[dict]:
        """One pass over this worker's rows in an order that ``seed`` fixes."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        raise NotImplementedError

    def resume_dir(self):
        """A context manager giving the mid-stage checkpoint folder to resume from, or None."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, strategy: str, *, precision: str = "fp32",
                activation_checkpointing: bool = False, compile: bool = False) -> torch.nn.Module:
        """DDP or FSDP2 with the adapter replicated (pipelines.parallel); a plain move without a process group."""
        from pipelines.parallel import wrap_for_training

        return wrap_for_training(model, strategy, device=self.device(), mixed_precision=precision,
                                 activation_checkpointing=activation_checkpointing, compile=compile)


class RayTrainContext(StageContext):
    def __init__(self, cache_mb: int = 512) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._shard = ray.train.get_dataset_shard("train")
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_bytes = cache_mb * 2**20

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def batches(self, batch_size: int, seed: int) -> Iterable[dict]:
        """The worker's shard; kept in memory after the first pass when it fits the cache budget.

        Every pass over a Ray Data shard starts a streaming execution (seconds);
        continual-learning tasks are often small and repeated for many epochs.
        The first pass is shuffled in a local buffer, later passes in memory.
        """
        if self._cache is not None:
            yield from _permuted_batches(self._cache, batch_size, seed, self.device())
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self._shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long, device="cpu",
                                                    local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                                    local_shuffle_seed=seed):
            if kept is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values())
                if size <= self._cache_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield {k: v.to(self.device()) for k, v in batch.items()}
        if kept:
            self._cache = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def resume_dir(self):
        import contextlib

        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)


class LocalContext(StageContext):
    """One process, one rank; reads the shard with pyarrow and keeps the last report."""

    def __init__(self, train_path: str, device: str = "cpu", on_report: Callable[[dict], None] | None = None,
                 checkpoint_root: Path | None = None, resume_from: Path | None = None) -> None:
        self._path = train_path
        self._resume_from = resume_from
        self._device = torch.device(device)
        self._on_report = on_report
        self._root = checkpoint_root
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self._columns: dict[str, torch.Tensor] | None = None

    def device(self) -> torch.device:
        return self._device

    def batches(self, batch_size: int, seed: int) -> Iterable[dict]:
        if self._columns is None:
            self._columns = read_train_columns(self._path)
        yield from _permuted_batches(self._columns, batch_size, seed, self._device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.last_metrics = dict(metrics)
        if checkpoint_dir is not None and self._root is not None:
            target = self._root / f"checkpoint-{int(metrics.get('step', 0)):06d}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(checkpoint_dir, target)
            self.last_checkpoint = target
        if self._on_report:
            self._on_report(metrics)

    def resume_dir(self):
        import contextlib

        return contextlib.nullcontext(self._resume_from)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: one task stage on this worker."""
    run_stage(config, RayTrainContext(cache_mb=config["run"]["train"].get("shard_cache_mb", 512)))


def run_stage(config: dict[str, Any], ctx: StageContext) -> None:
    """Train one task with the run's method; report loss, throughput and checkpoints."""
    from pipelines.config import parse_run_config
    from pipelines.models import load_model
    from pipelines.parallel import merge_under_fsdp, sync_gradients, unwrap
    from secura.methods import build_method

    run = parse_run_config(config["run"])
    stage = StageSpec(**config["stage"])
    train = run.train
    rank, world = ctx.rank, ctx.world_size
    torch.set_num_threads(train.torch_threads or max(1, int(run.scaling.resources_per_worker.get("CPU", 1))))
    torch.manual_seed(run.seed * 1000 + stage.index * 10 + rank)

    method = build_method(run.method_config_obj())
    model = method.wrap(load_model(run.model_config_obj(), seed=run.seed))
    if stage.init_state_dir:
        load_stage_state(Path(stage.init_state_dir), method, model, rank)
    trainer_state: dict[str, Any] = {}
    with ctx.resume_dir() as folder:
        if folder:
            trainer_state = load_stage_state(Path(folder), method, model, rank) or {}
    start_step = int(trainer_state.get("step", 0))

    total_steps = steps_for_stage(train.model_dump(), stage.train_rows, world)
    strategy = method.strategy

    def passes(epoch: int) -> Iterable[dict]:
        return ctx.batches(train.batch_size, shuffle_seed(run.seed, stage.index, epoch))

    def task_batches() -> Iterator[dict]:
        return (trim_padding(b) for b in _micro_batches(passes, total_steps * train.grad_accum))

    method.before_task(model, stage.index, stage.task, task_batches)  # may add or freeze parameters
    model = ctx.prepare(model, run.scaling.parallel_strategy, precision=train.precision,
                        activation_checkpointing=train.gradient_checkpointing, compile=train.compile)
    core = unwrap(model)
    device = ctx.device()
    trainable = [p for p in core.parameters() if p.requires_grad]
    flops_per_token = training_flops_per_token(core)
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(1, train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    if trainer_state:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])

    logger = _MlflowStepLogger(stage.tracking_uri, stage.stage_run_id, enabled=rank == 0)
    micro = _micro_batches(passes, (total_steps - start_step) * train.grad_accum)
    model.train()
    # window_extra: the strategy's own term (EWC penalty, I-LoRA consistency) inside the loss, None until it
    # contributes; logged on its own so a user sees whether, say, ewc_lambda is large enough to matter.
    window_loss, window_extra, window_tokens, window_start = 0.0, None, 0, time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(train.grad_accum):
            batch = trim_padding(next(micro))
            mixed = strategy.mix_batch(batch)
            strategy.observe(batch)
            with _autocast(train.precision, device):
                outputs = model(**mixed, output_hidden_states=strategy.needs_hidden_states)
                loss = outputs.loss
                extra = strategy.extra_loss(core, mixed, outputs)
                if extra is not None:
                    loss = loss + extra
                    window_extra = (window_extra or 0.0) + float(extra.detach()) / train.grad_accum
            (loss / train.grad_accum).backward()
            step_loss += float(loss.detach()) / train.grad_accum
            window_tokens += int(mixed["attention_mask"].sum())
        sync_gradients(model)
        if not math.isfinite(_all_ranks_max(step_loss, device, world)):
            ctx.report({"step": step, "loss": step_loss, "nonfinite": 1})
            return
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        with merge_under_fsdp(model):
            method.after_optimizer_step(core, step, optimizer)
        window_loss += step_loss
        is_log = step % train.log_every == 0 or step == total_steps
        is_checkpoint = bool(train.checkpoint_every) and step % train.checkpoint_every == 0 and step < total_steps
        if not (is_log or is_checkpoint):
            continue
        metrics: dict[str, Any] = {"step": step, "nonfinite": 0}
        if is_log:
            elapsed = time.perf_counter() - window_start
            window_steps = (step - 1) % train.log_every + 1
            metrics.update(
                loss=window_loss / window_steps,
                tokens_per_s=window_tokens * world / max(elapsed, 1e-9),
                tokens_per_s_per_worker=window_tokens / max(elapsed, 1e-9),
                lr=scheduler.get_last_lr()[0],
            )
            if window_extra is not None:
                metrics["loss/strategy"] = window_extra / window_steps
            if run.scaling.peak_tflops_per_worker:
                metrics["mfu"] = metrics["tokens_per_s_per_worker"] * flops_per_token / (
                    run.scaling.peak_tflops_per_worker * 1e12)
            metrics.update(_adapter_stats(core, bool(train.analysis_every) and step % train.analysis_every == 0))
            logger.log({k: v for k, v in metrics.items() if k not in ("step", "nonfinite")}, step)
            if rank == 0:
                print(f"[secura] stage {stage.index} ({stage.task}): step {step}/{total_steps} "
                      f"loss {metrics['loss']:.4f} {metrics['tokens_per_s']:.0f} tok/s", flush=True)
            window_loss, window_extra, window_tokens, window_start = 0.0, None, 0, time.perf_counter()
        if is_checkpoint:
            with tempfile.TemporaryDirectory() as folder:
                save_stage_state(Path(folder), method, core, rank,
                                 {"step": step, "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict()})
                ctx.report(metrics, Path(folder))
        else:
            ctx.report(metrics)

    with merge_under_fsdp(model):
        method.end_task(core, optimizer)
    strategy.after_task(core, lambda: _micro_batches(passes, 8), stage.index)
    with tempfile.TemporaryDirectory() as folder:
        save_stage_state(Path(folder), method, core, rank, None)
        ctx.report({"step": total_steps, "done": 1, "nonfinite": 0}, Path(folder))


def training_flops_per_token(model: torch.nn.Module) -> float:
    """Forward 2N, activation gradients 2N, weight gradients 2N only for trainable weights:
    4·N_all + 2·N_trainable per token (attention's sequence term ignored)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * total + 2.0 * trainable


def _all_ranks_max(value: float, device: torch.device, world: int) -> float:
    """The loss as every rank sees it: one rank's NaN must stop all of them, not hang the others."""
    if world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value if math.isfinite(value) else math.inf], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _adapter_stats(model: torch.nn.Module, with_grad_norms: bool) -> dict[str, float]:
    """S-MagNorm statistics (SECURA only) and, when asked, adapter gradient norms."""
    import secura
    from pipelines.analysis import grad_norms

    stats = {f"magnorm/{k}": v for k, v in secura.magnorm_stats(model, reset=True).items()}
    if with_grad_norms:
        stats.update({f"grad_norm/{k}": v for k, v in grad_norms(model).items()})
    return stats


def stage_spec_dict(spec: StageSpec) -> dict[str, Any]:
    return asdict(spec)


__all__ = [
    "ADAPTER_FILE",
    "NonFiniteLossError",
    "StageSpec",
    "LocalContext",
    "RayTrainContext",
    "StageContext",
    "load_stage_state",
    "run_stage",
    "save_stage_state",
    "stage_spec_dict",
    "steps_for_stage",
    "train_loop_per_worker",
]
