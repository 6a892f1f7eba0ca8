"""Configuration of the SECURA tuner (spec §1–§4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

SECURA_PEFT_TYPE = "SECURA"
"""Plain-string PEFT type: peft's ``PeftType`` enum is closed; ``import secura`` registers this string."""


def check_choice(cls_name: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}.{name} must be one of {choices}, got {value!r}.")


def check_positive_int(cls_name: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls_name}.{name} must be a positive integer, got {value!r}.")


def check_targeting(config: PeftConfig) -> None:
    """The target_modules/layers_* rules that every peft tuner applies."""
    name = type(config).__name__
    for attr in ("target_modules", "exclude_modules"):
        if isinstance(getattr(config, attr), list):
            setattr(config, attr, set(getattr(config, attr)))
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError(f"{name}.layers_to_transform cannot be used when target_modules is a regex string.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{name}.layers_pattern requires {name}.layers_to_transform to be set too.")


@dataclass
class SecuraConfig(PeftConfig):
    """Configuration of a SECURA adapter: ``W_eff = W0 + C (U + A B) R`` with S-MagNorm on the adapter output.

    Remember to ``import secura`` before ``PeftModel.from_pretrained``: peft only knows the ``"SECURA"`` type after
    the import has registered it (otherwise peft raises a bare ``KeyError: 'SECURA'``).
    """

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
    magnorm_norm: Literal["mean", "rank", "max"] = field(
        default="mean",
        metadata={"help": "Per-token normalisation of L = |ΔY|/|Y0|: 'mean' (default, centre 1), 'rank' (uniform "
                  "spread, a sort per token) or 'max' (the paper's form; tends to halve everything)."},
    )
    sigmoid_scale: float = field(default=6.0, metadata={"help": "s in S = 2 − σ(s (L̂ − c))."})
    threshold: float = field(
        default=1.2, metadata={"help": "m: elements with S ≤ m count as a large relative change (brake, stats)."}
    )
    ratio: float = field(
        default=0.9, metadata={"help": "ρ: the brake fires for a token whose fraction of S ≤ m exceeds ρ."}
    )
    decay: float = field(
        default=0.99, metadata={"help": "d: factor applied to ΔY on the important channels when the brake fires."}
    )
    magnorm_eps: float = field(default=1e-6, metadata={"help": "eps in L = |ΔY| / (|Y0| + eps)."})
    merge_strategy: Literal["M1", "M2"] = field(
        default="M2",
        metadata={"help": "'M2' (default): fold A·B into the long-term core U_L, base untouched, norm compares "
                  "against the original model. 'M1': fold C·A·B·R into the base weight, norm sees the live update."},
    )
    merge_every: int = field(
        default=1, metadata={"help": "Merge A·B and reset B every this many optimiser steps (paper: 1)."}
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
    cur_selection: Literal["topk", "sample"] = field(
        default="topk",
        metadata={"help": "'topk': the k least important rows/columns (ties by index); 'sample': seeded draws "
                  "without replacement from the inverted-norm probabilities."},
    )
    cur_seed: int = field(
        default=0, metadata={"help": "Seed for 'sample' selection and the extra columns of A (mixed per layer)."}
    )
    clamp_rank: bool = field(
        default=False, metadata={"help": "Clamp k to min(out, in) per layer instead of raising an error."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Whether the weight is stored as (in, out), like GPT-2's Conv1D. Detected per layer "
                  "type; True on an nn.Linear only triggers a warning."},
    )
    approximate_merge: bool = field(
        default=False,
        metadata={"help": "Allow merge()/merge_and_unload() to fold the adapter into the base weight while "
                  "S-MagNorm is on, dropping the norm (S = 1). The merged model then differs from the adapted one; "
                  "by default such a merge raises an error."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SECURA_PEFT_TYPE
        name = type(self).__name__
        check_targeting(self)
        check_positive_int(name, "k", self.k)
        check_positive_int(name, "r", self.r)
        check_positive_int(name, "merge_every", self.merge_every)
        if isinstance(self.magnorm, bool):  # YAML 1.1 reads on/off as booleans
            self.magnorm = "on" if self.magnorm else "off"
        check_choice(name, "magnorm", self.magnorm, ("on", "off"))
        check_choice(name, "magnorm_norm", self.magnorm_norm, ("mean", "rank", "max"))
        if isinstance(self.merge_strategy, str):
            self.merge_strategy = self.merge_strategy.upper()
        check_choice(name, "merge_strategy", self.merge_strategy, ("M1", "M2"))
        check_choice(name, "cur_selection", self.cur_selection, ("topk", "sample"))
        if not self.sigmoid_scale > 0:
            raise ValueError(f"{name}.sigmoid_scale must be > 0, got {self.sigmoid_scale!r}.")
        if not 1.0 <= self.threshold <= 2.0:
            raise ValueError(f"{name}.threshold must lie in [1, 2] (the range of S), got {self.threshold!r}.")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"{name}.ratio must lie in [0, 1], got {self.ratio!r}.")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"{name}.decay must lie in (0, 1], got {self.decay!r}.")
        if not self.magnorm_eps > 0:
            raise ValueError(f"{name}.magnorm_eps must be > 0, got {self.magnorm_eps!r}.")
