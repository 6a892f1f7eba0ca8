"""Does the new default train the same model? SmolLM2 + the calibration's LoRA (q/v), a few real batches.

    PYTHONPATH=. .venv/bin/python benchmarks/bf16_agreement.py [--batches 2] [--warm-steps 4]

On a few batches of each calibration task (agnews, sst2, qqp; 8 rows, prompts ≤ 96 tokens), after
``--warm-steps`` fp32 AdamW steps on agnews (LoRA's B starts at zero, so its A has no gradient yet):

* the label-only LM head's fp32 loss against `transformers`' own loss (every position's logits):
  equal to 1e-5;
* ``train.precision: auto`` (bf16 autocast on this CPU) against fp32: the loss within 5 % (relative, per batch),
  and every target module's adapter gradient (A and B together) at cosine ≥ 0.99 to fp32's: the
  gradient of the batches together (their sum, the direction a few steps move the adapter); the
  per-batch cosines are printed too (one batch's q_proj gradient is the noisiest: its softmax
  derivative amplifies bf16's rounding of the attention scores).

Prints one line per batch and the verdicts; saves them to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOSS_TOLERANCE = 0.05  # relative, bf16 autocast vs fp32, per batch of 8 (up to 4.7 % measured on short answers)
COSINE_MIN = 0.99
EXACT = 1e-5  # label-only head vs transformers' loss, fp32


def module_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted module's adapter gradient, its A and B flattened into one vector."""
    grads: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            module = name.split(".lora_")[0]
            grads.setdefault(module, []).append(p.grad.detach().flatten().clone())
    return {module: torch.cat(parts) for module, parts in grads.items()}


def main(argv: list[str] | None = None) -> int:
    from pipelines.precision import autocast, resolve_precision
    from pipelines.preprocess import prepare_stream
    from pipelines.train import BaseModels, causal_lm_loss, micro_batches, read_train_columns, shuffle_seed, trim_padding
    from real_run_cost import calibration_config  # noqa: E402 (same folder)
    from secura.methods import build_method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches per task")
    parser.add_argument("--warm-steps", type=int, default=4)
    parser.add_argument("--shards", type=Path, default=Path(tempfile.gettempdir()) / "bf16-agreement-shards")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bf16_agreement.json")
    args = parser.parse_args(argv)

    config, config_dir = calibration_config(Path(tempfile.mkdtemp(prefix="bf16-agreement-")), None, "local")
    torch.set_num_threads(int(config.scaling.resources_per_worker.get("CPU", 1)))
    precision = resolve_precision(config.train.precision, "cpu")
    stream = config.load_stream(config_dir)
    manifest = prepare_stream(stream, config.model_config_obj(), str(args.shards), progress=False)
    method = build_method(config.method_config_obj())
    model = method.wrap(BaseModels.fresh(config))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr)

    def batches(task: str, count: int, start: int = 0):
        columns = read_train_columns(manifest.task(task).split("train").path)
        return [trim_padding(b) for b in micro_batches(columns, config.train.batch_size,
                                                        lambda e: shuffle_seed(config.seed, 1, e),
                                                        torch.device("cpu"), count, start,
                                                        group=config.train.length_groups)]

    model.train()
    for batch in batches("agnews", args.warm_steps):
        optimizer.zero_grad(set_to_none=True)
        causal_lm_loss(model, model, batch)[1].backward()
        optimizer.step()

    def step(batch, mode: str) -> tuple[float, dict[str, torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        if mode == "transformers":
            loss = model(**batch, use_cache=False).loss
        else:
            with autocast(mode, "cpu"):
                loss = causal_lm_loss(model, model, batch)[1]
        loss.backward()
        return float(loss.detach()), module_gradients(model), time.perf_counter() - started

    lines, worst_loss, worst_exact, worst_batch_cosine = [], 0.0, 0.0, 1.0
    records, summed = [], {"fp32": {}, precision: {}}
    for task in ("agnews", "sst2", "qqp"):
        for i, batch in enumerate(batches(task, args.batches, start=args.warm_steps if task == "agnews" else 0)):
            reference, _, reference_s = step(batch, "transformers")
            loss32, grads32, fp32_s = step(batch, "fp32")
            loss16, grads16, bf16_s = step(batch, precision)
            cosines = {m: float(nn.functional.cosine_similarity(grads32[m], grads16[m], dim=0)) for m in grads32}
            for mode, grads in (("fp32", grads32), (precision, grads16)):
                for m, g in grads.items():
                    summed[mode][m] = summed[mode].get(m, 0) + g
            relative = abs(loss16 - loss32) / abs(loss32)
            worst_loss, worst_exact = max(worst_loss, relative), max(worst_exact, abs(loss32 - reference))
            worst_batch_cosine = min(worst_batch_cosine, min(cosines.values()))
            low = min(cosines, key=cosines.get)
            records.append({"task": task, "batch": i, "tokens": int(batch["attention_mask"].numel()),
                            "loss_transformers": reference, "loss_fp32": loss32, f"loss_{precision}": loss16,
                            "cosines": cosines, "seconds": {"transformers": reference_s, "fp32": fp32_s,
                                                            precision: bf16_s}})
            lines.append(f"{task} batch {i} ({tuple(batch['input_ids'].shape)}): loss transformers {reference:.6f}, "
                         f"label-only fp32 {loss32:.6f} (Δ {abs(loss32 - reference):.1e}), {precision} {loss16:.6f} "
                         f"(rel. Δ {relative:.2%}); gradient cosine min {cosines[low]:.4f} ({low}), "
                         f"step {reference_s:.2f}s / {fp32_s:.2f}s / {bf16_s:.2f}s")
            print(lines[-1], flush=True)
    together = {m: float(nn.functional.cosine_similarity(summed["fp32"][m], summed[precision][m], dim=0))
                for m in summed["fp32"]}
    worst_cosine = min(together.values())
    kinds = sorted({m.rsplit(".", 1)[-1] for m in together})
    print("cosine of the batches' summed gradient, min / median over layers: " + "; ".join(
        f"{kind} {min(v for m, v in together.items() if m.endswith(kind)):.4f} / "
        f"{sorted(v for m, v in together.items() if m.endswith(kind))[len(together) // (2 * len(kinds))]:.4f}"
        for kind in kinds))
    verdicts = [
        f"label-only head vs transformers (fp32): max |Δ loss| {worst_exact:.1e} (≤ {EXACT:g}: "
        f"{'met' if worst_exact <= EXACT else 'MISSED'})",
        f"{precision} vs fp32: max relative Δ loss {worst_loss:.2%} (≤ {LOSS_TOLERANCE:.0%}: "
        f"{'met' if worst_loss <= LOSS_TOLERANCE else 'MISSED'}); min cosine of the summed gradient over "
        f"{len(together)} target modules {worst_cosine:.4f} (≥ {COSINE_MIN}: "
        f"{'met' if worst_cosine >= COSINE_MIN else 'MISSED'}); single batches: min {worst_batch_cosine:.4f}",
    ]
    print("\n".join(verdicts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"precision": precision, "batches": records, "verdicts": verdicts,
                                    "summed_cosines": together,
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    return 0 if worst_exact <= EXACT and worst_loss <= LOSS_TOLERANCE and worst_cosine >= COSINE_MIN else 1


if __name__ == "__main__":
    raise SystemExit(main())
