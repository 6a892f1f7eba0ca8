"""Training-step cost of SECURA against peft LoRA and DoRA: step time and peak memory, ratios to LoRA.

Two configurations (issue 14):

* ``llama``: a Llama-like model (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8192, random
  weights), batch 8 × 128 tokens, adapters on q_proj and v_proj, loss = the causal LM loss;
* ``layer``: one 4096 × 4096 linear layer, 1024 tokens, loss = mean square of the output.

A step is what the trainer does: zero_grad, forward, backward, AdamW, and for SECURA the merge of
``secura.merge_step`` (every step, the paper's schedule). Ranks: LoRA and DoRA at rank k, SECURA at
k and r (``--k``, ``--r``), so ΔW has the same rank for all three.

**Time.** All methods are built once and stepped in turns (round-robin, the order rotated every
round) so that a shared machine's drift hits them alike; after warm-up rounds the median step time of
each is reported with its ratio to LoRA's: wall-clock time, and the process's CPU time (user + system,
all threads), which on a machine shared with other jobs measures the work a step does rather than how
long it waited for a core. On an idle machine with one thread the two agree; on a loaded one, two threads
also spin at every barrier while the other waits for a core, which inflates the CPU time of every small op
(``--threads 1`` avoids that). On a GPU read the wall column (steps end with a device synchronisation).

**Memory.** Each method is measured alone in a fresh child process (``--memory-child``), so no other
model is resident: on a GPU, ``torch.cuda.max_memory_allocated`` over building the model and
training; on the CPU, the process's peak resident set (``VmHWM``) minus the resident set after the
imports, with glibc told to serve every allocation of 64 KiB or more by mmap (so freed tensors leave
the resident set at once and the peak is the peak of live tensors, not of allocator caches). Both
count the base weights, the adapter, AdamW's state, activations and temporaries; "step" is the part
above what was resident just before the last step (activations and temporaries only).

    PYTHONPATH=. python benchmarks/adapter_step.py                    # both CPU configs, a few minutes idle
    PYTHONPATH=. python benchmarks/adapter_step.py --config layer --rounds 20
    PYTHONPATH=. python benchmarks/adapter_step.py --device cuda      # bf16 base + autocast on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

MIB = 1024**2
TARGETS = {"llama": ["q_proj", "v_proj"], "layer": ["proj"]}
# issue 14's targets, as (step time ÷ LoRA, peak memory ÷ LoRA, step time ÷ DoRA) upper bounds
GOALS = {"llama": (1.05, 1.15, None), "layer": (1.10, None, 0.5)}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration and one method on it."""

    config: str  # llama | layer
    method: str  # lora | dora | secura
    k: int
    r: int
    norm: str = "mean"  # SECURA's magnorm_norm, or "off"
    device: str = "cpu"
    precision: str = "fp32"  # bf16: bf16 base weights and autocast (GPU)
    tokens: int = 1024  # layer config only
    batch: int = 8
    seq: int = 128

    @property
    def label(self) -> str:
        if self.method == "secura":
            return f"SECURA k={self.k} r={self.r} norm={self.norm}"
        return f"{'LoRA' if self.method == 'lora' else 'DoRA'} r={self.k}"


class OneLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(case: Case, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The wrapped model and one fixed batch."""
    from peft import LoraConfig, get_peft_model

    import secura

    torch.manual_seed(seed)
    device = torch.device(case.device)
    dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    if case.config == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          intermediate_size=1376, vocab_size=8192, max_position_embeddings=max(512, case.seq))
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        ids = torch.randint(0, cfg.vocab_size, (case.batch, case.seq), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    else:
        model = OneLayer(4096).to(device=device, dtype=dtype)
        batch = {"x": torch.randn(case.tokens, 4096, generator=g).to(device=device, dtype=dtype)}
    targets = TARGETS[case.config]
    if case.method == "secura":
        magnorm = "off" if case.norm == "off" else "on"
        norm = {"magnorm_norm": case.norm} if case.norm != "off" else {}
        config = secura.SecuraConfig(target_modules=targets, k=case.k, r=case.r, magnorm=magnorm, **norm)
    else:
        config = LoraConfig(target_modules=targets, r=case.k, lora_alpha=case.k, use_dora=case.method == "dora")
    return get_peft_model(model, config), batch


class Stepper:
    """One method's model, optimiser and batch; ``step()`` runs and times one training step."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.model, self.batch = build(case)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = torch.device(case.device)
        self.steps = 0

    def _loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.case.precision == "bf16"):
            if self.case.config == "llama":
                return self.model(**self.batch).loss
            return self.model(self.batch["x"]).float().square().mean()

    def step(self) -> tuple[float, float]:
        """One training step; its (wall, CPU) seconds."""
        import secura

        synchronize(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()
        self.steps += 1
        if self.case.method == "secura":
            secura.merge_step(self.model, self.steps, optimizer=self.optimizer)
        synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - start_cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- time: interleaved rounds ------------------------------------------------------------------------


def time_interleaved(cases: list[Case], rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """Per method, the (wall, CPU) step times of ``rounds`` rounds (after ``warmup``), methods taking turns."""
    steppers = [Stepper(case) for case in cases]
    times: dict[str, list[tuple[float, float]]] = {case.label: [] for case in cases}
    for index in range(warmup + rounds):
        shift = index % len(steppers)
        for stepper in steppers[shift:] + steppers[:shift]:
            seconds = stepper.step()
            if index >= warmup:
                times[stepper.case.label].append(seconds)
    return times


# --- memory: one child process per method ------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def memory_child(case: Case, steps: int) -> dict[str, float]:
    """Peak memory of building ``case`` and training it ``steps`` steps, alone in this process."""
    import peft  # noqa: F401 - the libraries' own memory is not the method's
    import transformers.models.llama.modeling_llama  # noqa: F401

    import secura  # noqa: F401

    gpu = case.device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees return to the OS at once
        gc.collect()
        libc.malloc_trim(0)
        start = _rss_bytes("VmRSS")
        _reset_peak_rss()
    stepper = Stepper(case)
    for _ in range(steps - 1):
        stepper.step()
    gc.collect()
    if gpu:
        before_last = torch.cuda.memory_allocated()
        total_so_far = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        libc.malloc_trim(0)
        before_last = _rss_bytes("VmRSS")
        total_so_far = _rss_bytes("VmHWM")
        _reset_peak_rss()
    stepper.step()
    peak_last = torch.cuda.max_memory_allocated() if gpu else _rss_bytes("VmHWM")
    return {"total_mib": (max(total_so_far, peak_last) - start) / MIB, "step_mib": (peak_last - before_last) / MIB}


def measure_memory(case: Case, steps: int) -> dict[str, float]:
    """Run :func:`memory_child` in a fresh interpreter (nothing else resident) and read its JSON answer."""
    command = [sys.executable, __file__, "--memory-child", json.dumps(asdict(case)), "--memory-steps", str(steps),
               "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {case.label} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------------------------


def _ratio_cell(value: float, goal: float | None) -> str:
    if goal is None:
        return f"{value:.3f}"
    return f"**{value:.3f}** ({'met' if value <= goal else 'MISSED'}: ≤ {goal})"


def report(config: str, cases: list[Case], times: dict[str, list[tuple[float, float]]],
           memory: dict[str, dict]) -> str:
    """Markdown table: wall and CPU medians with their ratios to LoRA (and DoRA), peak memory and its ratio."""
    lora = next(c.label for c in cases if c.method == "lora")
    dora = next((c.label for c in cases if c.method == "dora"), None)
    time_goal, memory_goal, dora_goal = GOALS[config]
    wall = {label: statistics.median(t[0] for t in values) for label, values in times.items()}
    cpu = {label: statistics.median(t[1] for t in values) for label, values in times.items()}
    lines = ["| method | wall ms | wall ÷ LoRA | CPU ms | CPU ÷ LoRA | CPU ÷ DoRA | peak MiB | peak ÷ LoRA "
             "| step MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        label = case.label
        goals = case.method == "secura" and case.norm != "off"  # the targets are for SECURA with the norm on
        cells = [f"{1e3 * wall[label]:.1f}", _ratio_cell(wall[label] / wall[lora], time_goal if goals else None),
                 f"{1e3 * cpu[label]:.1f}", _ratio_cell(cpu[label] / cpu[lora], time_goal if goals else None),
                 _ratio_cell(cpu[label] / cpu[dora], dora_goal if goals else None) if dora else "–"]
        mem = memory.get(label)
        if mem:
            ratio = _ratio_cell(mem["total_mib"] / memory[lora]["total_mib"], memory_goal if goals else None)
            cells += [f"{mem['total_mib']:.0f}", ratio, f"{mem['step_mib']:.0f}"]
        else:
            cells += ["–", "–", "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cases_for(config: str, args: argparse.Namespace) -> list[Case]:
    k, r = (args.k or (64 if config == "llama" else 128)), (args.r or (32 if config == "llama" else 64))
    common = dict(config=config, k=k, r=r, device=args.device, precision=args.precision, tokens=args.tokens,
                  batch=args.batch, seq=args.seq)
    methods = [Case(method="lora", **common), Case(method="dora", **common)]
    return methods + [Case(method="secura", norm=norm, **common) for norm in args.norms]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["llama", "layer", "both"], default="both")
    p.add_argument("--norms", nargs="+", default=None,
                   help="SECURA norm modes to time (default: SecuraConfig's default mode); 'off' for no norm")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 llama, 8 layer)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--k", type=int, default=None, help="SECURA k and LoRA/DoRA rank (default 64 llama, 128 layer)")
    p.add_argument("--r", type=int, default=None, help="SECURA r (default 32 llama, 64 layer)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the layer config")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(Case(**json.loads(args.memory_child)), args.memory_steps)))
        return 0
    import secura

    if args.norms is None:
        args.norms = [secura.SecuraConfig().magnorm_norm]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"{device}; torch {torch.__version__}; {args.precision}", flush=True)
    for config in (["llama", "layer"] if args.config == "both" else [args.config]):
        cases = cases_for(config, args)
        rounds = args.rounds or (10 if config == "llama" else 8)
        shape = f"{args.batch}×{args.seq} tokens" if config == "llama" else f"{args.tokens} tokens"
        print(f"\n## {config}: {shape}, {rounds} interleaved rounds after {args.warmup} warm-up", flush=True)
        started = time.perf_counter()
        times = time_interleaved(cases, rounds, args.warmup)
        gc.collect()
        memory = {} if args.no_memory else {c.label: measure_memory(c, args.memory_steps) for c in cases}
        print(report(config, cases, times, memory))
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
