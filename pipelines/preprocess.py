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
* tokenise and write Parquet in one Ray Data pass for every split to build
  (one fast tokenizer per worker process, built once): ``train`` rows
  padded to ``max_length`` with the loss on the answer only, eval rows with
  the prompt and each choice tokenised. Each block of rows becomes one file
  named by its position, so a shard's files in name order hold its rows in
  source order.

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
import functools
import hashlib
import json
import os
import string
import sys
import time
import uuid
import warnings
from collections import Counter
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

from pipelines.files import content_hash
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
    from tokenizers import Tokenizer
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
TASK_CPUS = 0.5  # small requests: prepare may run beside training on a 2-CPU machine
BLOCK_ROWS = 2048  # rows per block: a block is tokenised at once and becomes one Parquet file
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
RENDERED_SCHEMA = pa.schema([  # a rendered row (`render_row`), as it travels to the workers
    ("head", pa.string()),
    ("body", pa.string()),
    ("tail", pa.string()),
    ("target", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("answer", pa.int64()),
])
BLOCK_COLUMNS = ["_split", "_part"]  # a block's split (index in the pass) and position in it
FILE_SCHEMA = pa.schema([  # what a worker reports per file written: the marker's content
    ("split", pa.int64()),
    ("file", pa.string()),
    ("size", pa.int64()),
    ("xxh3_128", pa.string()),
    ("rows", pa.int64()),
    ("tokens", pa.int64()),
    ("truncated", pa.int64()),
])


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


# ---------------------------------------------------------------- tokenise and write (Ray workers)


@dataclass(frozen=True)
class SplitSpec:
    """How one split is tokenised, and the folder its files go to: small, so it travels by value to the workers."""

    train: bool
    max_length: int
    max_prompt_length: int | None = None
    max_target_length: int | None = None
    target_prefix: str = TARGET_PREFIX
    special_tokens: bool = True
    truncation_side: str = "right"
    folder: str = ""  # local path or URI of the folder `write_blocks` writes the split's files to


def _prompt(row: dict[str, Any]) -> str:
    return row["head"] + row["body"] + row["tail"]


class TokenizeBatch:
    """One split's rendered rows in, token ids out, with a tokenizer shared by every split of a pass.

    The tokenizer is the Rust backend (`tokenizers.Tokenizer`): workers never
    import transformers or torch.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int, pad_id: int, spec: SplitSpec) -> None:
        self.tokenizer, self.eos_id, self.pad_id, self.spec = tokenizer, eos_id, pad_id, spec

    @classmethod
    def from_json(cls, tokenizer_json: str, eos_id: int, pad_id: int, spec: SplitSpec) -> "TokenizeBatch":
        return cls(load_backend(tokenizer_json), eos_id, pad_id, spec)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray] | pa.Table:
        rows = batch.to_pylist()
        return self._train(rows) if self.spec.train else self._eval(rows)

    def table(self, batch: pa.Table) -> tuple[pa.Table, int, int]:
        """The rows as the shard stores them (fixed-shape train columns as Ray Data's tensor type), plus
        their token and truncation counts for the marker."""
        from ray.data.block import BlockAccessor

        out = self(batch)
        table = BlockAccessor.batch_to_block(out) if isinstance(out, dict) else out
        tokens, truncated = (int(np.asarray(table[name]).sum()) for name in _STATS_COLUMNS)
        return table.drop_columns(_STATS_COLUMNS), tokens, truncated

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=special)]

    def _answer_ids(self, ids: list[int], eos: bool) -> tuple[list[int], bool]:
        """Answer tokens capped to max_target_length (and to max_length with room for one prompt token)."""
        spec = self.spec
        cap = min(spec.max_target_length or spec.max_length, spec.max_length - 1 - int(eos))
        return ids[:cap] + ([self.eos_id] if eos else []), len(ids) > cap

    def _prompt_budget(self, answer_length: int) -> int:
        budget = self.spec.max_length - answer_length
        return max(1, min(budget, self.spec.max_prompt_length or budget))

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
            kept_body = body_ids[:keep] if self.spec.truncation_side == "right" else body_ids[len(body_ids) - keep:]
            text = row["head"] + self.tokenizer.decode(kept_body, skip_special_tokens=False) + row["tail"]
            shorter = self._encode([text], special=self.spec.special_tokens)[0]
            if len(shorter) <= budget:
                return shorter, text, True
            keep -= len(shorter) - budget
        kept = ids[-budget:]
        return kept, self.tokenizer.decode(kept, skip_special_tokens=True), True

    def _train(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        n, length = len(rows), self.spec.max_length
        out = {
            "input_ids": np.full((n, length), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((n, length), dtype=np.int64),
            "labels": np.full((n, length), IGNORE_INDEX, dtype=np.int64),
            "_tokens": np.zeros(n, dtype=np.int64),
            "_truncated": np.zeros(n, dtype=np.int64),
        }
        prompts = self._encode([_prompt(r) for r in rows], special=self.spec.special_tokens)
        targets = self._encode([self.spec.target_prefix + r["target"] for r in rows], special=False)
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
        prefix = self.spec.target_prefix
        prompts = self._encode([_prompt(r) for r in rows], special=self.spec.special_tokens)
        choice_ids_flat = iter(self._encode([prefix + c for r in rows for c in r["choices"]], special=False))
        references = self._encode([prefix + r["target"] for r in rows], special=False)
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


def load_backend(tokenizer_json: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` from its JSON, with padding and truncation off (we do both)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def part_name(part: int) -> str:
    """A shard file's name: by position, so files in name order hold the rows in source order."""
    return f"part-{part:06d}.parquet"


def write_blocks(batch: pa.Table, tokenizer_file: str, eos_id: int, pad_id: int,
                 specs: list[SplitSpec]) -> pa.Table:
    """Ray Data task of the one pass that builds every shard of a `prepare_stream` call.

    Each input block holds rows of one split (``_split``, an index into
    ``specs``) at one position in it (``_part``); it becomes one Parquet file
    of that split's folder, named by the position, so blocks may finish in any
    order. Returns one row per file written: what the shard's marker records.
    """
    tokenizer = worker_tokenizer(tokenizer_file)
    return pa.Table.from_pylist([_write_block(block, tokenizer, eos_id, pad_id, specs) for block in _runs(batch)],
                                schema=FILE_SCHEMA)


@functools.lru_cache(maxsize=1)
def worker_tokenizer(tokenizer_file: str) -> Tokenizer:
    """The pass's tokenizer, read once per worker process from the JSON file the driver wrote next to the
    shards: the task's arguments stay small, and workers skip transformers' import and the GGUF load."""
    source = Location.of(tokenizer_file)
    with source.fs.open_input_stream(source.path) as stream:
        return load_backend(stream.read().decode("utf-8"))


def _write_block(block: pa.Table, tokenizer: Tokenizer, eos_id: int, pad_id: int,
                 specs: list[SplitSpec]) -> dict[str, Any]:
    split, part = (block[name][0].as_py() for name in BLOCK_COLUMNS)
    spec = specs[split]
    table, tokens, truncated = TokenizeBatch(tokenizer, eos_id, pad_id, spec).table(block.drop_columns(BLOCK_COLUMNS))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue()
    folder, name = Location.of(spec.folder), part_name(part)
    with folder.fs.open_output_stream(f"{folder.path}/{name}") as stream:
        stream.write(data)
    return {"split": split, "file": name, "size": data.size, "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
            "rows": table.num_rows, "tokens": tokens, "truncated": truncated}


def _runs(batch: pa.Table) -> Iterator[pa.Table]:
    """The batch cut where its (split, part) changes: one block per file, however Ray Data bundled them."""
    keys = np.stack([np.asarray(batch[name]) for name in BLOCK_COLUMNS], axis=1)
    edges = [0, *(np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1), len(keys)]
    for start, stop in zip(edges, edges[1:]):
        yield batch.slice(start, stop - start)


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
    return content_hash(shard.fs, f"{shard.path}/{name}")


def _parquet_sizes(shard: Location) -> dict[str, int]:
    infos = shard.fs.get_file_info(pafs.FileSelector(shard.path))
    return {info.base_name: info.size for info in infos if info.base_name.endswith(".parquet")}


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


def _staging(shard: Location) -> Location:
    """Where a shard's files are written before it is sealed: locally a temp dir renamed into place by
    `_seal` (atomic); on object stores, which have no atomic rename, the shard itself, marker last."""
    if shard.local:
        parent, name = shard.path.rsplit("/", 1)
        path = f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
        staging = Location(shard.fs, path, path)
    else:
        if shard.exists():
            shard.fs.delete_dir(shard.path)
        staging = shard
    staging.fs.create_dir(staging.path, recursive=True)
    return staging


def _seal(staging: Location, shard: Location, marker: dict[str, Any]) -> None:
    """Write the marker last; locally, rename the temp dir into place (keeping a shard another run
    completed meanwhile)."""
    staging.join(MARKER).write_json(marker)
    if staging is shard:
        return
    if _read_marker(shard) is not None:
        staging.fs.delete_dir(staging.path)  # another run built the same content meanwhile: keep theirs
        return
    if shard.exists():
        shard.fs.delete_dir(shard.path)  # an untrusted leftover
    os.replace(staging.path, shard.path)


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

    from pipelines.console import ray_init_kwargs

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_kwargs())
    else:
        ray.init(address="local", include_dashboard=False, **ray_init_kwargs())


def _task_count(max_tasks: int | None) -> int:
    """``max_tasks``, by default one per two CPUs free in the Ray cluster, at least two: a cluster's nodes
    all tokenise, and about half its cores stay for other work. Says so when no CPU is free: the pass then
    waits (for training to finish, say)."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if free < TASK_CPUS:
        print(f"warning: {free:g} CPU free in the Ray cluster; preprocessing needs {TASK_CPUS:g} "
              "and waits until other work releases it", file=sys.stderr, flush=True)
    return max_tasks or max(2, int(free // 2))


@contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data's progress bars and start-of-execution lines only with ``--verbose``; restored afterwards."""
    from ray.data import DataContext

    from pipelines.console import is_verbose

    context, verbose = DataContext.get_current(), is_verbose()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = verbose
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def _spec(plan: _SplitPlan, folder: Location) -> SplitSpec:
    task = plan.task
    return SplitSpec(plan.split == "train", task.max_length, task.max_prompt_length, task.max_target_length,
                     plan.rendering.target_prefix, plan.rendering.special_tokens, task.truncation_side, folder.uri)


def _blocks(plans: list[_SplitPlan]) -> list[pa.Table]:
    """Every split's rendered rows as blocks of at most `BLOCK_ROWS` rows of one split, tagged with the
    split's index and the block's position in it."""
    blocks = []
    for index, plan in enumerate(plans):
        for part, start in enumerate(range(0, len(plan.rows), BLOCK_ROWS)):
            block = pa.Table.from_pylist(plan.rows[start:start + BLOCK_ROWS], schema=RENDERED_SCHEMA)
            for name, value in zip(BLOCK_COLUMNS, (index, part)):
                block = block.append_column(name, pa.array(np.full(block.num_rows, value, dtype=np.int64)))
            blocks.append(block)
    return blocks


def _write_pass(blocks: list[pa.Table], writer_args: dict[str, Any], max_tasks: int) -> Iterator[dict[str, Any]]:
    """The one Ray Data execution: up to ``max_tasks`` tasks at a time tokenise and write every block;
    yields a row per file as it is written.

    Tasks, not an actor pool: the tokenizer is cached per worker process
    anyway, and Ray Data's actors log an error-level line each on creation
    (ray-project/ray#57733: their constructor always goes through the object store).
    """
    import ray.data
    from ray.data import TaskPoolStrategy

    files = ray.data.from_blocks(blocks).map_batches(  # no metadata tasks, and the blocks stay as they are
        write_blocks,
        fn_kwargs=writer_args,
        batch_format="pyarrow",
        batch_size=None,  # a block at a time: one file each
        compute=TaskPoolStrategy(size=max(1, min(max_tasks, len(blocks)))),
        num_cpus=TASK_CPUS,
    )
    yield from files.iter_rows()


def _marker(plan: _SplitPlan, files: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(f["rows"] for f in files)
    if rows != len(plan.rows):
        raise RuntimeError(f"{plan.shard.uri}: {rows} rows written, {len(plan.rows)} expected")
    return {
        "rows": rows, "tokens": sum(f["tokens"] for f in files), "truncated": sum(f["truncated"] for f in files),
        "skipped": len(plan.skipped), "skipped_rows": [asdict(s) for s in plan.skipped[:MAX_SKIPS_LISTED]],
        "source": plan.reader.location, "source_hash": plan.source_hash,
        "shard_hash": plan.shard_hash, "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {f["file"]: {"size": f["size"], "xxh3_128": f["xxh3_128"]} for f in sorted(files, key=lambda f: f["file"])},
    }


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


def _cached_summary(cached: list[_SplitPlan], probes: set[str]) -> str:
    """``7 shards cached (3 tasks, 1 probe)``."""
    names = {p.task.name for p in cached}
    counts = [(len(names - probes), "task"), (len(names & probes), "probe")]
    return (f"{_plural(len(cached), 'shard')} cached "
            f"({', '.join(_plural(n, word) for n, word in counts if n)})")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _build_all(stream_name: str, todo: list[_SplitPlan], tokenizer: PreTrainedTokenizerBase, root: Location,
               progress: bool, max_tasks: int) -> None:
    """Build every shard of ``todo`` in one Ray Data pass, sealing each shard as
    soon as its last file is written. An error leaves the shards sealed so far, and no temp files."""
    started = time.perf_counter()
    root.fs.create_dir(root.path, recursive=True)
    tokenizer_file = root.join(f".tmp-tokenizer-{uuid.uuid4().hex[:8]}.json")
    staging: list[Location] = []
    try:
        with tokenizer_file.fs.open_output_stream(tokenizer_file.path) as stream:
            stream.write(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
        for plan in todo:
            staging.append(_staging(plan.shard))
        writer_args = {"tokenizer_file": tokenizer_file.uri, "eos_id": tokenizer.eos_token_id,
                       "pad_id": tokenizer.pad_token_id, "specs": [_spec(p, f) for p, f in zip(todo, staging)]}
        parts = [-(-len(plan.rows) // BLOCK_ROWS) for plan in todo]
        written: list[list[dict[str, Any]]] = [[] for _ in todo]
        with _data_context():
            for file in _write_pass(_blocks(todo), writer_args, max_tasks):
                index = file["split"]
                written[index].append(file)
                if len(written[index]) == parts[index]:
                    plan = todo[index]
                    plan.marker = _marker(plan, written[index])
                    _seal(staging[index], plan.shard, plan.marker)
                    _report(progress, stream_name, plan, f"built at {time.perf_counter() - started:.1f}s")
    finally:
        for folder, plan in zip(staging, todo):
            if folder is not plan.shard and folder.exists():
                folder.fs.delete_dir(folder.path)
        if tokenizer_file.exists():
            tokenizer_file.fs.delete_file(tokenizer_file.path)


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


@dataclass
class StreamPlan:
    """Every split of a stream, read and validated or found cached: what `prepare_stream` then builds."""

    stream: StreamConfig
    tokenizer_config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    root: Location
    renderings: dict[str, Rendering]
    splits: list[_SplitPlan]


def plan_stream(stream: StreamConfig, tokenizer_config: ModelConfig, output_dir: str, *,
                verify: bool = False) -> StreamPlan:
    """Read and validate every input (each file exists, decodes, parses and has usable rows) and check every
    cached shard against its marker, without Ray: `secura run` does it before Ray starts."""
    from pipelines.models import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(tokenizer_config)
    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: preprocessing needs a fast tokenizer with an EOS token")
    fingerprint = tokenizer_fingerprint(tokenizer)
    root = Location.of(output_dir).join(SHARDS, stream.name)
    renderings = {task.name: resolve_rendering(task, tokenizer) for _, task in stream.entries()}
    splits = [_plan(task, split, renderings[task.name], fingerprint, root, verify)
              for role, task in stream.entries() for split in task.splits(role)]
    return StreamPlan(stream, tokenizer_config, tokenizer, fingerprint, root, renderings, splits)


def prepare_stream(stream: StreamConfig, tokenizer_config: ModelConfig, output_dir: str, *,
                   progress: bool = True, max_tasks: int | None = None, verify: bool = False,
                   planned: StreamPlan | None = None) -> Manifest:
    """Prepare every split of every task (training tasks, then probes); return the saved manifest.

    All inputs are validated, and every cached shard checked against its marker
    (``verify``: every file's hash, not only the small ones'), before the first
    shard is built (`plan_stream`, or ``planned`` when it was done already), so a bad row in the last task
    fails in seconds, not after the first tasks were tokenised. The splits to build are built together in
    one Ray Data pass by up to ``max_tasks`` tasks at a time of 0.5 CPU each
    (by default one per two free CPUs, at least two: 2 on a laptop, every node
    of a cluster). ``progress``: one line for the cached shards and one per
    shard built; Ray's own bars only with ``--verbose``.
    """
    planned = planned or plan_stream(stream, tokenizer_config, output_dir, verify=verify)
    tokenizer, fingerprint, root = planned.tokenizer, planned.fingerprint, planned.root
    renderings, plans = planned.renderings, planned.splits
    cached = [p for p in plans if p.cache_hit]
    if cached:
        _say(progress, f"[{stream.name}] {_cached_summary(cached, {t.name for t in stream.probe})}")
    todo = [p for p in plans if not p.cache_hit]
    if todo:
        ensure_ray()
        _build_all(stream.name, todo, tokenizer, root, progress, _task_count(max_tasks))
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
