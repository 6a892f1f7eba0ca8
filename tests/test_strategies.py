"""Continual-learning strategies: ER reservoir, EWC penalty, I-LoRA EMA and consistency, state round trips."""
from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pipelines.models import build_tiny_model
from secura.strategies import (
    EWC,
    ILoRA,
    ExperienceReplay,
    Sequential,
    build_strategy,
    pad_and_concat,
    trainable_parameters,
)


def make_batch(rows: int, length: int, first_id: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows whose first token is a unique id (first_id, first_id + 1, ...), so a row can be traced back."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 259, (rows, length), generator=g)
    input_ids[:, 0] = torch.arange(first_id, first_id + rows)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def round_trip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True): only tensors and plain Python survive."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def lora_model() -> torch.nn.Module:
    model = build_tiny_model(seed=0)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4))


# --- helpers and registry -------------------------------------------------------------------------


def test_pad_and_concat_right_pads_each_key_with_its_own_value():
    short, long = make_batch(2, 3), make_batch(1, 5, first_id=50)
    out = pad_and_concat([short, long])
    assert out["input_ids"].shape == (3, 5)
    assert out["input_ids"][:2, 3:].eq(0).all()
    assert out["attention_mask"][:2, 3:].eq(0).all()
    assert out["labels"][:2, 3:].eq(-100).all()
    assert torch.equal(out["input_ids"][:2, :3], short["input_ids"])
    assert torch.equal(out["labels"][2], long["labels"][0])
    assert all(t.dtype == torch.int64 for t in out.values())


def test_build_strategy_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown strategy 'replay'.*'er'.*'ewc'.*'ilora'.*'seq'"):
        build_strategy("replay")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['buffer'\] for strategy 'er'.*buffer_size"):
        build_strategy("er", {"buffer": 3})
    with pytest.raises(ValueError, match="replay_ratio"):
        build_strategy("er", {"replay_ratio": -0.5})
    assert isinstance(build_strategy("seq"), Sequential)


def test_seq_does_nothing():
    strategy, batch = Sequential(), make_batch(4, 6)
    assert strategy.mix_batch(batch) is batch
    assert strategy.extra_loss(None, batch, None) is None
    assert strategy.state_dict() == {} and not strategy.needs_hidden_states


# --- experience replay ----------------------------------------------------------------------------


def feed(er: ExperienceReplay, task: int, rows: int, length: int, batch_size: int = 10) -> None:
    """Run one task through mix_batch + observe; row ids are task * 10_000 + row."""
    er.before_task(None, task, f"t{task}")
    for start in range(0, rows, batch_size):
        er.observe(er.mix_batch(make_batch(batch_size, length, first_id=task * 10_000 + start, seed=start)))


def test_reservoir_is_bounded_and_counts_every_new_row():
    er = ExperienceReplay(buffer_size=16, replay_ratio=0.5, seed=0)
    feed(er, 0, rows=100, length=6)
    feed(er, 1, rows=100, length=6)
    assert len(er.row_tasks) == 16 and all(len(rows) == 16 for rows in er.rows.values())
    assert er.seen == 200  # replayed rows were not counted as new
    row = er.rows["input_ids"][0]
    assert row.untyped_storage().nbytes() == row.numel() * row.element_size()  # a copy, not a view of the batch


def test_reservoir_is_seeded_and_deterministic():
    def buffer(seed):
        er = ExperienceReplay(buffer_size=8, seed=seed)
        feed(er, 0, rows=60, length=4)
        feed(er, 1, rows=60, length=4)
        return [int(t[0]) for t in er.rows["input_ids"]]

    assert buffer(0) == buffer(0)
    assert buffer(0) != buffer(1)


def test_reservoir_keeps_a_uniform_sample_across_tasks():
    er = ExperienceReplay(buffer_size=300, replay_ratio=0.0, seed=0)
    for task in range(3):
        feed(er, task, rows=2000, length=4, batch_size=50)
    per_task = [er.row_tasks.count(t) for t in range(3)]
    assert sum(per_task) == 300
    assert all(70 <= n <= 130 for n in per_task), per_task  # 100 each expected; a FIFO would give [0, 0, 300]
    # Within a task too: stored rows are spread over the whole task, not its start or end.
    ids = sorted(int(t[0]) % 10_000 for t, task in zip(er.rows["input_ids"], er.row_tasks) if task == 2)
    assert ids[len(ids) // 2] == pytest.approx(1000, abs=250)


def test_first_task_trains_alone_and_later_tasks_get_the_configured_ratio():
    er = ExperienceReplay(buffer_size=50, replay_ratio=0.5, seed=0)
    er.before_task(None, 0, "a")
    batch = make_batch(8, 6)
    assert er.mix_batch(batch) is batch  # nothing from earlier tasks yet
    er.observe(batch)
    feed(er, 0, rows=40, length=6)
    er.before_task(None, 1, "b")
    new = make_batch(8, 6, first_id=10_000)
    mixed = er.mix_batch(new)
    assert mixed["input_ids"].shape[0] == 12  # 8 + round(0.5 * 8)
    assert torch.equal(mixed["input_ids"][:8], new["input_ids"])
    assert all(int(i) < 10_000 for i in mixed["input_ids"][8:, 0])  # replay comes from task 0 only


def test_mixing_pads_tasks_of_different_lengths_both_ways():
    er = ExperienceReplay(buffer_size=20, replay_ratio=1.0, seed=0)
    feed(er, 0, rows=20, length=5)
    er.before_task(None, 1, "longer")
    mixed = er.mix_batch(make_batch(4, 9, first_id=10_000))
    assert mixed["input_ids"].shape == (8, 9)
    assert mixed["attention_mask"][4:, 5:].eq(0).all() and mixed["attention_mask"][4:, :5].eq(1).all()
    assert mixed["labels"][4:, 5:].eq(-100).all() and mixed["input_ids"][4:, 5:].eq(0).all()
    er.observe(mixed)

    er.before_task(None, 2, "shorter")
    new = make_batch(4, 3, first_id=20_000)
    mixed = er.mix_batch(new)
    assert mixed["input_ids"].shape[1] >= 5  # the new rows are padded up to the replayed length
    assert mixed["labels"][:4, 3:].eq(-100).all() and mixed["attention_mask"][:4, 3:].eq(0).all()
    assert torch.equal(mixed["input_ids"][:4, :3], new["input_ids"])


def test_mixing_rows_from_several_earlier_tasks_of_different_lengths():
    er = ExperienceReplay(buffer_size=40, replay_ratio=1.0, seed=0)
    feed(er, 0, rows=20, length=5)
    feed(er, 1, rows=20, length=9)
    er.before_task(None, 2, "c")
    mixed = er.mix_batch(make_batch(20, 7, first_id=20_000))
    assert mixed["input_ids"].shape == (40, 9)
    replayed = mixed["input_ids"][20:, 0] // 10_000
    assert set(replayed.tolist()) == {0, 1}
    lengths = mixed["attention_mask"][20:].sum(1)
    assert torch.equal(lengths, torch.where(replayed == 0, 5, 9))
    assert mixed["labels"][20:][replayed == 0][:, 5:].eq(-100).all()


def test_replayed_rows_are_never_stored_again():
    er = ExperienceReplay(buffer_size=30, replay_ratio=1.0, seed=0)
    feed(er, 0, rows=30, length=4)
    feed(er, 1, rows=500, length=4)  # every batch is half replay from task 0
    for row, task in zip(er.rows["input_ids"], er.row_tasks):
        assert int(row[0]) // 10_000 == task  # a task-0 row tagged as task 1 would mean a replayed row was stored
    assert er.seen == 530
    # The trainer may also observe the unmixed batch: same rows stored, none replayed.
    raw = make_batch(10, 4, first_id=10_600)
    er.mix_batch(raw)
    er.observe(raw)
    assert er.seen == 540
    with pytest.raises(ValueError, match="observe"):
        er.mix_batch(raw)
        er.observe({k: v[:3] for k, v in raw.items()})


def test_er_state_dict_round_trip_continues_identically():
    er = ExperienceReplay(buffer_size=12, replay_ratio=0.5, seed=3)
    feed(er, 0, rows=40, length=5)
    er.before_task(None, 1, "b")
    clone = ExperienceReplay(buffer_size=12, replay_ratio=0.5, seed=99)
    clone.load_state_dict(round_trip(er.state_dict()))
    for start in range(0, 40, 10):
        batch = make_batch(10, 5, first_id=10_000 + start, seed=start)
        a, b = er.mix_batch(batch), clone.mix_batch(batch)
        assert torch.equal(a["input_ids"], b["input_ids"])
        er.observe(a)
        clone.observe(b)
    assert er.row_tasks == clone.row_tasks and er.seen == clone.seen
    assert all(torch.equal(x, y) for x, y in zip(er.rows["input_ids"], clone.rows["input_ids"]))


# --- EWC --------------------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_around_it():
    model = lora_model()
    params = trainable_parameters(model)
    batches = [make_batch(4, 8, seed=s) for s in range(5)]
    consumed = []

    def task_batches():
        for b in batches:
            consumed.append(1)
            yield b

    ewc = EWC(ewc_lambda=10.0, fisher_batches=3)
    ewc.before_task(model, 0, "a")
    assert ewc.extra_loss(model, batches[0], None) is None  # nothing to protect yet
    sentinel = {name: torch.full_like(p, 7.0) for name, p in params.items()}
    for name, p in params.items():
        p.grad = sentinel[name].clone()
    ewc.after_task(model, task_batches, 0)
    assert len(consumed) == 3
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in params.items())  # the trainer's grads are untouched
    assert set(ewc.fisher) == set(params)
    assert all(f.ge(0).all() for f in ewc.fisher.values())
    assert sum(f.sum() for f in ewc.fisher.values()) > 0

    assert ewc.extra_loss(model, batches[0], None).item() == 0.0
    direction = {name: torch.randn_like(p) * 1e-2 for name, p in params.items()}
    penalties = []
    for t in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ewc.anchor[name] + t * direction[name])
        penalties.append(ewc.extra_loss(model, batches[0], None).item())
    expected = 0.5 * 10.0 * sum((ewc.fisher[n] * direction[n] ** 2).sum().item() for n in params)
    assert penalties[0] == pytest.approx(expected, rel=1e-4)
    assert penalties[1] == pytest.approx(4 * penalties[0], rel=1e-4)
    assert penalties[2] == pytest.approx(9 * penalties[0], rel=1e-4)


def test_ewc_fisher_accumulates_over_tasks_and_round_trips():
    model = lora_model()
    batches = [make_batch(4, 8, seed=s) for s in range(2)]
    ewc = EWC(ewc_lambda=1.0, fisher_batches=None)
    ewc.after_task(model, lambda: iter(batches), 0)
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    ewc.after_task(model, lambda: iter(batches), 1)  # same parameters and data: the Fisher doubles
    assert all(torch.allclose(ewc.fisher[n], 2 * first[n]) for n in first)

    clone = EWC(ewc_lambda=1.0)
    clone.load_state_dict(round_trip(ewc.state_dict()))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.01)
    assert clone.extra_loss(model, batches[0], None).item() == pytest.approx(
        ewc.extra_loss(model, batches[0], None).item()
    )


# --- I-LoRA ---------------------------------------------------------------------------------------


def test_ilora_ema_moves_long_term_by_one_minus_lambda():
    model = lora_model()
    ilora = ILoRA(ema_decay=0.9)
    ilora.before_task(model, 0, "a")
    params = trainable_parameters(model)
    before = {n: t.clone() for n, t in ilora.long_term.items()}
    delta = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(delta[n])
    ilora.after_optimizer_step(model, 1)
    for n, p in params.items():
        assert torch.allclose(ilora.long_term[n], before[n] + 0.1 * delta[n], atol=1e-6)
        assert not torch.equal(ilora.long_term[n], p)  # a copy, not an alias
    ilora.after_task(model, lambda: [], 0)  # the working copy becomes the long-term one
    assert all(torch.equal(p, ilora.long_term[n]) for n, p in params.items())


def test_ilora_consistency_is_zero_for_equal_copies_and_trains_only_the_working_copy():
    model = lora_model().eval()
    ilora = ILoRA(consistency_weight=2.0)
    assert ilora.needs_hidden_states
    ilora.before_task(model, 0, "a")
    batch = make_batch(3, 7)
    outputs = model(**batch, output_hidden_states=True)
    assert ilora.extra_loss(model, batch, outputs).item() == 0.0

    params = trainable_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    working = {n: p.clone() for n, p in params.items()}
    outputs = model(**batch, output_hidden_states=True)
    loss = ilora.extra_loss(model, batch, outputs)
    assert loss.item() > 0
    assert all(torch.equal(p, working[n]) for n, p in params.items())  # the long-term forward restored the model
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(not t.requires_grad for t in ilora.long_term.values())


def test_ilora_consistency_ignores_padding():
    model = lora_model().eval()
    ilora = ILoRA()
    ilora.before_task(model, 0, "a")
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(2, 6)
    padded = pad_and_concat([batch, make_batch(1, 9, first_id=90)])
    losses = []
    for b in (batch, {k: v[:2] for k, v in padded.items()}):
        losses.append(ilora.extra_loss(model, b, model(**b, output_hidden_states=True)).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_ilora_state_dict_round_trip():
    model = lora_model()
    ilora = ILoRA(ema_decay=0.5, buffer_size=4)
    ilora.before_task(model, 0, "a")
    ilora.observe(make_batch(3, 5))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(1.0)
    ilora.after_optimizer_step(model, 1)
    clone = ILoRA(ema_decay=0.5, buffer_size=4)
    clone.load_state_dict(round_trip(ilora.state_dict()))
    assert set(clone.long_term) == set(ilora.long_term)
    assert all(torch.equal(clone.long_term[n], t) for n, t in ilora.long_term.items())
    assert clone.row_tasks == ilora.row_tasks and clone.seen == 3
