"""CorDA's sample set (``method.corda``): validated, resolved against the run config's folder, refused when it is
a probe or a task's test split, and read into token rows for `secura.corda` in the trainer.

CorDA's knowledge-preserved mode builds its adapter from the covariance of the adapted layers' inputs on
samples of the knowledge the model should keep, so those samples must be neither what the run measures
retention on (a probe) nor what it measures accuracy on (a task's test split): either would make the
measurement part of the method. ``samples`` is a source as a stream writes one (``builtin:demo/reviews``,
``hub:...``, a file or folder; relative paths against the run YAML's folder). Rows are rendered by
``template`` from their fields and tokenized as plain text (no chat template: passages, not prompts)::

    method:
      name: corda
      adapter: {r: 8, corda_method: kpm}
      corda: {samples: ../pipelines/data/knowledge-context/quoref-passages.jsonl, limit: 256, max_length: 256}
"""
from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines import sources
from pipelines.streams import SourceConfig, StreamConfig

CACHE_SUBDIR = "corda"  # under the user cache (SECURA_CL_CACHE): covariances by content hash


class CordaSamplesConfig(BaseModel):
    """``method.corda``: where CorDA's samples come from and how many tokens of how many rows it reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: SourceConfig | None = Field(None, description="kpm: a stream-style source of the knowledge to keep")
    split: str = Field("train", description="the source's split read (a folder's <split>.jsonl, a hub split)")
    limit: int = Field(256, ge=1, description="rows read: a seeded sample when the split holds more (ipm: rows "
                       "of the first task)")
    template: str = Field("{text}", description="how a row becomes text: its fields as {placeholders}")
    max_length: int = Field(256, ge=8, description="tokens per row, the rest cut")
    seed: int = Field(0, description="which rows the limit keeps")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        if not names or not all(name.isidentifier() for name in names):
            raise ValueError(f"expected a text with {{field}} placeholders, got {value!r}")
        return value


def parse_corda(method: dict[str, Any]) -> CordaSamplesConfig | None:
    """The validated ``method.corda`` of a corda method (None for other methods); errors name the field."""
    if method.get("name") != "corda":
        return None
    try:
        return CordaSamplesConfig.model_validate(method.get("corda") or {})
    except ValidationError as error:
        lines = [f"method.corda.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                 for e in error.errors()]
        raise ValueError("\n".join(lines)) from None


def _reader(source: SourceConfig, split: str, seed: int) -> sources.SplitReader:
    try:
        return sources.open_split(source, split, seed=seed)
    except sources.SourceError as error:
        raise ValueError(f"method.corda.samples: {error}") from None


def _same_split(a: SourceConfig, a_split: str, b: SourceConfig, b_split: str) -> bool:
    """The same data by name (hub and builtin sources are compared without reading them)."""
    if a.hub or b.hub:
        return (a.hub, a.config, a.splits.get(a_split, a_split)) == (b.hub, b.config, b.splits.get(b_split, b_split))
    return False


def check_not_measured(samples: CordaSamplesConfig, stream: StreamConfig) -> None:
    """Refuse samples that are a probe or a task's test split, by name or by content (a copy of the probe)."""
    assert samples.samples is not None
    reader = _reader(samples.samples, samples.split, samples.seed)
    fingerprint = None if samples.samples.hub else reader.fingerprint()
    measured = [(f"task {t.name!r}'s test split", t, "test") for t in stream.tasks]
    measured += [(f"probe {p.name!r}", p, split) for p in stream.probe for split in p.eval_splits("probe")]
    for what, task, split in measured:
        if _same_split(samples.samples, samples.split, task.source, split):
            same = True
        elif samples.samples.hub or task.source.hub:
            same = False
        else:
            same = fingerprint == _reader(task.source, split, task.seed or 0).fingerprint()
        if same:
            raise ValueError(f"method.corda.samples: {reader.location} is {what} of stream {stream.name!r}: CorDA's "
                             f"samples must be neither a probe nor a test split (the run measures on those); use "
                             f"other text of the knowledge to keep")


def resolve_corda_samples(config, config_dir: str | Path | None):
    """The run config with ``method.corda.samples`` an absolute source, checked against the run's stream.

    Workers read the samples themselves, so a relative path is resolved here, against the run YAML's folder
    (``config_dir``, default the current one), as the stream's inline paths are.
    """
    samples = parse_corda(config.method)
    if samples is None or samples.samples is None:
        return config
    source = samples.samples
    if source.path:
        base = Path(config_dir) if config_dir is not None else Path.cwd()
        source = source.model_copy(update={"path": str((base / Path(source.path).expanduser()).resolve())})
    resolved = samples.model_copy(update={"samples": source})
    check_not_measured(resolved, config.load_stream(config_dir))
    method = {**config.method, "corda": {**config.method.get("corda", {}),
                                         "samples": source.model_dump(exclude_defaults=True)}}
    return config.model_copy(update={"method": method})


def sample_rows(samples: CordaSamplesConfig, tokenizer, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The sample set as one-row batches of token ids (no padding), on ``device``."""
    assert samples.samples is not None
    reader = _reader(samples.samples, samples.split, samples.seed)
    rows = []
    for record in reader.records(samples.limit, seed=f"corda/{samples.seed}"):
        if record.data is None:
            raise ValueError(f"method.corda.samples: {record.where}: {record.error}")
        try:
            text = samples.template.format(**record.data)
        except KeyError as error:
            raise ValueError(f"method.corda.template: {record.where} has no field {error}; it has "
                             f"{sorted(record.data)}") from None
        ids = tokenizer(text, truncation=True, max_length=samples.max_length, return_tensors="pt")["input_ids"]
        rows.append({"input_ids": ids.to(device)})
    if not rows:
        raise ValueError(f"method.corda.samples: {reader.location} holds no rows")
    return rows


def corda_context(run, device: Callable[[], torch.device]):
    """What `secura.corda` needs in the trainer (None for other methods): the samples, read when first asked
    (a resumed stage never asks), and the covariance cache."""
    from pipelines.models import _cache_dir, load_tokenizer
    from secura.corda import CordaContext

    samples = parse_corda(run.method)
    if samples is None:
        return None

    def read() -> Iterable[dict[str, torch.Tensor]]:
        return sample_rows(samples, load_tokenizer(run.model_config_obj()), device())

    return CordaContext(samples=read if samples.samples is not None else None,
                        cache_dir=_cache_dir() / CACHE_SUBDIR, limit=samples.limit)
