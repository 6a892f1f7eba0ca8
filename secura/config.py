"""Configuration of the CUR tuners: the fields SECURA and CUR-LoRA share, and SECURA's own (spec §1–§4).

Every default lives here, once: the layers and S-MagNorm read the config they were built with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

SECURA_PEFT_TYPE = "SECURA"
"""Plain-string PEFT type: peft's ``PeftType`` enum is closed; ``import secura`` registers this string."""

NORM_MODES: tuple[str, ...] = ("mean", "rank", "max", "reference", "absolute", "trust")
"""Values of ``SecuraConfig.magnorm_norm`` (docs/secura-method.md §3 states the math of each)."""

DEFAULT_NORM_MODE = "mean"
"""The S-MagNorm mode a config gets when it names none. Issue 16 §3 lets measurements choose it."""

DEPRECATED_NAMES = {"threshold": "brake_threshold", "ratio": "brake_ratio", "decay": "brake_decay"}
"""Old field names still accepted (with a FutureWarning) and the fields they now set."""


def check_choice(cls_name: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}.{name} must be one of {choices}, got {value!r}.")


def check_positive_int(cls_name: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls_name}.{name} must be a positive integer, got {value!r}.")


def check_range(cls_name: str, name: str, value: object, low: float, high: float, *, open_low: bool = False,
                open_high: bool = False) -> None:
    """``low ≤ value ≤ high`` (or strict, per side), with the interval in the error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{cls_name}.{name} must lie in {interval}, got {value!r}.")


@dataclass
class CurConfig(PeftConfig):
    """What every CUR tuner needs: which layers to adapt and how to pick k rows and columns of each (spec §1)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or a regex of the modules to adapt, as in LoRA; "
            "'all-linear' selects every linear/Conv1D layer but the output head. Default: LoRA's per-architecture "
            "defaults (q_proj and v_proj for Llama-style models, the paper's setting)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (needs list target_modules)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    k: int = field(
        default=150,
        metadata={"help": "CUR rank: number of rows and columns selected from W (paper: 150). Must be ≤ min(out, in) "
                  "of every adapted layer unless clamp_rank is set."},
    )
    cur_selection: Literal["topk", "sample"] = field(
        default="topk",
        metadata={"help": "'topk': the k least important rows/columns (ties by index); 'sample': seeded draws "
                  "without replacement from the inverted-norm probabilities."},
    )
    cur_seed: int = field(
        default=0, metadata={"help": "Seed for 'sample' selection and random initial values (mixed per layer)."}
    )
    clamp_rank: bool = field(
        default=False, metadata={"help": "Clamp k to min(out, in) per layer instead of raising an error."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Whether the weight is stored as (in, out), like GPT-2's Conv1D. Detected per layer "
                  "type; True on an nn.Linear only triggers a warning."},
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        # Checked before peft's own __post_init__ (peft >= 0.22 raises for the first one too,
        # without naming the config class and field).
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{name}.layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}.layers_pattern requires {name}.layers_to_transform to be set too.")
        super().__post_init__()
        for attr in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, attr), list):
                setattr(self, attr, set(getattr(self, attr)))
        check_positive_int(name, "k", self.k)
        check_choice(name, "cur_selection", self.cur_selection, ("topk", "sample"))


@dataclass
class SecuraConfig(CurConfig):
    """Configuration of a SECURA adapter: ``W_eff = W0 + C (U + A B) R`` with S-MagNorm on the adapter output.

    Remember to ``import secura`` before ``PeftModel.from_pretrained``: peft only knows the ``"SECURA"`` type after
    the import has registered it (otherwise peft raises a bare ``KeyError: 'SECURA'``).
    """

    r: int = field(
        default=200,
        metadata={"help": "Rank of the trainable core A (k×r) · B (r×k) (paper: 200). r > k is allowed: the extra "
                  "columns of A start small and random."},
    )
    magnorm: Literal["on", "off"] = field(
        default="on",
        metadata={"help": "S-MagNorm on the adapter output; 'off' is the paper's CABR-only ablation (Y = Y0 + ΔY). "
                  "YAML booleans are accepted (true = 'on')."},
    )
    magnorm_norm: Literal["mean", "rank", "max", "reference", "absolute", "trust"] = field(
        default=DEFAULT_NORM_MODE,
        metadata={"help": "S-MagNorm mode (docs/secura-method.md §3). Scale-invariant gates S = 2 − σ(s(L̂ − c)) on "
                  "L = |ΔY|/(|Y0|+eps) normalised per token: 'mean', 'rank', 'max'. Magnitude-aware: 'reference' "
                  "(the paper's code: S = 2 − σ(s·L), L raw), 'absolute' (S = 1 + (S_max−1)·σ(s(L/τ − 1))), "
                  "'trust' (per-token trust region ‖Y − Y0‖ ≤ τ‖Y0‖, differentiable)."},
    )
    sigmoid_scale: float = field(
        default=6.0, metadata={"help": "s: slope of the sigmoid gate (mean, rank, max, reference, absolute)."}
    )
    magnorm_tau: float = field(
        default=0.2,
        metadata={"help": "τ: 'absolute': the relative change L at which the gate is half closed and above which an "
                  "element counts for the brake; 'trust': the radius of the trust region, ‖ΔY'‖ ≤ τ‖Y0‖ per token."},
    )
    magnorm_s_max: float = field(
        default=10.0, metadata={"help": "S_max ≥ 2: the largest divisor of the 'absolute' gate."}
    )
    magnorm_eps: float = field(
        default=1e-6,
        metadata={"help": "eps in L = |ΔY| / (|Y0| + eps); for 'absolute' it is relative to the token's RMS of Y0 "
                  "(|Y0| + eps·rms(Y0)), for 'trust' it is added to ‖Y0‖."},
    )
    brake_threshold: float = field(
        default=1.2,
        metadata={"help": "m ≥ 1: an element with S ≤ m counts as a large relative change (the brake of the scale-"
                  "invariant modes and 'reference'; the frac_le_m statistic of every mode). Was `threshold`."},
    )
    brake_ratio: float = field(
        default=0.9,
        metadata={"help": "ρ: the brake fires for a token whose fraction of large changes (S ≤ m; 'absolute': "
                  "L > τ) exceeds ρ. Was `ratio`."},
    )
    brake_decay: float = field(
        default=0.99,
        metadata={"help": "d: factor applied to ΔY on the important channels when the brake fires (1: no brake). "
                  "Was `decay`."},
    )
    merge_strategy: Literal["M1", "M2"] = field(
        default="M2",
        metadata={"help": "'M2' (default): fold A·B into the long-term core U_L, base untouched, norm compares "
                  "against the original model. 'M1': fold C·A·B·R into the base weight, norm sees the live update."},
    )
    merge_every: int = field(
        default=1,
        metadata={"help": "Merge A·B and reset B every this many optimiser steps (paper: 1). With 1, B is zero at "
                  "every forward, so A gets no gradient: A is frozen and only B trains."},
    )
    core_decay: float = field(
        default=0.0,
        metadata={"help": "λ ∈ [0, 1), M2 only: each merge sets U ← (1 − λ)·U + A·B, which bounds ‖U‖ by about "
                  "max‖A·B‖/λ. 0 (default): U is the plain sum of the merges."},
    )
    reset_b_optimizer_state: bool = field(
        default=False,
        metadata={"help": "Drop the optimiser state of B at each merge (needs the optimizer passed to the merge "
                  "call). Default: keep it."},
    )
    delta_bias: bool = field(
        default=False,
        metadata={"help": "Train an extra output bias b_Δ (zero-init), the paper's 'bias on'. Named delta_bias "
                  "because peft reads `bias` as its 'none'/'all' base-bias option."},
    )
    approximate_merge: bool = field(
        default=False,
        metadata={"help": "Allow merge()/merge_and_unload() to fold the adapter into the base weight while "
                  "S-MagNorm is on, dropping the norm (S = 1). The merged model then differs from the adapted one; "
                  "by default such a merge raises an error."},
    )
    threshold: Optional[float] = field(default=None, metadata={"help": "Deprecated name of brake_threshold."})
    ratio: Optional[float] = field(default=None, metadata={"help": "Deprecated name of brake_ratio."})
    decay: Optional[float] = field(default=None, metadata={"help": "Deprecated name of brake_decay."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SECURA_PEFT_TYPE
        name = type(self).__name__
        self._take_deprecated_names()
        check_positive_int(name, "r", self.r)
        check_positive_int(name, "merge_every", self.merge_every)
        if isinstance(self.magnorm, bool):  # YAML 1.1 reads on/off as booleans
            self.magnorm = "on" if self.magnorm else "off"
        check_choice(name, "magnorm", self.magnorm, ("on", "off"))
        check_choice(name, "magnorm_norm", self.magnorm_norm, NORM_MODES)
        if isinstance(self.merge_strategy, str):
            self.merge_strategy = self.merge_strategy.upper()
        check_choice(name, "merge_strategy", self.merge_strategy, ("M1", "M2"))
        check_range(name, "sigmoid_scale", self.sigmoid_scale, 0.0, float("inf"), open_low=True, open_high=True)
        check_range(name, "magnorm_tau", self.magnorm_tau, 0.0, float("inf"), open_low=True, open_high=True)
        check_range(name, "magnorm_s_max", self.magnorm_s_max, 2.0, float("inf"), open_high=True)
        check_range(name, "magnorm_eps", self.magnorm_eps, 0.0, float("inf"), open_low=True, open_high=True)
        # S ∈ [1, 2] for the sigmoid gates (mean, rank, max, reference); wider for absolute and trust
        s_high = {"absolute": self.magnorm_s_max, "trust": float("inf")}.get(self.magnorm_norm, 2.0)
        check_range(name, "brake_threshold", self.brake_threshold, 1.0, s_high)
        check_range(name, "brake_ratio", self.brake_ratio, 0.0, 1.0)
        check_range(name, "brake_decay", self.brake_decay, 0.0, 1.0, open_low=True)
        check_range(name, "core_decay", self.core_decay, 0.0, 1.0, open_high=True)
        if self.core_decay and self.merge_strategy != "M2":
            raise ValueError(f"{name}.core_decay decays the long-term core U of M2; merge_strategy "
                             f"{self.merge_strategy!r} folds U into the base weight. Use M2 or core_decay=0.")

    def _take_deprecated_names(self) -> None:
        """Move values given under the old names to the new fields, with a FutureWarning."""
        name = type(self).__name__
        for old, new in DEPRECATED_NAMES.items():
            value = getattr(self, old)
            if value is None:
                continue
            default = type(self).__dataclass_fields__[new].default
            current = getattr(self, new)
            if current != default and current != value:
                raise ValueError(f"{name}: both {old}={value!r} (deprecated) and {new}={current!r} are set; "
                                 f"keep {new} only.")
            warnings.warn(f"{name}.{old} is deprecated; use {new} (same meaning).", FutureWarning, stacklevel=4)
            setattr(self, new, value)
            setattr(self, old, None)
