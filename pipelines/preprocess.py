"""Stream -> tokenised Parquet shards + manifest, with Ray Data, cached by content.

Layout (the contract in docs/architecture.md)::

    <output_dir>/shards/<stream>/<task>/<split>-<hash>/*.parquet + _COMPLETE.json
    <output_dir>/shards/<stream>/manifest.json

* read -> validate -> render the prompt in the driver, so that a bad row fails
  with its file, line and field before any Ray work starts (or, with
  ``on_bad_rows: skip``, is counted and listed in the manifest: never dropped silently);
* the prompt is the task's template, wrapped in the tokenizer's chat template
  when the task's ``prompt_format`` resolves to ``chat`` (`Rendering`): the
  train rows, the scored prompts and the generation prompts share it;
* ``validation_rows`` carves a seeded ``validation`` eval split out of the
  train records, disjoint from the rows left to train on;
* tokenise in a Ray Data actor pool (one fast tokenizer per actor, built once),
  then write Parquet: ``train`` rows padded to ``max_length`` with the loss on
  the answer only, eval rows with the prompt and each choice tokenised.

Cache: ``<hash>`` covers the source content, the task config, the rendering
(chat template included), the tokenizer fingerprint and `SCHEMA_VERSION`; an
unchanged split is a cache hit and costs no Ray work at all. A shard directory
is trusted only when its completion marker, written last, is present and the
files match it: the marker records every Parquet file's size and xxh3-128 hash;
a cache hit checks every size, and the hash of every file up to
`HASH_CHECK_BYTES` (all files with ``verify=True``). A mismatch rebuilds a
local shard with a `ShardWarning` naming the file; on remote storage it raises
`CorruptShardError` naming the file. Local shards are written into a temporary
directory and renamed into place, so an interrupted run never leaves a half
shard under a trusted name. ``output_dir`` may be an ``s3://`` or ``gs://`` URI
(pyarrow filesystems); there, the marker alone guards the shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import string
import sys
import time
import uuid
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from pipelines.sources import Record, SourceError, SplitReader, carve, open_split, sample_indices
from pipelines.streams import (
    TEXT_ROLES,
    VALIDATION,
    StreamConfig,
    StreamConfigError,
    TaskConfig,
    load_stream,
    read_stream_yaml,
    with_options,
)

if TYPE_CHECKING:  # pipelines.models imports torch: kept out of the Ray workers that import this module
    import ray.data
    from transformers import PreTrainedTokenizerBase

    from pipelines.config import RunConfig
    from pipelines.models import ModelConfig

SCHEMA_VERSION = 2  # 2: the marker lists file sizes and hashes; chat rendering; validation splits
MARKER = "_COMPLETE.json"
MANIFEST = "manifest.json"
SHARDS = "shards"  # the folder under a run's storage_path (default: its output_dir) that holds its streams
IGNORE_INDEX = -100  # labels value that the loss ignores (prompt and padding)
TARGET_PREFIX = " "  # raw prompts: answers are rendered as " {label}" / " {choice}" / " {target}"
HASH_CHECK_BYTES = 64 << 20  # a cache hit hashes files up to this size (all with verify=True); sizes always
ACTOR_CPUS = 0.5  # small requests: prepare may run beside training on a 2-CPU machine
TASK_CPUS = 0.25
BATCH_ROWS = 256
BLOCK_ROWS = 2048
MAX_SKIPS_LISTED = 100
EVAL_SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("answer", pa.int64()),
    ("target", pa.string()),
    ("prompt_ids", pa.list_(pa.int64())),
    ("choice_ids", pa.list_(pa.list_(pa.int64()))),
])
_STATS_COLUMNS = ["_tokens", "_truncated"]  # per-row counts for the manifest, dropped before writing
_EVAL_OUTPUT_SCHEMA = pa.schema([*EVAL_SCHEMA, *(pa.field(name, pa.int64()) for name in _STATS_COLUMNS)])


class DataError(ValueError):
    """Input rows that cannot be used; the message names the file, line and field."""


class RowError(ValueError):
    """Why one row is unusable (becomes a `DataError` or a skip, per ``on_bad_rows``)."""


class CorruptShardError(RuntimeError):
    """A cached shard on remote storage no longer matches its marker; the message names the file."""


class ShardWarning(UserWarning):
    """A cached local shard no longer matched its marker and is rebuilt; the message names the file."""


# ---------------------------------------------------------------- rendering: raw or chat


_CONTENT = "\x00secura-prompt\x00"  # stands for the user turn while the chat template is rendered


@dataclass(frozen=True)
class Rendering:
    """How a task's prompt reaches the model, resolved against the tokenizer.

    ``raw``: the template's text, tokenised with the tokenizer's special tokens
    (BOS), answers after a space. ``chat``: the template's text as the user
    turn of the chat template, generation prompt appended; the template brings
    its own special tokens and the answer is the assistant's reply, without
    the space. Either way the answer ends with EOS.
    """

    format: str  # "raw" or "chat"
    head: str = ""  # chat text before the user turn
    tail: str = ""  # chat text after it, through the generation prompt
    target_prefix: str = TARGET_PREFIX
    special_tokens: bool = True
    template_hash: str = ""  # the chat template's hash: part of the shard key

    @property
    def key(self) -> str:
        return f"{self.format}:{self.template_hash}" if self.template_hash else self.format


RAW = Rendering("raw")


def chat_rendering(tokenizer: PreTrainedTokenizerBase) -> Rendering:
    """The chat template around one user turn, split where the prompt goes."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}], tokenize=False,
                                         add_generation_prompt=True)
    head, found, tail = text.partition(_CONTENT)
    if not found or _CONTENT in tail:
        raise ValueError(f"{type(tokenizer).__name__}: its chat template does not keep the user turn's text "
                         "as is; use prompt_format: raw")
    template_hash = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    return Rendering("chat", head, tail, target_prefix="", special_tokens=False, template_hash=template_hash)


def resolve_rendering(task: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Rendering:
    """``auto`` is ``chat`` when the tokenizer has a chat template, else ``raw``."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if task.prompt_format == "chat" and not has_template:
        raise StreamConfigError(f"task {task.name!r}: prompt_format: chat, but the tokenizer has no chat template "
                                "(use raw or auto)")
    if task.prompt_format == "raw" or not has_template:
        return RAW
    return chat_rendering(tokenizer)


# ---------------------------------------------------------------- validate + render (driver)


@dataclass(frozen=True)
class Skipped:
    where: str
    reason: str


def _column(data: dict[str, Any], role: str, path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RowError(f"field {role!r}: column {path!r} is missing")
        value = value[part]
    return value


def _as_text(role: str, path: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field {role!r}: column {path!r} should be text, got {type(value).__name__}")
    return str(value)


def _text(data: dict[str, Any], role: str, spec: str | list[str]) -> str:
    """One text value; several columns are joined by newlines, skipping empty ones (common in Hub data)."""
    if isinstance(spec, str):
        value = _column(data, role, spec)
        if value is None:
            raise RowError(f"field {role!r}: column {spec!r} is null")
        text = _as_text(role, spec, value)
    else:
        parts = [_column(data, role, path) for path in spec]
        text = "\n".join(_as_text(role, p, v) for p, v in zip(spec, parts) if v is not None and str(v).strip())
    if not text.strip():
        raise RowError(f"field {role!r}: empty")
    return text


def _label_index(value: Any, labels: list[str]) -> int:
    """A label name from the label set, or a class index (Hub `ClassLabel` columns hold indices)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(labels):
            return value
        raise RowError(f"field 'label': class index {value} is outside 0..{len(labels) - 1} for labels {labels}")
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise RowError(f"field 'label': {value!r} is not in the label set {labels}")


def _choices(value: Any) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold lists as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or len(value) < 2:
        raise RowError(f"field 'choices': expected a list of at least 2 options, got {value!r}")
    choices = [_as_text("choices", "choices", v).strip() for v in value]
    if not all(choices):
        raise RowError(f"field 'choices': empty option in {value!r}")
    if len(set(choices)) != len(choices):
        raise RowError(f"field 'choices': duplicate options in {choices!r}")
    return choices


def _answer_index(value: Any, choices: list[str]) -> int:
    """An index, the text of a choice, a letter (``B``) or a digit string; checked in that order."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in choices:
            return choices.index(text)
        letters = string.ascii_uppercase[: len(choices)]
        if len(text) == 1 and text.upper() in letters:
            return letters.index(text.upper())
        if text.isdigit() and int(text) < len(choices):
            return int(text)
    raise RowError(f"field 'answer': {value!r} is not a choice index (0..{len(choices) - 1}), "
                   f"a letter or one of the choices {choices}")


def _split_prompt(template: str, values: dict[str, str]) -> tuple[str, str, str]:
    """The prompt as head + body + tail, where body is the longest text field used once.

    Too-long prompts lose the end of the body only, so the instruction and the
    answer cue ("Answer:") always survive truncation.
    """
    pieces = [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]
    counts = Counter(name for _, name in pieces if name)
    candidates = [name for name, n in counts.items() if n == 1 and name in TEXT_ROLES]
    body_name = max(candidates, key=lambda name: len(values[name]), default=None)
    head: list[str] = []
    tail: list[str] = []
    body = ""
    for literal, name in pieces:
        side = tail if body else head
        side.append(literal)
        if name == body_name:
            body = values[name]  # non-empty: text fields are validated
        elif name is not None:
            side.append(values[name])
    return "".join(head), body, "".join(tail)


def render_row(task: TaskConfig, data: dict[str, Any], rendering: Rendering = RAW) -> dict[str, Any]:
    """Validate one raw row and render it: prompt parts, choices, answer index, target text."""
    assert task.fields is not None and task.template is not None  # set by load_stream
    roles = task.fields.roles()
    values = {role: _text(data, role, roles[role]) for role in TEXT_ROLES if role in roles}
    if task.type == "classification":
        assert task.labels is not None
        choices = list(task.labels)
        answer = _label_index(_column(data, "label", roles["label"]), choices)
        target = choices[answer]
    elif task.type == "multiple_choice":
        choices = _choices(_column(data, "choices", roles["choices"]))
        answer = _answer_index(_column(data, "answer", roles["answer"]), choices)
        target = choices[answer]
    else:
        choices, answer, target = [], -1, _text(data, "target", roles["target"])
    values["choices"] = ", ".join(choices)
    values["options"] = "\n".join(f"{letter}. {choice}" for letter, choice in zip(string.ascii_uppercase, choices))
    head, body, tail = _split_prompt(task.template, values)
    return {"head": rendering.head + head, "body": body, "tail": tail + rendering.tail,
            "target": target, "choices": choices, "answer": answer}


def render_split(task: TaskConfig, split: str, records: list[Record], location: str,
                 rendering: Rendering = RAW) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """All rows of a split rendered, bad ones raised or skipped as ``on_bad_rows`` says."""
    rows, skipped = [], []
    for record in records:
        try:
            if record.error is not None or record.data is None:
                raise RowError(record.error or "unreadable row")
            rows.append(render_row(task, record.data, rendering))
        except RowError as exc:
            if task.on_bad_rows == "error":
                raise DataError(f"{record.where}: {exc} [task {task.name!r}, split {split!r}; "
                                "on_bad_rows: skip would skip such rows]") from None
            skipped.append(Skipped(record.where, str(exc)))
    if not rows:
        detail = f"; all {len(skipped)} skipped, first: {skipped[0].where}: {skipped[0].reason}" if skipped else ""
        raise DataError(f"task {task.name!r} split {split!r}: no usable rows in {location}{detail}")
    return rows, skipped


# ---------------------------------------------------------------- tokenise (Ray actor)


def _prompt(row: dict[str, Any]) -> str:
    return row["head"] + row["body"] + row["tail"]


class TokenizeBatch:
    """Ray Data actor: rendered rows in, token ids out.

    Holds the tokenizer's Rust backend (`tokenizers.Tokenizer`), rebuilt once per
    actor from its JSON: workers never import transformers or torch.
    """

    def __init__(self, tokenizer_json: str, eos_id: int, pad_id: int, train: bool, max_length: int,
                 max_prompt_length: int | None, max_target_length: int | None, *, target_prefix: str = TARGET_PREFIX,
                 special_tokens: bool = True, truncation_side: str = "right") -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.eos_id, self.pad_id, self.train = eos_id, pad_id, train
        self.max_length, self.max_prompt_length, self.max_target_length = max_length, max_prompt_length, max_target_length
        self.target_prefix, self.special_tokens, self.truncation_side = target_prefix, special_tokens, truncation_side

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray] | pa.Table:
        rows = batch.to_pylist()
        return self._train(rows) if self.train else self._eval(rows)

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=special)]

    def _answer_ids(self, ids: list[int], eos: bool) -> tuple[list[int], bool]:
        """Answer tokens capped to max_target_length (and to max_length with room for one prompt token)."""
        cap = min(self.max_target_length or self.max_length, self.max_length - 1 - int(eos))
        return ids[:cap] + ([self.eos_id] if eos else []), len(ids) > cap

    def _prompt_budget(self, answer_length: int) -> int:
        budget = self.max_length - answer_length
        return max(1, min(budget, self.max_prompt_length or budget))

    def _fit_prompt(self, row: dict[str, Any], ids: list[int], budget: int) -> tuple[list[int], str, bool]:
        """Prompt ids within budget: shorten the body first (its end, or its start with
        ``truncation_side: left``), then (last resort) keep the prompt's end."""
        if len(ids) <= budget:
            return ids, _prompt(row), False
        body_ids = self._encode([row["body"]], special=False)[0]
        keep = len(body_ids) - (len(ids) - budget)
        for _ in range(4):  # re-tokenising at the seams may shift a token or two
            if keep <= 0:
                break
            kept_body = body_ids[:keep] if self.truncation_side == "right" else body_ids[len(body_ids) - keep:]
            text = row["head"] + self.tokenizer.decode(kept_body, skip_special_tokens=False) + row["tail"]
            shorter = self._encode([text], special=self.special_tokens)[0]
            if len(shorter) <= budget:
                return shorter, text, True
            keep -= len(shorter) - budget
        kept = ids[-budget:]
        return kept, self.tokenizer.decode(kept, skip_special_tokens=True), True

    def _train(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        n, length = len(rows), self.max_length
        out = {
            "input_ids": np.full((n, length), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((n, length), dtype=np.int64),
            "labels": np.full((n, length), IGNORE_INDEX, dtype=np.int64),
            "_tokens": np.zeros(n, dtype=np.int64),
            "_truncated": np.zeros(n, dtype=np.int64),
        }
        prompts = self._encode([_prompt(r) for r in rows], special=self.special_tokens)
        targets = self._encode([self.target_prefix + r["target"] for r in rows], special=False)
        for i, (row, prompt_ids, target_ids) in enumerate(zip(rows, prompts, targets)):
            answer, cut_answer = self._answer_ids(target_ids, eos=True)
            prompt, _, cut_prompt = self._fit_prompt(row, prompt_ids, self._prompt_budget(len(answer)))
            ids = prompt + answer
            out["input_ids"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            out["labels"][i, len(prompt) : len(ids)] = answer
            out["_tokens"][i] = len(ids)
            out["_truncated"][i] = cut_answer or cut_prompt
        return out

    def _eval(self, rows: list[dict[str, Any]]) -> pa.Table:
        prompts = self._encode([_prompt(r) for r in rows], special=self.special_tokens)
        choice_ids_flat = iter(self._encode([self.target_prefix + c for r in rows for c in r["choices"]], special=False))
        references = self._encode([self.target_prefix + r["target"] for r in rows], special=False)
        out = []
        for row, prompt_ids, reference in zip(rows, prompts, references):
            answers = [self._answer_ids(next(choice_ids_flat), eos=False) for _ in row["choices"]]
            choice_ids = [ids for ids, _ in answers]
            # Generation has no choices: leave the room that training gave the reference (plus EOS).
            longest = max((len(ids) for ids in choice_ids), default=len(self._answer_ids(reference, eos=True)[0]))
            prompt, text, cut = self._fit_prompt(row, prompt_ids, self._prompt_budget(longest))
            out.append({
                "prompt": text, "choices": row["choices"], "answer": row["answer"], "target": row["target"],
                "prompt_ids": prompt, "choice_ids": choice_ids,
                "_tokens": len(prompt) + sum(map(len, choice_ids)),
                "_truncated": int(cut or any(cut_choice for _, cut_choice in answers)),
            })
        return pa.Table.from_pylist(out, schema=_EVAL_OUTPUT_SCHEMA)


# ---------------------------------------------------------------- storage


@dataclass(frozen=True)
class Location:
    """A directory on a pyarrow filesystem; ``uri`` is what users see (a local path or ``s3://...``)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @classmethod
    def of(cls, uri: str) -> "Location":
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
            return cls(fs, path.rstrip("/"), uri.rstrip("/"))
        path = str(Path(uri).expanduser().resolve())
        return cls(pafs.LocalFileSystem(), path, path)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, "/".join([self.path, *parts]), "/".join([self.uri, *parts]))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_json(self) -> Any:
        with self.fs.open_input_stream(self.path) as stream:
            return json.loads(stream.read().decode("utf-8"))

    def write_json(self, payload: Any) -> None:
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))


def _read_marker(shard: Location) -> dict[str, Any] | None:
    """The completion marker, or None: a shard without one is never trusted."""
    try:
        return shard.join(MARKER).read_json()
    except (OSError, ValueError):  # missing, unreadable or not JSON: all mean "not complete"
        return None


def _digest(shard: Location, name: str) -> str:
    hasher = xxhash.xxh3_128()
    with shard.fs.open_input_stream(f"{shard.path}/{name}") as stream:
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _parquet_sizes(shard: Location) -> dict[str, int]:
    infos = shard.fs.get_file_info(pafs.FileSelector(shard.path))
    return {info.base_name: info.size for info in infos if info.base_name.endswith(".parquet")}


def file_digests(shard: Location) -> dict[str, dict[str, Any]]:
    """``{file: {size, xxh3_128}}`` for every Parquet file of a shard: what its marker records."""
    return {name: {"size": size, "xxh3_128": _digest(shard, name)} for name, size in sorted(_parquet_sizes(shard).items())}


def shard_problem(shard: Location, marker: dict[str, Any], verify: bool = False) -> str | None:
    """Why a shard does not match its marker, naming the file; None when it does.

    Every file's size is checked; its hash too when it is at most
    `HASH_CHECK_BYTES` or ``verify`` is set.
    """
    expected = marker.get("files")
    if not isinstance(expected, dict) or not expected:
        return f"{shard.uri}/{MARKER}: lists no file sizes and hashes (written by an older version)"
    found = _parquet_sizes(shard)
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{shard.uri}/{extra[0]}: a file the marker does not list"
    for name, entry in sorted(expected.items()):
        where = f"{shard.uri}/{name}"
        if name not in found:
            return f"{where}: missing"
        if found[name] != entry.get("size"):
            return f"{where}: {found[name]} bytes, but the marker says {entry.get('size')}"
        if (verify or found[name] <= HASH_CHECK_BYTES) and _digest(shard, name) != entry.get("xxh3_128"):
            return f"{where}: content differs from the marker's hash"
    return None


def _trusted_marker(shard: Location, verify: bool) -> dict[str, Any] | None:
    """The marker of a cached shard that matches it, or None (no shard, or a local one to rebuild)."""
    marker = _read_marker(shard)
    problem = None if marker is None else shard_problem(shard, marker, verify)
    if problem is None:
        return marker
    if not shard.local:  # other readers may be using it, and an object store cannot swap it atomically
        raise CorruptShardError(f"{problem}: the cached shard {shard.uri} cannot be trusted; "
                                "delete it and run `secura prepare` again")
    warnings.warn(f"{problem}: rebuilding the shard", ShardWarning, stacklevel=2)
    shard.fs.delete_file(shard.join(MARKER).path)  # untrusted from now on, and replaced by the rebuild
    return None


def _require_complete(path: str) -> Location:
    shard = Location.of(path)
    if _read_marker(shard) is None:
        raise FileNotFoundError(f"{path}: not a complete shard (no {MARKER}); run `secura prepare` again")
    return shard


def _write_shard(dataset: "ray.data.Dataset", shard: Location, marker: dict[str, Any]) -> None:
    """Parquet files, then the marker; locally in a temp dir renamed into place (atomic)."""
    write = {"ray_remote_args": {"num_cpus": TASK_CPUS}}
    if not shard.local:  # object stores have no atomic directory rename: the marker is the guard
        if shard.exists():
            shard.fs.delete_dir(shard.path)
        dataset.write_parquet(shard.path, filesystem=shard.fs, **write)
        marker["files"] = file_digests(shard)
        shard.join(MARKER).write_json(marker)
        return
    parent, name = shard.path.rsplit("/", 1)
    temp = Location(shard.fs, f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:8]}", "")
    try:
        dataset.write_parquet(temp.path, filesystem=shard.fs, **write)
        marker["files"] = file_digests(temp)
        temp.join(MARKER).write_json(marker)
        if _read_marker(shard) is not None:
            return  # another run built the same content meanwhile: keep theirs
        if shard.exists():
            shard.fs.delete_dir(shard.path)  # an untrusted leftover
        os.replace(temp.path, shard.path)
    finally:
        if temp.exists():
            shard.fs.delete_dir(temp.path)


# ---------------------------------------------------------------- manifest and readers


@dataclass
class SplitEntry:
    """One shard: where it is and what went into it."""

    name: str
    path: str  # absolute path or URI of the shard directory
    rows: int
    tokens: int  # non-padding tokens written (eval: prompt + every choice)
    truncated: int  # rows whose prompt or answer was cut to fit
    skipped: int
    skipped_rows: list[dict[str, str]]  # first MAX_SKIPS_LISTED: {where, reason}
    source: str
    source_hash: str
    shard_hash: str
    created_at: str
    cache: str  # "hit" or "built", in the run that wrote the manifest


@dataclass
class TaskEntry:
    name: str
    role: str  # "task" (trained, in stream order) or "probe" (evaluated only)
    type: str
    labels: list[str] | None
    max_length: int
    splits: dict[str, SplitEntry]  # train (tasks), validation (when carved), test
    prompt_format: str = "raw"  # the resolved rendering: "raw" or "chat"

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]


@dataclass
class Manifest:
    """What `prepare_stream` wrote: tasks in stream order, then probes."""

    stream: str
    seed: int
    schema_version: int
    created_at: str
    tokenizer: dict[str, Any]  # fingerprint, pad/eos ids, the ModelConfig it came from
    tasks: list[TaskEntry]
    path: str = field(default="", compare=False)  # the manifest file, once saved or loaded

    def task(self, name: str) -> TaskEntry:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        raise KeyError(f"manifest of stream {self.stream!r} has no task {name!r} (has {', '.join(t.name for t in self.tasks)})")

    @property
    def training_tasks(self) -> list[TaskEntry]:
        return [t for t in self.tasks if t.role == "task"]

    @property
    def probes(self) -> list[TaskEntry]:
        return [t for t in self.tasks if t.role == "probe"]

    def to_dict(self, base: str) -> dict[str, Any]:
        """JSON form with shard paths relative to ``base`` (the manifest's directory): the tree can move."""
        data = asdict(self)
        data.pop("path")
        for task in data["tasks"]:
            for split in task["splits"].values():
                split["path"] = split["path"].removeprefix(base.rstrip("/") + "/")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: str, path: str = "") -> "Manifest":
        tasks = []
        for task in data["tasks"]:
            splits = {}
            for name, split in task["splits"].items():
                relative = "://" not in split["path"] and not split["path"].startswith("/")
                splits[name] = SplitEntry(**{**split, "path": f"{base}/{split['path']}" if relative else split["path"]})
            tasks.append(TaskEntry(**{**task, "splits": splits}))
        return cls(**{**data, "tasks": tasks, "path": path})

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """From a manifest file, or a directory holding ``manifest.json`` (local path or URI)."""
        location = Location.of(path)
        if location.fs.get_file_info(location.path).type == pafs.FileType.Directory:
            location = location.join(MANIFEST)
        try:
            data = location.read_json()
        except FileNotFoundError:
            raise FileNotFoundError(f"{location.uri}: no manifest; run `secura prepare` first") from None
        return cls.from_dict(data, base=location.uri.rsplit("/", 1)[0], path=location.uri)

    def save(self, directory: str) -> str:
        """Write ``manifest.json`` into ``directory`` (temp file + rename where the filesystem has rename)."""
        target = Location.of(directory).join(MANIFEST)
        payload = self.to_dict(base=target.uri.rsplit("/", 1)[0])
        if target.local:
            temp = Location(target.fs, f"{target.path}.tmp-{uuid.uuid4().hex[:8]}", "")
            temp.write_json(payload)
            os.replace(temp.path, target.path)
        else:
            target.write_json(payload)  # a single-object PUT is atomic on S3 and GCS
        self.path = target.uri
        return target.uri


def read_eval_rows(path: str) -> list[dict[str, Any]]:
    """An eval shard as a list of dicts, rows in source order (files are named in block order)."""
    shard = _require_complete(path)
    files = sorted(info.path for info in shard.fs.get_file_info(pafs.FileSelector(shard.path)) if info.path.endswith(".parquet"))
    tables = [pq.read_table(file, filesystem=shard.fs) for file in files]
    return pa.concat_tables(tables).to_pylist() if tables else []


def train_dataset(path: str) -> "ray.data.Dataset":
    """A train shard as a Ray Dataset (``input_ids``/``attention_mask``/``labels`` tensor columns)."""
    import ray.data

    shard = _require_complete(path)
    return ray.data.read_parquet(shard.path, filesystem=shard.fs)


# ---------------------------------------------------------------- prepare


@dataclass
class _SplitPlan:
    task: TaskConfig
    split: str
    rendering: Rendering
    reader: SplitReader
    source_hash: str
    shard: Location
    shard_hash: str
    marker: dict[str, Any] | None  # set on a cache hit, and after a build
    cache_hit: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def shard_hash(task: TaskConfig, split: str, source_hash: str, tokenizer_fingerprint: str,
               rendering_key: str = RAW.key) -> str:
    """Content address of a shard: changes when the data, the task config, the rendering (chat template
    included), the tokenizer or the schema does.

    The source path is left out (the content hash covers the data), so moving the project keeps the cache.
    """
    config = task.model_dump(mode="json", exclude={"source": {"path"}, "labels_file": True})
    payload = {"schema": SCHEMA_VERSION, "split": split, "task": config, "source": source_hash,
               "tokenizer": tokenizer_fingerprint, "rendering": rendering_key}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _select(task: TaskConfig, split: str, reader: SplitReader) -> list[Record]:
    """The split's records: test as sampled by ``limits``; train and validation from the train
    records, validation carved first (seeded), train sampled from the rest."""
    seed = f"{task.seed}/{task.name}"
    if split == "test":
        return reader.records(task.limits.test, seed=f"{seed}/test")
    try:
        validation, remaining = carve(reader.count(), task.validation_rows, f"{seed}/{VALIDATION}")
    except SourceError as exc:
        raise DataError(f"task {task.name!r}, {reader.location}: {exc}") from None
    if split == VALIDATION:
        return reader.take(validation)
    return reader.take([remaining[i] for i in sample_indices(len(remaining), task.limits.train, f"{seed}/train")])


def _plan(task: TaskConfig, split: str, rendering: Rendering, fingerprint: str, root: Location,
          verify: bool) -> _SplitPlan:
    """Decide hit or build; for a build, read and validate now (before any Ray work)."""
    assert task.seed is not None
    reader = open_split(task.source, "train" if split == VALIDATION else split, seed=task.seed)
    source_hash = reader.fingerprint()
    key = shard_hash(task, split, source_hash, fingerprint, rendering.key)
    shard = root.join(task.name, f"{split}-{key}")
    marker = _trusted_marker(shard, verify)
    plan = _SplitPlan(task, split, rendering, reader, source_hash, shard, key, marker, cache_hit=marker is not None)
    if not plan.cache_hit:
        plan.rows, plan.skipped = render_split(task, split, _select(task, split, reader), reader.location, rendering)
    return plan


def ensure_ray() -> None:
    """Start or attach to Ray only when there is work: a cache hit never pays Ray's start-up.

    ``RAY_ADDRESS`` set (as inside ``ray job submit``): attach to that cluster;
    otherwise start a private local instance (a bare ``ray.init()`` would
    silently attach to any head running on this machine).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)


def _warn_if_starved() -> None:
    """Say so when the cluster has no CPU to spare: the builds then wait (for training to finish, say)."""
    import ray

    free, needed = ray.available_resources().get("CPU", 0.0), ACTOR_CPUS + TASK_CPUS
    if free < needed:
        print(f"warning: {free:g} CPU free in the Ray cluster; preprocessing needs {needed:g} "
              "and waits until other work releases it", file=sys.stderr, flush=True)


@contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Progress bars on request and order-preserving execution, restored afterwards for the caller."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options.preserve_order
    context.enable_progress_bars, context.execution_options.preserve_order = progress, True
    try:
        yield
    finally:
        context.enable_progress_bars, context.execution_options.preserve_order = saved


def _block_totals(dataset: "ray.data.MaterializedDataset") -> tuple[int, int]:
    """Sum the per-row stats columns block by block where the blocks live (no shuffle, no big transfer)."""
    import ray

    @ray.remote(num_cpus=TASK_CPUS)
    def totals(block: pa.Table) -> tuple[int, int]:
        return tuple(int(np.asarray(block[c]).sum()) for c in _STATS_COLUMNS)  # type: ignore[return-value]

    results = ray.get([totals.remote(ref) for ref in dataset.to_arrow_refs()])
    return sum(r[0] for r in results), sum(r[1] for r in results)


def _build(plan: _SplitPlan, tokenizer_args: dict[str, Any], max_actors: int) -> dict[str, Any]:
    """Tokenise in an actor pool, write the shard, return its marker."""
    import ray.data
    from ray.data import ActorPoolStrategy

    task = plan.task
    blocks = max(1, -(-len(plan.rows) // BLOCK_ROWS))
    tokenized = ray.data.from_items(plan.rows, override_num_blocks=blocks).map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={**tokenizer_args, "train": plan.split == "train", "max_length": task.max_length,
                               "max_prompt_length": task.max_prompt_length, "max_target_length": task.max_target_length,
                               "target_prefix": plan.rendering.target_prefix,
                               "special_tokens": plan.rendering.special_tokens,
                               "truncation_side": task.truncation_side},
        batch_format="pyarrow",
        batch_size=BATCH_ROWS,
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(max_actors, blocks))),
        num_cpus=ACTOR_CPUS,
    ).materialize()
    tokens, truncated = _block_totals(tokenized)
    marker = {
        "rows": len(plan.rows), "tokens": tokens, "truncated": truncated, "skipped": len(plan.skipped),
        "skipped_rows": [asdict(s) for s in plan.skipped[:MAX_SKIPS_LISTED]],
        "source": plan.reader.location, "source_hash": plan.source_hash,
        "shard_hash": plan.shard_hash, "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_shard(tokenized.drop_columns(_STATS_COLUMNS, num_cpus=TASK_CPUS), plan.shard, marker)
    return marker


def _entry(plan: _SplitPlan) -> SplitEntry:
    m = plan.marker or {}
    return SplitEntry(name=plan.split, path=plan.shard.uri, rows=m["rows"], tokens=m["tokens"], truncated=m["truncated"],
                      skipped=m["skipped"], skipped_rows=m["skipped_rows"], source=m["source"], source_hash=m["source_hash"],
                      shard_hash=plan.shard_hash, created_at=m["created_at"], cache="hit" if plan.cache_hit else "built")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _report(progress: bool, stream_name: str, plan: _SplitPlan, status: str) -> None:
    m = plan.marker or {}
    _say(progress, f"[{stream_name}] {plan.task.name}/{plan.split}: {m['rows']} rows, {m['tokens']} tokens, "
                   f"{m['skipped']} skipped ({status})")


def _build_all(stream_name: str, todo: list[_SplitPlan], tokenizer_args: dict[str, Any], progress: bool,
               parallel: int, max_actors: int) -> None:
    """Build shards ``parallel`` at a time: each build is mostly actor start-up, which overlaps well."""

    def build(plan: _SplitPlan) -> None:
        _say(progress, f"[{stream_name}] {plan.task.name}/{plan.split}: building from {len(plan.rows)} rows of {plan.reader.location}")
        started = time.perf_counter()
        plan.marker = _build(plan, tokenizer_args, max_actors)
        _report(progress, stream_name, plan, f"built in {time.perf_counter() - started:.1f}s")

    with _data_context(progress), ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(build, plan) for plan in todo]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # builds already running finish (their shards are valid); queued ones never start
            raise


def prepare_shared_shards(run: "RunConfig", stream: StreamConfig, root: Path) -> None:
    """Tokenise a run's stream once in a driver, under its storage_path or else ``root``, before the runs
    of a comparison or sweep start (N runs would build the same content-addressed shards N times)."""
    prepare_stream(stream, run.model_config_obj(), run.storage_path or str(root))


def link_shared_shards(root: Path, run_dir: Path) -> None:
    """Link the driver's ``root/shards`` into a run's output dir, where `run_continual` looks for them."""
    shared, link = root / SHARDS, run_dir / SHARDS
    shared.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared, target_is_directory=True)


def prepare_stream(stream: StreamConfig, tokenizer_config: ModelConfig, output_dir: str, *,
                   progress: bool = True, parallel: int = 2, max_actors: int = 2, verify: bool = False) -> Manifest:
    """Prepare every split of every task (training tasks, then probes); return the saved manifest.

    All inputs are validated, and every cached shard checked against its marker
    (``verify``: every file's hash, not only the small ones'), before the first
    shard is built, so a bad row in the last task fails in seconds, not after
    the first tasks were tokenised.
    ``parallel`` splits are built at once, each by 1..``max_actors`` tokenizer
    actors of 0.5 CPU: at most 2 CPUs by default, so it fits beside other work.
    """
    from pipelines.models import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(tokenizer_config)
    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: preprocessing needs a fast tokenizer with an EOS token")
    fingerprint = tokenizer_fingerprint(tokenizer)
    root = Location.of(output_dir).join(SHARDS, stream.name)
    renderings = {task.name: resolve_rendering(task, tokenizer) for _, task in stream.entries()}
    plans = [_plan(task, split, renderings[task.name], fingerprint, root, verify)
             for role, task in stream.entries() for split in task.splits(role)]
    for plan in plans:
        if plan.cache_hit:
            _report(progress, stream.name, plan, "cached")
    todo = [p for p in plans if not p.cache_hit]
    if todo:
        ensure_ray()
        _warn_if_starved()
        tokenizer_args = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                          "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
        _build_all(stream.name, todo, tokenizer_args, progress, parallel, max_actors)
    tasks = []
    for role, task in stream.entries():
        splits = {p.split: _entry(p) for p in plans if p.task is task}
        tasks.append(TaskEntry(task.name, role, task.type, task.labels, task.max_length, splits,
                               renderings[task.name].format))
    manifest = Manifest(
        stream=stream.name, seed=stream.seed, schema_version=SCHEMA_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tokenizer={"fingerprint": fingerprint, "pad_token_id": tokenizer.pad_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "model": tokenizer_config.to_dict()},
        tasks=tasks,
    )
    manifest.save(root.uri)
    return manifest


# ---------------------------------------------------------------- CLI


def format_summary(manifest: Manifest) -> str:
    """A plain-text table: task, split, rows, tokens, skipped, truncated, cache."""
    header = ("task", "split", "rows", "tokens", "skipped", "truncated", "cache")
    lines = [(t.name + (" (probe)" if t.role == "probe" else ""), s.name, str(s.rows), str(s.tokens), str(s.skipped),
              str(s.truncated), s.cache) for t in manifest.tasks for s in t.splits.values()]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def _command_inputs(args: argparse.Namespace) -> tuple[StreamConfig, ModelConfig, str]:
    """Stream, tokenizer model and output dir from a stream YAML, a run YAML or a built-in name; CLI flags win."""
    from pipelines.models import ModelConfig

    config = Path(args.config)
    raw = read_stream_yaml(config) if config.is_file() else None
    if raw is None:  # a built-in stream name (or an error naming the choices)
        stream, model, output_dir = load_stream(args.config), None, None
    elif "tasks" in raw:  # a stream YAML, maybe with a model: section
        stream, model, output_dir = load_stream(str(config)), raw.get("model"), None
    elif "stream" in raw:  # a run YAML: stream is a path (relative to the run YAML), a built-in name or a dict
        stream = load_stream(raw["stream"], base_dir=config.parent)
        model, output_dir = raw.get("model"), raw.get("output_dir")
    else:
        raise StreamConfigError(f"{config}: neither a stream (no tasks:) nor a run config (no stream:)")
    model = dict(model or {})
    if args.model_source:
        model["source"] = args.model_source
    if args.model_path:
        model["path"] = args.model_path
    try:
        model_config = ModelConfig.from_dict(model)
    except (TypeError, ValueError) as exc:
        raise StreamConfigError(f"{config}: {exc}") from None
    return stream, model_config, args.output_dir or output_dir or "outputs"


def prepare_command(args: argparse.Namespace) -> int:
    """``secura prepare CONFIG [--output-dir DIR] [--model-source S --model-path P] [--verify]
    [--prompt-format auto|chat|raw] [--validation-rows N] [--no-progress]``."""
    try:
        stream, model, output_dir = _command_inputs(args)
        stream = with_options(stream, prompt_format=getattr(args, "prompt_format", None),
                              validation_rows=getattr(args, "validation_rows", None))
        manifest = prepare_stream(stream, model, output_dir, progress=not getattr(args, "no_progress", False),
                                  verify=getattr(args, "verify", False))
    except (StreamConfigError, DataError, SourceError, CorruptShardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    print(f"manifest: {manifest.path}")
    return 0
