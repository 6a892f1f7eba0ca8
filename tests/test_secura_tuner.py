"""SECURA as a PEFT tuner on tiny Llama (nn.Linear) and GPT-2 (Conv1D) models built in code."""

import copy
import json
import math

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import secura
from secura import SecuraConfig
from secura.layer import SecuraLayer
from secura.magnorm import s_magnorm
from tiny_llama import llama, llama_state  # noqa: F401 - llama_state is a fixture

GPT2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=300)
QV = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def gpt2_state():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(GPT2).state_dict()


def gpt2(state):
    model = transformers.GPT2LMHeadModel(GPT2)
    model.load_state_dict(state)
    return model.eval()


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def train(model, steps=3, lr=1e-2, merge=True):
    """A few AdamW steps with the SECURA merge hook; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if merge:
            secura.merge_step(model, step, optimizer=opt)
        losses.append(loss.item())
    model.eval()
    return losses


def randomise(model, scale=0.05, seed=0):
    """Give every adapter a non-trivial A, B, U and bias without training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in secura.model.secura_layers(model):
            for container in (layer.secura_B, layer.secura_U, layer.secura_bias):
                for t in container.values():
                    t.copy_(scale * torch.randn(t.shape, generator=g))


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"k": 0}, "k"),
        ({"r": -1}, "r"),
        ({"merge_every": 0}, "merge_every"),
        ({"magnorm": "maybe"}, "magnorm"),
        ({"magnorm_norm": "median"}, "magnorm_norm"),
        ({"merge_strategy": "M3"}, "merge_strategy"),
        ({"cur_selection": "random"}, "cur_selection"),
        ({"brake_threshold": 2.5}, "brake_threshold"),
        ({"brake_ratio": 1.5}, "brake_ratio"),
        ({"brake_decay": 0.0}, "brake_decay"),
        ({"magnorm_norm": "absolute", "magnorm_s_max": 1.5}, "magnorm_s_max"),
        ({"magnorm_norm": "absolute", "brake_threshold": 12.0}, "brake_threshold"),
        ({"magnorm_tau": 0.0}, "magnorm_tau"),
        ({"core_decay": 1.0}, "core_decay"),
        ({"core_decay": 0.1, "merge_strategy": "M1"}, "core_decay"),
        ({"sigmoid_scale": 0.0}, "sigmoid_scale"),
        ({"magnorm_eps": 0.0}, "magnorm_eps"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SecuraConfig\.{field}\b"):
        SecuraConfig(**kwargs)


def test_config_normalises_yaml_booleans_and_strategy_case():
    assert SecuraConfig(magnorm=False).magnorm == "off"
    assert SecuraConfig(magnorm=True).magnorm == "on"
    assert SecuraConfig(merge_strategy="m1").merge_strategy == "M1"
    cfg = SecuraConfig()
    assert cfg.peft_type == "SECURA" and (cfg.merge_strategy, cfg.merge_every) == ("M2", 1)
    assert cfg.magnorm_norm == secura.DEFAULT_NORM_MODE in secura.NORM_MODES


def test_old_brake_names_still_work_with_a_deprecation_message():
    with pytest.warns(FutureWarning, match="threshold is deprecated; use brake_threshold"):
        cfg = SecuraConfig(threshold=1.3, ratio=0.5, decay=0.9)
    assert (cfg.brake_threshold, cfg.brake_ratio, cfg.brake_decay) == (1.3, 0.5, 0.9)
    assert (cfg.threshold, cfg.ratio, cfg.decay) == (None, None, None)  # saved configs carry the new names only
    with pytest.raises(ValueError, match="both threshold=1.3 .* and brake_threshold=1.4"):
        SecuraConfig(threshold=1.3, brake_threshold=1.4)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"SecuraConfig\.brake_ratio"):
        SecuraConfig(ratio=2.0)


# ------------------------------------------------------------------------------------------ creation and step 0


@pytest.mark.parametrize("strategy", ["M1", "M2"])
def test_step_zero_equals_base_exactly(llama_state, gpt2_state, strategy):
    for build, state, targets in ((llama, llama_state, QV), (gpt2, gpt2_state, ["c_attn", "c_proj"])):
        ref = logits(build(state))
        cfg = SecuraConfig(k=16, r=8, target_modules=targets, merge_strategy=strategy, delta_bias=True)
        assert torch.equal(logits(get_peft_model(build(state), cfg)), ref)


def test_trainable_parameters_are_a_b_and_bias_only(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, delta_bias=True,
                                                            merge_every=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(t in n for t in ("secura_A", "secura_B", "secura_bias")) for n in trainable)
    # 4 layers × (A 16×8 + B 8×16) + bias: 2 q_proj (64) + 2 v_proj (32)
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 16 * 8 + 2 * 64 + 2 * 32
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SecuraLayer)
    assert not layer.secura_U["default"].requires_grad
    assert torch.count_nonzero(layer.secura_B["default"]) == 0


def test_r_larger_than_k(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=8, r=12, target_modules=QV))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    a = layer.secura_A["default"]
    assert a.shape == (8, 12) and layer.secura_B["default"].shape == (12, 8)
    assert torch.all(a[:, 8:] != 0)
    assert model.get_nb_trainable_parameters()[0] == 4 * 8 * 12  # merge_every 1: B only, A is frozen


def test_impossible_rank_is_a_clear_error_unless_clamped(llama_state):
    with pytest.raises(ValueError, match=r"v_proj.*k=40 exceeds min\(out, in\).*clamp_rank"):
        get_peft_model(llama(llama_state), SecuraConfig(k=40, r=8, target_modules=QV))
    model = get_peft_model(llama(llama_state), SecuraConfig(k=40, r=8, target_modules=QV, clamp_rank=True))
    layers = model.base_model.model.model.layers[0].self_attn
    assert layers.q_proj.secura_A["default"].shape == (40, 8)
    assert layers.v_proj.secura_A["default"].shape == (32, 8)  # v_proj is 64 → 32


def test_cur_buffers_stay_in_the_base_dtype(llama_state):
    base = llama(llama_state).to(torch.bfloat16)
    model = get_peft_model(base, SecuraConfig(k=16, r=8, target_modules=QV))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.secura_C["default"].dtype == layer.secura_R["default"].dtype == torch.bfloat16
    assert layer.secura_A["default"].dtype == layer.secura_U["default"].dtype == torch.float32  # peft autocast
    assert torch.equal(logits(model), logits(llama(llama_state).to(torch.bfloat16)))
    randomise(model)
    assert torch.isfinite(logits(model)).all()


# ------------------------------------------------------------------------------------------------ the forward


def float64_layer(state, builder, target, strategy="M2", magnorm="on", r=6):
    model = builder(state).double()
    cfg = SecuraConfig(k=12, r=r, target_modules=[target], merge_strategy=strategy, magnorm=magnorm, delta_bias=True)
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    randomise(model)
    layer = next(secura.model.secura_layers(model))
    return model, layer


@pytest.mark.parametrize("builder_name, target", [("llama", "q_proj"), ("gpt2", "c_attn")])
@pytest.mark.parametrize("strategy, r", [("M2", 6), ("M1", 6), ("M1", 5)])  # M1 with r < k/2: B, A one by one
@pytest.mark.parametrize("magnorm", ["on", "off"])
def test_factorised_forward_matches_materialised_delta_w(
    llama_state, gpt2_state, builder_name, target, strategy, r, magnorm
):
    builder, state = (llama, llama_state) if builder_name == "llama" else (gpt2, gpt2_state)
    _, layer = float64_layer(state, builder, target, strategy=strategy, magnorm=magnorm, r=r)
    base = layer.get_base_layer()
    w0 = base.weight.T if layer.fan_in_fan_out else base.weight  # out × in
    b0 = base.bias if base.bias is not None else 0.0
    rows, cols = layer.secura_rows["default"], layer.secura_cols["default"]
    c, r = w0[:, cols], w0[rows, :]
    a, b, u, bias = (layer.secura_A["default"], layer.secura_B["default"], layer.secura_U["default"],
                     layer.secura_bias["default"])
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    if strategy == "M2":  # Y0 = original output, ΔY = whole accumulated change + b_Δ
        delta_w = c @ (u + a @ b) @ r
        y0, dy = x @ w0.T + b0, x @ delta_w.T + bias
    else:  # U is already in the base weight; Y0 = current model (with b_Δ), ΔY = live A·B only
        delta_w = c @ a @ b @ r
        y0, dy = x @ w0.T + b0 + bias, x @ delta_w.T
    expected = s_magnorm(y0, dy, layer.secura_config["default"], brake_channels=layer.secura_brake["default"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.get_delta_weight("default"), delta_w.T if layer.fan_in_fan_out else delta_w)


def test_one_token_never_depends_on_the_rest_of_the_batch(llama_state):
    model, layer = float64_layer(llama_state, llama, "q_proj")
    x = torch.randn(4, 6, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        other = x.clone()
        other[0] *= 100
        other[2, :3] = 0
        torch.testing.assert_close(layer(x[1:2, 4:5]), full[1:2, 4:5], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(other)[1], full[1], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- merging


def test_m1_with_norm_off_trains_exactly_like_m2_with_norm_off(llama_state):
    runs = {}
    for strategy in ("M1", "M2"):
        torch.manual_seed(0)
        cfg = SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy=strategy, magnorm="off", delta_bias=True)
        model = get_peft_model(llama(llama_state), cfg)
        runs[strategy] = (train(model, steps=5, lr=1e-2), logits(model))
    torch.testing.assert_close(runs["M1"][0], runs["M2"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(runs["M1"][1], runs["M2"][1], rtol=1e-4, atol=1e-5)
    assert runs["M1"][0][-1] < runs["M1"][0][0] - 0.01  # it does learn


def test_merge_step_respects_merge_every_and_accumulates_the_core(llama_state):
    cfg = SecuraConfig(k=16, r=8, target_modules=QV, merge_every=2)
    model = get_peft_model(llama(llama_state), cfg)
    layer = next(secura.model.secura_layers(model))
    randomise(model)
    before = logits(model)
    expected_u = layer.secura_U["default"] + layer.secura_A["default"] @ layer.secura_B["default"]
    assert not secura.merge_step(model, 1)
    assert torch.count_nonzero(layer.secura_B["default"]) > 0
    assert secura.merge_step(model, 2)
    assert torch.count_nonzero(layer.secura_B["default"]) == 0
    torch.testing.assert_close(layer.secura_U["default"], expected_u)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)  # M2 merges keep the function


def test_b_optimizer_state_is_kept_by_default_and_reset_on_request(llama_state):
    for reset in (False, True):
        cfg = SecuraConfig(k=16, r=8, target_modules=QV, reset_b_optimizer_state=reset)
        model = get_peft_model(llama(llama_state), cfg)
        train(model, steps=1, merge=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        b = next(secura.model.secura_layers(model)).secura_B["default"]
        assert b in opt.state
        if reset:
            with pytest.raises(ValueError, match="pass the optimizer"):
                secura.end_task(model)
        secura.end_task(model, optimizer=opt)
        assert (b in opt.state) != reset


def test_m1_merge_and_unload_is_exact(gpt2_state):
    cfg = SecuraConfig(k=12, r=6, target_modules=["c_attn", "c_proj"], merge_strategy="M1", delta_bias=True)
    model = get_peft_model(gpt2(gpt2_state), cfg)
    train(model, steps=3)
    secura.end_task(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(gpt2(gpt2_state)))
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SecuraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_m1_bias_without_base_bias_cannot_be_merged(llama_state):
    cfg = SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy="M1", delta_bias=True)
    model = get_peft_model(llama(llama_state), cfg)
    train(model, steps=2)
    secura.end_task(model)
    with pytest.raises(ValueError, match="no bias"):
        model.merge_and_unload()


def test_m1_live_update_must_be_merged_before_unloading(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy="M1"))
    randomise(model)
    with pytest.raises(ValueError, match="end_task"):
        model.merge_and_unload()


def test_m2_merge_and_unload_refuses_with_norm_on(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    train(model, steps=2)
    with pytest.raises(ValueError, match="approximate_merge"):
        model.merge_and_unload()


def test_m2_merge_and_unload_with_norm_off_is_exact_and_approximate_fold_on_request(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, magnorm="off"))
    train(model, steps=2)
    adapted = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), adapted, rtol=1e-5, atol=1e-5)

    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, approximate_merge=True))
    randomise(model, scale=0.5)
    adapted = logits(model)
    folded = logits(model.merge_and_unload())
    assert torch.isfinite(folded).all() and not torch.allclose(folded, adapted)


def test_disabled_adapter_gives_the_base_output_bit_for_bit(llama_state):
    ref = logits(llama(llama_state))
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    train(model, steps=2)
    assert not torch.equal(logits(model), ref)
    with model.disable_adapter():
        assert torch.equal(logits(model), ref)


# --------------------------------------------------------------------------------------------- several adapters


def test_named_adapters_and_set_adapter(llama_state):
    ref = logits(llama(llama_state))
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV), adapter_name="task1")
    model.add_adapter("task2", SecuraConfig(k=8, r=4, target_modules=QV, magnorm_norm="rank"))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer.secura_A["task2"].shape == (8, 4)
    randomise(model)
    out1 = logits(model)
    model.set_adapter("task2")
    out2 = logits(model)
    assert not torch.equal(out1, out2) and not torch.equal(out2, ref)
    assert layer.secura_B["task2"].requires_grad and not layer.secura_B["task1"].requires_grad
    secura.end_task(model)  # only the active adapter merges
    assert torch.count_nonzero(layer.secura_B["task2"]) == 0 and torch.count_nonzero(layer.secura_B["task1"]) > 0
    model.set_adapter("task1")
    assert torch.equal(logits(model), out1)
    with model.disable_adapter():
        assert torch.equal(logits(model), ref)
    model.delete_adapter("task2")
    assert "task2" not in layer.secura_U and "task2" not in layer.secura_C and "task2" not in layer.secura_config


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("strategy", ["M1", "M2"])
def test_save_and_load_round_trip(tmp_path, llama_state, strategy):
    cfg = SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy=strategy, delta_bias=True, merge_every=2)
    model = get_peft_model(llama(llama_state), cfg)
    train(model, steps=3)  # leaves a live B (step 3 is not a merge step) and a merged core
    adapted = logits(model)
    model.save_pretrained(tmp_path)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    suffixes = {key.rsplit(".", 1)[-1] for key in tensors}
    assert suffixes == {"secura_A", "secura_B", "secura_bias", "secura_U", "secura_rows", "secura_cols"}
    assert all(".secura_" in key for key in tensors) and len(tensors) == 4 * 6
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert nbytes < 4 * (2 * 16 * 8 + 16 * 16 + 64 + 2 * 16) * 8  # adapter state only, no C/R, no base weight
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < nbytes + 10_000
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SECURA"

    loaded = PeftModel.from_pretrained(llama(llama_state), tmp_path)
    if strategy == "M2":
        assert torch.equal(logits(loaded), adapted)
    else:  # one fold of the accumulated core vs. several successive folds: equal up to rounding
        torch.testing.assert_close(logits(loaded), adapted, rtol=1e-5, atol=1e-5)
    layer = next(secura.model.secura_layers(loaded))
    assert torch.count_nonzero(layer.secura_U["default"]) > 0


def test_loading_rebuilds_c_and_r_from_the_loaded_indices(tmp_path, llama_state):
    cfg = SecuraConfig(k=16, r=8, target_modules=QV, cur_selection="sample", cur_seed=5)
    model = get_peft_model(llama(llama_state), cfg)
    randomise(model)
    adapted = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["cur_seed"] = 6  # the fresh injection now selects other indices; the loaded ones must win
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    other = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, cur_selection="sample",
                                                             cur_seed=6))
    first = next(secura.model.secura_layers(model)).secura_rows["default"]
    assert not torch.equal(next(secura.model.secura_layers(other)).secura_rows["default"], first)
    loaded = PeftModel.from_pretrained(llama(llama_state), tmp_path)
    assert torch.equal(logits(loaded), adapted)


def test_low_cpu_mem_usage_loading(tmp_path, llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy="M1"))
    train(model, steps=2)
    adapted = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(llama_state), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded), adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ statistics


def test_magnorm_stats_aggregate_over_layers_and_reset(llama_state):
    model = get_peft_model(llama(llama_state), SecuraConfig(k=16, r=8, target_modules=QV))
    randomise(model)
    with secura.magnorm_token_mask(model, torch.ones_like(IDS)):
        logits(model)
    stats = secura.magnorm_stats(model)
    tokens = IDS.numel()
    assert stats["tokens"] == 4 * tokens and stats["elements"] == 2 * tokens * (64 + 32)
    assert 1 < stats["s_mean"] < 2 and stats["s_std"] > 0
    assert 0 <= stats["frac_le_m"] <= 1 and 0 <= stats["frac_ge_1_8"] <= 1 and stats["brake_rate"] == 0
    assert secura.magnorm_stats(model, reset=True) == stats
    assert math.isnan(secura.magnorm_stats(model)["s_mean"])


def test_full_state_dict_round_trip_does_not_fold_m1_twice(llama_state):
    cfg = SecuraConfig(k=16, r=8, target_modules=QV, merge_strategy="M1", merge_every=5)
    model = get_peft_model(llama(llama_state), cfg)
    train(model, steps=2)  # live B, nothing merged yet
    before = logits(model)
    clone = copy.deepcopy(model)
    secura.end_task(clone)  # merges into the clone's base only
    assert torch.equal(logits(model), before)
    weight = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight  # noqa: E731
    assert not torch.equal(weight(clone), weight(model))
    fresh = get_peft_model(llama(llama_state), cfg)
    fresh.load_state_dict(clone.state_dict())  # the base weight arrives merged: taken as is, not folded again
    assert torch.equal(weight(fresh), weight(clone))
    assert torch.equal(logits(fresh), logits(clone))
