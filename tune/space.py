"""The search space of a sweep: dotted run-config keys → distributions.

Each entry is written ``KEY: {choice: [...]}``, ``{grid: [...]}``,
``{uniform: [lo, hi]}`` or ``{loguniform: [lo, hi]}``. Values are checked
against the base run config before Ray starts, so a typo or an out-of-range
value fails in a second with the key named, not as N failed trials.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from pipelines.config import parse_run_config

KINDS = ("choice", "grid", "uniform", "loguniform")
SEARCHES = ("random", "grid", "optuna", "hyperopt")
# Set per trial by the sweep itself; a space over them would break the sweep's layout.
SWEEP_OWNED = ("name", "output_dir", "tracking_uri", "experiment")


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``values`` for choice/grid, ``(lo, hi)`` in ``bounds`` for ranges."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    bounds: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind}{list(self.values)}"
        return f"{self.kind}[{self.bounds[0]:g}, {self.bounds[1]:g}]"

    def allows(self, value: Any) -> bool:
        """Whether ``value`` can be drawn: one of the values, or a number within the bounds."""
        if self.kind in ("choice", "grid"):
            return value in self.values
        return _is_number(value) and self.bounds[0] <= value <= self.bounds[1]

    def probe_values(self) -> list[Any]:
        """Values checked against the run config: every listed value, or both ends and one inside.

        The inside point is deliberately fractional, so an integer-only key
        (``method.adapter.k``) given a range fails here, not in a trial.
        """
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.bounds
        inside = lo * (hi / lo) ** 0.4142 if self.kind == "loguniform" else lo + (hi - lo) * 0.4142
        return [lo, hi, inside]


def parse_space(raw: Any) -> list[Dimension]:
    """The ``space:`` mapping as dimensions; every error names the offending key."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("space: expected a non-empty mapping of dotted run-config keys to distributions")
    return [_parse_dimension(str(key), spec) for key, spec in raw.items()]


def _parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"space.{key}"
    if key.split(".")[0] in SWEEP_OWNED:
        raise ValueError(f"{where}: {key.split('.')[0]} is set by the sweep for every trial and cannot be searched")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: expected exactly one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; valid: {list(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return Dimension(key, kind, values=tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise ValueError(f"{where}: {kind} needs [lo, hi] (two numbers), got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not lo < hi:
        raise ValueError(f"{where}: {kind} needs lo < hi, got [{lo:g}, {hi:g}]")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{where}: loguniform needs 0 < lo, got {lo:g}")
    return Dimension(key, kind, bounds=(lo, hi))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_search(dimensions: list[Dimension], search: str) -> None:
    """Distributions a search algorithm cannot use are an error before anything runs."""
    if search not in SEARCHES:
        raise ValueError(f"search: unknown algorithm {search!r}; valid: {list(SEARCHES)}")
    for dim in dimensions:
        if search == "grid" and dim.kind != "grid":
            raise ValueError(f"space.{dim.key}: search: grid enumerates values, so every key needs "
                             f"{{grid: [...]}}, got {dim.kind}")
        if search in ("optuna", "hyperopt") and dim.kind == "grid":
            raise ValueError(f"space.{dim.key}: search: {search} samples, it cannot enumerate a grid; "
                             f"use {{choice: [...]}}")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``a.b.c``, creating sections; a non-section on the way is an error."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[:i + 1])} is {child!r}, not a section, so {key} cannot be set")
        node = child
    node[parts[-1]] = value


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``values`` set."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(data, key, value)
    return data


def check_against(base: dict[str, Any], dimensions: list[Dimension]) -> None:
    """Every probe value of every key must give a valid run config (one key at a time)."""
    for dim in dimensions:
        for value in dim.probe_values():
            try:
                _check_value(base, dim.key, value)
            except (ValueError, TypeError) as err:
                hint = " (uniform/loguniform draw floats: use choice or grid for an integer key)" \
                    if _takes_integers(base, dim.key, value) else ""
                raise ValueError(f"space.{dim.key}: value {value!r} ({dim.describe()}) is not valid: {err}{hint}") \
                    from None


def _check_value(base: dict[str, Any], key: str, value: Any) -> None:
    parse_run_config(with_values(base, {key: value}), source="run config")


def _takes_integers(base: dict[str, Any], key: str, value: Any) -> bool:
    """A whole float refused where the same int is accepted: the key wants integers."""
    if not (isinstance(value, float) and value.is_integer()):
        return False
    try:
        _check_value(base, key, int(value))
    except (ValueError, TypeError):
        return False
    return True


def parse_points(raw: Any, dimensions: list[Dimension], base: dict[str, Any]) -> list[dict[str, Any]]:
    """``points_to_evaluate``: configs tried before the search samples (the one you know, a do-nothing control).

    Each names every searched key with a value its distribution allows (Optuna
    and HyperOpt need whole points) and gives a valid run config.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"points_to_evaluate: expected a list of mappings, got {type(raw).__name__}")
    by_key = {dim.key: dim for dim in dimensions}
    points = []
    for i, point in enumerate(raw):
        where = f"points_to_evaluate[{i}]"
        if not isinstance(point, dict):
            raise ValueError(f"{where}: expected a mapping of searched keys to values, got {point!r}")
        missing, unknown = sorted(set(by_key) - set(point)), sorted(set(point) - set(by_key))
        if missing or unknown:
            details = (f"; missing {missing}" if missing else "") + (f"; not searched {unknown}" if unknown else "")
            raise ValueError(f"{where}: must name exactly the searched keys {sorted(by_key)}{details}")
        for key, value in point.items():
            if not by_key[key].allows(value):
                raise ValueError(f"{where}.{key}: {value!r} is outside {by_key[key].describe()}")
        try:
            parse_run_config(with_values(base, point), source="run config")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: not a valid run config: {err}") from None
        points.append(dict(point))
    return points


def to_tune(dimensions: list[Dimension]) -> dict[str, Any]:
    """The Ray Tune ``param_space``: flat, keyed by the dotted run-config key."""
    from ray import tune as ray_tune

    makers = {
        "choice": lambda d: ray_tune.choice(list(d.values)),
        "grid": lambda d: ray_tune.grid_search(list(d.values)),
        "uniform": lambda d: ray_tune.uniform(*d.bounds),
        "loguniform": lambda d: ray_tune.loguniform(*d.bounds),
    }
    return {dim.key: makers[dim.kind](dim) for dim in dimensions}
