"""CorDA, context-oriented decomposition adaptation (Yang et al., NeurIPS 2024, arXiv 2406.05223), as peft ships it.

peft builds the adapter from the covariance C of each adapted layer's inputs on a sample set
(`peft.tuners.lora.corda.preprocess_corda`, then ``LoraLayer.corda_init``): the SVD of ``W C`` gives
directions ordered by how much the sampled context uses them. The knowledge-preserved mode (``kpm``, the
default here) trains the r *least* used directions of samples of the knowledge to keep, so that knowledge
is left alone; the instruction-previewed mode (``ipm``) trains the r *most* used directions of the task's
own rows. Either way the adapter starts as ``s · B₀A₀`` and the base weight as ``W − s · B₀A₀``: the model's
output is unchanged until it trains. peft's ``examples/corda_finetuning/`` reports the retention this
buys: Llama-2-7B fine-tuned on math keeps 55% of its NQ-open score with CorDA-KPM, 8% with LoRA.

Here the adapter is built once, before the first task (`initialize`), and then trains through the stream
like sequential LoRA. What peft leaves to its caller:

* **Where the samples come from**: the caller passes them (`CordaContext`; pipelines reads
  ``method.corda``); ``ipm`` takes the first task's rows. peft's covariance hook reads one sample per
  forward (it squeezes the batch dimension), so every row runs alone, without its padding.
* **The covariance cache**: peft reads and writes ``CordaConfig.covariance_file``; the file here is named by
  the content hash of what the covariance depends on (the frozen weights, the adapted layers, the sample
  tokens, the peft version), written under a file lock to a temporary name first, so runs on the same model
  and samples (a comparison's learning rates) compute it once and a changed sample set never reads a stale one.
* **The state**: ``A₀`` and ``B₀`` are kept as buffers of each layer and saved with the trained factors, so a
  fresh model rebuilds ``W − s · B₀A₀`` exactly as ``corda_init`` computed it (`load_corda_state_dict`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import peft
import torch
from filelock import FileLock
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from torch import Tensor, nn

INIT_A, INIT_B = "corda_A0", "corda_B0"  # not "lora_…": peft's state dict filter must not pick them up
USER_FIELDS = ("r", "lora_alpha", "lora_dropout", "corda_method")
DEFAULT_LIMIT = 256  # peft's corda docstring: 256 distinct samples are enough for a 4096-wide model
Batch = dict[str, Tensor]


@dataclass
class CordaLoraConfig(LoraConfig):
    """peft's LoRA config with CorDA's mode; the adapter structure is built with LoRA's plain init (B = 0), and
    `initialize` then gives it CorDA's factors. Only `USER_FIELDS` are the method's knobs."""

    r: int = field(default=8, metadata={"help": "CorDA rank: the number of directions of W C the adapter trains."})
    lora_alpha: float = field(default=16.0, metadata={"help": "The update is scaled by lora_alpha / r."})
    corda_method: Literal["kpm", "ipm"] = field(
        default="kpm", metadata={"help": "kpm: train the directions the knowledge samples use least (keeps that "
                                         "knowledge); ipm: the directions the first task's rows use most."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.corda_method not in ("kpm", "ipm"):
            raise ValueError(f"CordaLoraConfig.corda_method must be 'kpm' or 'ipm', got {self.corda_method!r}.")


@dataclass(frozen=True)
class CordaContext:
    """What CorDA needs beside the model, from the caller (pipelines builds it from ``method.corda``)."""

    samples: Callable[[], Iterable[Batch]] | None = None  # kpm: the knowledge samples; ipm: unused
    cache_dir: Path | None = None  # covariances are cached here by content hash; None: computed every time
    limit: int = DEFAULT_LIMIT  # rows read (ipm: of the first task's batches)


def corda_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def is_initialized(model: nn.Module) -> bool:
    layers = corda_layers(model)
    return bool(layers) and all(hasattr(layer, INIT_A) for layer in layers.values())


def _rows(batches: Iterable[Batch], limit: int) -> list[Tensor]:
    """Each row's tokens without padding, one (1, T) tensor per row, at most ``limit`` of them."""
    rows: list[Tensor] = []
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        for ids, keep in zip(batch["input_ids"], mask):
            rows.append(ids[keep].unsqueeze(0))
            if len(rows) == limit:
                return rows
    if not rows:
        raise ValueError("CorDA: the sample set yielded no rows to build the covariance from")
    return rows


def covariance_key(model: nn.Module, layer_names: Iterable[str], rows: list[Tensor]) -> str:
    """The content hash of what the layers' input covariance depends on: frozen weights, layers, samples."""
    digest = hashlib.sha256(f"corda-covariance/peft {peft.__version__}/torch {torch.__version__}".encode())
    digest.update("\n".join(sorted(layer_names)).encode())
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the base; the adapter's random A does not change the inputs (B = 0)
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for row in rows:
        digest.update(row.to("cpu", torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def _preprocess(model: nn.Module, config: CordaLoraConfig, rows: list[Tensor], covariance_file: str | None) -> None:
    """peft's `preprocess_corda` on the wrapped model: the base layers are its targets, one row per forward."""
    device = next(model.parameters()).device
    targets = [f"{name}.base_layer" for name in corda_layers(model)]
    probe = dataclasses.replace(config, target_modules=targets, init_lora_weights="corda",
                                corda_config=CordaConfig(corda_method=config.corda_method,
                                                         covariance_file=covariance_file))

    def run_model() -> None:
        for row in rows:
            model(input_ids=row.to(device))

    was_training = model.training
    try:
        preprocess_corda(model, probe, run_model=run_model)
    finally:
        model.train(was_training)


@torch.no_grad()
def initialize(model: nn.Module, rows: list[Tensor], cache_dir: Path | None) -> None:
    """Give every adapted layer CorDA's factors (peft's ``corda_init``) from the input covariance on ``rows``.

    The model is moved to the rows' device first (before a stage the trainer has not placed it yet).
    """
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if not isinstance(config, CordaLoraConfig):
        raise TypeError(f"not a CorDA model: its config is a {type(config).__name__}")
    if next(model.parameters()).device != rows[0].device:
        model.to(rows[0].device)
    layers = corda_layers(model)
    if cache_dir is None:
        _preprocess(model, config, rows, None)
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        final = cache_dir / f"{covariance_key(model, [f'{n}.base_layer' for n in layers], rows)}.pt"
        with FileLock(str(final) + ".lock"):
            if final.is_file():
                _preprocess(model, config, rows, str(final))  # peft reads it: no forward pass
            else:
                handle, temp = tempfile.mkstemp(dir=cache_dir, prefix=final.stem, suffix=".tmp")
                os.close(handle)
                os.unlink(temp)  # peft writes it only if absent (an empty file would make it look cached)
                try:
                    _preprocess(model, config, rows, temp)
                    os.replace(temp, final)
                finally:
                    Path(temp).unlink(missing_ok=True)
    for layer in layers.values():
        layer.corda_init(adapter, "corda")
        layer.register_buffer(INIT_A, layer.lora_A[adapter].weight.detach().clone())
        layer.register_buffer(INIT_B, layer.lora_B[adapter].weight.detach().clone())


def start(model: nn.Module, task_index: int, task_batches: Callable[[], Iterable[Batch]] | None,
          context: CordaContext | None) -> None:
    """Before a task: build the adapter before the first one (kpm from the context's samples, ipm from the
    task's rows); later tasks, and a resumed first one, find it built (idempotent)."""
    if is_initialized(model):
        return
    if task_index != 1:
        raise ValueError(f"CorDA: task {task_index} starts on an adapter never built from samples; the adapter "
                         f"is built before task 1")
    config = model.peft_config[model.active_adapter]
    context = context or CordaContext()
    if config.corda_method == "kpm":
        if context.samples is None:
            raise ValueError("CorDA kpm builds its adapter from samples of the knowledge to keep: set "
                             "method.corda.samples (the caller passes them as a CordaContext)")
        batches = context.samples()
    else:
        if task_batches is None:
            raise ValueError("CorDA ipm builds its adapter from the first task's rows: before_task needs task_batches")
        batches = task_batches()
    initialize(model, _rows(batches, context.limit), context.cache_dir)


def corda_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """peft's LoRA state (the trained factors) and each layer's initial factors ``A₀``, ``B₀``."""
    state = dict(get_peft_model_state_dict(model))
    for name, layer in corda_layers(model).items():
        if hasattr(layer, INIT_A):
            state[f"{name}.{INIT_A}"] = getattr(layer, INIT_A)
            state[f"{name}.{INIT_B}"] = getattr(layer, INIT_B)
    return state


@torch.no_grad()
def load_corda_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore `corda_state_dict`: a fresh model's base weights become ``W − s · B₀A₀`` first (as peft's
    ``corda_init`` computes them); a model already built (a stage's best state) keeps its own."""
    adapter = model.active_adapter
    init_keys = {k for k in state if k.endswith((f".{INIT_A}", f".{INIT_B}"))}
    layers = corda_layers(model)
    if init_keys:
        for name, layer in layers.items():
            if hasattr(layer, INIT_A):
                continue
            a0, b0 = state.get(f"{name}.{INIT_A}"), state.get(f"{name}.{INIT_B}")
            if a0 is None or b0 is None:
                raise KeyError(f"adapter state lacks {name}.{INIT_A} / {INIT_B}")
            base = layer.get_base_layer()
            a0 = a0.to(base.weight.device, torch.float32)
            b0 = b0.to(base.weight.device, torch.float32)
            residual = base.weight.to(torch.float32).data - layer.scaling[adapter] * b0 @ a0
            base.weight.data = residual.to(base.weight.dtype)
            layer.register_buffer(INIT_A, a0.clone())
            layer.register_buffer(INIT_B, b0.clone())
    result = set_peft_model_state_dict(model, {k: v for k, v in state.items() if k not in init_keys})
    if result.unexpected_keys:
        raise KeyError(f"adapter state has keys the model lacks: {result.unexpected_keys[:5]}")
