"""The continual-learning stream on Ray Train: one worker group trains every stage.

`train_loop_per_worker(config)` reads like a plain PyTorch loop, stage after
stage; everything method-specific goes through `secura.methods.Method`. The
same loop runs in the driver's process with ``scaling.backend: local``
(`LocalContext`), so both backends train the same batches for the same seed.

Checkpoints (pipelines/checkpoints.py) hold adapter state only, never base
weights: ``adapter.safetensors`` (rank 0's gathered copy), one
``strategy-rank{r}.pt`` per rank (ER buffers and Fisher estimates are per
worker), and mid-stage ``trainer.pt`` (optimiser, scheduler, RNG). Where the
stream stands (stage, step) is in the checkpoint's name, and the data
position follows from it: every pass over a task visits the rows in an order
fixed by the run's seed, so step ``s`` of a stage always sees the same rows.
A restarted worker group, or a resumed driver, continues from the newest
complete checkpoint and ends with the same adapter as an undisturbed run.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from pipelines.checkpoints import CheckpointRef, CheckpointStore
from pipelines.precision import autocast, resolve_precision

ADAPTER_FILE = "adapter.safetensors"
TRAINER_FILE = "trainer.pt"
# Errors a retry cannot fix: reported as fatal and not retried by FailureConfig.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError,
                        AssertionError, FileNotFoundError)


class NonFiniteLossError(RuntimeError):
    """Raised by the driver when a stage reported a NaN/inf loss."""


@dataclass
class StageSpec:
    """One stage of the stream, as every worker sees it."""

    index: int  # 1-based position of the task in the stream
    task: str
    train_path: str  # the task's train shard (a local, shared or bucket path written by `secura prepare`)
    train_rows: int
    task_type: str = "classification"
    validation_path: str | None = None  # the validation eval shard, when the stream carves one from train


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
    """Restore adapter and strategy from ``folder``; returns the trainer state if it has one.

    Everything is read without unpickling code (safetensors, ``weights_only=True``): checkpoints may come
    from shared or remote storage.
    """
    method.load_adapter_state(model, load_file(str(folder / ADAPTER_FILE)))
    rank_file = folder / strategy_file(rank)
    if not rank_file.exists():
        rank_file = folder / strategy_file(0)
    if rank_file.exists():
        method.strategy.load_state_dict(torch.load(rank_file, weights_only=True))
    trainer_file = folder / TRAINER_FILE
    return torch.load(trainer_file, weights_only=True) if trainer_file.exists() else None


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


def shuffle_seed(run_seed: int, stage: int, epoch: int) -> int:
    """The row order of one pass over a task: the run's seed decides which rows a short stage sees."""
    return (run_seed * 1_000_003 + stage * 1_009 + epoch) % 2**31


def pass_batches(rows: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None,
                 group: int = 1) -> list[torch.Tensor]:
    """The row indices of each micro-batch of one pass over a task, in the order the pass visits them.

    The rows are shuffled by ``seed``; with ``lengths`` and ``group > 1`` each run of ``group`` batches'
    worth of shuffled rows is sorted by length before it is cut into batches (rows of similar length share
    a batch, so trimming leaves little padding), and the pass visits the batches in a seeded order. Every
    row is still in exactly one batch of the pass, and the batches depend only on the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=generator)
    if lengths is None or group <= 1:
        return list(order.split(batch_size))
    span = group * batch_size
    batches: list[torch.Tensor] = []
    for start in range(0, rows, span):
        part = order[start:start + span]
        batches.extend(part[torch.argsort(lengths[part], descending=True, stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def micro_batches(columns: dict[str, torch.Tensor], batch_size: int, order_seed: Callable[[int], int],
                  device: torch.device, count: int, start: int = 0,
                  group: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches ``start``…``start + count`` of the stream of passes over ``columns``.

    Pass ``e`` visits the rows in the batches `pass_batches` cuts from the permutation ``order_seed(e)``
    (length-grouped by ``group``), so micro-batch ``m`` is always the same rows: a resumed stage continues
    at its data position by index, without replaying the batches before it.
    """
    rows = len(next(iter(columns.values())))
    if rows == 0:
        raise ValueError("the task's train shard is empty for this worker")
    lengths = columns["attention_mask"].sum(dim=1) if group > 1 and "attention_mask" in columns else None
    per_pass = math.ceil(rows / batch_size)
    epoch, offset = divmod(start, per_pass)
    produced = 0
    while produced < count:
        batches = pass_batches(rows, batch_size, order_seed(epoch), lengths, group)
        for picked in batches[offset:]:
            yield {k: v[picked].to(device) for k, v in columns.items()}
            produced += 1
            if produced >= count:
                return
        epoch, offset = epoch + 1, 0


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the LM head is needed in training, and what it predicts there: position ``t`` predicts token
    ``t + 1``, so the positions before each labelled token (row-major, as `lm_head_on` returns them)."""
    targets = labels[:, 1:]
    carries = targets != -100
    return torch.nn.functional.pad(carries, (0, 1)), targets[carries]


def causal_lm_loss(model: torch.nn.Module, core: torch.nn.Module, batch: dict[str, torch.Tensor],
                   output_hidden_states: bool = False):
    """The forward and its mean next-token loss over the labelled tokens (the causal-LM loss
    `transformers` computes from ``labels``), with the LM head on those positions only."""
    from pipelines.models import lm_head_on

    positions, targets = label_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with lm_head_on(core, positions):
        outputs = model(**inputs, output_hidden_states=output_hidden_states, use_cache=False)
    return outputs, torch.nn.functional.cross_entropy(outputs.logits.float(), targets)


def read_train_columns(path: str) -> dict[str, torch.Tensor]:
    """A train shard folder (local path or URI) as int64 tensors, rows in written order.

    Ray Data writes fixed-shape columns as a tensor extension type; plain pyarrow reads them as lists.
    """
    import numpy
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = {}
    for name in ("input_ids", "attention_mask", "labels"):
        column = table.column(name).combine_chunks()
        array = column.to_numpy_ndarray() if hasattr(column, "to_numpy_ndarray") else column.to_numpy(zero_copy_only=False)
        columns[name] = torch.as_tensor(numpy.stack(array) if array.dtype == object else array, dtype=torch.long)
    return columns


# --- where the loop runs ----------------------------------------------------------------


class StageContext:
    """What the loop needs from its runner: rank, device, the worker's rows, reporting.

    `RayTrainContext` is the real one (inside a `TorchTrainer` worker);
    `LocalContext` runs the same loop in the current process.
    """

    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        raise NotImplementedError

    def rows(self, stage: StageSpec) -> dict[str, torch.Tensor]:
        """This worker's rows of a stage's task, in shard order, as int64 tensors on the CPU."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any]) -> None:
        raise NotImplementedError

    def cancelled(self) -> bool:
        return False

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def prepare(self, model: torch.nn.Module, strategy: str, *, precision: str = "fp32",
                activation_checkpointing: bool = False, compile: bool = False) -> torch.nn.Module:
        """DDP or FSDP2 with the adapter replicated (pipelines.parallel); a plain move without a process group."""
        from pipelines.parallel import wrap_for_training

        return wrap_for_training(model, strategy, device=self.device(), mixed_precision=precision,
                                 activation_checkpointing=activation_checkpointing, compile=compile)


class RayTrainContext(StageContext):
    """Inside a `TorchTrainer` worker. Rank 0 hands its reports to the run's sink directly (the tracking
    spool and progress file in the run's folder): `ray.train.report` would block each report until the
    controller's next poll, seconds apart."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None = None, cancel_uri: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._sink = sink
        self._cancel_uri = cancel_uri

    def cancelled(self) -> bool:
        """The driver gave up on this stream (it failed): stop at the next report, keeping the checkpoints."""
        import pyarrow.fs as pafs

        if self._cancel_uri is None:
            return False
        uri = self._cancel_uri
        fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def rows(self, stage: StageSpec) -> dict[str, torch.Tensor]:
        """This rank's rows of the task's shard (every ``world_size``-th row), read straight from storage.

        The shard is small next to a model (24 bytes a token) and is revisited
        for many epochs, so each worker holds its rows in memory and every
        pass, and a resumed one, picks its batches by index. Reading the
        Parquet files directly (local disk, shared filesystem or bucket) costs
        no Ray Data execution per stage.
        """
        columns = read_train_columns(stage.train_path)
        return {k: v[self.rank::self.world_size] for k, v in columns.items()}

    def report(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0 and self._sink is not None:
            self._sink(metrics)


class LocalContext(StageContext):
    """One process, one rank; reads the shard with pyarrow and hands every report to ``on_report``."""

    def __init__(self, device: str = "cpu", on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._device = torch.device(device)
        self._on_report = on_report
        self.last_metrics: dict[str, Any] = {}

    def device(self) -> torch.device:
        return self._device

    def rows(self, stage: StageSpec) -> dict[str, torch.Tensor]:
        return read_train_columns(stage.train_path)

    def report(self, metrics: dict[str, Any]) -> None:
        self.last_metrics = dict(metrics)
        if self._on_report:
            self._on_report(metrics)


# --- the loop --------------------------------------------------------------------------


class ReportSink:
    """Where the trainer's reports go: the tracking spool (stage runs, and the loss on the parent) and a progress
    file the driver reads.

    Steps are stream-wide: a stage's step ``s`` is logged at ``step_offsets[stage] + s`` (the training steps
    of the stream before it), so a run's loss is one curve over the whole stream. On Ray Train rank 0 calls
    it in the worker, writing into the run's output dir (local, or the shared filesystem of a cluster), so a
    report never waits for the controller.
    """

    def __init__(self, spool_folder: str | Path, parent_key: str, progress_path: str | Path,
                 step_offsets: dict[int, int] | dict[str, int] | None = None) -> None:
        from pipelines.spool import SpoolWriter

        self.spool = SpoolWriter(spool_folder, "train")
        self.parent_key = parent_key
        self.progress_path = Path(progress_path)
        self.step_offsets = {int(k): int(v) for k, v in (step_offsets or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {"spool_folder": str(self.spool.folder), "parent_key": self.parent_key,
                "progress_path": str(self.progress_path), "step_offsets": self.step_offsets}

    def __call__(self, metrics: dict[str, Any]) -> None:
        from pipelines.files import write_text_atomic
        from pipelines.tracking import sanitize_key, stage_key

        stage = int(metrics.get("stage", -1))
        key = stage_key(self.parent_key, stage)
        offset = self.step_offsets.get(stage, 0)
        if metrics.get("event") == "attempt":
            for run in (key, self.parent_key):
                self.spool.append("attempt", run, attempt=metrics["attempt"],
                                  from_step=offset + int(metrics["from_step"]))
            if "precision" in metrics:  # what train.precision (auto by default) resolved to on this worker
                self.spool.append("params", key, params={"train.precision_resolved": metrics["precision"]})
        elif stage > 0:
            values = {sanitize_key(k): float(v) for k, v in metrics.items()
                      if k not in CONTROL_KEYS and isinstance(v, (int, float)) and math.isfinite(v)}
            step, ts, attempt = offset + int(metrics["step"]), int(time.time() * 1000), metrics.get("attempt")
            if values:
                self.spool.append("metrics", key, metrics=values, step=step, ts=ts, attempt=attempt)
            if "loss" in values:
                self.spool.append("metrics", self.parent_key, metrics={"loss": values["loss"]}, step=step, ts=ts,
                                  attempt=attempt)
        write_text_atomic(self.progress_path, json.dumps({k: v for k, v in metrics.items()
                                                          if isinstance(v, (int, float, str))}))


CONTROL_KEYS = {"stage", "step", "attempt", "total_steps", "event", "from_step", "done", "nonfinite", "fatal"}


def write_plan(uri: str, plan: dict[str, Any]) -> None:
    """Publish the stream's plan to a launched worker group (atomically: one write on a bucket, a rename on disk)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    staging = f"{path}.tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(staging) as out:
        out.write(json.dumps(plan).encode())
    if staging != path:
        fs.move(staging, path)


def wait_for_plan(uri: str, poll_s: float = 0.2) -> dict[str, Any]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    while True:
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            time.sleep(poll_s)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: every remaining stage of the stream on this worker.

    The worker group is launched before the driver knows the stages: it loads
    the base model, then waits for the plan the driver publishes at
    ``config["plan"]`` (stages, checkpoint store, report sink). A
    deterministic error (a bad config, a NaN) is reported as ``fatal`` and ends
    the loop normally, so `FailureConfig` does not retry what cannot succeed;
    anything else (a lost worker, a network error) is raised and retried from
    the newest checkpoint.
    """
    from pipelines.config import parse_run_config

    BaseModels.fresh(parse_run_config(config["run"]))  # warm: imports and the base model, before the plan
    plan = wait_for_plan(config["plan"])
    if plan.get("cancel"):
        return
    ctx = RayTrainContext(ReportSink(**plan["sink"]), cancel_uri=f"{config['plan']}.cancel")
    for _ in train_stream({"run": config["run"], **plan}, ctx):
        pass


def train_stream(config: dict[str, Any], ctx: StageContext) -> Iterator[CheckpointRef]:
    """Train the stages not yet done in the run's checkpoint store; yields each stage's final checkpoint."""
    from pipelines.config import parse_run_config
    from pipelines.spool import new_attempt_id

    run = parse_run_config(config["run"])
    store = CheckpointStore(config["checkpoint_root"])
    stages = [StageSpec(**s) for s in config["stages"]]
    attempt = new_attempt_id()
    try:
        latest = store.latest()
        for stage in stages:
            if latest is not None and (stage.index < latest.stage or (stage.index == latest.stage and latest.done)):
                continue
            resume = latest if latest is not None and latest.stage == stage.index else None
            previous = store.final(stage.index - 1) if stage.index > 1 and resume is None else None
            if stage.index > 1 and resume is None and previous is None:
                raise FileNotFoundError(f"{store.root}: no verified final state of stage {stage.index - 1} "
                                        f"to start stage {stage.index} from")
            ref = run_stage(run, stage, ctx, store, init=previous, resume=resume, attempt=attempt)
            if ref is None:
                return
            latest = ref
            yield ref
    except DETERMINISTIC_ERRORS as error:
        ctx.report({"fatal": f"{type(error).__name__}: {error}", "stage": -1, "step": -1})


class BaseModels:
    """The base model, loaded once per process and copied per use (a GGUF load takes ~20 s): the trainer's
    stages and, in the same process with the local backend, the evaluator share one load."""

    _loaded: dict[str, torch.nn.Module] = {}

    @classmethod
    def fresh(cls, run) -> torch.nn.Module:
        import copy

        from pipelines.models import load_model

        seeded = run.model_config_obj().source == "tiny"  # only a built tiny model's weights depend on the seed
        key = json.dumps([run.model, run.seed if seeded else None], sort_keys=True, default=str)
        if key not in cls._loaded:
            cls._loaded = {key: load_model(run.model_config_obj(), seed=run.seed)}
        return copy.deepcopy(cls._loaded[key])


def _restore(store: CheckpointStore, ref: CheckpointRef | None, method, model, rank: int) -> dict[str, Any]:
    if ref is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        state = load_stage_state(store.download(ref, Path(folder) / "state"), method, model, rank)
    return state or {}


def _save(store: CheckpointStore, ctx: StageContext, method, core, stage: int, step: int, done: bool,
          trainer_state: dict[str, Any] | None) -> CheckpointRef:
    """Every rank writes its part; rank 0 registers the checkpoint once all parts are there."""
    from pipelines.checkpoints import checkpoint_name

    with tempfile.TemporaryDirectory() as folder:
        save_stage_state(Path(folder), method, core, ctx.rank, trainer_state)
        name = checkpoint_name(stage, step, done)
        if ctx.world_size == 1:
            return store.save(Path(folder), stage, step, done)
        if ctx.rank == 0:
            store.clear_parts(name)
        ctx.barrier()
        store.put_parts(Path(folder), name)
        ctx.barrier()
        ref = store.commit(name, stage, step, done) if ctx.rank == 0 else None
        ctx.barrier()
        return ref or CheckpointRef(stage, step, done, name)


def run_stage(run, stage: StageSpec, ctx: StageContext, store: CheckpointStore, *, init: CheckpointRef | None,
              resume: CheckpointRef | None, attempt: str) -> CheckpointRef | None:
    """Train one task with the run's method; report loss and throughput, checkpoint, and return the final state.

    Returns None when the loss became non-finite (reported as ``nonfinite``).
    """
    import secura
    from pipelines.corda import corda_context
    from pipelines.parallel import merge_under_fsdp, sync_gradients, unwrap
    from secura.methods import build_method

    train = run.train
    rank, world = ctx.rank, ctx.world_size
    torch.set_num_threads(train.torch_threads or max(1, int(run.scaling.resources_per_worker.get("CPU", 1))))
    torch.manual_seed(run.seed * 1000 + stage.index * 10 + rank)

    method = build_method(run.method_config_obj(), corda_context(run, ctx.device))
    model = method.wrap(BaseModels.fresh(run))
    trainer_state = _restore(store, resume or init, method, model, rank)  # a stage's final state has none
    start_step = int(trainer_state.get("step", 0))
    if "rng" in trainer_state:
        torch.set_rng_state(trainer_state["rng"])
    device = ctx.device()
    precision = resolve_precision(train.precision, device)
    ctx.report({"event": "attempt", "stage": stage.index, "attempt": attempt, "from_step": start_step,
                "precision": precision})

    total_steps = steps_for_stage(train.model_dump(), stage.train_rows, world)
    columns = ctx.rows(stage)

    def batches(count: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        return micro_batches(columns, train.batch_size, lambda e: shuffle_seed(run.seed, stage.index, e), device,
                             count, start, group=train.length_groups)

    method.before_task(model, stage.index, stage.task, lambda: (trim_padding(b) for b in batches(
        total_steps * train.grad_accum)))  # may add or freeze parameters, so it comes before the optimiser
    model = ctx.prepare(model, run.scaling.parallel_strategy, precision=precision,
                        activation_checkpointing=train.gradient_checkpointing, compile=train.compile)
    core = unwrap(model)
    trainable = [p for p in core.parameters() if p.requires_grad]
    flops_per_token = training_flops_per_token(core)
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(1, train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    if trainer_state:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])

    strategy = method.strategy
    validation = Validation.for_stage(run, stage, core, device, trainer_state.get("validation"), precision)
    micro = batches((total_steps - start_step) * train.grad_accum, start_step * train.grad_accum)
    base = {"stage": stage.index, "attempt": attempt, "total_steps": total_steps}
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
            # S-MagNorm statistics are a sample: the last step of each log window (computing them costs as much
            # as the norm itself)
            sampled = step % train.log_every == 0 or step == total_steps
            with autocast(precision, device), (secura.magnorm_token_mask(core, mixed["attention_mask"])
                                               if sampled else contextlib.nullcontext()):
                outputs, loss = causal_lm_loss(model, core, mixed, strategy.needs_hidden_states)
                extra = strategy.extra_loss(core, mixed, outputs)
                if extra is not None:
                    loss = loss + extra
                    window_extra = (window_extra or 0.0) + float(extra.detach()) / train.grad_accum
            (loss / train.grad_accum).backward()
            step_loss += float(loss.detach()) / train.grad_accum
            window_tokens += int(mixed["attention_mask"].sum())
        sync_gradients(model)
        if not math.isfinite(_all_ranks_max(step_loss, device, world)):
            ctx.report({**base, "step": step, "loss": step_loss, "nonfinite": 1})
            return None
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        with merge_under_fsdp(model):
            method.after_optimizer_step(core, step, optimizer)
        window_loss += step_loss
        is_log = step % train.log_every == 0 or step == total_steps
        validated = validation.due(step) and validation.score(step, method, core)
        is_checkpoint = bool(train.checkpoint_every) and step % train.checkpoint_every == 0 and step < total_steps
        if is_checkpoint:
            _save(store, ctx, method, core, stage.index, step, False,
                  {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "rng": torch.get_rng_state(), "validation": validation.state_dict()})
        if validated:
            ctx.report({**base, "step": step, "val/score": validation.last, "val/best": validation.best})
        if validation.should_stop():
            break
        if not is_log:
            continue
        elapsed = time.perf_counter() - window_start
        window_steps = (step - 1) % train.log_every + 1
        metrics: dict[str, Any] = {
            **base, "step": step,
            "loss": window_loss / window_steps,
            "tokens_per_s": window_tokens * world / max(elapsed, 1e-9),
            "tokens_per_s_per_worker": window_tokens / max(elapsed, 1e-9),
            "lr": scheduler.get_last_lr()[0],
        }
        if window_extra is not None:
            metrics["loss/strategy"] = window_extra / window_steps
        if run.scaling.peak_tflops_per_worker:
            metrics["mfu"] = metrics["tokens_per_s_per_worker"] * flops_per_token / (
                run.scaling.peak_tflops_per_worker * 1e12)
        metrics.update(_adapter_stats(core, bool(train.analysis_every) and step % train.analysis_every == 0))
        ctx.report(metrics)
        if _all_ranks_max(float(ctx.cancelled()), device, world) > 0:  # every rank stops at the same step
            return None
        window_loss, window_extra, window_tokens, window_start = 0.0, None, 0, time.perf_counter()

    validation.restore_best(method, core)
    with merge_under_fsdp(model):
        method.end_task(core, optimizer)
    # the task's batches again: each strategy takes what it needs (EWC's Fisher, InfLoRA's subspace)
    strategy.after_task(core, lambda: (trim_padding(b) for b in batches(total_steps * train.grad_accum)), stage.index)
    ref = _save(store, ctx, method, core, stage.index, total_steps, True, None)
    ctx.report({**base, "step": total_steps, "done": 1, "trainable_params": sum(p.numel() for p in trainable)})
    return ref


class Validation:
    """Scores on the task's validation split during a stage: the best state is kept, and optionally the
    stage stops once the score has not improved for ``patience`` validations.

    Selection and stopping only ever look at validation rows, carved from the task's train split
    (the benchmark's dev files equal its test files). Every rank scores the same rows with the same
    model, so all ranks decide alike without communicating.
    """

    def __init__(self, every: int, patience: int | None, sets: dict | None, tokenizer, device: torch.device,
                 batch_size: int, state: dict[str, Any] | None = None, precision: str = "fp32") -> None:
        self.every, self.patience, self.sets, self.tokenizer = every, patience, sets, tokenizer
        self.device, self.batch_size, self.precision = device, batch_size, precision
        state = state or {}
        self.best = float(state.get("best", -math.inf))
        self.best_step = int(state.get("best_step", 0))
        self.since_best = int(state.get("since_best", 0))
        self.best_adapter: dict[str, torch.Tensor] | None = state.get("best_adapter")
        self.best_strategy = state.get("best_strategy")
        self.last = math.nan

    @classmethod
    def for_stage(cls, run, stage: StageSpec, model, device: torch.device, state: dict | None,
                  precision: str = "fp32") -> "Validation":
        every = run.train.validation_every
        if not every:
            return cls(0, None, None, None, device, 1)
        if stage.validation_path is None:
            raise ValueError(f"train.validation_every: task {stage.task!r} has no validation split; set "
                             f"validation_rows on the stream's tasks (or train.validation_every: 0)")
        from pipelines.models import load_tokenizer
        from pipelines.preprocess import read_eval_rows

        rows = read_eval_rows(stage.validation_path)
        return cls(every, run.train.early_stopping_patience, {stage.task: (stage.task_type, rows)},
                   load_tokenizer(run.model_config_obj()), device, run.eval.batch_size, state, precision)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def score(self, step: int, method, model) -> bool:
        """Score the model now; keep its state when it is the best so far. Returns True."""
        from pipelines.evaluate import evaluate_tasks

        self.last = next(iter(evaluate_tasks(model, self.tokenizer, self.sets, batch_size=self.batch_size,
                                             device=self.device, progress=False,
                                             precision=self.precision).values()))["score"]
        model.train()
        if self.last > self.best:
            self.best, self.best_step, self.since_best = self.last, step, 0
            self.best_adapter = {k: v.detach().clone() for k, v in method.adapter_state_dict(model).items()}
            self.best_strategy = method.strategy.state_dict()
        else:
            self.since_best += 1
        return True

    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def restore_best(self, method, model) -> None:
        """Back to the best-scoring state before the end-of-task hooks (no-op without validation)."""
        if self.best_adapter is not None:
            method.load_adapter_state(model, self.best_adapter)
            method.strategy.load_state_dict(self.best_strategy)

    def state_dict(self) -> dict[str, Any] | None:
        if not self.every:
            return None
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best,
                "best_adapter": self.best_adapter, "best_strategy": self.best_strategy}


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
    """S-MagNorm statistics (SECURA only: other methods log none) and, when asked, adapter gradient norms."""
    import secura
    from pipelines.analysis import grad_norms

    stats = {f"magnorm/{k}": v for k, v in secura.magnorm_stats(model, reset=True).items()
             if isinstance(v, (int, float)) and math.isfinite(v)}
    if not stats.get("magnorm/elements"):
        stats = {}
    if with_grad_norms:
        stats.update({f"grad_norm/{k}": v for k, v in grad_norms(model).items()})
    return stats


def stage_dicts(stages: list[StageSpec]) -> list[dict[str, Any]]:
    return [asdict(s) for s in stages]


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
    "steps_for_stage",
    "train_loop_per_worker",
    "train_stream",
]
