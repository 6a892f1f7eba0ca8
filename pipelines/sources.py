"""Where task rows come from: local files and folders, the Hugging Face Hub, built-in generators.

Each record keeps its origin (``file.jsonl:12``, ``file.parquet row 3``,
``hub:name split train #41``) so that a validation error points at the exact
line to fix. Records that cannot even be parsed (a malformed JSON line) come
back with ``error`` set instead of raising, so that ``on_bad_rows: skip`` can
count them like any other bad row.

``limits`` sample record *indices* (seeded) before parsing: a 4.5M-row hub
split is never turned into Python dicts just to keep 1,000 of them.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipelines import demo_stream

if TYPE_CHECKING:
    from pipelines.streams import SourceConfig

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTINS = {"demo": demo_stream}


class SourceError(ValueError):
    """A source that cannot be read at all: missing file, unknown format, hub failure."""


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from; ``error`` is set (and ``data`` None) when it could not be parsed."""

    where: str
    data: dict[str, Any] | None
    error: str | None = None


class SplitReader(Protocol):
    location: str

    def fingerprint(self) -> str:
        """A hash of the split's content: the shard cache key depends on it."""
        ...

    def records(self, limit: int | None, seed: str) -> list[Record]:
        """All records, or a seeded sample of ``limit`` of them, in source order."""
        ...


def sample_indices(total: int, limit: int | None, seed: str) -> list[int]:
    """Which records to keep: all, or a seeded sample kept in source order (stable, reproducible)."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- local files


def local_split_file(source: SourceConfig, split: str) -> tuple[Path, str]:
    """The file (and its format) that holds ``split`` for a local ``path`` source."""
    root = Path(source.path or "")
    if root.is_file():
        file = root
    elif root.is_dir():
        if split in source.splits:
            file = root / source.splits[split]
            if not file.is_file():
                raise SourceError(f"source.splits.{split}: file not found: {file}")
        else:
            names = [f"{split}{ext}" for ext in FORMATS]
            found = [root / name for name in names if (root / name).is_file()]
            if not found:
                raise SourceError(
                    f"source.path: no {split} file in {root} (looked for {', '.join(names)}; "
                    f"name another with source.splits.{split})"
                )
            file = found[0]
    else:
        raise SourceError(f"source.path: not found: {root}")
    fmt = source.format or FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise SourceError(f"source.format: cannot tell the format of {file}; set one of {sorted(set(FORMATS.values()))}")
    return file, fmt


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _parse_object(where: str, text: str) -> Record:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Record(where, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(data, dict):
        return Record(where, None, f"expected a JSON object, got {type(data).__name__}")
    return Record(where, data)


def _jsonl(path: Path, limit: int | None, seed: str) -> list[Record]:
    # split("\n"), not splitlines(): a JSON string may hold U+2028, which splitlines() breaks on.
    lines = [(n, text.rstrip("\r")) for n, text in enumerate(_read_text(path).split("\n"), 1) if text.strip()]
    return [_parse_object(f"{path}:{lines[i][0]}", lines[i][1]) for i in sample_indices(len(lines), limit, seed)]


def _json(path: Path, limit: int | None, seed: str) -> list[Record]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(items, list):
        raise SourceError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
    records = []
    for i in sample_indices(len(items), limit, seed):
        where = f"{path}[{i}]"
        item = items[i]
        records.append(Record(where, item) if isinstance(item, dict) else Record(where, None, f"expected an object, got {type(item).__name__}"))
    return records


def _csv(path: Path, limit: int | None, seed: str) -> list[Record]:
    rows: list[Record] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                extra = row.pop(None, None)  # DictReader files surplus values under the key None
                rows.append(Record(where, None, f"{len(extra)} more value(s) than header columns") if extra else Record(where, row))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return [rows[i] for i in sample_indices(len(rows), limit, seed)]


def _parquet(path: Path, limit: int | None, seed: str) -> list[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    indices = sample_indices(table.num_rows, limit, seed)
    return [Record(f"{path} row {i + 1}", row) for i, row in zip(indices, table.take(indices).to_pylist())]


_FILE_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


class FileSplit:
    """One local file."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format, self.location = path, fmt, str(path)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.format.encode())
        with self.path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def records(self, limit: int | None, seed: str) -> list[Record]:
        return _FILE_READERS[self.format](self.path, limit, seed)


# ---------------------------------------------------------------- Hugging Face Hub


class HubSplit:
    """One split of a Hub dataset, loaded (and cached on disk) by `datasets.load_dataset`."""

    def __init__(self, name: str, config: str | None, split: str, revision: str | None) -> None:
        self.name, self.config, self.split, self.revision = name, config, split, revision
        self.location = f"hub:{name}" + (f"/{config}" if config else "") + f" split {split}"
        self._dataset: Any = None

    def _load(self) -> Any:
        if self._dataset is None:
            try:
                import datasets

                self._dataset = datasets.load_dataset(self.name, self.config, split=self.split, revision=self.revision)
            except Exception as exc:  # network, auth, missing config: all end here, with the dataset named
                raise SourceError(f"{self.location}: cannot load from the Hugging Face Hub: {exc}") from exc
        return self._dataset

    def fingerprint(self) -> str:
        # `datasets` fingerprints the prepared Arrow data: a new revision of the data changes it.
        return _sha256(f"{self.location}@{self.revision}:{self._load()._fingerprint}".encode())

    def records(self, limit: int | None, seed: str) -> list[Record]:
        dataset = self._load()
        indices = sample_indices(len(dataset), limit, seed)
        return [Record(f"{self.location} #{i}", dict(row)) for i, row in zip(indices, dataset.select(indices))]


# ---------------------------------------------------------------- built-in generators


def builtin_names() -> list[str]:
    return [f"{family}/{task}" for family, module in BUILTINS.items() for task in module.GENERATORS]


class BuiltinSplit:
    """Rows generated in code (``builtin: demo/arithmetic``), seeded by the task's seed."""

    def __init__(self, name: str, split: str, seed: int) -> None:
        if name not in builtin_names():
            raise SourceError(f"source.builtin: unknown generator {name!r}; available: {', '.join(builtin_names())}")
        family, task = name.split("/", 1)
        self.location = f"builtin:{name} split {split}"
        self._rows = BUILTINS[family].generate(task, split, seed)

    def fingerprint(self) -> str:
        return _sha256(json.dumps(self._rows, sort_keys=True).encode())

    def records(self, limit: int | None, seed: str) -> list[Record]:
        return [Record(f"{self.location} #{i}", self._rows[i]) for i in sample_indices(len(self._rows), limit, seed)]


def open_split(source: SourceConfig, split: str, *, seed: int) -> SplitReader:
    """A reader for one split of a task's source (nothing is read until asked)."""
    if source.builtin:
        return BuiltinSplit(source.builtin, split, seed)
    if source.hub:
        return HubSplit(source.hub, source.config, source.splits.get(split, split), source.revision)
    return FileSplit(*local_split_file(source, split))
