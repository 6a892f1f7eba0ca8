"""FSDP2 (frozen base sharded, adapter replicated) trains SECURA exactly like DDP on 3 gloo ranks.

All four runs share three forked processes and one process group (a fresh
model per run). Forked, not spawned: a spawned child spends ~15 s on 2 cores
re-importing transformers and peft, a forked one inherits the parent's imports.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import free_port

WORLD = 3
STEPS = 3
# Three ranks so that dim-0 shards are uneven (tiny model: q_proj 64 rows → 22/22/20, v_proj 32 → 11/11/10):
# M1's merge into a sharded base weight must hit exactly each rank's rows.
ADAPTERS = {
    "M2": ("secura", {"k": 8, "r": 4, "delta_bias": True, "merge_every": 2}),
    "M1": ("secura", {"k": 8, "r": 4, "delta_bias": True, "merge_every": 2, "merge_strategy": "M1"}),
    # merging every step freezes A (it gets no gradient): under FSDP it is sharded and gathered at the merge
    "M2-every": ("secura", {"k": 8, "r": 4, "delta_bias": True, "merge_every": 1}),
    # LoRA's A comes from the global RNG, seeded per rank as train.py does: FSDP must start from rank 0's.
    "lora": ("lora", {"r": 4}),
}
RUNS = [(strategy, adapter) for adapter in ADAPTERS for strategy in ("ddp", "fsdp")]


def _batch(rank: int) -> dict[str, torch.Tensor]:
    """Each rank's own fixed batch: the loss must fall as the adapter fits it."""
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(3, 259, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :6] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _train(strategy: str, adapter: str, rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The train loop's order of calls: backward, sync, clip, step, merge (under merge_under_fsdp)."""
    from pipelines.models import build_tiny_model
    from pipelines.parallel import gather_adapter_state, merge_under_fsdp, sync_gradients, unwrap, wrap_for_training
    from secura.methods import MethodConfig, build_method

    name, args = ADAPTERS[adapter]
    method = build_method(MethodConfig(name=name, adapter=args))
    base = build_tiny_model(seed=0)
    torch.manual_seed(rank)
    core = method.wrap(base)
    model = wrap_for_training(core, strategy, device="cpu", activation_checkpointing=strategy == "fsdp")
    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**_batch(rank)).loss
        loss.backward()
        sync_gradients(model)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        with merge_under_fsdp(model):
            method.after_optimizer_step(unwrap(model), step)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / WORLD)
    with merge_under_fsdp(model):
        method.end_task(unwrap(model))
    state = gather_adapter_state(model, method)
    if adapter == "M1":  # M1's merges live in the base: compare the (gathered) merged q/v weights too
        for key, p in unwrap(model).named_parameters():
            if key.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight")):
                state[f"merged::{key}"] = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
    return losses, state


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {f"{s}-{m}": _train(s, m, rank) for s, m in RUNS}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs() -> dict:
    import pipelines.parallel  # noqa: F401 - imported before the fork, inherited by the workers
    import secura.methods  # noqa: F401

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "results.pt")
        mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, join=True, start_method="fork")
        return torch.load(out, weights_only=False)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_fsdp_matches_ddp(runs: dict, adapter: str) -> None:
    ddp_losses, ddp_state = runs[f"ddp-{adapter}"]
    fsdp_losses, fsdp_state = runs[f"fsdp-{adapter}"]
    assert all(torch.isfinite(torch.tensor(fsdp_losses)))
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5, abs=1e-6)
    assert ddp_losses[-1] < ddp_losses[0]  # it trained
    assert sorted(fsdp_state) == sorted(ddp_state)
    for name, tensor in ddp_state.items():
        torch.testing.assert_close(fsdp_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if adapter != "lora":
        assert any("secura_U" in name and tensor.abs().sum() > 0 for name, tensor in ddp_state.items())
