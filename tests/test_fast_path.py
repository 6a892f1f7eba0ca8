"""The cheap real-model path (issue 25): precision auto, the LM head on label positions only,
length-grouped batches, generation that stops at the end of the answer's first line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.evaluate import choice_loglikelihoods, first_line, generate_answers
from pipelines.models import build_tiny_model, lm_head_on
from pipelines.precision import cpu_flags, resolve_precision
from pipelines.train import causal_lm_loss, micro_batches, pass_batches, shuffle_seed, trim_padding
from secura.methods import MethodConfig, build_method


def answer_batch(rows: int = 6, width: int = 24, vocab: int = 259, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, labels on each row's last few tokens (the answer)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, width), generator=generator)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100)
    for i in range(rows):
        length = width - 3 * (i % 4)
        attention_mask[i, :length] = 1
        labels[i, length - 1 - i % 3 : length] = input_ids[i, length - 1 - i % 3 : length]
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask,
            "labels": labels}


def lora(model: nn.Module) -> nn.Module:
    return build_method(MethodConfig.from_dict({"name": "lora", "target_modules": ["q_proj", "v_proj"],
                                                "adapter": {"r": 4, "lora_alpha": 8}})).wrap(model)


def test_auto_precision_follows_the_hardware(monkeypatch, tmp_path):
    import pipelines.precision as precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_supports_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert {"avx512f", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_label_only_head_gives_transformers_loss_and_gradients():
    torch.manual_seed(0)
    model = lora(build_tiny_model(seed=0))
    batch = trim_padding(answer_batch())
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    outputs, loss = causal_lm_loss(model, model, batch)
    loss.backward()
    assert outputs.logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum())  # the head ran on those only
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4)


def test_bf16_autocast_keeps_the_loss_and_the_adapter_gradients_direction():
    """What train.precision auto changes on a bf16 CPU, on the tiny model: loss within 2 %, every
    target module's adapter gradient at cosine >= 0.99 to fp32's (benchmarks/bf16_agreement.py: SmolLM2)."""
    from pipelines.precision import autocast

    torch.manual_seed(0)
    model = lora(build_tiny_model(seed=0, overrides={"hidden_size": 128, "intermediate_size": 256}))
    for p in model.parameters():  # LoRA's B starts at zero: give the adapter a direction of its own
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    batch = trim_padding(answer_batch(rows=8, width=32))

    def step(precision: str) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        with autocast(precision, "cpu"):
            _, loss = causal_lm_loss(model, model, batch)
        loss.backward()
        return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    loss32, grads32 = step("fp32")
    loss16, grads16 = step("bf16")
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    for name in grads32:
        cosine = nn.functional.cosine_similarity(grads32[name].flatten(), grads16[name].flatten(), dim=0)
        assert cosine >= 0.99, (name, float(cosine))


def test_lm_head_on_checks_its_positions():
    model = build_tiny_model(seed=0)
    with lm_head_on(model, torch.ones(2, 5, dtype=torch.bool)), pytest.raises(ValueError, match="positions"):
        model(input_ids=torch.zeros(2, 4, dtype=torch.long))


def test_length_groups_keep_every_row_once_a_pass_and_cut_the_padding():
    rows, size = 203, 8
    lengths = torch.randint(8, 96, (rows,), generator=torch.Generator().manual_seed(1))
    grouped = pass_batches(rows, size, seed=5, lengths=lengths, group=10)
    assert sorted(torch.cat(grouped).tolist()) == list(range(rows))  # every row once
    assert [len(b) for b in grouped].count(size) == rows // size  # only the last group's tail is short
    assert [b.tolist() for b in grouped] == [b.tolist() for b in pass_batches(rows, size, 5, lengths, 10)]
    plain = pass_batches(rows, size, seed=5)
    assert sorted(torch.cat(plain).tolist()) == list(range(rows)) and [b.tolist() for b in pass_batches(rows, size, 5, lengths, 1)] == [b.tolist() for b in plain]

    def padded(batches: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    assert pass_batches(rows, size, seed=6, lengths=lengths, group=10)[0].tolist() != grouped[0].tolist()


def test_grouped_micro_batches_resume_at_their_position():
    rows = 64
    mask = (torch.arange(24) < torch.randint(4, 24, (rows, 1), generator=torch.Generator().manual_seed(0))).long()
    columns = {"input_ids": torch.arange(rows).repeat(24, 1).T.contiguous(), "attention_mask": mask,
               "labels": mask.clone()}

    def ids(count: int, start: int = 0) -> list[int]:
        batches = micro_batches(columns, 4, lambda e: shuffle_seed(3, 1, e), torch.device("cpu"), count, start, group=4)
        return [int(i) for b in batches for i in b["input_ids"][:, 0]]

    two_passes = ids(32)
    assert sorted(two_passes[:rows]) == sorted(two_passes[rows:]) == list(range(rows))
    assert ids(5, start=14) == two_passes[14 * 4:19 * 4]


class LineLM(nn.Module):
    """Says a fixed token sequence after the prompt, whatever the prompt; counts its forwards."""

    def __init__(self, answer: list[int], eos: int) -> None:
        super().__init__()
        self.inner = build_tiny_model(seed=0)
        self.config, self.generation_config = self.inner.config, self.inner.generation_config
        self.answer, self.eos, self.steps = answer, eos, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, pad_token_id, **kwargs):
        """Greedy decoding as `transformers` runs it: a token a step, rows stopped by the criteria padded."""
        self.steps = 0
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        for step in range(max_new_tokens):
            self.steps += 1
            token = torch.tensor([self.answer[step] if step < len(self.answer) else self.eos] * len(input_ids))
            input_ids = torch.cat([input_ids, token.masked_fill(done, pad_token_id)[:, None]], dim=1)
            done |= stopping_criteria[0](input_ids, None) | torch.isin(token, torch.tensor(kwargs["eos_token_id"]))
            if done.all():
                break
        return input_ids


def test_generation_stops_at_the_end_of_the_first_line(tiny_tokenizer):
    encode = lambda text: tiny_tokenizer(text)["input_ids"]  # noqa: E731
    rows = [{"prompt_ids": encode("Q? A:" + "x" * i)} for i in (3, 0, 5)]
    model = LineLM(encode("\n Sports\nWorld news"), tiny_tokenizer.eos_token_id)
    assert generate_answers(model, tiny_tokenizer, rows, max_new_tokens=30, batch_size=2) == ["Sports"] * 3
    assert model.steps == len(encode("\n Sports\n")), "decoding went on past the answer's first line"
    assert first_line("  \n The topic: Sports.\nMore ") == "The topic: Sports."


def test_generation_batches_by_length_and_keeps_the_row_order(tiny_tokenizer):
    model = build_tiny_model(seed=0)
    prompts = ["a", "a much longer prompt here", "mid prompt", "b"]
    rows = [{"prompt_ids": tiny_tokenizer(p)["input_ids"]} for p in prompts]
    alone = [generate_answers(model, tiny_tokenizer, [row], max_new_tokens=6)[0] for row in rows]
    assert generate_answers(model, tiny_tokenizer, rows, max_new_tokens=6, batch_size=2) == alone


def test_option_scores_under_bf16_stay_close_to_fp32(tiny_tokenizer):
    model = build_tiny_model(seed=0)
    rows = [{"prompt_ids": tiny_tokenizer("Topic of the news: ")["input_ids"],
             "choice_ids": [tiny_tokenizer(c)["input_ids"] for c in ("World", "Sports", "Sci/Tech")]}] * 2
    fp32 = choice_loglikelihoods(model, rows)
    bf16 = choice_loglikelihoods(model, rows, precision="bf16")
    assert torch.allclose(torch.tensor(bf16), torch.tensor(fp32), rtol=0.02, atol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_resolved_precision_goes_to_the_stage_run(tmp_path):
    import json

    from pipelines.train import ReportSink

    sink = ReportSink(tmp_path / "tracking", "parent", tmp_path / "progress.json")
    sink({"event": "attempt", "stage": 2, "attempt": "a1", "from_step": 0, "precision": "bf16"})
    events = [json.loads(line) for file in (tmp_path / "tracking").rglob("*.jsonl") for line in file.read_text().splitlines()]
    assert {"op": "params", "key": "parent/stage-2", "params": {"train.precision_resolved": "bf16"}} in events
