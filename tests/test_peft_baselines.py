"""peft's continual-learning methods as baselines: OSF (secura.osf) and CorDA (secura.corda, pipelines.corda).

OSF: the preserved singular directions of every weight stay unchanged through a stage, the preserved rank
grows by the example's schedule, the merge between tasks keeps the model's function, a state restores any
stage. CorDA: the initial adapter changes nothing, the covariance cache is reused and invalidated by other
samples, a probe or a test split is refused as samples. Both: a 3-stage stream, two DDP ranks agreeing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.models import build_tiny_model
from secura import corda, osf
from secura.methods import MethodConfig, build_method
from ranks import run_ranks
from tiny_llama import byte_batch as make_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square-U (v: 32×64), square-V (down: 64×128) and square layers
pytestmark = pytest.mark.usefixtures("single_thread")


def build(method: dict, context=None, seed: int = 0):
    torch.manual_seed(seed)
    built = build_method(MethodConfig.from_dict({"target_modules": TARGETS, **method}), context)
    return built, built.wrap(build_tiny_model(seed=0))


def train(method, model, task: int, steps: int = 6, lr: float = 1e-2) -> None:
    """One task as the trainer runs it: before_task, AdamW steps with the method's hook after each."""
    batches = [make_batch(100 * task + i) for i in range(steps)]
    method.before_task(model, task, f"t{task}", lambda: iter(batches))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step, batch in enumerate(batches, start=1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step, optimizer)
    method.end_task(model, optimizer)
    model.eval()


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or make_batch(7, rows=2, length=9))).logits


# --- OSF ---------------------------------------------------------------------------------------


def _preserved(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The weight a task starts from and its top singular directions, the ones OSF freezes."""
    weight = layer.get_base_layer().weight.detach().clone()
    k = layer.effective_rank["default"]
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    return weight, u[:, :k], vh[:k], k


def test_osf_keeps_the_preserved_directions_and_grows_their_rank_by_the_examples_schedule():
    method, model = build({"name": "osf"})
    expected = {"q_proj": (19, 32, 44), "v_proj": (9, 16, 22), "down_proj": (19, 32, 44)}  # 0.3, 0.5, 0.7 of min
    for task in (1, 2, 3):
        method.before_task(model, task, f"t{task}", None)
        layers = osf.osf_layers(model)
        start = {name: _preserved(layer) for name, layer in layers.items()}
        train(method, model, task)
        for name, layer in layers.items():
            weight, u_high, v_high, k = start[name]
            assert k == expected[name.rsplit(".", 1)[-1]][task - 1], name
            delta = layer.get_delta_weight("default").detach()
            assert delta.abs().max() > 1e-3, name  # the task trained this layer
            assert (u_high.T @ delta).abs().max() < 1e-6, name  # rows along the frozen left directions
            assert (delta @ v_high.T).abs().max() < 1e-6, name  # columns along the frozen right directions
            assert torch.equal(layer.get_base_layer().weight, weight)  # the stage never writes the weight
    assert osf.current_task(model) == 3


def test_without_the_projection_after_each_step_adamw_leaks_into_the_frozen_directions(monkeypatch):
    method, model = build({"name": "osf"})
    monkeypatch.setattr(osf, "project_factors", lambda model: None)  # peft's gradient hooks alone
    layer = osf.osf_layers(model)["model.layers.0.self_attn.q_proj"]
    _, u_high, _, _ = _preserved(layer)
    train(method, model, 1)
    assert (u_high.T @ layer.get_delta_weight("default").detach()).abs().max() > 1e-4


def test_osf_merges_the_task_before_the_next_so_the_model_is_unchanged_by_it():
    method, model = build({"name": "osf"})
    train(method, model, 1)
    before = logits(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method.before_task(model, 2, "t2", None)
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < trainable  # more is preserved


def test_osf_state_restores_any_stage_on_a_fresh_model_and_resumes_idempotently(tmp_path):
    method, model = build({"name": "osf", "adapter": {"effective_rank": 0.25, "rank_growth": 0.25}})
    for task in (1, 2):
        train(method, model, task)
    method.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "osf.safetensors"))
    expected = logits(model)

    fresh_method, fresh = build({"name": "osf", "adapter": {"effective_rank": 0.25, "rank_growth": 0.25}}, seed=3)
    assert not torch.allclose(logits(fresh.eval()), expected, atol=1e-4)
    fresh_method.load_adapter_state(fresh, saved)
    assert torch.equal(logits(fresh.eval()), expected)
    state = {k: v.clone() for k, v in fresh_method.adapter_state_dict(fresh).items()}
    fresh_method.before_task(fresh, 2, "t2", None)  # a stage restarted from its checkpoint: nothing changes
    assert all(torch.equal(v, fresh_method.adapter_state_dict(fresh)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="task 4 cannot start on a model decomposed for task 2"):
        fresh_method.before_task(fresh, 4, "t4", None)


@pytest.mark.parametrize("adapter, message", [
    ({"effective_rank": 1.5}, r"effective_rank must be a fraction in \(0, 1\] or a positive integer"),
    ({"effective_rank": 8, "rank_growth": 0.2}, r"rank_growth must be an integer >= 0 \(the ranks are counts\)"),
    ({"effective_rank": 0.3, "rank_pattern": {"q_proj": 8}}, r"rank_growth must be of one unit"),
])
def test_osf_config_errors_name_the_field(adapter, message):
    with pytest.raises(ValueError, match=rf"method\.adapter: ContinualOsfConfig\.{message}"):
        MethodConfig.from_dict({"name": "osf", "adapter": adapter})


def test_osf_refuses_the_strategies_that_copy_parameters():
    with pytest.raises(ValueError, match=r"method\.strategy: 'ewc' does not apply to method 'osf'"):
        MethodConfig.from_dict({"name": "osf", "strategy": "ewc"})


def test_osf_rank_pattern_grows_per_module():
    method, model = build({"name": "osf", "adapter": {"effective_rank": 4, "rank_growth": 4,
                                                      "rank_pattern": {"down_proj": 10}}})
    train(method, model, 1, steps=1)
    method.before_task(model, 2, "t2", None)
    ranks = {name.rsplit(".", 1)[-1]: layer.effective_rank["default"] for name, layer in osf.osf_layers(model).items()}
    assert ranks == {"q_proj": 8, "v_proj": 8, "down_proj": 14}


# --- CorDA -------------------------------------------------------------------------------------


def knowledge(seed: int, rows: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 259, (1, 16), generator=g)} for _ in range(rows)]


def count_forwards(model) -> list[int]:
    calls = [0]
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_corda_kpm_starts_where_the_base_model_is(tmp_path):
    base = build_tiny_model(seed=0).eval()
    context = corda.CordaContext(samples=lambda: iter(knowledge(1)), cache_dir=tmp_path)
    method, model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}, context)
    method.before_task(model, 1, "t1", None)
    layers = corda.corda_layers(model)
    assert layers and all(layer.lora_B["default"].weight.abs().max() > 0 for layer in layers.values())
    batch = make_batch(5)
    assert torch.allclose(logits(model.eval(), batch), logits(base, batch), atol=1e-5)


def test_corda_caches_the_covariance_by_content_and_a_new_sample_set_misses(tmp_path):
    def init(rows):
        method, model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}},
                              corda.CordaContext(samples=lambda: iter(rows), cache_dir=tmp_path))
        calls = count_forwards(model)
        method.before_task(model, 1, "t1", None)
        return calls[0], {k: v for k, v in method.adapter_state_dict(model).items() if "lora_B" in k}

    first_calls, first = init(knowledge(1))
    files = sorted(tmp_path.glob("*.pt"))
    assert first_calls == 12 and len(files) == 1
    again_calls, again = init(knowledge(1))
    assert again_calls == 0 and sorted(tmp_path.glob("*.pt")) == files  # peft read the cached covariance
    assert all(torch.equal(first[k], again[k]) for k in first)
    other_calls, other = init(knowledge(2))
    assert other_calls == 12 and len(list(tmp_path.glob("*.pt"))) == 2
    assert any(not torch.allclose(first[k], other[k]) for k in first)


def test_corda_ipm_builds_from_the_first_tasks_rows_and_differs_from_kpm(tmp_path):
    kpm, kpm_model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}},
                           corda.CordaContext(samples=lambda: iter(knowledge(1)), cache_dir=tmp_path))
    kpm.before_task(kpm_model, 1, "t1", None)
    ipm, ipm_model = build({"name": "corda", "adapter": {"corda_method": "ipm"}})
    batches = [make_batch(100 + i) for i in range(3)]
    ipm.before_task(ipm_model, 1, "t1", lambda: iter(batches))
    a, b = (m.adapter_state_dict(x) for m, x in ((kpm, kpm_model), (ipm, ipm_model)))
    key = next(k for k in a if k.endswith("lora_B.weight"))
    assert a[key].norm() < b[key].norm()  # kpm trains the least used directions (smallest singular values)


def test_corda_state_rebuilds_the_residual_base_on_a_fresh_model(tmp_path):
    context = corda.CordaContext(samples=lambda: iter(knowledge(1)), cache_dir=tmp_path)
    method, model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}, context)
    train(method, model, 1, lr=1e-3)
    expected = logits(model)
    state = method.adapter_state_dict(model)
    fresh_method, fresh = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}, seed=4)
    fresh_method.load_adapter_state(fresh, state)
    assert torch.equal(logits(fresh.eval()), expected)
    fresh_method.before_task(fresh, 2, "t2", None)  # built: later tasks need no samples
    fresh_method.load_adapter_state(fresh, state)  # a stage's best state: the residual is not taken twice
    assert torch.equal(logits(fresh.eval()), expected)


def test_corda_without_samples_says_what_to_set():
    with pytest.raises(ValueError, match=r"method\.corda\.samples: required for corda_method kpm"):
        MethodConfig.from_dict({"name": "corda"})
    method, model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}})
    with pytest.raises(ValueError, match="set method.corda.samples"):
        method.before_task(model, 1, "t1", None)


def _demo_run(tmp_path, method: dict, **update):
    from pipelines.config import parse_run_config

    data = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), method=method, **update)
    data["train"].update(steps_per_task=3, log_every=3, checkpoint_every=2, batch_size=8)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"]["backend"] = "local"
    return parse_run_config(data)


@pytest.mark.parametrize("samples, refused", [
    ("builtin:demo/facts", "probe 'facts-probe'"),
    ({"builtin": "demo/jobs", }, "task 'jobs''s test split"),
])
def test_a_probe_or_a_test_split_is_refused_as_corda_samples(tmp_path, samples, refused):
    from pipelines.corda import resolve_corda_samples

    config = _demo_run(tmp_path, {"name": "corda", "corda": {"samples": samples}})
    with pytest.raises(ValueError, match=rf"method\.corda\.samples: .* is {refused} of stream 'demo'"):
        resolve_corda_samples(config, CONFIGS)


def test_a_copy_of_the_probe_file_is_refused_and_other_passages_pass(tmp_path):
    from pipelines.corda import resolve_corda_samples

    probe = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "knowledge-probe" / "probe.jsonl"
    (tmp_path / "copy.jsonl").write_bytes(probe.read_bytes())
    stream = {"name": "kp", "tasks": [{"name": "t", "type": "classification", "labels": ["a", "b"],
                                       "source": "builtin:demo/sentiment"}],
              "probe": [{"name": "knowledge-probe", "type": "multiple_choice", "source": str(probe)}]}
    config = _demo_run(tmp_path, {"name": "corda", "corda": {"samples": "copy.jsonl"}}, stream=stream)
    with pytest.raises(ValueError, match=r"copy\.jsonl is probe 'knowledge-probe' of stream 'kp'"):
        resolve_corda_samples(config, tmp_path)
    passages = "../pipelines/data/knowledge-context/quoref-passages.jsonl"
    config = _demo_run(tmp_path, {"name": "corda", "corda": {"samples": passages}}, stream=stream)
    resolved = resolve_corda_samples(config, CONFIGS)
    assert Path(resolved.method["corda"]["samples"]["path"]).is_file()


def test_corda_reads_the_packaged_passages_as_one_row_batches():
    from pipelines.corda import parse_corda, sample_rows
    from pipelines.models import build_byte_tokenizer

    path = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "knowledge-context" / "quoref-passages.jsonl"
    samples = parse_corda({"name": "corda", "corda": {"samples": str(path), "limit": 5, "max_length": 40}})
    rows = sample_rows(samples, build_byte_tokenizer(), torch.device("cpu"))
    assert len(rows) == 5 and all(r["input_ids"].shape[0] == 1 and r["input_ids"].shape[1] <= 40 for r in rows)
    with pytest.raises(ValueError, match=r"method\.corda\.template: .* has no field 'question'"):
        sample_rows(samples.model_copy(update={"template": "{question}"}), build_byte_tokenizer(), torch.device("cpu"))


# --- the whole path: a 3-stage stream, MLflow, two DDP ranks -------------------------------------


@pytest.mark.parametrize("method", [
    {"name": "osf", "target_modules": TARGETS},
    {"name": "corda", "target_modules": TARGETS, "adapter": {"r": 4}, "corda": {"samples": "builtin:demo/reviews"}},
], ids=lambda m: m["name"])
def test_a_three_stage_stream_runs_and_mlflow_has_the_trainable_parameters(ray_local, tmp_path, monkeypatch, method):
    import mlflow

    from pipelines.run import run_continual

    monkeypatch.setenv("SECURA_CL_CACHE", str(tmp_path / "cache"))
    config = _demo_run(tmp_path, method)
    result = run_continual(config, config_dir=CONFIGS)
    assert len(result.matrix.to_rows()) == 4
    final = sorted((tmp_path / "run" / "stages").iterdir())[-1]
    state = load_file(str(final / "adapter.safetensors"))
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(config.experiment).experiment_id
    parent = client.get_run(result.parent_run_id)
    stages = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
                                order_by=["attributes.start_time ASC"])
    trainable = [client.get_metric_history(s.info.run_id, "trainable_params")[-1].value for s in stages]
    if method["name"] == "osf":
        assert int(state[osf.TASK_KEY]) == 3
        assert trainable[0] > trainable[1] > trainable[2]  # each task preserves more
        assert parent.data.params["method.adapter.effective_rank"] == "0.3"
    else:
        assert any(k.endswith(corda.INIT_A) for k in state)
        assert trainable[0] == trainable[1] == trainable[2] > 0
        assert parent.data.params["method.corda.samples.builtin"] == "demo/reviews"
        assert len(list((tmp_path / "cache" / "corda").glob("*.pt"))) == 1  # one covariance for the run


WORLD = 2


def _rank_worker(rank: int, port: int, out: str, cache: str) -> None:
    import os

    import torch.distributed as dist

    from pipelines.parallel import gather_adapter_state, unwrap, wrap_for_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for spec in ({"name": "osf"}, {"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}):
            context = corda.CordaContext(samples=lambda: iter(knowledge(1)), cache_dir=Path(cache))
            state: dict[str, torch.Tensor] = {}
            for task in (1, 2):  # as run_stage: a fresh wrap per stage, the state, before_task, then DDP
                method, core = build(spec, context, seed=rank + 10 * task)
                if state:
                    method.load_adapter_state(core, state)
                batches = [make_batch(1000 * task + 10 * rank + i, rows=2) for i in range(2)]
                method.before_task(core, task, f"t{task}", lambda: iter(batches))
                model = wrap_for_training(core, "ddp", device="cpu")
                optimizer = torch.optim.AdamW([p for p in unwrap(model).parameters() if p.requires_grad], lr=1e-2)
                for step, batch in enumerate(batches, start=1):
                    optimizer.zero_grad()
                    model(**batch).loss.backward()
                    optimizer.step()
                    method.after_optimizer_step(unwrap(model), step, optimizer)
                state = gather_adapter_state(model, method)
            results[spec["name"]] = state
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_under_ddp(tmp_path):
    first, second = run_ranks(_rank_worker, str(tmp_path / "runs"), str(tmp_path / "cache"), world=WORLD)
    assert int(first["osf"][osf.TASK_KEY]) == 2
    for name, state in first.items():
        for key, tensor in state.items():  # every rank saw other rows, yet holds the same adapter
            assert torch.isfinite(tensor.float()).all() and torch.equal(tensor, second[name][key]), (name, key)


def test_the_memory_formula_counts_osf_factors_and_cordas_covariances():
    from pipelines.gpu_memory import Workload, formula_parts, saved_tensor_bytes

    work = Workload(rows=8, seq_len=96, eval_rows=16, precision="fp32")
    _, lora = build({"name": "lora"})
    _, osf_model = build({"name": "osf"})
    _, corda_model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}})
    assert formula_parts(lora, work)["adapter"] == 0 == formula_parts(lora, work)["initialization"]
    ids = torch.randint(3, 259, (8, 96), generator=torch.Generator().manual_seed(0))
    saved = saved_tensor_bytes(osf_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    parts = formula_parts(osf_model, work)
    assert saved <= parts["activations"] + parts["logits"] + parts["adapter"] <= 4 * saved
    covariances = 4 * (2 * 64 * 64 + 2 * 64 * 64 + 2 * 128 * 128)  # q, v (in 64), down (in 128), both layers
    assert formula_parts(corda_model, work)["initialization"] >= covariances
    assert json.dumps(parts)  # plain ints: written to gpu-memory.json


def test_their_knobs_are_searchable_and_bad_values_fail_before_a_sweep_starts():
    from tune.space import check_against, parse_space

    osf_base = yaml.safe_load((CONFIGS / "demo.yaml").read_text()) | {"method": {"name": "osf"}}
    check_against(osf_base, parse_space({"method.adapter.effective_rank": {"uniform": [0.2, 0.6]},
                                         "method.adapter.rank_growth": {"choice": [0.0, 0.1, 0.2]}}))
    corda_base = osf_base | {"method": {"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}}
    check_against(corda_base, parse_space({"method.adapter.r": {"choice": [4, 8, 16]},
                                           "method.adapter.corda_method": {"choice": ["kpm", "ipm"]},
                                           "method.corda.limit": {"choice": [16, 32]}}))
    with pytest.raises(ValueError, match=r"space\.method\.adapter\.effective_rank: value 1\.5"):
        check_against(osf_base, parse_space({"method.adapter.effective_rank": {"choice": [0.5, 1.5]}}))
    with pytest.raises(ValueError, match=r"space\.method\.corda\.limit: value 0 .*method\.corda\.limit"):
        check_against(corda_base, parse_space({"method.corda.limit": {"choice": [0]}}))


def test_the_gpu_memory_measurement_trains_both_methods_through_the_real_loop(ray_local, tmp_path, monkeypatch):
    from pipelines.compare import _prepare_shared, parse_compare
    from pipelines.gpu_memory import measure_peaks, memory_key

    monkeypatch.setenv("SECURA_CL_CACHE", str(tmp_path / "cache"))
    passages = "../pipelines/data/knowledge-context/quoref-passages.jsonl"  # relative to the compare YAML's folder
    data = {"name": "mem", "base": str(CONFIGS / "demo.yaml"), "seeds": [0], "output_dir": str(tmp_path / "cmp"),
            "overrides": {"tasks": ["jobs", "creatures"], "scaling.backend": "local"}, "reference": "osf",
            "methods": [{"label": "osf", "method": {"name": "osf"}, "lrs": [0.003]},
                        {"label": "corda", "method": {"name": "corda", "corda": {"samples": passages, "limit": 8,
                                                                                  "max_length": 32}},
                         "lrs": [0.003]}]}
    comparison = parse_compare(data, base_dir=CONFIGS)
    _prepare_shared(comparison, comparison.plans[0])
    configs = {memory_key(plan.config): plan.config for plan in comparison.plans}
    peaks = measure_peaks(configs, CONFIGS, str(comparison.output_dir), peak=lambda work: (work(), 1)[1])
    assert [p["source"] for p in peaks.values()] == ["measured", "measured"]
    assert len(list((tmp_path / "cache" / "corda").glob("*.pt"))) == 1


@pytest.mark.parametrize("name", ["compare-smollm2.yaml", "compare-smollm2-2task.yaml", "compare-smollm2-gpu.yaml",
                                  "compare-smollm2-modes.yaml"])
def test_the_smollm2_comparisons_carry_both_with_the_packaged_passages(name):
    from pipelines.compare import load_compare
    from pipelines.corda import resolve_corda_samples

    comparison = load_compare(CONFIGS / name)
    plans = {plan.label: plan for plan in comparison.plans}
    assert plans["osf"].config.method["adapter"] == {"effective_rank": 0.3, "rank_growth": 0.2}
    resolved = resolve_corda_samples(plans["corda"].config, comparison.config_dir)  # not a probe, not a test split
    path = Path(resolved.method["corda"]["samples"]["path"])
    assert path == Path(__file__).resolve().parents[1] / "pipelines/data/knowledge-context/quoref-passages.jsonl"


@pytest.mark.parametrize("method", [
    {"name": "osf"},
    {"name": "corda", "adapter": {"r": 4}, "corda": {"samples": "builtin:demo/reviews"}},
], ids=lambda m: m["name"])
def test_a_second_stage_killed_mid_way_resumes_to_the_same_adapter(ray_local, tmp_path, monkeypatch, method):
    """Stage 2 starts from stage 1's state on a fresh model (OSF: merged and decomposed again, CorDA: the
    residual rebuilt), is killed after step 4 and resumed from its checkpoint: bit for bit the undisturbed run."""
    from pipelines.checkpoints import CheckpointStore
    from pipelines.preprocess import prepare_stream
    from pipelines.streams import load_stream
    from pipelines.train import ADAPTER_FILE, LocalContext, StageSpec, stage_dicts, train_stream

    monkeypatch.setenv("SECURA_CL_CACHE", str(tmp_path / "cache"))
    config = _demo_run(tmp_path, method)
    config = config.model_copy(update={"train": config.train.model_copy(update={"steps_per_task": 6, "log_every": 2})})
    tasks = ["jobs", "creatures"]

    def loop(name: str) -> dict:
        manifest = prepare_stream(load_stream("demo"), config.model_config_obj(), str(tmp_path / name), progress=False)
        stages = [StageSpec(index=i, task=t, train_path=manifest.task(t).split("train").path,
                            train_rows=manifest.task(t).split("train").rows) for i, t in enumerate(tasks, 1)]
        return {"run": config.to_dict(), "stages": stage_dicts(stages), "checkpoint_root": str(tmp_path / name / "ck")}

    class WorkerKilled(Exception):
        pass

    def kill(metrics):
        if metrics.get("stage") == 2 and metrics.get("step") == 4 and "loss" in metrics:
            raise WorkerKilled

    killed = loop("killed")
    with pytest.raises(WorkerKilled):
        list(train_stream(killed, LocalContext(on_report=kill)))
    reports: list[dict] = []
    list(train_stream(killed, LocalContext(on_report=reports.append)))
    assert reports[0]["event"] == "attempt" and (reports[0]["stage"], reports[0]["from_step"]) == (2, 4)
    undisturbed = loop("undisturbed")
    list(train_stream(undisturbed, LocalContext()))

    def final(run: dict) -> dict[str, torch.Tensor]:
        store = CheckpointStore(run["checkpoint_root"])
        return load_file(str(store.download(store.final(2), tmp_path / f"final-{len(run)}-{id(run)}") / ADAPTER_FILE))

    resumed, reference = final(killed), final(undisturbed)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "bit for bit on CPU"


def test_cordas_drift_is_measured_from_the_pretrained_weight(tmp_path):
    from pipelines.analysis import adapter_drift

    context = corda.CordaContext(samples=lambda: iter(knowledge(1)), cache_dir=tmp_path)
    method, model = build({"name": "corda", "corda": {"samples": "builtin:demo/reviews"}}, context)
    method.before_task(model, 1, "t1", None)
    assert all(stats["frobenius"] < 1e-5 for stats in adapter_drift(model).values())  # nothing trained yet
    train(method, model, 1, lr=1e-2)
    assert all(stats["frobenius"] > 1e-4 for stats in adapter_drift(model).values())
