"""The method registry: every method builds, wraps, trains; configs fail clearly; state saves and restores."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from pipelines.models import build_tiny_model
from secura.methods import METHODS, MethodConfig, build_method
from secura.strategies import ExperienceReplay

# Small enough for the tiny model (q_proj 64×64, v_proj 32×64).
ADAPTER_ARGS = {
    "secura": {"k": 8, "r": 4, "delta_bias": True},
    "cur_lora": {"k": 8},
    "lora": {"r": 4},
    "dora": {"r": 4},
    "seq": {"r": 4},
    "er": {"r": 4},
    "ewc": {"r": 4},
    "ilora": {"r": 4},
    "olora": {"r": 4},
    "inflora": {"r": 4},
    "nlora": {"r": 4},
    "osf": {"effective_rank": 0.7},
    "corda": {"r": 4, "corda_method": "ipm"},  # from the task's rows: no samples to pass
    "full": {},
}
# Which trainable parameter names each adapter may have (all of them must be matched by one pattern).
TRAINABLE = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "secura": ("secura_B", "secura_bias"),  # A is frozen at merge_every 1 (the default): B is zero at every forward
    "cur_lora": ("_U.",),
    "task_lora": ("lora_A", "lora_B"),
    "inflora": ("lora_B",),
    "osf": ("osf_svd_params",),
    "corda": ("lora_A", "lora_B"),
}
LR = {"secura": 1e-2, "cur_lora": 1e-2, "full": 1e-3}


def make_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 259, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def train(method, model, task_index: int, steps: int, length: int = 12, lr: float = 1e-3) -> list[float]:
    """What the trainer does for one task, hooks in order; returns the losses."""
    strategy = method.strategy
    batches = [make_batch(4, length, seed=100 * task_index + s) for s in range(steps)]
    method.before_task(model, task_index, f"task{task_index}", lambda: iter(batches))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step, raw in enumerate(batches, start=1):
        batch = strategy.mix_batch(raw)
        strategy.observe(batch)
        outputs = model(**batch, output_hidden_states=strategy.needs_hidden_states)
        loss = outputs.loss
        extra = strategy.extra_loss(model, batch, outputs)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step)
        losses.append(loss.item())
    method.end_task(model)
    strategy.after_task(model, lambda: iter(batches), task_index)
    return losses


def build(name: str, **overrides):
    config = MethodConfig.from_dict({"name": name, "adapter": ADAPTER_ARGS[name], **overrides})
    method = build_method(config)
    return method, method.wrap(build_tiny_model(seed=0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_wraps_and_trains(name):
    method, model = build(name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable, n_total = method.trainable_parameter_count(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    adapter = METHODS[name].adapter
    if adapter == "full":
        assert n_trainable == n_total
    else:
        assert n_trainable < n_total / 10
        patterns = TRAINABLE[adapter]
        assert all(any(p in n for p in patterns) for n in trainable), trainable
        assert all(any(p in n for n in trainable) for p in patterns), (patterns, trainable)
        assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train(method, model, 1, steps=3, lr=LR.get(adapter, 1e-3))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # something learned (SECURA: A or B)
    assert method.describe()["method"] == name


def test_secura_trains_across_two_tasks_with_replay():
    method, model = build("secura", strategy="er", strategy_args={"buffer_size": 8, "replay_ratio": 0.5})
    assert isinstance(method.strategy, ExperienceReplay)
    assert method.describe()["strategy"] == "er" and method.describe()["strategy.buffer_size"] == 8
    train(method, model, 0, steps=3, length=10, lr=1e-2)
    assert len(method.strategy.row_tasks) == 8
    seen = []
    original_mix = method.strategy.mix_batch
    method.strategy.mix_batch = lambda b: seen.append(original_mix(b)) or seen[-1]
    losses = train(method, model, 1, steps=3, length=14, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    assert all(b["input_ids"].shape == (6, 14) for b in seen)  # 4 new + 2 replayed (10 tokens, padded to 14)


def test_secura_merges_on_its_schedule_under_the_method():
    method, model = build("secura", adapter={"k": 8, "r": 4, "merge_every": 2})
    method.end_task = lambda model: None  # only the per-step schedule is under test here
    b = [p for n, p in model.named_parameters() if "secura_B" in n]
    train(method, model, 0, steps=1, lr=1e-2)
    assert any(p.abs().sum() > 0 for p in b)  # step 1: not due, B keeps its update
    train(method, model, 0, steps=2, lr=1e-2)
    assert b and all(p.abs().sum() == 0 for p in b)  # step 2: folded into the core and reset
    assert any(t.abs().sum() > 0 for n, t in model.named_buffers() if "secura_U" in n)


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"method\.name.*'sgd'") as error:
        MethodConfig.from_dict({"name": "sgd"})
    for name in METHODS:
        assert repr(name) in str(error.value)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"name": "lora", "rank": 4}, r"method: unknown field\(s\) \['rank'\]"),
        ({"strategy": "er"}, r"method\.name: required"),
        ({"name": "lora", "strategy": "replay"}, r"method\.strategy: unknown strategy 'replay'"),
        ({"name": "lora", "adapter": {"rank": 4}}, r"method\.adapter: unknown field\(s\) \['rank'\].*lora_alpha"),
        ({"name": "dora", "adapter": {"use_dora": False}}, r"method\.adapter: unknown field\(s\) \['use_dora'\]"),
        ({"name": "secura", "adapter": {"rank": 4}}, r"method\.adapter: unknown field\(s\) \['rank'\].*merge_every"),
        ({"name": "full", "adapter": {"r": 4}}, r"method\.adapter: unknown field\(s\) \['r'\] for adapter 'full'"),
        ({"name": "er", "strategy_args": {"size": 3}}, r"method\.strategy_args: unknown argument\(s\) \['size'\]"),
        ({"name": "secura", "strategy": "ewc", "strategy_args": {"buffer_size": 3}}, r"strategy_args.*'ewc'"),
        ({"name": "er", "strategy_args": {"replay_ratio": -1}}, r"method\.strategy_args: replay_ratio must be >= 0"),
        ({"name": "secura", "adapter": {"k": 0}}, r"method\.adapter: SecuraConfig\.k must be a positive integer"),
        ({"name": "secura", "adapter": {"merge_strategy": "M3"}}, r"method\.adapter: .*merge_strategy"),
        ({"name": "lora", "target_modules": [1]}, r"method\.target_modules"),
        ({"name": "lora", "adapter": [4]}, r"method\.adapter: expected a mapping"),
        ({"name": "olora", "adapter": {"r": 0}}, r"method\.adapter: TaskLoraConfig\.r must be a positive integer"),
        ({"name": "inflora", "adapter": {"use_dora": True}}, r"method\.adapter: unknown field\(s\) \['use_dora'\]"),
        ({"name": "olora", "strategy_args": {"lambda_1": -1}}, r"method\.strategy_args: lambda_1 must be"),
        ({"name": "nlora", "strategy_args": {"lambda_1": 1}}, r"method\.strategy_args: unknown.*l1_lambda"),
        ({"name": "inflora", "strategy_args": {"threshold": 1.5}}, r"method\.strategy_args: threshold must be in"),
        ({"name": "lora", "strategy": "olora"}, r"method\.strategy: 'olora' needs the per-task LoRA adapter"),
        ({"name": "osf", "adapter": {"r": 4}}, r"method\.adapter: unknown field\(s\) \['r'\].*rank_growth"),
        ({"name": "corda", "adapter": {"corda_method": "svd"}}, r"method\.adapter: .*corda_method must be 'kpm'"),
        ({"name": "lora", "corda": {"samples": "x.jsonl"}}, r"method\.corda: only for method corda"),
    ],
)
def test_method_config_errors_name_the_bad_field(data, field):
    with pytest.raises((ValueError, TypeError), match=field):
        MethodConfig.from_dict(data)


def test_default_strategies_and_config_round_trip():
    expected = {"seq": "seq", "er": "er", "ewc": "ewc", "ilora": "ilora", "secura": "seq", "full": "seq",
                "olora": "olora", "inflora": "inflora", "nlora": "nlora"}
    for name, strategy in expected.items():
        assert build_method(MethodConfig.from_dict({"name": name})).strategy.name == strategy
    config = MethodConfig.from_dict({"name": "ewc", "strategy_args": {"ewc_lambda": 5.0}})
    assert MethodConfig.from_dict(config.to_dict()) == config
    assert config.target_modules == ["q_proj", "v_proj"]
    described = build_method(config).describe()
    assert described["strategy.ewc_lambda"] == 5.0 and described["target_modules"] == "q_proj,v_proj"


@pytest.mark.parametrize("name", ["lora", "dora", "secura", "cur_lora", "full"])
def test_adapter_state_round_trip(name, tmp_path):
    method, model = build(name)
    train(method, model, 0, steps=2, lr=LR.get(name, 1e-3))
    state = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    assert state
    batch = make_batch(2, 9, seed=7)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits

    fresh_method, fresh = build(name)
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch).logits, expected)  # the state matters
    fresh_method.load_adapter_state(fresh, state)
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, expected, atol=1e-5)

    method.save_adapter(model, tmp_path / "adapter")
    files = list((tmp_path / "adapter").glob("*.safetensors"))
    assert len(files) == 1
    saved = load_file(str(files[0]))
    assert len(saved) == len(state)
    if name == "full":
        assert set(saved) == {n for n, p in model.named_parameters()}
