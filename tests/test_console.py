"""What `secura` prints, line by line: a failing and a succeeding `secura run` on the demo stream.

The failure is one line naming the field, then a hint whose command works (global flags are taken
after the subcommand too); the success is our lines only (no Ray or MLflow output, no MLflow
"View run" links), ending with the store the run was tracked in.
"""
from __future__ import annotations

import errno
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import _describe, build_parser
from pipelines.tracking import store_line

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["tasks=[jobs, creatures]", "train.steps_per_task=4", "train.log_every=2", "train.checkpoint_every=0",
             "eval.test_limit=8", "eval.probe_limit=8", "scaling.backend=local"]
# Every line a successful run may print (stderr: our log lines and progress; stdout: the summary).
OUR_LINES = [
    r"\[(secura|demo)\] .*",  # our log lines; preparing the shards names the stream
    r"accuracy matrix \(rows: after each stage; columns: tasks, then probes\)",
    r"after +jobs +creatures +facts-probe",
    r"(base|\d \w+) +( *(\d\.\d{3}|-) *){3}",
    r"acc \d\.\d{3}  bwt -?\d\.\d{3}  fwt -?\d\.\d{3}  forgetting -?\d\.\d{3}  probe_retention \d\.\d{3}",
    r"outputs: /.*",
    r"MLflow: sqlite:////.*/mlflow\.db \(UI: secura ui --output-dir /.*\)",
]


def secura(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SECURA_VERBOSE", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_failing_run_says_what_and_hints_a_command_that_works(tmp_path):
    args = ["run", "configs/demo.yaml", "--output-dir", str(tmp_path / "out"), "--set", "method.adapter.k=999"]
    done = secura(*args)
    assert done.returncode == 2 and done.stdout == ""
    error, hint = done.stderr.splitlines()  # two lines, nothing else
    assert error.startswith("secura run: error: ") and "method.adapter.k: 999 exceeds" in error
    command = re.fullmatch(r"\(the full traceback: (secura .*)\)", hint).group(1)
    assert shlex.split(command) == ["secura", *args, "--verbose"]
    again = secura(*shlex.split(command)[1:])  # the hint's command, as printed: --verbose after the subcommand
    assert again.returncode == 2
    assert "Traceback (most recent call last)" in again.stderr and again.stderr.splitlines()[-1] == error


def test_a_succeeding_run_prints_our_lines_only_and_ends_with_its_store(tmp_path):
    out = tmp_path / "out"
    done = secura("run", "configs/demo.yaml", "--output-dir", str(out), *[a for o in OVERRIDES for a in ("--set", o)])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    strangers = [line for line in lines if not any(re.fullmatch(p, line.strip()) for p in OUR_LINES)]
    assert not strangers, strangers
    assert "View run" not in done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"MLflow: sqlite:///{out}/mlflow.db (UI: secura ui --output-dir {out})"
    assert done.stdout.splitlines()[-2] == f"outputs: {out}"


def test_global_flags_go_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["--verbose", "run", "x.yaml"]).verbose is True
    assert parser.parse_args(["run", "x.yaml", "--verbose"]).verbose is True
    assert parser.parse_args(["ui", "-v"]).verbose is True
    assert parser.parse_args(["run", "x.yaml"]).verbose is False


def test_the_last_line_names_the_store_that_was_used(tmp_path):
    assert store_line("http://mlflow:5000", tmp_path) == "MLflow: http://mlflow:5000 (open it in a browser)"
    assert store_line(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run") == (
        f"MLflow: sqlite:///{tmp_path}/mlflow.db (UI: secura ui --output-dir {tmp_path})")
    other = f"sqlite:///{tmp_path}/elsewhere.db"
    assert store_line(other, tmp_path) == f"MLflow: {other} (UI: secura ui --tracking-uri {other})"
    assert f"secura sync {tmp_path}" in store_line("http://mlflow:5000", tmp_path, offline=True)


def test_os_errors_name_their_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    assert _describe(FileNotFoundError(errno.ENOENT, "No such file or directory", str(missing))) == (
        f"No such file or directory: {missing}")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    monkeypatch.setenv("PWD", str(gone))
    gone.rmdir()
    assert _describe(FileNotFoundError(errno.ENOENT, "No such file or directory")) == (
        f"No such file or directory: the working directory {gone} no longer exists")
