"""The project's locks read as data, for the tests that keep every install path honest."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
CUDA_LOCK = ROOT / "requirements-cuda.lock"
BENCH_LOCK = ROOT / "benchmarks" / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"


@dataclass
class Pin:
    version: str
    marker: str = ""
    hashes: list[str] = field(default_factory=list)


def pins(path: Path = LOCK) -> dict[str, list[Pin]]:
    """{canonical name: its pins}; a universal lock pins some packages once per Python range."""
    entries: dict[str, list[Pin]] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if pin:
            current = Pin(pin.group(2), (pin.group(3) or "").strip())
            entries.setdefault(canonicalize_name(pin.group(1)), []).append(current)
        elif current and (digest := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            current.hashes.append(digest.group(1))
    return entries


def locked_version(name: str, path: Path = LOCK) -> str:
    """The one version of ``name`` in a lock (an error if it is pinned per Python range)."""
    (pin,) = pins(path)[canonicalize_name(name)]
    return pin.version


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def direct_requirements() -> list[str]:
    """pyproject.toml's dependencies and every extra's."""
    meta = project()
    return meta["dependencies"] + [spec for extra in meta["optional-dependencies"].values() for spec in extra]


def makefile_variable(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s*[:?]?=\s*(.+)$", MAKEFILE.read_text(), re.M)
    return value.strip()
