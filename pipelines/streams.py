"""Task streams: which tasks, in which order, from which data, rendered how.

A stream is a YAML file, an inline dict or a built-in name, validated into
pydantic models so that a typo fails before any data is read, with the file
and the field path in the message (``stream.yaml: tasks[2].fields.label:
required for a classification task``). All errors of a file are reported at once.

* ``source`` is a mapping (``{path: ...}``, ``{hub: ..., config: ...}``,
  ``{builtin: demo/facts}``) or a string shorthand: ``builtin:demo/facts``,
  ``hub:openai/gsm8k``, or a path.
* Relative paths (``source.path``, ``labels_file``) are relative to the YAML file.
* A top-level ``defaults:`` mapping is merged under every task and probe.
* A top-level ``model:`` section (the tokenizer's `ModelConfig`) is allowed and
  ignored here: ``secura prepare`` reads it.
* Built-in streams are the YAML files in ``pipelines/presets/``: ``demo``,
  ``cl-text`` (packaged data), ``order1``-``order3`` and ``paper`` (Hub data).

Training tasks have ``train`` and ``test`` splits; probes have only ``test``:
they are evaluated after every stage and never trained on.
"""
from __future__ import annotations

import json
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines import sources
from pipelines.files import read_yaml

TaskType = Literal["classification", "multiple_choice", "generation"]
Role = Literal["task", "probe"]
SPLITS: dict[str, tuple[str, ...]] = {"task": ("train", "test"), "probe": ("test",)}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names become directory names

# Roles whose value is free text: they may be joined from several columns and appear in templates.
TEXT_ROLES = ("text", "question", "context")
ROLES_BY_TYPE: dict[str, tuple[str, ...]] = {
    "classification": (*TEXT_ROLES, "label"),
    "multiple_choice": (*TEXT_ROLES, "choices", "answer"),
    "generation": (*TEXT_ROLES, "target"),
}
REQUIRED_ROLES: dict[str, tuple[str, ...]] = {
    "classification": ("label",),
    "multiple_choice": ("choices", "answer"),
    "generation": ("target",),
}
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "classification": {"text": "text", "label": "label"},
    "multiple_choice": {"question": "question", "choices": "choices", "answer": "answer"},
    "generation": {"text": "text", "target": "target"},
}
DEFAULT_TEMPLATES: dict[str, str] = {
    "classification": "{text}\nAnswer:",
    "multiple_choice": "Question: {question}\nAnswer:",
    "generation": "{text}\nAnswer:",
}
# Placeholders rendered from the answer options: "a, b, c" and "A. a\nB. b\nC. c".
OPTION_PLACEHOLDERS = ("choices", "options")


class StreamConfigError(ValueError):
    """An invalid stream config; the message names the file and every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """Exactly one of ``path`` (file or folder), ``hub`` (dataset name) or ``builtin`` (generator)."""

    path: str | None = None
    hub: str | None = None
    builtin: str | None = None
    config: str | None = None  # hub: the dataset's config (subset) name
    revision: str | None = None  # hub: a branch, tag or commit
    format: Literal["jsonl", "json", "csv", "parquet"] | None = None  # path: overrides the file extension
    splits: dict[str, str] = {}  # split -> file name in the folder (path) or split name (hub)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``source: builtin:demo/facts``, ``source: hub:openai/gsm8k`` or ``source: data/agnews``."""
        if not isinstance(value, str):
            return value
        for kind in ("builtin", "hub"):
            if value.startswith(f"{kind}:"):
                return {kind: value.removeprefix(f"{kind}:")}
        return {"path": value}

    @model_validator(mode="after")
    def _one_kind(self) -> "SourceConfig":
        kinds = [k for k in ("path", "hub", "builtin") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of path, hub, builtin (got {', '.join(kinds) or 'none'})")
        if not self.hub and (self.config or self.revision):
            raise ValueError("config and revision apply to hub sources only")
        if not self.path and self.format:
            raise ValueError("format applies to path sources only")
        return self


class FieldsConfig(_Strict):
    """Column names for each role; text roles may list several columns (joined by a newline),
    nested columns use dots (``translation.de``)."""

    text: str | list[str] | None = None
    question: str | list[str] | None = None
    context: str | list[str] | None = None
    choices: str | None = None
    answer: str | None = None
    label: str | None = None
    target: str | list[str] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _column_names(cls, value: Any) -> Any:
        if value is None or isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError("expected a column name or a list of column names")

    def roles(self) -> dict[str, str | list[str]]:
        return {role: column for role, column in self.model_dump().items() if column is not None}


class LimitsConfig(_Strict):
    """At most this many rows per split, a seeded sample (None: all)."""

    train: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class TaskConfig(_Strict):
    """One task of a stream. After `load_stream`, ``fields``, ``template``, ``seed`` and (for
    classification) ``labels`` are always set and paths are absolute."""

    name: str = Field(pattern=NAME_PATTERN)
    type: TaskType
    source: SourceConfig
    fields: FieldsConfig | None = None
    labels: list[str] | None = None
    labels_file: str | None = None
    template: str | None = None
    max_length: int = Field(256, ge=8)
    max_prompt_length: int | None = Field(None, ge=1)
    max_target_length: int | None = Field(None, ge=1)
    limits: LimitsConfig = LimitsConfig()
    seed: int | None = None
    on_bad_rows: Literal["error", "skip"] = "error"


class StreamConfig(_Strict):
    """An ordered list of training tasks plus probes evaluated after every stage."""

    name: str = Field(pattern=NAME_PATTERN)
    tasks: list[TaskConfig] = Field(min_length=1)
    probe: list[TaskConfig] = []
    seed: int = 0

    def entries(self) -> list[tuple[Role, TaskConfig]]:
        """Every task with its role, training tasks first in stream order."""
        return [("task", t) for t in self.tasks] + [("probe", p) for p in self.probe]

    def task(self, name: str) -> TaskConfig:
        for _, task in self.entries():
            if task.name == name:
                return task
        raise KeyError(f"stream {self.name!r} has no task {name!r}")


# ---------------------------------------------------------------- templates


def template_placeholders(template: str) -> list[str]:
    """Placeholder names in order of appearance; raises ValueError on a malformed template."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                             "must be a plain name such as {text}")
        names.append(name)
    return names


def allowed_placeholders(task: TaskConfig) -> list[str]:
    roles = task.fields.roles() if task.fields else DEFAULT_FIELDS[task.type]
    names = [r for r in TEXT_ROLES if r in roles]
    return names if task.type == "generation" else names + list(OPTION_PLACEHOLDERS)


# ---------------------------------------------------------------- checks beyond the schema


def _check_fields(task: TaskConfig) -> list[tuple[str, str]]:
    if task.fields is None:
        return []
    errors = []
    roles = task.fields.roles()
    for role in REQUIRED_ROLES[task.type]:
        if role not in roles:
            errors.append((f"fields.{role}", f"required for a {task.type} task"))
    if task.type == "classification" and not set(roles) & set(TEXT_ROLES):
        errors.append(("fields.text", "required for a classification task (or fields.question / fields.context)"))
    for role in roles:
        if role not in ROLES_BY_TYPE[task.type]:
            errors.append((f"fields.{role}", f"not used by a {task.type} task (roles: {', '.join(ROLES_BY_TYPE[task.type])})"))
    return errors


def _check_labels(task: TaskConfig) -> list[tuple[str, str]]:
    if task.type != "classification":
        return [(key, "only for classification tasks") for key in ("labels", "labels_file") if getattr(task, key) is not None]
    if task.labels is not None and task.labels_file is not None:
        return [("labels", "give labels or labels_file, not both")]
    if task.labels is None and task.labels_file is None:
        return [("labels", "required for a classification task (give labels or labels_file)")]
    return _check_label_set(task.labels) if task.labels is not None else []


def _check_label_set(labels: Any) -> list[tuple[str, str]]:
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        return [("labels", "expected a list of non-empty strings")]
    if len(labels) < 2:
        return [("labels", "a classification task needs at least 2 labels")]
    if len(set(labels)) != len(labels):
        return [("labels", f"duplicate labels in {labels}")]
    return []


def _check_template(task: TaskConfig) -> list[tuple[str, str]]:
    template = task.template or DEFAULT_TEMPLATES[task.type]
    try:
        used = template_placeholders(template)
    except ValueError as exc:
        return [("template", str(exc))]
    allowed = allowed_placeholders(task)
    unknown = [name for name in used if name not in allowed]
    if unknown:
        return [("template", f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                             f"this task has {', '.join('{' + n + '}' for n in allowed)}")]
    if not any(name in TEXT_ROLES for name in used):
        return [("template", f"uses none of the task's fields ({', '.join('{' + n + '}' for n in allowed if n in TEXT_ROLES)})")]
    return []


def _check_lengths(task: TaskConfig) -> list[tuple[str, str]]:
    errors = []
    for key in ("max_prompt_length", "max_target_length"):
        value = getattr(task, key)
        if value is not None and value >= task.max_length:
            errors.append((key, f"must be below max_length ({task.max_length})"))
    return errors


def _check_task(task: TaskConfig) -> list[tuple[str, str]]:
    return _check_fields(task) + _check_labels(task) + _check_template(task) + _check_lengths(task)


# ---------------------------------------------------------------- resolution


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _read_labels_file(path: Path) -> list[str]:
    if not path.is_file():
        raise _FieldError("labels_file", f"not found: {path}")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _FieldError("labels_file", f"{path}: not valid JSON ({exc})") from exc
    problems = _check_label_set(labels)
    if problems:
        raise _FieldError("labels_file", f"{path}: {problems[0][1]}")
    return labels


def _resolve_source(source: SourceConfig, base_dir: Path, splits: tuple[str, ...]) -> SourceConfig:
    if source.builtin:
        if source.builtin not in sources.builtin_names():
            raise _FieldError("source.builtin", f"unknown generator {source.builtin!r}; available: {', '.join(sources.builtin_names())}")
        return source
    if not source.path:
        return source  # hub: nothing to check offline
    resolved = source.model_copy(update={"path": str((base_dir / Path(source.path).expanduser()).resolve())})
    if Path(resolved.path).is_file() and len(splits) > 1:
        raise _FieldError("source.path", f"{resolved.path} is a single file, but a training task needs "
                                         f"{' and '.join(splits)} splits: point path at a folder")
    for split in splits:
        try:
            sources.local_split_file(resolved, split)
        except sources.SourceError as exc:
            field, _, message = str(exc).partition(": ")
            raise _FieldError(field, message) from exc
    return resolved


def _resolve_task(task: TaskConfig, role: Role, base_dir: Path, stream_seed: int) -> TaskConfig:
    """Fill in defaults and absolute paths, read the label file: consumers never see a None there."""
    update: dict[str, Any] = {
        "source": _resolve_source(task.source, base_dir, SPLITS[role]),
        "fields": task.fields or FieldsConfig(**DEFAULT_FIELDS[task.type]),
        "template": task.template or DEFAULT_TEMPLATES[task.type],
        "seed": stream_seed if task.seed is None else task.seed,
    }
    if task.labels_file is not None:
        path = (base_dir / Path(task.labels_file).expanduser()).resolve()
        update["labels"] = _read_labels_file(path)
        update["labels_file"] = str(path)
    return task.model_copy(update=update)


# ---------------------------------------------------------------- loading


def presets_dir() -> Path:
    """The packaged preset folder (a real directory: presets refer to packaged data by relative path)."""
    return Path(str(resources.files("pipelines") / "presets"))


def builtin_streams() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_messages(error: ValidationError) -> list[str]:
    messages = []
    for item in error.errors():
        if item["type"] == "missing":
            text = "required"
        elif item["type"] == "extra_forbidden":
            text = "unknown field"
        else:
            text = item["msg"].removeprefix("Value error, ")
        messages.append(f"{_format_loc(item['loc']) or '(top level)'}: {text}")
    return messages


def _merge_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ValueError("defaults: expected a mapping of task fields")
    for key in ("tasks", "probe"):
        if isinstance(raw.get(key), list):
            raw[key] = [{**defaults, **item} if isinstance(item, dict) else item for item in raw[key]]
    return raw


def stream_from_dict(raw: dict[str, Any], *, origin: str, base_dir: Path) -> StreamConfig:
    """Validate a parsed stream mapping; every problem is reported in one `StreamConfigError`.

    Each task is also checked on its own, so a schema error in one task does not
    hide a missing file in another.
    """
    raw = dict(raw)
    raw.pop("model", None)
    try:
        raw = _merge_defaults(raw)
    except ValueError as exc:
        raise StreamConfigError(f"{origin}: {exc}") from None
    errors: list[str] = []
    try:
        stream: StreamConfig | None = StreamConfig.model_validate(raw)
    except ValidationError as exc:
        stream, errors = None, _pydantic_messages(exc)
    seed = raw.get("seed") if isinstance(raw.get("seed"), int) else 0
    resolved: dict[str, list[TaskConfig]] = {"tasks": [], "probe": []}
    seen: set[str] = set()
    for key, role in (("tasks", "task"), ("probe", "probe")):
        items = raw.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            try:
                task = TaskConfig.model_validate(item)
            except ValidationError:
                continue  # reported with the stream's errors above
            where = f"{key}[{i}]"
            if task.name in seen:
                errors.append(f"{where}.name: duplicate task name {task.name!r}")
            seen.add(task.name)
            problems = _check_task(task)
            errors.extend(f"{where}.{field}: {message}" for field, message in problems)
            if problems:
                continue
            try:
                resolved[key].append(_resolve_task(task, role, base_dir, seed))
            except _FieldError as exc:
                errors.append(f"{where}.{exc.field}: {exc}")
    if errors or stream is None:
        raise StreamConfigError("\n".join(f"{origin}: {line}" for line in errors))
    return stream.model_copy(update=resolved)


def read_stream_yaml(path: Path) -> dict[str, Any]:
    """A stream or run YAML: a mapping, errors as :class:`StreamConfigError` naming the file."""
    return read_yaml(path, "stream config", error=StreamConfigError, mapping=True)


def load_stream(path_or_name: str | dict[str, Any], *, base_dir: str | Path | None = None) -> StreamConfig:
    """A validated stream from a YAML path, an inline dict or a built-in name.

    ``base_dir`` resolves a relative YAML path and an inline dict's relative data paths
    (a run YAML passes its own folder); default: the current directory.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(path_or_name, dict):
        return stream_from_dict(path_or_name, origin="<inline stream>", base_dir=base)
    candidate = base / Path(path_or_name).expanduser()
    if candidate.is_file():
        return stream_from_dict(read_stream_yaml(candidate), origin=str(path_or_name), base_dir=candidate.parent.resolve())
    if candidate.suffix in (".yaml", ".yml"):
        raise StreamConfigError(f"{path_or_name}: file not found (looked in {candidate.parent})")
    if path_or_name in builtin_streams():
        preset = presets_dir() / f"{path_or_name}.yaml"
        return stream_from_dict(read_stream_yaml(preset), origin=f"{path_or_name} ({preset})", base_dir=preset.parent)
    raise StreamConfigError(
        f"{path_or_name}: neither a stream YAML file nor a built-in stream ({', '.join(builtin_streams())})"
    )
