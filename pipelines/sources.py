"""Where task rows come from: local files and folders, the Hugging Face Hub, built-in generators.

Each record keeps its origin (``file.jsonl:12``, ``file.parquet row 3``,
``hub:name split train #41``) so that a validation error points at the exact
line to fix. Records that cannot even be parsed (a malformed JSON line) come
back with ``error`` set instead of raising, so that ``on_bad_rows: skip`` can
count them like any other bad row.

``limits`` sample record *indices* (seeded) before parsing: a 4.5M-row hub
split is never turned into Python dicts just to keep 1,000 of them. The same
indices carve a task's validation rows out of its train split (`carve`):
seeded, and disjoint from the train rows that remain.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

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


class SplitReader(ABC):
    """One split of a source; records are chosen by index before they are parsed."""

    location: str

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of the split's content: the shard cache key depends on it."""

    @abstractmethod
    def count(self) -> int:
        """How many records the split holds (parsed or not)."""

    @abstractmethod
    def take(self, indices: list[int]) -> list[Record]:
        """The records at ``indices`` (sorted), parsed only now."""

    def records(self, limit: int | None, seed: str) -> list[Record]:
        """All records, or a seeded sample of ``limit`` of them, in source order."""
        return self.take(sample_indices(self.count(), limit, seed))


def sample_indices(total: int, limit: int | None, seed: str) -> list[int]:
    """Which records to keep: all, or a seeded sample kept in source order (stable, reproducible)."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def validation_count(total: int, rows: int | float) -> int:
    """Rows to carve: a count, or a fraction of ``total`` (at least one); raises when none would remain."""
    count = rows if isinstance(rows, int) else max(1, round(rows * total))
    if count >= total:
        raise SourceError(f"validation_rows: {rows} would take {count} of the {total} train rows; leave some to train on")
    return count


def carve(total: int, rows: int | float | None, seed: str) -> tuple[list[int], list[int]]:
    """(validation, remaining) record indices of a train split, each sorted, disjoint, seeded.

    Without ``rows`` nothing is carved and every index remains (so a stream
    without validation samples its train rows exactly as before).
    """
    if rows is None:
        return [], list(range(total))
    validation = sample_indices(total, validation_count(total, rows), seed)
    taken = set(validation)
    return validation, [i for i in range(total) if i not in taken]


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


def _not_utf8(path: Path, exc: UnicodeDecodeError, data: bytes) -> SourceError:
    """The error names the file and the line to fix, not only a byte offset."""
    line = data[:exc.start].count(b"\n") + 1
    return SourceError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc, data) from None


def _parse_object(where: str, text: str) -> Record:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Record(where, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(data, dict):
        return Record(where, None, f"expected a JSON object, got {type(data).__name__}")
    return Record(where, data)


class _Rows(Protocol):
    """A file's records, each parsed only when taken."""

    def __len__(self) -> int: ...

    def take(self, indices: list[int]) -> list[Record]: ...


class _JsonlRows:
    def __init__(self, path: Path) -> None:
        # split("\n"), not splitlines(): a JSON string may hold U+2028, which splitlines() breaks on.
        self.path = path
        self.lines = [(n, text.rstrip("\r")) for n, text in enumerate(_read_text(path).split("\n"), 1) if text.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def take(self, indices: list[int]) -> list[Record]:
        return [_parse_object(f"{self.path}:{self.lines[i][0]}", self.lines[i][1]) for i in indices]


class _JsonRows:
    def __init__(self, path: Path) -> None:
        try:
            items = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(items, list):
            raise SourceError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
        self.path, self.items = path, items

    def __len__(self) -> int:
        return len(self.items)

    def take(self, indices: list[int]) -> list[Record]:
        records = []
        for i in indices:
            where, item = f"{self.path}[{i}]", self.items[i]
            records.append(Record(where, item) if isinstance(item, dict)
                           else Record(where, None, f"expected an object, got {type(item).__name__}"))
        return records


class _CsvRows:
    def __init__(self, path: Path) -> None:
        self.rows: list[Record] = []
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        for row in reader:
            where = f"{path}:{reader.line_num}"
            extra = row.pop(None, None)  # DictReader files surplus values under the key None
            self.rows.append(Record(where, None, f"{len(extra)} more value(s) than header columns")
                             if extra else Record(where, row))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: list[int]) -> list[Record]:
        return [self.rows[i] for i in indices]


class _ParquetRows:
    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path, self.table = path, pq.read_table(path)

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, indices: list[int]) -> list[Record]:
        return [Record(f"{self.path} row {i + 1}", row) for i, row in zip(indices, self.table.take(indices).to_pylist())]


_FILE_ROWS: dict[str, Callable[[Path], _Rows]] = {"jsonl": _JsonlRows, "json": _JsonRows, "csv": _CsvRows, "parquet": _ParquetRows}


class FileSplit(SplitReader):
    """One local file, read once on first use."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format, self.location = path, fmt, str(path)
        self._rows: _Rows | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.format.encode())
        with self.path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def _loaded(self) -> _Rows:
        if self._rows is None:
            self._rows = _FILE_ROWS[self.format](self.path)
        return self._rows

    def count(self) -> int:
        return len(self._loaded())

    def take(self, indices: list[int]) -> list[Record]:
        return self._loaded().take(indices)


# ---------------------------------------------------------------- Hugging Face Hub


class HubSplit(SplitReader):
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

    def count(self) -> int:
        return len(self._load())

    def take(self, indices: list[int]) -> list[Record]:
        return [Record(f"{self.location} #{i}", dict(row)) for i, row in zip(indices, self._load().select(indices))]


# ---------------------------------------------------------------- built-in generators


def builtin_names() -> list[str]:
    return [f"{family}/{task}" for family, module in BUILTINS.items() for task in module.GENERATORS]


class BuiltinSplit(SplitReader):
    """Rows generated in code (``builtin: demo/jobs``), seeded by the task's seed."""

    def __init__(self, name: str, split: str, seed: int) -> None:
        if name not in builtin_names():
            raise SourceError(f"source.builtin: unknown generator {name!r}; available: {', '.join(builtin_names())}")
        family, task = name.split("/", 1)
        self.location = f"builtin:{name} split {split}"
        self._rows = BUILTINS[family].generate(task, split, seed)

    def fingerprint(self) -> str:
        return _sha256(json.dumps(self._rows, sort_keys=True).encode())

    def count(self) -> int:
        return len(self._rows)

    def take(self, indices: list[int]) -> list[Record]:
        return [Record(f"{self.location} #{i}", self._rows[i]) for i in indices]


def open_split(source: SourceConfig, split: str, *, seed: int) -> SplitReader:
    """A reader for one split of a task's source (nothing is read until asked)."""
    if source.builtin:
        return BuiltinSplit(source.builtin, split, seed)
    if source.hub:
        return HubSplit(source.hub, source.config, source.splits.get(split, split), source.revision)
    return FileSplit(*local_split_file(source, split))
