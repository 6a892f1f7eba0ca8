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
  ``cl-text`` and the long-sequence benchmark orders ``order4``-``order6`` (14
  tasks) and ``order4-first3``-``order6-first3`` (packaged data);
  ``order1``-``order3`` and ``paper`` (Hub data).
* A task with ``if_missing: skip`` whose local ``source.path`` does not exist is
  dropped with a `MissingTaskWarning` naming it (the benchmark's ``yahoo``).

Training tasks have ``train`` and ``test`` splits, plus ``validation`` when
``validation_rows`` carves it out of ``train``; probes have only ``test``:
they are evaluated after every stage and never trained on.

``prompt_format`` says how a prompt reaches the model: ``raw`` is the task's
template as is; ``chat`` wraps it as the user turn of the tokenizer's chat
template (the answer is the assistant's reply); ``auto`` (default) is ``chat``
when the tokenizer has a chat template, else ``raw``. Preprocessing resolves it,
and training rows, scoring and generation all use the one rendering.
"""
from __future__ import annotations

import json
import string
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines import sources
from pipelines.files import read_yaml

TaskType = Literal["classification", "multiple_choice", "generation"]
Role = Literal["task", "probe"]
PromptFormat = Literal["auto", "chat", "raw"]
SPLITS: dict[str, tuple[str, ...]] = {"task": ("train", "test"), "probe": ("test",)}  # the splits read from a source
VALIDATION = "validation"  # an eval split carved out of train (``validation_rows``), never read from a file
TRAIN_ONLY_FIELDS = ("validation_rows",)  # ``defaults:`` does not give these to probes
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


class MissingTaskWarning(UserWarning):
    """A task with ``if_missing: skip`` was dropped because its data is not there."""


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
    # Rows carved out of train for model selection (a count, or a fraction of the train rows): seeded,
    # disjoint from the rows trained on. Never from test: benchmarks' dev files often are their test files.
    validation_rows: int | float | None = None
    prompt_format: PromptFormat = "auto"
    # Which end of the prompt's body a too-long prompt loses: "left" keeps a question written after a passage.
    truncation_side: Literal["right", "left"] = "right"
    if_missing: Literal["error", "skip"] = "error"  # skip: drop the task (with a warning) when source.path is absent

    @field_validator("validation_rows")
    @classmethod
    def _validation_rows(cls, value: int | float | None) -> int | float | None:
        if value is None or isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value < 1:
            return value
        raise ValueError("expected a row count (>= 1) or a fraction of the train rows (between 0 and 1)")

    def eval_splits(self, role: Role) -> tuple[str, ...]:
        """The evaluation splits a stage is scored on: ``test``, and ``validation`` when carved."""
        return (VALIDATION, "test") if role == "task" and self.validation_rows is not None else ("test",)

    def splits(self, role: Role) -> tuple[str, ...]:
        """Every split preprocessing writes for this task, train first."""
        return ("train", *self.eval_splits(role)) if role == "task" else self.eval_splits(role)


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


def _check_role(task: TaskConfig, role: Role) -> list[tuple[str, str]]:
    if role == "probe" and task.validation_rows is not None:
        return [("validation_rows", "only for training tasks (a probe has no train split to carve it from)")]
    if task.if_missing == "skip" and not task.source.path:
        return [("if_missing", "skip applies to local source.path data only")]
    return []


def _check_task(task: TaskConfig, role: Role) -> list[tuple[str, str]]:
    return _check_fields(task) + _check_labels(task) + _check_template(task) + _check_lengths(task) + _check_role(task, role)


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
    probe_defaults = {k: v for k, v in defaults.items() if k not in TRAIN_ONLY_FIELDS}
    for key, under in (("tasks", defaults), ("probe", probe_defaults)):
        if isinstance(raw.get(key), list):
            raw[key] = [{**under, **item} if isinstance(item, dict) else item for item in raw[key]]
    return raw


def _absent(task: TaskConfig, base_dir: Path) -> Path | None:
    """The missing data folder of an ``if_missing: skip`` task, else None."""
    if task.if_missing != "skip" or not task.source.path:
        return None
    path = (base_dir / Path(task.source.path).expanduser()).resolve()
    return None if path.exists() else path


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
    skipped: set[str] = set()
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
            problems = _check_task(task, role)
            errors.extend(f"{where}.{field}: {message}" for field, message in problems)
            if problems:
                continue
            absent = _absent(task, base_dir)
            if absent is not None:
                warnings.warn(f"{origin}: task {task.name!r} skipped: no data at {absent} (if_missing: skip)",
                              MissingTaskWarning)
                skipped.add(task.name)
                continue
            try:
                resolved[key].append(_resolve_task(task, role, base_dir, seed))
            except _FieldError as exc:
                errors.append(f"{where}.{exc.field}: {exc}")
    if stream is not None and not resolved["tasks"] and not errors:
        errors.append(f"tasks: every task was skipped ({', '.join(sorted(skipped))}: no data)")
    if errors or stream is None:
        raise StreamConfigError("\n".join(f"{origin}: {line}" for line in errors))
    return stream.model_copy(update=resolved)


def with_options(stream: StreamConfig, *, prompt_format: PromptFormat | None = None,
                 validation_rows: int | float | None = None) -> StreamConfig:
    """The stream with a run's choices applied to every task: ``prompt_format`` to tasks and probes,
    ``validation_rows`` to training tasks (None leaves each task's own setting)."""
    def apply(task: TaskConfig, role: Role) -> TaskConfig:
        update: dict[str, Any] = {}
        if prompt_format is not None:
            update["prompt_format"] = prompt_format
        if validation_rows is not None and role == "task":
            update["validation_rows"] = validation_rows
        try:
            return TaskConfig.model_validate({**task.model_dump(), **update})  # validated like a YAML value
        except ValidationError as exc:
            raise StreamConfigError("\n".join(f"stream {stream.name!r}: {line}" for line in _pydantic_messages(exc))) from None

    return stream.model_copy(update={"tasks": [apply(t, "task") for t in stream.tasks],
                                     "probe": [apply(p, "probe") for p in stream.probe]})


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
