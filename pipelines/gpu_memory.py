"""How much GPU memory one run of a comparison holds, so `secura compare --gpu` can pack several runs
onto one GPU (Ray's fractional ``num_gpus``).

Measured on the GPU: each distinct (model, method, batch, precision) of the comparison runs the real
training loop for one step of its first two stages (so replay, EWC's Fisher pass and SECURA's merge
take their memory), then the real evaluation of one batch of the longest items of every set, and
PyTorch's peak reserved memory is read. Where that cannot be measured, a conservative formula of the
model's shapes stands in (`formula_parts`, checked on the CPU against what autograd saves). Either way
a run is sized as ``peak × HEADROOM + CUDA_CONTEXT_BYTES``: Ray does not enforce a fraction, so the
reservation must cover a batch longer than the measured one, the allocator's fragmentation and the
CUDA context that every process holds outside the allocator.
"""
from __future__ import annotations

import gc
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipelines.config import RunConfig

HEADROOM = 1.25
CUDA_CONTEXT_BYTES = 1 << 30  # context, cuBLAS workspace and kernels: about 0.5–1 GiB on Hopper
GIB = 1 << 30
# Copies of the trainable parameters a strategy keeps beside them (EWC: Fisher and anchor; I-LoRA: the EMA learner).
STRATEGY_COPIES = {"ewc": 2, "ilora": 1}


@dataclass(frozen=True)
class Workload:
    """What, beside the model, decides a run's memory."""

    rows: int  # training micro-batch rows, replayed rows included
    seq_len: int  # the longest prompt the stream allows
    eval_rows: int
    precision: Literal["fp32", "bf16"]
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RunMemory:
    """One run's reservation against one GPU's memory."""

    run_bytes: int  # peak × HEADROOM + CUDA context: what each run is given
    gpu_bytes: int  # one GPU's total memory
    source: Literal["measured", "formula"]

    def describe(self) -> str:
        return f"{self.run_bytes / GIB:.1f} GiB per run ({self.source}) of {self.gpu_bytes / GIB:.0f} GiB per GPU"


def run_bytes(peak_bytes: int) -> int:
    return math.ceil(peak_bytes * HEADROOM) + CUDA_CONTEXT_BYTES


def memory_key(config: RunConfig) -> str:
    """Runs that share this key hold the same memory (the learning rate and seed do not change it)."""
    return json.dumps({"model": config.model, "method": config.method, "stream": config.stream,
                       "tasks": config.tasks, "batch": config.train.batch_size, "precision": config.train.precision,
                       "checkpointing": config.train.gradient_checkpointing, "eval": config.eval.batch_size},
                      sort_keys=True, default=str)


def gpu_precision(requested: str) -> Literal["fp32", "bf16"]:
    """What ``train.precision`` is on the GPUs this plans for: ``auto`` is bf16 on every GPU with bf16."""
    return "fp32" if requested == "fp32" else "bf16"


def workload(config: RunConfig, stream) -> Workload:
    """The micro-batch (with ER's replayed rows) at the longest ``max_length`` of the run's tasks and probes."""
    from pipelines.run import select_tasks
    from secura.strategies import build_strategy

    method = config.method_config_obj()
    strategy = build_strategy(method.strategy_name, method.strategy_args)
    replay = getattr(strategy, "replay_ratio", 0.0) if getattr(strategy, "buffer_size", 0) else 0.0
    lengths = [t.max_length for t in select_tasks(stream, config.tasks)] + [p.max_length for p in stream.probe]
    return Workload(rows=config.train.batch_size + round(replay * config.train.batch_size), seq_len=max(lengths),
                    eval_rows=config.eval.batch_size, precision=gpu_precision(config.train.precision),
                    gradient_checkpointing=config.train.gradient_checkpointing)


# --- the formula --------------------------------------------------------------------------------


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    tensors = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return tensors


def formula_parts(model: nn.Module, work: Workload, strategy: str = "seq") -> dict[str, int]:
    """Bytes of a training step and of an evaluation batch, from the model's shapes; ``peak`` is their sum.

    weights: every parameter and buffer as stored. gradients and optimizer: the trainable parameters'
    gradient and AdamW's two moments. activations: per token and decoder layer, the tensors a layer
    saves for backward (12·hidden + 6·intermediate values, a deliberate over-count of the ~10 + 5 a
    Llama layer saves) plus eager attention's scores and probabilities (2·heads·seq); with gradient
    checkpointing only each layer's input and one layer's full set. logits: the logits in the compute
    precision plus three fp32 copies (upcast, log-softmax, its gradient). evaluation: a no-grad forward's
    fp32 logits and log-probabilities. The step and the evaluation never overlap, so the larger counts.
    adapter and initialization: what `adapter_parts` says of OSF and CorDA (0 for other methods).
    """
    config = getattr(model, "get_base_model", lambda: model)().config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inner = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    act = 2 if work.precision == "bf16" else 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    tokens = work.rows * work.seq_len
    per_layer = (12 * hidden + 6 * inner + 2 * heads * work.seq_len) * act
    if work.gradient_checkpointing:
        activations = tokens * (layers * hidden * act + per_layer)
    else:
        activations = tokens * layers * per_layer
    parts = {
        "weights": sum(t.numel() * t.element_size() for t in _unique_tensors(model)),
        "gradients": trainable_bytes,
        "optimizer": 2 * trainable_bytes,
        "strategy": STRATEGY_COPIES.get(strategy, 0) * trainable_bytes,
        "activations": activations,
        "logits": tokens * vocab * (act + 12),
        "evaluation": work.eval_rows * work.seq_len * vocab * 8,
        **adapter_parts(model, tokens, act),
    }
    step = parts["activations"] + parts["logits"] + parts["adapter"]
    training = parts["gradients"] + parts["optimizer"] + parts["strategy"] + max(step, parts["evaluation"])
    parts["peak"] = parts["weights"] + max(training, parts["initialization"])
    return parts


def adapter_parts(model: nn.Module, tokens: int, act: int) -> dict[str, int]:
    """Bytes beyond the formula's layers that peft's OSF and CorDA hold.

    adapter (a training step): an OSF layer's forward builds its delta as two factors of rank 2r, the
    trained and the initial ones side by side (``A``: out × 2r, ``B``: 2r × in, fp32), and keeps them and
    the input's projection (tokens × 2r) for backward. initialization (before the first task, when no
    gradient or optimizer state exists yet): CorDA holds one fp32 input covariance (in × in) per adapted
    layer at once, plus one layer's SVD workspace (three more).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.osf.layer import OSFLayer

    from secura.corda import CordaLoraConfig

    adapter = initialization = 0
    for module in model.modules():
        if isinstance(module, OSFLayer):
            for params in module.osf_svd_params.values():
                rank = params["S_low"].shape[0]
                adapter += 2 * rank * (module.out_features + module.in_features) * 4 + tokens * 2 * rank * act
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if isinstance(config, CordaLoraConfig):
        inputs = [m.in_features for m in model.modules() if isinstance(m, LoraLayer)]
        initialization = 4 * (sum(n * n for n in inputs) + 3 * max(inputs, default=0) ** 2)
    return {"adapter": adapter, "initialization": initialization}


def formula_estimate(config: RunConfig, config_dir: str | Path | None = None) -> dict[str, int]:
    """`formula_parts` of a run's model and method, built on the CPU."""
    from pipelines.models import load_model
    from secura.methods import build_method

    method = build_method(config.method_config_obj())
    model = method.wrap(load_model(config.model_config_obj(), seed=config.seed))
    return formula_parts(model, workload(config, config.load_stream(config_dir)), method.strategy.name)


def saved_tensor_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage once): what the formula's
    activations and logits stand for, counted on any device."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    parameters = {t.untyped_storage().data_ptr() for t in _unique_tensors(model)}
    return sum(size for ptr, size in storages.items() if ptr not in parameters)


# --- the measurement (inside a Ray task that holds a whole GPU) --------------------------------------


def _longest(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: len(row.get("prompt_ids") or ()), reverse=True)[:count]


def _peak(work: Callable[[], Any]) -> int:
    """Peak bytes PyTorch reserves on the GPU while ``work()`` runs, from an empty cache."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    work()
    peak = torch.cuda.max_memory_reserved()
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _on_gpu(config: RunConfig) -> RunConfig:
    """The run trained for one step a stage, in this process, on the GPU."""
    train = config.train.model_copy(update={"steps_per_task": 1, "checkpoint_every": 0, "validation_every": 0,
                                            "early_stopping_patience": None})
    scaling = config.scaling.model_copy(update={"use_gpu": True, "backend": "local"})
    return config.model_copy(update={"train": train, "scaling": scaling})


def _train_two_stages(run: RunConfig, stages: list) -> None:
    from pipelines.train import LocalContext, stage_dicts, train_stream

    with tempfile.TemporaryDirectory() as root:
        ctx = LocalContext("cuda" if torch.cuda.is_available() else "cpu")
        for _ in train_stream({"run": run.to_dict(), "stages": stage_dicts(stages), "checkpoint_root": root}, ctx):
            pass
    if "fatal" in ctx.last_metrics:
        raise RuntimeError(f"measuring method {run.method.get('name')}: {ctx.last_metrics['fatal']}")


def measure_peaks(configs: dict[str, RunConfig], config_dir: str | Path | None, shard_root: str, *,
                  peak: Callable[[Callable[[], Any]], int] = _peak, too_large: int = 0) -> dict[str, dict[str, Any]]:
    """``{key: {"peak": bytes, "source": "measured" | "formula"}}``, each peak read by ``peak`` around the
    work it measures.

    Training: one step of each of the run's first two stages through the real loop. Evaluation: the
    real evaluation of the base model on one batch of the longest items of every set, once per model
    (an adapter adds little to it). A run trains and evaluates in turn in one process, so its peak is the
    larger of the two. A key that runs out of memory on its own gets ``too_large``; one whose
    measurement fails otherwise gets the formula (the run will say what failed).
    """
    from pipelines.corda import resolve_corda_samples
    from pipelines.preprocess import prepare_stream
    from pipelines.run import Evaluator, load_eval_sets, log, select_tasks, stage_spec

    peaks: dict[str, dict[str, Any]] = {}
    evaluation: dict[str, int] = {}
    for key, config in configs.items():
        run = resolve_corda_samples(_on_gpu(config), config_dir)  # the trainer reads CorDA's samples itself
        stream = run.load_stream(config_dir)
        manifest = prepare_stream(stream, run.model_config_obj(), run.storage_path or shard_root, progress=False)
        stages = [stage_spec(manifest.task(t.name), i) for i, t in enumerate(select_tasks(stream, run.tasks)[:2], 1)]
        eval_key = json.dumps([run.model, run.stream, run.tasks, run.eval.batch_size], sort_keys=True, default=str)
        try:
            if eval_key not in evaluation:
                sets = {name: (kind, _longest(rows, run.eval.batch_size))
                        for name, (kind, rows) in load_eval_sets(run, stream, manifest).items()}
                evaluation[eval_key] = peak(lambda: Evaluator(run, sets).score(None))
            peaks[key] = {"peak": max(peak(lambda: _train_two_stages(run, stages)), evaluation[eval_key]),
                          "source": "measured"}
        except torch.cuda.OutOfMemoryError:
            peaks[key] = {"peak": too_large, "source": "measured"}
        except Exception as error:  # noqa: BLE001 - a failed measurement falls back to the formula
            log(f"memory: measuring method {run.method.get('name')} failed ({type(error).__name__}: {error}); "
                f"the formula stands in")
            peaks[key] = {"peak": formula_estimate(run, config_dir)["peak"], "source": "formula"}
    return peaks


def measure_on_gpu(configs: dict[str, RunConfig], config_dir: str | Path | None,
                   shard_root: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """(this GPU's total bytes, `measure_peaks` on it); a run that does not fit alone gets more than the
    whole GPU, so that placement refuses it."""
    total = torch.cuda.get_device_properties(0).total_memory
    return total, measure_peaks(configs, config_dir, shard_root, too_large=total + 1)
