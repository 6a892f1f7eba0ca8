"""FSDP2 (frozen base sharded, adapter replicated) trains SECURA exactly like DDP on 2 gloo ranks.

All four runs share two forked processes and one process group (a fresh
model per run). Forked, not spawned: a spawned child spends ~15 s on 2 cores
re-importing transformers and peft, a forked one inherits the parent's imports.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 4
# q_proj is 64×64, v_proj 32×64 in the tiny model; 32 rows split 16/16, 64 rows 32/32.
# hidden 48 → q 48×48 rows 24/24; the odd vocab (259) makes the root's embedding shard unevenly.
SECURA = {"k": 8, "r": 4, "delta_bias": True, "merge_every": 2}
RUNS = [("ddp", "M2"), ("fsdp", "M2"), ("ddp", "M1"), ("fsdp", "M1")]


def _batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    input_ids = torch.randint(3, 259, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :6] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _train(strategy: str, merge: str, rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The train loop's order of calls: backward, sync, clip, step, merge (under merge_under_fsdp)."""
    from pipelines.models import build_tiny_model
    from pipelines.parallel import gather_adapter_state, merge_under_fsdp, sync_gradients, unwrap, wrap_for_training
    from secura.methods import MethodConfig, build_method

    method = build_method(MethodConfig(name="secura", adapter={**SECURA, "merge_strategy": merge}))
    core = method.wrap(build_tiny_model({"hidden_size": 48, "intermediate_size": 96}, seed=0))
    model = wrap_for_training(core, strategy, device="cpu", activation_checkpointing=strategy == "fsdp")
    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**_batch(rank, step)).loss
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
    if merge == "M1":  # M1's merges live in the base: compare the (gathered) merged q_proj weights too
        for name, p in unwrap(model).named_parameters():
            if name.endswith("q_proj.base_layer.weight"):
                state[f"merged::{name}"] = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs() -> dict:
    import pipelines.parallel  # noqa: F401 - imported before the fork, inherited by the workers
    import secura.methods  # noqa: F401

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "results.pt")
        mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="fork")
        return torch.load(out, weights_only=False)


@pytest.mark.parametrize("merge", ["M2", "M1"])
def test_fsdp_matches_ddp(runs: dict, merge: str) -> None:
    ddp_losses, ddp_state = runs[f"ddp-{merge}"]
    fsdp_losses, fsdp_state = runs[f"fsdp-{merge}"]
    assert all(torch.isfinite(torch.tensor(fsdp_losses)))
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5, abs=1e-6)
    assert ddp_losses[-1] < ddp_losses[0]  # it trained
    assert sorted(fsdp_state) == sorted(ddp_state)
    for name, tensor in ddp_state.items():
        torch.testing.assert_close(fsdp_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert any(name.endswith("secura_U.default") or "secura_U" in name for name in ddp_state)
