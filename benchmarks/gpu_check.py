"""One-shot GPU check of SECURA at 1.5B scale (bf16): correctness, FSDP/DDP training, throughput.

Fits one run of < 8 minutes on one H100/H200 and installs nothing: it needs
only torch, transformers, peft, safetensors (no Ray, MLflow or gguf), run from
the repository root with ``PYTHONPATH=.`` (``benchmarks/gpu_check.sh``).

(a) correctness: every adapted layer's factorised SECURA forward against the
    materialised reference ``Y0 + ΔY / S`` with ``ΔW = C·core·R`` built in
    fp32 (spec §2–§4), with non-zero B and a non-zero merged history (U for
    M2, the base weight for M1); M1/M2 × S-MagNorm on/off.
(b) FSDP2 (world of one, nccl) and DDP: a few training steps each, finite
    losses, DDP and FSDP adapter states gathered equal; M1 under FSDP too.
(c) tokens/s and MFU of SECURA vs peft LoRA (rank k), fwd+bwd+AdamW+merge in
    bf16 at seq 1024 and 2048, DDP and FSDP, warm-up and synchronised timing;
    then, time allowing, the 8B config under FSDP.

Prints markdown tables and writes them to ``$OUT/gpu_check.md`` when OUT is
set. Each section records its own failure and the run goes on; the exit
status is 1 if any section failed. ``--smoke`` runs the same code on a tiny
config on the CPU (gloo), to know the script works before it goes to a GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# A sibling module, found because a script's own folder leads sys.path (a namespace package `benchmarks`
# would lose to any installed package of that name).
from scale_model import (
    AdapterSpec,
    DTYPES,
    MODEL_SIZES,
    apply_adapter,
    build_model,
    count_params,
    default_device,
    init_distributed,
    measure_peak_tflops,
    results_table,
    run_config,
    train_steps,
)


@dataclass
class Settings:
    """What the run does; ``--smoke`` shrinks everything to CPU seconds."""

    model: str
    device: torch.device
    precision: str
    k: int
    r: int
    seqs: tuple[int, ...]
    batch_for_seq: dict[int, int]
    steps: int
    warmup: int
    train_steps: int
    rel_tol: float  # on the layer output
    inc_tol: float  # on the adapter's increment
    big_model: str | None
    budget_s: float


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        precision = args.precision or "fp32"
        bf16 = precision == "bf16"
        return Settings("smoke", torch.device("cpu"), precision, k=16, r=8, seqs=(64,), batch_for_seq={64: 2},
                        steps=2, warmup=1, train_steps=3, rel_tol=2e-2 if bf16 else 1e-4,
                        inc_tol=3e-2 if bf16 else 1e-4, big_model=None, budget_s=args.budget_s)
    return Settings("qwen2-1.5b", default_device(), args.precision or "bf16", k=args.k, r=args.r, seqs=(1024, 2048),
                    batch_for_seq={1024: 8, 2048: 4}, steps=10, warmup=3, train_steps=4, rel_tol=2e-2,
                    inc_tol=3e-2, big_model=None if args.skip_8b else "llama3-8b", budget_s=args.budget_s)


# --- (a) factorised vs materialised ---------------------------------------------------


def _secura_layers(model: nn.Module) -> list[nn.Module]:
    from secura.layer import SecuraLayer

    return [m for m in model.modules() if isinstance(m, SecuraLayer)]


@torch.no_grad()
def _perturb(model: nn.Module, scale: float, seed: int) -> None:
    """Non-zero live B, a non-zero merged history (U, and for M1 the base), and a non-zero b_Δ."""
    g = torch.Generator().manual_seed(seed)
    for layer in _secura_layers(model):
        for name in layer.secura_B:
            b = layer.secura_B[name]
            b.copy_(torch.randn(b.shape, generator=g) * scale)
            layer.fold_live_update([name])  # → U (M2) or W (M1); B back to zero
            b.copy_(torch.randn(b.shape, generator=g) * scale)
            if name in layer.secura_bias:
                bias = layer.secura_bias[name]
                bias.copy_(torch.randn(bias.shape, generator=g) * 1e-2)


@torch.no_grad()
def reference_increment(layer: nn.Module, name: str, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """What the adapter adds to the frozen output ``y0``, in fp32 with ΔW = C·core·R materialised (spec §2–§4)."""
    from secura.magnorm import gated_add

    def scaled_delta(y0: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:  # ΔY/S alone: added to zeros
        return gated_add(torch.zeros_like(y0), y0, dy, layer.secura_config[name],
                         brake_channels=layer.secura_brake[name])[0]

    m1 = layer.secura_config[name].merge_strategy == "M1"
    core = layer.secura_A[name].float() @ layer.secura_B[name].float()
    if not m1:
        core = core + layer.secura_U[name].float()
    delta_w = layer.secura_C[name].float() @ core @ layer.secura_R[name].float()
    dy = x.float() @ delta_w.T
    bias = layer.secura_bias[name].float() if name in layer.secura_bias else None
    if bias is not None and m1:  # M1: b_Δ belongs to the current model, the norm gates the live A·B only
        return bias + scaled_delta(y0 + bias, dy)
    if bias is not None:
        dy = dy + bias
    return scaled_delta(y0, dy)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_factorised(s: Settings, merge: str, magnorm: str) -> dict[str, float]:
    """Worst adapted layer's error of the factorised forward against the materialised fp32 reference.

    ``rel_out``: the layer output against ``x Wᵀ + b`` + reference increment, all fp32.
    ``rel_inc``: the adapter's increment alone (``add_adapter_output`` onto zeros), both
    sides given the same bf16 frozen output, so the error is the factorised
    path's own and not the rounding of the (much larger) frozen output.
    """
    dtype = DTYPES[s.precision]
    model = build_model(s.model, s.device, dtype)
    model = apply_adapter(model, AdapterSpec("secura", k=s.k, r=s.r, merge=merge, magnorm=magnorm, delta_bias=True))
    _perturb(model, scale=0.05, seed=1)
    inputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].detach()))
             for layer in _secura_layers(model)]
    seq = min(s.seqs)
    ids = torch.randint(0, MODEL_SIZES[s.model]["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids.to(s.device))
    for h in hooks:
        h.remove()
    worst = {"rel_out": 0.0, "rel_inc": 0.0, "max_abs": 0.0, "layers": 0}
    with torch.no_grad():
        for layer, x in inputs.items():
            name = layer.active_adapters[0]
            base = layer.get_base_layer()
            y0 = x.float() @ base.weight.float().T + (base.bias.float() if base.bias is not None else 0.0)
            ref = y0 + reference_increment(layer, name, x, y0)
            got = layer(x).float()
            frozen = base(x)
            inc = layer.add_adapter_output(name, x, frozen, torch.zeros_like(frozen))
            worst["rel_out"] = max(worst["rel_out"], _rel(got, ref))
            worst["rel_inc"] = max(worst["rel_inc"], _rel(inc, reference_increment(layer, name, x, frozen.float())))
            worst["max_abs"] = max(worst["max_abs"], float((got - ref).abs().max()))
            worst["layers"] += 1
    del model
    return worst


def section_correctness(s: Settings, report: list[str]) -> bool:
    report += ["## (a) factorised vs materialised ΔW forward", "",
               f"{s.model}, {s.precision}, SECURA k={s.k} r={s.r} with b_Δ, non-zero B and merged history; "
               f"worst adapted layer; pass: rel_out < {s.rel_tol:g} and rel_inc < {s.inc_tol:g}", "",
               "| merge | S-MagNorm | layers | output ‖err‖/‖ref‖ | increment ‖err‖/‖ref‖ | output max abs err | pass |",
               "|---|---|---|---|---|---|---|"]
    ok = True
    for merge in ("M1", "M2"):
        for magnorm in ("on", "off"):
            w = check_factorised(s, merge, magnorm)
            passed = w["rel_out"] < s.rel_tol and w["rel_inc"] < s.inc_tol
            ok &= passed
            report.append(f"| {merge} | {magnorm} | {w['layers']} | {w['rel_out']:.2e} | {w['rel_inc']:.2e} "
                          f"| {w['max_abs']:.2e} | {'yes' if passed else 'NO'} |")
    return ok


# --- (b) FSDP and DDP training -------------------------------------------------------


def _train_and_gather(s: Settings, strategy: str, merge: str) -> tuple[list[float], dict[str, torch.Tensor], float]:
    from pipelines.parallel import gather_adapter_state, wrap_for_training
    from secura.methods import MethodConfig, build_method

    on_gpu = s.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(s.device)
    model = apply_adapter(build_model(s.model, s.device, DTYPES[s.precision]),
                          AdapterSpec("secura", k=s.k, r=s.r, merge=merge))
    model = wrap_for_training(model, strategy, device=s.device, mixed_precision=s.precision)
    seq = min(s.seqs)
    losses, _ = train_steps(model, "secura", device=s.device, precision=s.precision, batch=2, seq=seq,
                            vocab=MODEL_SIZES[s.model]["vocab_size"], steps=s.train_steps, warmup=0, lr=1e-3)
    state = gather_adapter_state(model, build_method(MethodConfig(name="secura")))
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if on_gpu else float("nan")
    del model
    return losses, state, peak


def section_training(s: Settings, report: list[str]) -> bool:
    report += ["", "## (b) FSDP2 (1 rank) and DDP training", "",
               f"{s.model}, {s.precision}, {s.train_steps} steps of 2×{min(s.seqs)} tokens, lr 1e-3, merge every step", "",
               "| run | losses | finite | peak GiB |", "|---|---|---|---|"]
    runs = {}
    ok = True
    for strategy, merge in (("ddp", "M2"), ("fsdp", "M2"), ("fsdp", "M1")):
        losses, state, peak = _train_and_gather(s, strategy, merge)
        finite = all(torch.isfinite(torch.tensor(losses)))
        ok &= finite
        runs[(strategy, merge)] = state
        report.append(f"| {strategy} {merge} | {', '.join(f'{x:.4f}' for x in losses)} | {finite} | {peak:.2f} |")
    ddp, fsdp = runs[("ddp", "M2")], runs[("fsdp", "M2")]
    same_keys = sorted(ddp) == sorted(fsdp)
    worst = max((_rel(fsdp[k], ddp[k].float()) for k in ddp), default=0.0) if same_keys else float("inf")
    equal = worst <= s.rel_tol
    ok &= equal
    report += ["", f"DDP vs FSDP adapter state (M2): {len(ddp)} tensors, same keys {same_keys}, worst tensor "
                   f"‖fsdp − ddp‖/‖ddp‖ = {worst:.2e} (pass < {s.rel_tol:g}) → {'equal' if equal else 'DIFFERENT'}"]
    return ok


# --- (c) throughput ------------------------------------------------------------------


def _guarded(report: list[str], label: str, **kwargs) -> list:
    """One configuration; an out-of-memory is a row of the report, not the end of the section."""
    try:
        return [run_config(**kwargs)]
    except torch.cuda.OutOfMemoryError as err:
        report.append(f"- {label}: out of memory ({str(err).splitlines()[0][:120]})")
    gc.collect()  # the failed run's tensors were held by the traceback until here
    torch.cuda.empty_cache()
    return []


def section_throughput(s: Settings, report: list[str], started: float) -> bool:
    peak = measure_peak_tflops(s.device, DTYPES[s.precision])
    specs = [AdapterSpec("lora", k=s.k, r=s.k), AdapterSpec("secura", k=s.k, r=s.r)]
    notes: list[str] = []
    common = {"device": s.device, "precision": s.precision, "peak_tflops": peak}
    results = []
    for seq in s.seqs:
        for strategy in ("ddp", "fsdp"):
            for spec in specs:
                results += _guarded(notes, f"{spec.label} {strategy} seq {seq}", model_name=s.model, spec=spec,
                                    strategy=strategy, batch=s.batch_for_seq[seq], seq=seq, steps=s.steps,
                                    warmup=s.warmup, **common)
    seq = max(s.seqs)
    for spec in specs:  # activation checkpointing: the memory it saves, the time it costs
        results += _guarded(notes, f"{spec.label} fsdp AC seq {seq}", model_name=s.model, spec=spec, strategy="fsdp",
                            batch=s.batch_for_seq[seq], seq=seq, steps=s.steps, warmup=s.warmup,
                            activation_checkpointing=True, **common)
    report += ["", "## (c) throughput: SECURA vs peft LoRA", "",
               f"{s.model} ({count_params(MODEL_SIZES[s.model])['total'] / 1e9:.2f}B), {s.precision}, q/v adapters, "
               f"median of {s.steps} timed steps after {s.warmup} warm-up; MFU against a measured {s.precision} GEMM of "
               f"{peak:.1f} TFLOP/s (formula: benchmarks/scale_model.py)", "", results_table(results), *notes]
    big = s.big_model
    if big and time.perf_counter() - started < 0.5 * s.budget_s:
        notes = []
        big_results = []
        for spec in specs:
            big_results += _guarded(notes, f"{big} {spec.label}", model_name=big, spec=spec, strategy="fsdp",
                                    batch=1, seq=2048, steps=5, warmup=2, **common)
        report += ["", f"### {big} ({count_params(MODEL_SIZES[big])['total'] / 1e9:.2f}B), FSDP, 1×2048", "",
                   results_table(big_results), *notes]
        results += big_results
    elif big:
        report += ["", f"({big} skipped: {time.perf_counter() - started:.0f} s used of the {s.budget_s:.0f} s budget)"]
    return bool(results) and all(all(torch.isfinite(torch.tensor(r.losses))) for r in results)


# --- driver --------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU (gloo)")
    p.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 with --smoke)")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--sections", default="abc", help="which of a, b, c to run")
    p.add_argument("--skip-8b", action="store_true", help="do not try the 8B config at the end of (c)")
    p.add_argument("--budget-s", type=float, default=420.0, help="the 8B runs start only before half of this")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    s = settings(args)
    started = time.perf_counter()
    init_distributed(s.device)
    device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    import peft
    import transformers

    report = [f"# SECURA GPU check — {device_name}", "",
              f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
              f"python {sys.version.split()[0]}", ""]
    sections = {"a": ("correctness", lambda: section_correctness(s, report)),
                "b": ("training", lambda: section_training(s, report)),
                "c": ("throughput", lambda: section_throughput(s, report, started))}
    failed = []
    _publish(report, 0)
    for key in args.sections:
        name, run = sections[key]
        t0, shown = time.perf_counter(), len(report)
        try:
            if not run():
                failed.append(name)
        except Exception:  # noqa: BLE001 - record and go on: one GPU run must tell as much as it can
            failed.append(name)
            report += ["", f"**{name} failed:**", "", "```", traceback.format_exc().strip(), "```"]
        gc.collect()  # a failed section's tensors were held by its traceback
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        report.append(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
        _publish(report, shown)
    report += ["", f"Total {time.perf_counter() - started:.0f} s; "
                   f"{'all sections passed' if not failed else 'FAILED: ' + ', '.join(failed)}"]
    _publish(report, len(report) - 2)
    torch.distributed.destroy_process_group()
    return 1 if failed else 0


def _publish(report: list[str], shown: int) -> None:
    """Print the lines added since ``shown`` and rewrite ``$OUT/gpu_check.md``: a run cut short by its time
    limit still leaves every finished section behind."""
    print("\n".join(report[shown:]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
