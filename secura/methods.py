"""The method registry: a method name resolves to an adapter and a strategy.

A run names a method (``secura``, ``lora``, ``dora``, ``cur_lora``, ``full``,
``seq``, ``er``, ``ewc``, ``ilora``, ``olora``, ``inflora``, ``nlora``, and
peft's own continual-learning methods ``osf`` and ``corda``). The *adapter*
says how the model is wrapped (a peft tuner, one LoRA per task, or every
weight unfrozen); the *strategy*
(`secura.strategies`) says what happens around training. Everything
method-specific sits behind `Method`, so the trainer never branches on a name::

    method = build_method(MethodConfig.from_dict({"name": "er", "strategy_args": {"buffer_size": 500}}))
    model = method.wrap(model)
    ...
    method.before_task(model, task_index, task_name, task_batches)   # per-task adapters, InfLoRA's A
    method.after_optimizer_step(model, step)   # SECURA merges, then the strategy's hook
    method.end_task(model)                     # SECURA end-of-task merge

The peft tuners ``SECURA`` and ``CURLORA`` are registered with peft by
``import secura``, which importing this module does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim import Optimizer

import secura
from secura import corda, osf
from secura.strategies import STRATEGIES, Strategy, TaskBatches, build_strategy
from secura.task_lora import (
    USER_FIELDS,
    TaskLoraConfig,
    inject_task_lora,
    load_task_lora_state_dict,
    task_lora_layers,
    task_lora_state_dict,
)

# PeftConfig's own fields (task type, base model name, ...) and the target
# modules are set by the registry, never through `MethodConfig.adapter`.
_RESERVED = {f.name for f in dataclasses.fields(PeftConfig)} | {"target_modules"}


class Adapter:
    """How a method wraps the model and what it saves; the training hooks default to no-ops."""

    strategies: tuple[str, ...] | None = None  # the strategies that apply (None: any but the per-task LoRA's)

    def fields(self) -> list[str]:
        """The config fields a user may set through ``MethodConfig.adapter``."""
        return []

    def config(self, target_modules: list[str] | str, kwargs: dict[str, Any]) -> Any:
        """The adapter's validated config (None: nothing to configure); bad values raise here."""
        return None

    def wrap(self, model: nn.Module, target_modules: list[str] | str, kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def save(self, model: nn.Module, path: str | Path) -> None:
        raise NotImplementedError

    def before_task(self, model: nn.Module, task_index: int, task_name: str, task_batches: TaskBatches,
                    context: Any = None) -> None:
        """Before a task's optimiser exists (per-task adapters are created here); idempotent on resume.

        ``context`` is what the method needs beside the model and the task (CorDA: `secura.corda.CordaContext`).
        """

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer: Optimizer | None = None) -> None:
        pass

    def end_task(self, model: nn.Module, optimizer: Optimizer | None = None) -> None:
        pass


class PeftAdapter(Adapter):
    """An adapter injected by peft's ``get_peft_model`` from a config class."""

    def __init__(self, config_class: Callable[[], type[PeftConfig]], **fixed: Any) -> None:
        # A callable, so secura's config classes are looked up only when used.
        self._config_class = config_class
        self.fixed = fixed  # kwargs the method itself sets (DoRA: use_dora=True)

    def fields(self) -> list[str]:
        names = (f.name for f in dataclasses.fields(self._config_class()) if f.init)
        return sorted(n for n in names if n not in _RESERVED and n not in self.fixed)

    def config(self, target_modules: list[str] | str, kwargs: dict[str, Any]) -> PeftConfig:
        """The peft config; its own checks run here, so bad values fail before any model is loaded."""
        return self._config_class()(task_type="CAUSAL_LM", target_modules=target_modules, **self.fixed, **kwargs)

    def wrap(self, model: nn.Module, target_modules: list[str] | str, kwargs: dict[str, Any]) -> nn.Module:
        return get_peft_model(model, self.config(target_modules, kwargs))

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return get_peft_model_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise KeyError(f"adapter state has keys the model lacks: {result.unexpected_keys[:5]}")

    def save(self, model: nn.Module, path: str | Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True)


class SecuraAdapter(PeftAdapter):
    """SECURA: a peft adapter that also folds its live update into the core on a schedule (spec §4)."""

    def __init__(self) -> None:
        super().__init__(lambda: secura.SecuraConfig)

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer: Optimizer | None = None) -> None:
        secura.merge_step(model, step, optimizer=optimizer)

    def end_task(self, model: nn.Module, optimizer: Optimizer | None = None) -> None:
        secura.end_task(model, optimizer=optimizer)


class OsfAdapter(PeftAdapter):
    """OSF (`secura.osf`): peft's tuner, decomposed again with a larger preserved rank before each task.

    The strategies that keep per-parameter copies (EWC, I-LoRA) do not apply: each task's trained factors
    are new tensors of another shape.
    """

    strategies = ("seq", "er")

    def __init__(self) -> None:
        super().__init__(lambda: osf.ContinualOsfConfig)

    def fields(self) -> list[str]:
        return list(osf.USER_FIELDS)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return osf.osf_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        osf.load_osf_state_dict(model, state)

    def save(self, model: nn.Module, path: str | Path) -> None:
        _save_tensors(self.state_dict(model), Path(path) / "osf.safetensors")

    def before_task(self, model: nn.Module, task_index: int, task_name: str, task_batches: TaskBatches,
                    context: Any = None) -> None:
        osf.start_task(model, task_index)

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer: Optimizer | None = None) -> None:
        osf.project_factors(model)


class CordaAdapter(PeftAdapter):
    """CorDA (`secura.corda`): peft's LoRA with CorDA's factors, built from samples before the first task."""

    def __init__(self) -> None:
        super().__init__(lambda: corda.CordaLoraConfig)

    def fields(self) -> list[str]:
        return list(corda.USER_FIELDS)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return corda.corda_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        corda.load_corda_state_dict(model, state)

    def save(self, model: nn.Module, path: str | Path) -> None:
        _save_tensors(self.state_dict(model), Path(path) / "corda.safetensors")

    def before_task(self, model: nn.Module, task_index: int, task_name: str, task_batches: TaskBatches,
                    context: Any = None) -> None:
        corda.start(model, task_index, task_batches, context)


def _save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(file))


class FullFineTuning(Adapter):
    """Every weight trained; the "adapter" file is a safetensors of the trainable weights."""

    file_name = "model.safetensors"

    def wrap(self, model: nn.Module, target_modules: list[str] | str, kwargs: dict[str, Any]) -> nn.Module:
        return model.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"weights the model lacks: {result.unexpected_keys[:5]}")

    def save(self, model: nn.Module, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous().cpu() for name, t in self.state_dict(model).items()}
        save_file(tensors, str(Path(path) / self.file_name))


class TaskLoraAdapter(Adapter):
    """One LoRA per task, the earlier ones frozen and active (`secura.task_lora`): O-LoRA, InfLoRA, N-LoRA.

    The factors of every task are the adapter's state, so a freshly wrapped model grows to the saved number
    of tasks when it loads a state (the evaluator, a resumed stage). ``train_a=False`` freezes each task's A
    (InfLoRA, whose strategy sets A from the task's inputs).
    """

    file_name = "task_lora.safetensors"

    def __init__(self, train_a: bool = True) -> None:
        self.train_a = train_a

    def fields(self) -> list[str]:
        return list(USER_FIELDS)

    def config(self, target_modules: list[str] | str, kwargs: dict[str, Any]) -> TaskLoraConfig:
        return TaskLoraConfig(task_type="CAUSAL_LM", target_modules=target_modules, **kwargs)

    def wrap(self, model: nn.Module, target_modules: list[str] | str, kwargs: dict[str, Any]) -> nn.Module:
        return inject_task_lora(model, self.config(target_modules, kwargs), train_a=self.train_a)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return task_lora_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        load_task_lora_state_dict(model, state)

    def save(self, model: nn.Module, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict(model).items()}
        save_file(tensors, str(Path(path) / self.file_name))

    def before_task(self, model: nn.Module, task_index: int, task_name: str, task_batches: TaskBatches,
                    context: Any = None) -> None:
        """Freeze the previous task's LoRA and start a fresh one (Kaiming A, zero B) for this task."""
        for layer in task_lora_layers(model).values():
            layer.start_task(task_index)


ADAPTERS: dict[str, Adapter] = {
    "lora": PeftAdapter(lambda: LoraConfig),
    "dora": PeftAdapter(lambda: LoraConfig, use_dora=True),
    "secura": SecuraAdapter(),
    "cur_lora": PeftAdapter(lambda: secura.CurLoraConfig),
    "full": FullFineTuning(),
    "task_lora": TaskLoraAdapter(),
    "inflora": TaskLoraAdapter(train_a=False),
    "osf": OsfAdapter(),
    "corda": CordaAdapter(),
}


@dataclass(frozen=True)
class MethodSpec:
    adapter: str  # a key of ADAPTERS
    strategy: str  # the default strategy, a key of secura.strategies.STRATEGIES


# The one place where methods are registered.
METHODS: dict[str, MethodSpec] = {
    "secura": MethodSpec("secura", "seq"),
    "lora": MethodSpec("lora", "seq"),
    "dora": MethodSpec("dora", "seq"),
    "cur_lora": MethodSpec("cur_lora", "seq"),
    "full": MethodSpec("full", "seq"),
    "seq": MethodSpec("lora", "seq"),
    "er": MethodSpec("lora", "er"),
    "ewc": MethodSpec("lora", "ewc"),
    "ilora": MethodSpec("lora", "ilora"),
    "olora": MethodSpec("task_lora", "olora"),
    "inflora": MethodSpec("inflora", "inflora"),
    "nlora": MethodSpec("task_lora", "nlora"),
    "osf": MethodSpec("osf", "seq"),
    "corda": MethodSpec("corda", "seq"),
}


@dataclass
class MethodConfig:
    """Which method to train with, as written in a run config (the ``method:`` section)."""

    # The registered method: secura, lora, dora, cur_lora, full, seq, er, ewc, ilora, olora, inflora, nlora,
    # osf, corda.
    name: str
    # A strategy to use instead of the method's default (seq, er, ewc, ilora; olora, nlora, inflora
    # on the per-task LoRA only), e.g. ``secura`` + ``er``. None: the method's own (er/ewc/ilora/
    # olora/inflora/nlora for those names, seq for the rest).
    strategy: str | None = None
    # Module names (or a peft regex string) the adapter is injected into; unused by ``full``.
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Adapter config kwargs. secura: SecuraConfig fields (k, r, magnorm, merge_strategy,
    # merge_every, ...); lora/dora: LoraConfig fields (r, lora_alpha, lora_dropout, ...);
    # cur_lora: CurLoraConfig fields (k, ...); olora/inflora/nlora: TaskLoraConfig fields
    # (r, lora_alpha, lora_dropout); osf: effective_rank, rank_pattern, rank_growth (secura.osf);
    # corda: r, lora_alpha, lora_dropout, corda_method (kpm or ipm; secura.corda); full: none.
    # Unset fields take the config class's defaults.
    adapter: dict[str, Any] = field(default_factory=dict)
    # Strategy constructor kwargs, e.g. {"buffer_size": 500, "replay_ratio": 0.25} for er,
    # {"lambda_1": 0.5, "lambda_2": 0.0} for olora, {"l1_lambda": 0.4} for nlora,
    # {"threshold": 0.995, "threshold_tasks": 15, "feature_batches": 100} for inflora.
    strategy_args: dict[str, Any] = field(default_factory=dict)
    # corda only: the sample set CorDA's kpm builds its adapter from, read by pipelines (pipelines.corda):
    # {samples: <a stream-style source>, split, limit, template, max_length}. Never a probe or a task's test
    # split (refused). ipm builds from the first task's rows and takes only ``limit`` here (samples unused, so
    # a sweep may search corda_method).
    corda: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build and validate; every error names the offending field and the valid choices."""
        if not isinstance(data, dict):
            raise TypeError(f"method: expected a mapping, got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"method: unknown field(s) {unknown}; valid: {valid}")
        if "name" not in data:
            raise ValueError(f"method.name: required; valid: {sorted(METHODS)}")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.name, str) or self.name not in METHODS:
            raise ValueError(f"method.name: unknown method {self.name!r}; valid: {sorted(METHODS)}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"method.strategy: unknown strategy {self.strategy!r}; valid: {sorted(STRATEGIES)}")
        targets = self.target_modules
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise TypeError(f"method.target_modules: expected a list of module names or a string, got {targets!r}")
        for name in ("adapter", "strategy_args", "corda"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"method.{name}: expected a mapping, got {type(getattr(self, name)).__name__}")
        spec = METHODS[self.name]
        allowed = ADAPTERS[spec.adapter].fields()
        bad = sorted(set(self.adapter) - set(allowed))
        if bad:
            raise ValueError(f"method.adapter: unknown field(s) {bad} for adapter {spec.adapter!r}; valid: {allowed}")
        try:
            ADAPTERS[spec.adapter].config(self.target_modules, dict(self.adapter))
        except (TypeError, ValueError) as error:
            raise ValueError(f"method.adapter: {error}") from error
        try:
            build_strategy(self.strategy_name, self.strategy_args)
        except (TypeError, ValueError) as error:
            raise ValueError(f"method.strategy_args: {error}") from error
        if STRATEGIES[self.strategy_name].needs_task_lora and not isinstance(ADAPTERS[spec.adapter], TaskLoraAdapter):
            raise ValueError(f"method.strategy: {self.strategy_name!r} needs the per-task LoRA adapter "
                             f"(methods olora, inflora, nlora); method {self.name!r} uses {spec.adapter!r}")
        allowed_strategies = ADAPTERS[spec.adapter].strategies
        if allowed_strategies is not None and self.strategy_name not in allowed_strategies:
            raise ValueError(f"method.strategy: {self.strategy_name!r} does not apply to method {self.name!r}; "
                             f"valid: {list(allowed_strategies)}")
        self._validate_corda(spec.adapter)

    def _validate_corda(self, adapter: str) -> None:
        """The sample set's presence; its fields are pipelines' (pipelines.corda validates them)."""
        if adapter != "corda":
            if self.corda:
                raise ValueError(f"method.corda: only for method corda, not {self.name!r}")
            return
        if self.adapter.get("corda_method", "kpm") == "kpm" and "samples" not in self.corda:
            raise ValueError("method.corda.samples: required for corda_method kpm: a stream-style source of the "
                             "knowledge to keep (e.g. builtin:demo/reviews, or a JSONL file of passages)")

    @property
    def strategy_name(self) -> str:
        return self.strategy or METHODS[self.name].strategy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Method:
    """A method ready to use: wraps the model, owns the strategy, saves and restores adapter state."""

    def __init__(self, config: MethodConfig, context: Any = None) -> None:
        config.validate()
        self.config = config
        self.context = context  # what the adapter needs beside the model (CorDA: secura.corda.CordaContext)
        self.name = config.name
        self.adapter_name = METHODS[config.name].adapter
        self.adapter = ADAPTERS[self.adapter_name]
        self.strategy: Strategy = build_strategy(config.strategy_name, config.strategy_args)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: a peft model with the adapter injected, or (``full``) the model unfrozen."""
        return self.adapter.wrap(model, self.config.target_modules, dict(self.config.adapter))

    def before_task(self, model: nn.Module, task_index: int, task_name: str, task_batches: TaskBatches) -> None:
        """Before the task's optimiser is built: the adapter's set-up (per-task adapters), then the strategy's.

        Called on every (re)start of a stage, after a checkpoint's state was loaded, so it must be idempotent.
        """
        self.adapter.before_task(model, task_index, task_name, task_batches, self.context)
        self.strategy.before_task(model, task_index, task_name, task_batches)

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer: Optimizer | None = None) -> None:
        """After each optimiser step: the adapter's own schedule (SECURA merges) first, then the strategy's.

        ``optimizer`` is needed only by SECURA with ``reset_b_optimizer_state`` (its B state is dropped at merges).
        """
        self.adapter.after_optimizer_step(model, step, optimizer)
        self.strategy.after_optimizer_step(model, step)

    def end_task(self, model: nn.Module, optimizer: Optimizer | None = None) -> None:
        """At the end of a task, before the strategy's ``after_task``: SECURA's end-of-task merge."""
        self.adapter.end_task(model, optimizer)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The trained state only (adapter tensors, or all weights for ``full``), for checkpoints."""
        return self.adapter.state_dict(model)

    def load_adapter_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Restore what `adapter_state_dict` returned into a model already wrapped by `wrap`."""
        self.adapter.load_state_dict(model, state)

    def save_adapter(self, model: nn.Module, path: str | Path) -> None:
        """Write the adapter as safetensors into the folder ``path`` (peft's layout for peft methods)."""
        self.adapter.save(model, path)

    @staticmethod
    def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied weights counted once."""
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def describe(self) -> dict[str, Any]:
        """Flat parameters for experiment tracking."""
        out: dict[str, Any] = {
            "method": self.name,
            "adapter": self.adapter_name,
            "strategy": self.strategy.name,
        }
        if isinstance(self.adapter, (PeftAdapter, TaskLoraAdapter)):
            targets = self.config.target_modules
            out["target_modules"] = targets if isinstance(targets, str) else ",".join(targets)
        for prefix, values in (("adapter", self.config.adapter), ("strategy", self.strategy.describe()),
                               ("corda", self.config.corda)):
            for key, value in values.items():
                plain = value is None or isinstance(value, (int, float, str, bool))
                out[f"{prefix}.{key}"] = value if plain else str(value)
        return out


def build_method(config: MethodConfig, context: Any = None) -> Method:
    """The method of ``config``; ``context`` is what its adapter needs beside the model (CorDA's samples)."""
    return Method(config, context)
