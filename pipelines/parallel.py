"""Data parallelism for adapter training of 7–8B models: DDP, or FSDP2 with the frozen base sharded.

Why not Ray's ``prepare_model(parallel_strategy="fsdp")``: it wraps the whole
model in one FSDP1 unit (one flat parameter, so no per-layer memory saving),
refuses CPU, and FSDP1 without ``use_orig_params`` rejects the mix of frozen
base and trainable adapter parameters that every peft model is.

Why FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer + root:
per-parameter DTensor sharding allows frozen and trainable parameters in one
group, parameter names are unchanged (peft's adapter state keys keep working),
and a layer's weights are all-gathered only while that layer runs.

The one design choice that matters for adapters: trainable parameters of a
peft model (SECURA's A, B, b_Δ; LoRA's A, B) are *not* sharded. They are passed
to ``fully_shard`` as ``ignored_params`` and stay plain, replicated tensors
whose gradients `sync_gradients` averages with one all-reduce per step:

* they are under 1 % of the model (0.03 % for SECURA k=r=128 on an 8B
  model), so sharding them saves little;
* sharded, SECURA breaks twice (both seen with torch 2.13): ``fully_shard``
  rejects its A ("FSDP does not support non-contiguous parameters": A is a
  column slice of an SVD factor), and the merge ``U += A B`` mixes a plain
  buffer with DTensors ("got mixed torch.Tensor and DTensor"); replicated,
  SECURA's code runs unchanged;
* the adapter state dict is plain tensors on every rank: saving needs no
  collective.

A model without frozen parameters (full fine-tuning) is sharded whole, the
ordinary FSDP2 way (gradients reduce-scattered by FSDP itself).

SECURA's M1 merge writes ``W ← W + C A B R`` into the frozen base weight,
which under FSDP2 is a DTensor sharded on dim 0 (output rows). Run the merge
inside `merge_under_fsdp`: with DTensor's implicit replication the full-size
factors are treated as replicated, so each rank updates only its own rows,
``W_shard += (C[shard rows] · A B) · R`` — exactly the rows of the full update,
with no communication. M2 never touches the base weight and needs nothing.
Precision note for M1 (not specific to FSDP): the merges fold into a bf16
base through an fp32 remainder (secura/merges.py), so updates smaller than
the weight's bf16 spacing accumulate instead of vanishing; U stays fp32
under either merge strategy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["fp32", "bf16"]


# --- structure ------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module the method and strategy work on: under DDP its ``.module``; FSDP2 shards in place."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the model's ``_no_split_modules`` (what HF uses for FSDP auto-wrap)."""
    names = set(getattr(_hf_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(_hf_model(model)).__name__} (no _no_split_modules match)")
    return layers


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP leaves unsharded: the trainable ones of a model that also has frozen ones (an adapter)."""
    params = list(model.parameters())
    if all(p.requires_grad for p in params):
        return []
    return [p for p in params if p.requires_grad]


# --- wrapping -------------------------------------------------------------------------


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer through transformers' own switch.

    Non-reentrant: the frozen embedding output needs no ``requires_grad`` and
    FSDP2's hooks compose with it. transformers ≥ 5.2x names the switch
    ``activation_checkpointing_enable``; older ones ``gradient_checkpointing_enable``.
    """
    hf = _hf_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _mixed_precision_policy(mixed_precision: Precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        # Compute in bf16; any gradient FSDP reduces (full fine-tuning) is reduced in fp32.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard(model: nn.Module, device: torch.device, mixed_precision: Precision) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    replicated = replicated_parameters(model)
    with torch.no_grad():  # what DDP does at construction: every rank starts from rank 0's adapter
        for p in replicated:  # (peft draws LoRA's A from the global RNG, which train.py seeds per rank)
            dist.broadcast(p, src=0)
    policy = _mixed_precision_policy(mixed_precision)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=set(replicated))
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(replicated))
    return model


def wrap_for_training(
    model: nn.Module,
    strategy: Strategy,
    *,
    device: torch.device | str,
    mixed_precision: Precision = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it for data-parallel training; returns the module to call.

    Needs an initialised process group for ``ddp``/``fsdp`` (Ray Train sets one
    up; gloo on CPU, nccl on GPU); without one the model is returned unwrapped
    (single process). Build the optimizer *after* this call from the returned
    module's parameters: FSDP2 replaces them with DTensors in place. The frozen
    base must be the same on every rank (one checkpoint or seed): FSDP2 keeps
    each rank's own rows of it; trainable parameters are taken from rank 0.

    ``mixed_precision="bf16"``: FSDP casts the sharded weights to bf16 for the
    forward (the train loop's autocast covers DDP); trainable adapter weights
    stay fp32. ``compile`` compiles each decoder layer in place (names kept).
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if mixed_precision not in ("fp32", "bf16"):
        raise ValueError(f"mixed_precision must be 'fp32' or 'bf16', got {mixed_precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = model.to(device)  # FSDP2 leaves ignored (adapter) parameters where they are
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        for layer in decoder_layers(model):
            layer.compile()
    if not dist.is_initialized() or dist.get_world_size() == 1:  # one worker: nothing to synchronise
        return model
    if strategy == "fsdp":
        return _shard(model, device, mixed_precision)
    # Only trainable (adapter) parameters are registered with the reducer; the frozen base
    # is broadcast once at construction and never again (C, R buffers are not re-broadcast).
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_sync())


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for per-forward buffer broadcasts: ``forward_sync_buffers`` from torch 2.13, before it
    ``broadcast_buffers`` (deprecated there)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# --- the training step ----------------------------------------------------------------


def sync_gradients(model: nn.Module) -> None:
    """Average the replicated adapter gradients across ranks (FSDP only; DDP already did).

    Call once per optimiser step, after the last micro-batch's backward and
    before clipping. One flattened all-reduce (SUM then divide: gloo has no AVG).
    """
    if not (dist.is_initialized() and _is_fsdp(model)):
        return
    params = replicated_parameters(model)
    if not params:
        return
    for p in params:
        if p.grad is None:  # every rank must contribute the same shapes
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
        offset += p.numel()


@contextlib.contextmanager
def merge_under_fsdp(model: nn.Module) -> Iterator[None]:
    """Context for adapter merges that write into the (sharded) base weight: SECURA M1.

    Inside it, plain tensors meeting a DTensor count as replicated, so
    ``W.addmm_(C·AB, R)`` on a dim-0-sharded ``W`` updates each rank's own rows
    from the matching rows of ``C·AB`` — the exact update, no communication.
    Every rank must run the merge (they do: merges follow the optimiser step).
    A no-op outside FSDP.
    """
    if not _is_fsdp(model):
        yield
        return
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


def gather_adapter_state(model: nn.Module, method: Any) -> dict[str, Tensor]:
    """The full (unsharded) adapter state as CPU tensors, for saving or merging.

    Call it on *every* rank: a sharded entry (full fine-tuning under FSDP) is
    gathered with ``DTensor.full_tensor()``, a collective. Adapter entries are
    replicated (see the module docstring), so for peft methods nothing moves.
    """
    from torch.distributed.tensor import DTensor

    state = method.adapter_state_dict(unwrap(model))
    full = {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        full[name] = tensor.detach().cpu().contiguous()
    return full
