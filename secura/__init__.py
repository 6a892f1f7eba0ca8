"""SECURA-CL adapters as first-class PEFT tuners: SECURA (CUR + S-MagNorm) and the CUR-LoRA baseline.

Importing this package registers the plain-string PEFT types ``"SECURA"`` and ``"CURLORA"`` with peft, so
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work with them. A process that has not
imported ``secura`` gets a bare ``KeyError: 'SECURA'`` from peft when it loads a saved adapter.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import DEFAULT_NORM_MODE, NORM_MODES, SECURA_PEFT_TYPE, SecuraConfig
from .cur_lora import CURLORA_PEFT_TYPE, CurLoraConfig, CurLoraModel
from .model import SecuraModel, end_task, magnorm_stats, magnorm_token_mask, merge_step, reset_magnorm_stats

__version__ = "0.1.0"


def _register(peft_type: str, config_cls: type, model_cls: type) -> None:
    """Register a plain-string PEFT type (``peft.utils.register_peft_method`` only takes ``PeftType`` members)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix


_register(SECURA_PEFT_TYPE, SecuraConfig, SecuraModel)
_register(CURLORA_PEFT_TYPE, CurLoraConfig, CurLoraModel)

from .methods import METHODS, Method, MethodConfig, build_method  # noqa: E402 - after registration
from .strategies import EWC, STRATEGIES, ExperienceReplay, ILoRA, Sequential, Strategy, build_strategy  # noqa: E402

__all__ = [
    "__version__",
    "EWC",
    "METHODS",
    "STRATEGIES",
    "ExperienceReplay",
    "ILoRA",
    "Method",
    "MethodConfig",
    "Sequential",
    "Strategy",
    "build_method",
    "build_strategy",
    "CurLoraConfig",
    "DEFAULT_NORM_MODE",
    "NORM_MODES",
    "CurLoraModel",
    "SecuraConfig",
    "SecuraModel",
    "end_task",
    "magnorm_stats",
    "magnorm_token_mask",
    "merge_step",
    "reset_magnorm_stats",
]
