"""Scaling benchmark: SECURA vs peft LoRA on 1.5B- and 8B-size Llama-style models, DDP vs FSDP.

Builds the model from a config (random weights, no download), injects the
adapter on ``q_proj``/``v_proj``, wraps it with `pipelines.parallel`, and times
full training steps (forward + backward + gradient sync + AdamW + SECURA's
merge) after warm-up. Prints params, adapter params, memory, tokens/s and MFU
per (method, strategy), with ratios against peft LoRA measured in the same run,
and the analytic per-GPU memory budget of the 1.5B and 8B configs.

Runs single-process (world size 1, gloo on CPU / nccl on GPU) or under
``torchrun --nproc-per-node N`` (it reads the usual RANK/WORLD_SIZE variables).
``--cpu-scale`` swaps in a small config (hidden 256, 4 layers) that runs in
about a minute on 2 cores. Imports neither Ray nor MLflow (it also serves
``benchmarks/gpu_check.py`` on the bare GPU machine).

Model FLOPs (what MFU divides by the peak), per token of a training step,
with the base frozen (no weight gradients, so its backward is the activation
gradient only — 2 of the usual 4 FLOPs per weight):

    base      4 · N_mm                     N_mm: weights of every matmul (lm_head too, not the embedding lookup)
    attention 12 · L · d · s               QKᵀ and AV forward (4·d·s) + their backward (8·d·s), per layer (PaLM's term)
    LoRA      6 · r · (in + out)           A and B trained: forward 2, activation grad 2, weight grad 2
    SECURA    4 · k · (in + out + k_M2)    C, R (and M2's U) frozen: forward + activation grad
            + 6 · 2 · k · r                A and B trained

summed over adapted modules; MFU = FLOPs/token × tokens/s ÷ peak. The peak
is the fastest square GEMM in the run's precision timed in the same run on
this device (``--peak-tflops`` overrides it, e.g. 989 for the H100
datasheet's dense bf16).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

GIB = 1024**3
TARGETS = ("q_proj", "v_proj")

# Llama-style stand-ins of the paper's models (random weights; shapes are what costs).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "qwen2-1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                   "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                  "tie_word_embeddings": False},
    # --cpu-scale: the same architecture, small enough for a minute on 2 cores.
    "cpu-scale": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 704, "vocab_size": 8192,
                  "tie_word_embeddings": True},
    # gpu_check --smoke: seconds on a CPU.
    "smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
              "tie_word_embeddings": True},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter, at what rank. LoRA's default rank is SECURA's k: the same rank of ΔW and the same
    per-token cost order (spec §2), so the comparison is at one rank budget."""

    method: Literal["secura", "lora"]
    k: int = 128  # SECURA CUR rank (paper: 150)
    r: int = 128  # SECURA core rank (paper: 200); LoRA's rank
    merge: Literal["M1", "M2"] = "M2"
    magnorm: Literal["on", "off"] = "on"
    delta_bias: bool = False  # SECURA's b_Δ (the paper's "bias on")

    @property
    def label(self) -> str:
        return f"secura k={self.k} r={self.r} {self.merge}" if self.method == "secura" else f"lora r={self.r}"


# --- analytic model ------------------------------------------------------------------


def model_dims(cfg: dict[str, Any]) -> dict[str, int]:
    d = cfg["hidden_size"]
    return {"d": d, "L": cfg["num_hidden_layers"], "i": cfg["intermediate_size"], "V": cfg["vocab_size"],
            "d_kv": d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]}


def module_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in one decoder layer."""
    m = model_dims(cfg)
    d, d_kv, i = m["d"], m["d_kv"], m["i"]
    return {"q_proj": (d, d), "k_proj": (d, d_kv), "v_proj": (d, d_kv), "o_proj": (d, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def count_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Base parameters: total, and ``matmul`` = weights used in a matmul per token (lm_head, not the lookup)."""
    m = model_dims(cfg)
    per_layer = sum(a * b for a, b in module_shapes(cfg).values())
    layers = m["L"] * (per_layer + 2 * m["d"])
    embed = m["V"] * m["d"]
    head = 0 if cfg["tie_word_embeddings"] else embed
    return {"total": embed + head + layers + m["d"], "matmul": m["L"] * per_layer + embed}


def adapter_counts(cfg: dict[str, Any], spec: AdapterSpec) -> dict[str, int]:
    """Per model: trainable params, frozen adapter buffers (SECURA's C, R, U) and per-token adapter FLOPs."""
    trainable = frozen = flops = 0
    for name in TARGETS:
        fan_in, fan_out = module_shapes(cfg)[name]
        if spec.method == "lora":
            trainable += spec.r * (fan_in + fan_out)
            flops += 6 * spec.r * (fan_in + fan_out)
        else:
            k_u = spec.k if spec.merge == "M2" else 0
            trainable += 2 * spec.k * spec.r
            frozen += spec.k * (fan_in + fan_out) + spec.k * spec.k
            flops += 4 * spec.k * (fan_in + fan_out + k_u) + 6 * 2 * spec.k * spec.r
    layers = model_dims(cfg)["L"]
    return {"trainable": layers * trainable, "frozen": layers * frozen, "flops_per_token": layers * flops}


def flops_per_token(cfg: dict[str, Any], seq: int, spec: AdapterSpec) -> float:
    """Model FLOPs per trained token (module docstring)."""
    m = model_dims(cfg)
    return 4 * count_params(cfg)["matmul"] + 12 * m["L"] * m["d"] * seq + adapter_counts(cfg, spec)["flops_per_token"]


def memory_budget(
    cfg: dict[str, Any], spec: AdapterSpec, *, world_size: int, strategy: str, micro_batch: int, seq: int,
    activation_checkpointing: bool, weight_bytes: int = 2,
) -> dict[str, float]:
    """Per-GPU memory (GiB) of adapter training, by component, analytically.

    * weights: frozen base in bf16; FSDP keeps 1/world of it plus two unsharded
      layers in flight (the running one and the prefetched next);
    * adapter: fp32 weights + grads + AdamW's two moments (16 B/param),
      replicated, plus SECURA's C, R (base dtype) and U (fp32);
    * activations (bf16, SDPA attention so no s² term): per token and layer the
      tensors autograd keeps, ≈ 10·d + 2·d_kv + 4·i elements (norm inputs/outputs,
      q/k/v/attention output, residuals, gate/up/act/product of the MLP), plus per
      adapted module ≈ (in + out + 2·rank) fp32 elements. With checkpointing only
      each layer's input (d) is kept, plus one layer recomputed;
    * logits: bf16 logits and the fp32 copy + gradient the loss makes (3 × 4·V per token
      counted conservatively);

    Allocator fragmentation and CUDA context (~0.5–1 GiB) come on top.
    """
    m = model_dims(cfg)
    d, d_kv, i, L, V = m["d"], m["d_kv"], m["i"], m["L"], m["V"]
    tokens = micro_batch * seq
    base_bytes = count_params(cfg)["total"] * weight_bytes
    layer_bytes = (sum(a * b for a, b in module_shapes(cfg).values()) + 2 * d) * weight_bytes
    weights = base_bytes / world_size + 2 * layer_bytes if strategy == "fsdp" else base_bytes
    adapter = adapter_counts(cfg, spec)
    rank = spec.r if spec.method == "lora" else spec.k
    adapter_bytes = 16 * adapter["trainable"] + weight_bytes * adapter["frozen"]
    layer_act = 2 * (10 * d + 2 * d_kv + 4 * i) + 4 * sum(sum(module_shapes(cfg)[t]) + 2 * rank for t in TARGETS)
    if activation_checkpointing:
        activations = tokens * (L * 2 * d + layer_act)
    else:
        activations = tokens * L * layer_act
    logits = tokens * V * (2 + 3 * 4)
    parts = {"weights": weights, "adapter+optimiser": adapter_bytes, "activations": activations, "logits+loss": logits}
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


# --- building and timing -------------------------------------------------------------


def llama_config(name: str, **overrides: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{**MODEL_SIZES[name], "max_position_embeddings": 8192, **overrides})


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Random weights built directly on ``device`` in ``dtype`` (an 8B model never exists in fp32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return LlamaForCausalLM(llama_config(name))


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if spec.method == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", target_modules=list(TARGETS), r=spec.r, lora_alpha=spec.r)
    else:
        import secura

        config = secura.SecuraConfig(task_type="CAUSAL_LM", target_modules=list(TARGETS), k=spec.k, r=spec.r,
                                     merge_strategy=spec.merge, magnorm=spec.magnorm,
                                     delta_bias=spec.delta_bias)
    return get_peft_model(model, config)


def init_distributed(device: torch.device) -> None:
    """A process group: torchrun's (env://) when launched by it, else a world of one on a free local port."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The fastest of several square GEMMs in ``dtype`` (random data, warm): the ceiling MFU is taken against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(10 if device.type == "cuda" else 5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


class _MemoryMeter:
    """Peak allocated (GPU) or peak RSS since reset (CPU, via /proc: the kernel's high-water mark)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024 / GIB


@dataclass
class StepResult:
    method: str
    strategy: str
    seq: int
    batch: int
    params: int
    trainable: int
    tokens_per_s: float
    step_ms: float
    peak_gib: float
    mfu: float
    losses: list[float] = field(default_factory=list)
    activation_checkpointing: bool = False


def _batch(batch: int, seq: int, vocab: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class TrainingRun:
    """A wrapped model, its AdamW and the train loop's step: forward under autocast, backward, adapter
    gradient sync, clipping, AdamW, SECURA's merge (every step, the paper's schedule)."""

    def __init__(self, model: nn.Module, method_name: str, *, device: torch.device, precision: str, batch: int,
                 seq: int, vocab: int, lr: float = 1e-4) -> None:
        from pipelines.parallel import unwrap

        self.model, self.method_name, self.device = model, method_name, device
        self.shape = (batch, seq, vocab)
        self.trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.losses: list[torch.Tensor] = []
        model.train()

    def step(self) -> float:
        """One training step, timed to a device synchronisation; returns its seconds."""
        import secura
        from pipelines.parallel import merge_under_fsdp, sync_gradients, unwrap

        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(**_batch(*self.shape, self.device, seed=len(self.losses))).loss
        loss.backward()
        sync_gradients(self.model)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        if self.method_name == "secura":
            with merge_under_fsdp(self.model):
                secura.merge_step(unwrap(self.model), len(self.losses) + 1)
        self.losses.append(loss.detach())
        synchronize(self.device)
        return time.perf_counter() - start

    def loss_values(self) -> list[float]:
        return [float(x) for x in self.losses]


def train_steps(
    model: nn.Module, method_name: str, *, device: torch.device, precision: str, batch: int, seq: int, vocab: int,
    steps: int, warmup: int, lr: float = 1e-4,
) -> tuple[list[float], float]:
    """``warmup`` untimed then ``steps`` timed steps; returns (all losses, median seconds per timed step)."""
    import statistics

    run = TrainingRun(model, method_name, device=device, precision=precision, batch=batch, seq=seq, vocab=vocab, lr=lr)
    times = [run.step() for _ in range(warmup + steps)][warmup:]
    return run.loss_values(), statistics.median(times) if times else float("nan")


def _throughput(model_name: str, spec: AdapterSpec, batch: int, seq: int, seconds: float,
                peak_tflops: float) -> tuple[float, float]:
    """(tokens/s over all ranks, MFU) of a step time."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens_per_s = batch * seq * world / seconds
    return tokens_per_s, flops_per_token(MODEL_SIZES[model_name], seq, spec) * tokens_per_s / (peak_tflops * 1e12 * world)


def _build_wrapped(model_name: str, spec: AdapterSpec, strategy: str, device: torch.device, precision: str,
                   activation_checkpointing: bool, compile: bool) -> nn.Module:
    from pipelines.parallel import wrap_for_training

    model = apply_adapter(build_model(model_name, device, DTYPES[precision]), spec)
    return wrap_for_training(model, strategy, device=device, mixed_precision=precision,
                             activation_checkpointing=activation_checkpointing, compile=compile)


def run_config(
    model_name: str, spec: AdapterSpec, strategy: str, *, device: torch.device, precision: str, batch: int, seq: int,
    steps: int, warmup: int, peak_tflops: float, activation_checkpointing: bool = False, compile: bool = False,
) -> StepResult:
    """Build, wrap, train (median step time); the model is freed before returning so configurations do not add up."""
    meter = _MemoryMeter(device)
    meter.reset()
    model = _build_wrapped(model_name, spec, strategy, device, precision, activation_checkpointing, compile)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses, seconds = train_steps(model, spec.method, device=device, precision=precision, batch=batch, seq=seq,
                                  vocab=MODEL_SIZES[model_name]["vocab_size"], steps=steps, warmup=warmup)
    tokens_per_s, mfu = _throughput(model_name, spec, batch, seq, seconds, peak_tflops)
    result = StepResult(spec.label, strategy, seq, batch, params, trainable, tokens_per_s, seconds * 1e3,
                        meter.peak_gib(), mfu, losses, activation_checkpointing)
    del model
    _release_memory(device)
    return result


def interleaved_best_seconds(
    model_name: str, configs: list[tuple[AdapterSpec, str]], *, device: torch.device, precision: str, batch: int,
    seq: int, rounds: int,
) -> tuple[dict[tuple[str, str], float], float]:
    """Fastest step of each (spec, strategy) over ``rounds`` rounds of one step each, all configurations
    alive at once, and the fastest GEMM (TFLOP/s) timed in the same rounds.

    On a shared CPU the load drifts over minutes; interleaving exposes every
    configuration, and the GEMM that MFU divides by, to the same drift (the
    minimum is the least disturbed step)."""
    vocab = MODEL_SIZES[model_name]["vocab_size"]
    runs = {(spec.label, strategy): TrainingRun(_build_wrapped(model_name, spec, strategy, device, precision, False,
                                                               False), spec.method, device=device,
                                                precision=precision, batch=batch, seq=seq, vocab=vocab)
            for spec, strategy in configs}
    for run in runs.values():
        run.step()  # warm-up
    best = {key: math.inf for key in runs}
    peak = 0.0
    for _ in range(rounds):
        peak = max(peak, measure_peak_tflops(device, DTYPES[precision]))
        for key, run in runs.items():
            best[key] = min(best[key], run.step())
    return best, peak


def _release_memory(device: torch.device) -> None:
    """Hand freed memory back (CUDA cache; glibc's heap on CPU) so the next configuration's peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- reporting -----------------------------------------------------------------------


def results_table(results: list[StepResult], baseline: str = "lora") -> str:
    """Markdown table; each row's tokens/s and peak memory also as a ratio to the baseline of the same strategy,
    sequence length and checkpointing setting."""
    def key(r: StepResult) -> tuple:
        return r.strategy, r.seq, r.batch, r.activation_checkpointing

    base = {key(r): r for r in results if r.method.startswith(baseline)}
    lines = ["| method | strategy | AC | batch×seq | params | trainable | tokens/s | step ms | peak GiB | MFU "
             f"| tokens/s ÷ {baseline} | memory ÷ {baseline} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get(key(r))
        speed = f"{r.tokens_per_s / b.tokens_per_s:.2f}" if b else "–"
        memory = f"{r.peak_gib / b.peak_gib:.2f}" if b else "–"
        lines.append(f"| {r.method} | {r.strategy} | {'on' if r.activation_checkpointing else 'off'} "
                     f"| {r.batch}×{r.seq} | {r.params / 1e6:,.1f}M | {r.trainable / 1e6:.2f}M "
                     f"| {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | {r.peak_gib:.2f} | {100 * r.mfu:.1f}% "
                     f"| {speed} | {memory} |")
    return "\n".join(lines)


def budget_table(world_size: int = 8, micro_batch: int = 1, seq: int = 2048, spec: AdapterSpec | None = None) -> str:
    """The analytic per-GPU memory budget of the 1.5B and 8B configs (`memory_budget`), as markdown."""
    spec = spec or AdapterSpec("secura")
    lines = [f"Per-GPU memory, GiB (bf16 frozen base, {spec.label} on q/v, micro-batch {micro_batch}×{seq}, "
             f"world {world_size}):", "",
             "| model | params | strategy | AC | weights | adapter+optimiser | activations | logits+loss | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("qwen2-1.5b", "llama3-8b"):
        cfg = MODEL_SIZES[name]
        for strategy in ("ddp", "fsdp"):
            for ac in (False, True):
                b = memory_budget(cfg, spec, world_size=world_size, strategy=strategy, micro_batch=micro_batch,
                                  seq=seq, activation_checkpointing=ac)
                lines.append(f"| {name} | {count_params(cfg)['total'] / 1e9:.2f}B | {strategy} | {'on' if ac else 'off'} "
                             f"| {b['weights']:.2f} | {b['adapter+optimiser']:.3f} | {b['activations']:.2f} "
                             f"| {b['logits+loss']:.2f} | {b['total']:.2f} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default="qwen2-1.5b")
    p.add_argument("--cpu-scale", action="store_true", help="use the small cpu-scale config (about a minute on 2 cores)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None,
                   help="then time all configurations interleaved, this many rounds, fastest step "
                        "(default 8 on CPU, whose load drifts; 0 on GPU)")
    p.add_argument("--k", type=int, default=None, help="SECURA k (default 128; 32 with --cpu-scale)")
    p.add_argument("--r", type=int, default=None, help="SECURA r and LoRA rank (default k)")
    p.add_argument("--merge", choices=["M1", "M2"], default="M2")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured GEMM)")
    p.add_argument("--budget-only", action="store_true", help="print the analytic memory budget and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(budget_table(), "\n", flush=True)
    if args.budget_only:
        return 0
    device = default_device()
    on_gpu = device.type == "cuda"
    model_name = "cpu-scale" if args.cpu_scale else args.model
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    k = args.k or (32 if args.cpu_scale else 128)
    r = args.r or k
    batch = args.batch or (2 if args.cpu_scale else 4)
    seq = args.seq or (256 if args.cpu_scale else 2048)
    steps = args.steps or (4 if args.cpu_scale else 10)
    if args.rounds is None:
        args.rounds = 0 if on_gpu else 8
    init_distributed(device)
    peak = args.peak_tflops or measure_peak_tflops(device, DTYPES[precision])
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        print(f"device: {name}; torch {torch.__version__}; model {model_name} "
              f"({count_params(MODEL_SIZES[model_name])['total'] / 1e6:,.1f}M params); {precision}; "
              f"peak {peak:.2f} TFLOP/s ({'given' if args.peak_tflops else 'measured GEMM'})", flush=True)
    specs = [AdapterSpec("lora", k=k, r=min(k, r)), AdapterSpec("secura", k=k, r=r, merge=args.merge)]
    results = []
    for strategy in args.strategies:
        for spec in specs:
            result = run_config(model_name, spec, strategy, device=device, precision=precision, batch=batch, seq=seq,
                                steps=steps, warmup=args.warmup, peak_tflops=peak,
                                activation_checkpointing=args.activation_checkpointing, compile=args.compile)
            if not all(math.isfinite(x) for x in result.losses):
                raise RuntimeError(f"{spec.label} {strategy}: non-finite loss {result.losses}")
            results.append(result)
            if rank0:
                print(f"  {spec.label:>24} {strategy}: {result.tokens_per_s:,.0f} tokens/s, "
                      f"{result.peak_gib:.2f} GiB peak", flush=True)
    note = "step time: median of the timed steps"
    if args.rounds:
        best, gemm = interleaved_best_seconds(model_name, [(spec, st) for st in args.strategies for spec in specs],
                                              device=device, precision=precision, batch=batch, seq=seq,
                                              rounds=args.rounds)
        peak = args.peak_tflops or max(peak, gemm)
        for result, spec in zip(results, specs * len(args.strategies)):
            seconds = best[(result.method, result.strategy)]
            result.tokens_per_s, result.mfu = _throughput(model_name, spec, batch, seq, seconds, peak)
            result.step_ms = seconds * 1e3
        note = (f"step time: fastest of {args.rounds} interleaved rounds; MFU against {peak:.3f} TFLOP/s, the fastest "
                f"GEMM timed in the same rounds; peak memory from the sequential pass")
    if rank0:
        print(f"\n{note}\n" + results_table(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
