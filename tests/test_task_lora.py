"""O-LoRA, InfLoRA and N-LoRA on the per-task LoRA adapter: penalties, frozen old tasks, InfLoRA's subspace,
save → fresh wrap → load (the evaluator's and a resumed stage's path), and a short stream on the local backend."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.models import build_tiny_model
from secura.methods import MethodConfig, build_method
from secura.task_lora import grow_subspace, input_covariances, task_lora_layers
from ranks import run_ranks
from tiny_llama import byte_batch as make_batch

R = 4
pytestmark = pytest.mark.usefixtures("single_thread")


def task_batches(task: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_batch(100 * task + i) for i in range(count)]


def build(name: str, strategy_args: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    method = build_method(MethodConfig.from_dict(
        {"name": name, "adapter": {"r": R}, "strategy_args": strategy_args or {}}))
    return method, method.wrap(build_tiny_model(seed=0))


def start(method, model, task: int) -> list[dict[str, torch.Tensor]]:
    batches = task_batches(task)
    method.before_task(model, task, f"t{task}", lambda: iter(batches))
    return batches


def train(method, model, task: int, steps: int = 3, lr: float = 1e-2, finish: bool = True) -> list[dict]:
    """What the trainer does for one task (hooks in its order)."""
    batches = start(method, model, task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        outputs = model(**batch)
        extra = method.strategy.extra_loss(model, batch, outputs)
        loss = outputs.loss if extra is None else outputs.loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step, optimizer)
    if finish:
        method.end_task(model, optimizer)
        method.strategy.after_task(model, lambda: iter(batches), task)
    return batches


def penalty(method, model) -> float:
    return float(method.strategy.extra_loss(model, None, None).detach())


def overlap(model) -> float:
    return sum(float((layer.past_A @ layer.lora_A.T).abs().sum()) for layer in task_lora_layers(model).values())


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_olora_overlap_is_zero_for_orthogonal_factors_and_positive_otherwise():
    method, model = build("olora", {"lambda_1": 0.5})
    start(method, model, 1)
    assert method.strategy.extra_loss(model, None, None) is None  # nothing earlier to be orthogonal to
    layers = task_lora_layers(model).values()
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.copy_(torch.eye(layer.lora_A.shape[1])[:R] * 0.3)
    start(method, model, 2)
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.copy_(torch.eye(layer.lora_A.shape[1])[R:2 * R] * -0.7)
    assert penalty(method, model) == 0.0
    with torch.no_grad():
        for layer in layers:
            layer.lora_A[0, 0] = 2.0  # overlaps task 1's first direction (0.3 · 2.0 per layer)
    assert penalty(method, model) == pytest.approx(0.5 * 0.6 * len(layers))


def test_olora_l2_term_sums_the_frobenius_norms_of_the_new_factors():
    method, model = build("olora", {"lambda_1": 0.0, "lambda_2": 0.3})
    start(method, model, 1)
    with torch.no_grad():
        for layer in task_lora_layers(model).values():
            layer.lora_B.fill_(0.1)
    expected = sum(math.sqrt(float(layer.lora_A.pow(2).sum())) + math.sqrt(float(layer.lora_B.pow(2).sum()))
                   for layer in task_lora_layers(model).values())
    assert penalty(method, model) == pytest.approx(0.3 * expected, rel=1e-5)


def test_olora_penalty_reduces_the_overlap_with_earlier_tasks():
    method, model = build("olora")
    train(method, model, 1)
    state = method.adapter_state_dict(model)
    overlaps = {}
    for lambda_1 in (0.0, 1.0):
        branch, branch_model = build("olora", {"lambda_1": lambda_1}, seed=1)
        branch.load_adapter_state(branch_model, state)
        torch.manual_seed(2)  # the same new A in both branches
        train(branch, branch_model, 2, steps=6)
        overlaps[lambda_1] = overlap(branch_model)
    assert overlaps[1.0] < 0.5 * overlaps[0.0], overlaps


@pytest.mark.parametrize("name", ["olora", "inflora", "nlora"])
def test_old_task_adapters_get_no_gradient_and_do_not_change(name):
    method, model = build(name, {"threshold": 0.5} if name == "inflora" else None)
    train(method, model, 1)
    layers = task_lora_layers(model)
    first = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in layers.items()}
    assert all(float(b.abs().sum()) > 0 for _, b in first.values())  # task 1 learned something to protect
    train(method, model, 2, finish=False)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    trained = ("lora_B",) if name == "inflora" else ("lora_A", "lora_B")
    assert with_grad == {f"{n}.{key}" for n in layers for key in trained}
    for n, layer in layers.items():
        assert not layer.past_A.requires_grad and not layer.past_B.requires_grad
        assert torch.equal(layer.past_A, first[n][0]) and torch.equal(layer.past_B, first[n][1])
        assert not torch.equal(layer.lora_B, first[n][1])


def test_inflora_a_is_orthogonal_to_the_earlier_tasks_subspace_and_frozen():
    method, model = build("inflora", {"threshold": 0.6})
    train(method, model, 1)
    layers = task_lora_layers(model)
    for layer in layers.values():  # task 1: the top input directions, orthonormal rows scaled by 1/√3
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, torch.eye(R) / 3, atol=1e-5)
    subspace = {n: m.clone() for n, m in method.strategy.subspace.items()}
    assert set(subspace) == set(layers) and all(0 < m.shape[1] < m.shape[0] - R for m in subspace.values())
    train(method, model, 2, finish=False)
    for n, layer in layers.items():
        assert float((layer.lora_A @ subspace[n]).abs().max()) < 1e-5
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, torch.eye(R) / 3, atol=1e-5)
        assert not layer.lora_A.requires_grad and layer.lora_A.grad is None and layer.lora_B.grad is not None


def test_the_subspace_takes_the_fewest_directions_that_reach_the_threshold():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16))
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.5] + [0.0] * 12)  # squared energies 16, 4, 1, 0.25 of 21.25
    covariance = basis @ torch.diag(spectrum) @ basis.T
    empty = torch.zeros(16, 0)
    dims = {eps: grow_subspace(empty, covariance, eps).shape[1] for eps in (0.5, 0.9, 0.97, 0.995)}
    assert dims == {0.5: 1, 0.9: 2, 0.97: 3, 0.995: 4}  # 16/21.25 = .75, 20/21.25 = .94, 21/21.25 = .99
    first = grow_subspace(empty, covariance, 0.9)
    assert torch.allclose(first.abs(), basis[:, :2].abs(), atol=1e-5)
    assert grow_subspace(first, covariance, 0.9).shape == first.shape  # already captured: nothing added
    # A second task along new directions: the subspace grows, stays orthonormal and captures ε of the new energy.
    second = basis[:, 4:8] @ torch.diag(torch.tensor([3.0, 1.0, 0.1, 0.1])) @ basis[:, 4:8].T
    grown = grow_subspace(first, second, 0.9)  # energies 9, 1, .01, .01: two directions reach 0.9
    assert grown.shape[1] == 4 and torch.allclose(grown.T @ grown, torch.eye(4), atol=1e-5)
    captured = torch.linalg.matrix_norm(grown.T @ second) ** 2 / torch.linalg.matrix_norm(second) ** 2
    assert captured >= 0.9


def test_inflora_subspace_grows_after_each_task_more_with_a_higher_threshold():
    dims = {}
    for threshold in (0.5, 0.9):
        method, model = build("inflora", {"threshold": threshold, "threshold_tasks": None})
        train(method, model, 1)
        after_first = {n: m.shape[1] for n, m in method.strategy.subspace.items()}
        train(method, model, 2)
        after_second = {n: m.shape[1] for n, m in method.strategy.subspace.items()}
        assert all(after_second[n] > after_first[n] > 0 for n in after_first)
        for m in method.strategy.subspace.values():
            assert torch.allclose(m.T @ m, torch.eye(m.shape[1]), atol=1e-4)
        dims[threshold] = after_second
    assert all(dims[0.9][n] > dims[0.5][n] for n in dims[0.5])


def test_inflora_threshold_rises_over_the_stream_as_in_the_port():
    method, _ = build("inflora", {"threshold": 0.99, "threshold_tasks": 15})
    assert method.strategy.threshold_at(1) == 0.99
    assert method.strategy.threshold_at(16) == pytest.approx(1.0)


def test_input_features_leave_out_padding():
    method, model = build("inflora")
    layers = task_lora_layers(model)
    batch = make_batch(0, rows=2, length=8)
    padded = {k: torch.nn.functional.pad(v, (0, 5), value=0) for k, v in batch.items()}
    plain = input_covariances(model, layers, [batch], None)
    with_padding = input_covariances(model, layers, [padded], None)
    assert all(torch.allclose(plain[n], with_padding[n], atol=1e-4) for n in layers)


def test_nlora_penalty_is_the_l1_norm_of_b_times_a():
    method, model = build("nlora", {"l1_lambda": 0.4})
    start(method, model, 1)
    with torch.no_grad():
        for layer in task_lora_layers(model).values():
            layer.lora_B.normal_()
    by_hand = 0.0
    for layer in task_lora_layers(model).values():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        update = (b[:, :, None] * a[None, :, :]).sum(dim=1)  # ΔW[i, j] = Σ_k B[i, k] A[k, j]
        assert update.shape == layer.base_layer.weight.shape  # v_proj is 32 × 64: the order matters
        by_hand += float(update.abs().sum())
    assert penalty(method, model) == pytest.approx(0.4 * by_hand, rel=1e-5)


@pytest.mark.parametrize("name", ["olora", "inflora", "nlora"])
def test_save_then_a_fresh_wrap_restores_every_task_and_resumes_idempotently(name, tmp_path):
    args = {"threshold": 0.5} if name == "inflora" else None
    method, model = build(name, args)
    for task in (1, 2, 3):
        train(method, model, task)
    method.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "task_lora.safetensors"))
    strategy_state = round_trip(method.strategy.state_dict())
    batch = make_batch(7, rows=2, length=9)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits

    fresh_method, fresh = build(name, args, seed=5)
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch).logits, expected, atol=1e-4)
    fresh_method.load_adapter_state(fresh, saved)
    fresh_method.strategy.load_state_dict(strategy_state)
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, expected, atol=1e-5)
    layers = task_lora_layers(fresh)
    assert all(int(layer.tasks) == 3 and layer.past_A.shape[0] == 2 * R for layer in layers.values())

    current = {n: layer.lora_A.detach().clone() for n, layer in layers.items()}
    other = [make_batch(999)]
    fresh_method.before_task(fresh, 3, "t3", lambda: iter(other))  # a stage restarted from its checkpoint
    assert all(int(layer.tasks) == 3 and layer.past_A.shape[0] == 2 * R for layer in layers.values())
    assert all(torch.equal(layer.lora_A, current[n]) for n, layer in layers.items())
    fresh_method.before_task(fresh, 4, "t4", lambda: iter(other))
    assert all(int(layer.tasks) == 4 and layer.past_A.shape[0] == 3 * R for layer in layers.values())


def test_tasks_must_follow_each_other():
    method, model = build("olora")
    with pytest.raises(ValueError, match="task 3 cannot start on an adapter that holds 0 task"):
        start(method, model, 3)


def test_a_state_of_another_rank_names_the_layer_and_shapes():
    method, model = build("olora")
    train(method, model, 1)
    state = method.adapter_state_dict(model)
    other_method = build_method(MethodConfig.from_dict({"name": "olora", "adapter": {"r": 2 * R}}))
    other = other_method.wrap(build_tiny_model(seed=0))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: shape"):
        other_method.load_adapter_state(other, state)


# --- a short stream with the real trainer and driver (local backend) ---------------------------------------


@pytest.mark.parametrize("method", [
    {"name": "olora", "adapter": {"r": 4}},
    {"name": "inflora", "adapter": {"r": 4}, "strategy_args": {"threshold": 0.9}},
    {"name": "nlora", "adapter": {"r": 4}},
], ids=lambda m: m["name"])
def test_a_stream_runs_and_the_penalty_is_logged(ray_local, tmp_path, method):
    import mlflow

    from pipelines.config import parse_run_config
    from pipelines.run import run_continual

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), tasks=["jobs", "sentiment"], method=method)
    data["train"].update(steps_per_task=4, log_every=2, checkpoint_every=2, batch_size=8)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"]["backend"] = "local"
    config = parse_run_config(data)
    result = run_continual(config)
    assert len(result.matrix.to_rows()) == 3
    final = sorted((tmp_path / "run" / "stages").iterdir())[-1]
    state = load_file(str(final / "adapter.safetensors"))
    assert {int(v) for k, v in state.items() if k.endswith(".tasks")} == {2}
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db")
    stages = client.search_runs(
        [client.get_experiment_by_name(config.experiment).experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'", order_by=["attributes.start_time ASC"])
    penalties = [[m.value for m in client.get_metric_history(s.info.run_id, "loss/strategy")] for s in stages]
    if method["name"] == "olora":
        assert penalties[0] == [] and penalties[1] and all(v > 0 for v in penalties[1])
    elif method["name"] == "nlora":
        assert all(p and all(v > 0 for v in p) for p in penalties)
    else:
        assert penalties == [[], []]


# --- two ranks: DDP and FSDP2 with the bf16 policy, as the trainer runs them ---------------------------------

WORLD = 2


def _rank_batches(rank: int, task: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(1000 * task + 10 * rank + i, rows=2) for i in range(2)]


def _train_two_tasks(name: str, parallel: str, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Two stages as ``run_stage`` orders them (fresh wrap, load, before_task, wrap for training, ...)."""
    from pipelines.parallel import gather_adapter_state, sync_gradients, unwrap, wrap_for_training

    state: dict[str, torch.Tensor] = {}
    for task in (1, 2):
        method, core = build(name, {"threshold": 0.5} if name == "inflora" else None, seed=rank + 10 * task)
        if state:
            method.load_adapter_state(core, state)
            method.strategy.load_state_dict(round_trip(strategy_state))
        batches = _rank_batches(rank, task)
        method.before_task(core, task, f"t{task}", lambda: iter(batches))
        model = wrap_for_training(core, parallel, device="cpu", mixed_precision="bf16")
        trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for batch in batches:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(**batch)
                extra = method.strategy.extra_loss(unwrap(model), batch, outputs)
                loss = outputs.loss if extra is None else outputs.loss + extra
            loss.backward()
            sync_gradients(model)
            optimizer.step()
        method.end_task(unwrap(model), optimizer)
        method.strategy.after_task(unwrap(model), lambda: iter(batches), task)  # a forward outside autocast
        state = gather_adapter_state(model, method)
        strategy_state = method.strategy.state_dict()
    return state, strategy_state


def _rank_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        runs = {f"{parallel}-{name}": _train_two_tasks(name, parallel, rank)
                for name, parallel in (("inflora", "fsdp"), ("olora", "fsdp"), ("inflora", "ddp"))}
        torch.save(runs, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_and_the_subspace_under_ddp_and_fsdp(tmp_path):
    first, second = run_ranks(_rank_worker, str(tmp_path / "runs"), world=WORLD)
    for run, (state, strategy_state) in first.items():
        assert {int(v) for k, v in state.items() if k.endswith(".tasks")} == {2}, run
        for key, tensor in state.items():  # every rank saw other rows, yet holds the same adapter
            assert torch.isfinite(tensor.float()).all() and torch.equal(tensor, second[run][0][key]), (run, key)
        for key, subspace in strategy_state.get("subspace", {}).items():
            assert subspace.shape[1] > 0 and torch.equal(subspace, second[run][1]["subspace"][key]), (run, key)
