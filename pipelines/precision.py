"""The compute precision of training and evaluation: ``auto`` picks bf16 autocast where the hardware runs it.

Autocast only changes the dtype matmuls and attention compute in: master weights, optimiser state, SECURA's
core and its merges stay fp32 (secura-method §9). On a CPU bf16 is only fast with native bf16 instructions
(AVX512-BF16 or AMX): elsewhere it is emulated and slower than fp32, so ``auto`` is fp32 there.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
Requested = Literal["auto", "fp32", "bf16"]
# /proc/cpuinfo flags of the x86 extensions that run bf16 matmuls natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm64
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls: torch's capability report (cpuinfo), else Linux's flags."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        if any(found.get(flag) for flag in BF16_CPU_FLAGS):
            return True
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """``auto``: bf16 on a GPU with bf16 and on a CPU with native bf16, fp32 elsewhere; fp32/bf16 as asked."""
    if requested in ("fp32", "bf16"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast(precision: Precision, device: torch.device | str):
    """bf16 autocast for ``bf16``; for ``fp32`` autocast switched off (also inside an outer autocast)."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
