"""Slow deployment checks: a real `ray job submit` of `secura run`, end to end.

`test_ray_job_submit_secura_run` does what docs/cluster.md tells a user to do,
against a local head instead of a cloud one:

1. start a Ray head with the dashboard on 127.0.0.1, its own ports and its
   own temp dir, token authentication on (a fresh token in a temp file, so
   ~/.ray/auth_token is neither read nor written);
2. `ray job submit --address http://127.0.0.1:<port> --working-dir .
   --runtime-env-json '{"env_vars": ...}' -- secura run configs/demo.yaml
   --tracking-uri sqlite:////<tmp>/mlflow.db --output-dir <tmp>/out` (with
   `--set` overrides that shorten the stages), and wait for SUCCEEDED;
3. check MLflow: one parent run for (stream, method, seed) with a nested run
   per stage.

Why its own module, and no `ray stop`: `ray stop` kills every Ray process of
the machine, which would also take down the session-wide `ray_local` fixture
of the other test modules (and anybody else's Ray). This test starts its head
with `ray start --head --block` in a new process group and stops exactly that
process (SIGTERM: the head drains and shuts its own processes down), then
kills any straggler whose command line names this test's temp dir.

`test_a_cluster_of_your_own_machines` follows docs/cluster.md section 0 on
one machine: a head and a second node (`ray start --address`, its own temp dir
and ports: with a shared temp dir, the second node's runtime-env agent removed
the job's working-dir copy), the stage worker pinned to the second node, a job
submitted with `--working-dir .` and the excludes that keep `.git` and `.venv`
home, stopped after its first stage, then the same command again continuing
it with `--resume` in the same MLflow run.

`test_k8s_configs_pass_full_validation` is the slow half of
tests/test_cluster_configs.py: the full validation of the run and sweep
configs of the Kubernetes ConfigMaps, which imports torch, transformers and peft.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The config the job runs, relative to the repository root (the job's working dir).
DEMO_CONFIG = "configs/demo.yaml"
# Logical CPUs of the test head: more than the 2 cores, so Ray Data is never
# starved by the train worker (the 2-CPU deadlock in the Ray notes).
HEAD_NUM_CPUS = 4
HEAD_START_TIMEOUT_S = 120
# The demo takes 3 to 7 minutes on a 2-core machine (idle to busy); the bound leaves
# room for a loaded one. The test's own pytest-timeout is above the sum.
JOB_TIMEOUT_S = 600
# Shorter than the demo's defaults: this test is about the submission path,
# not about what the model learns.
def _first_demo_tasks(count: int) -> str:
    from pipelines.streams import load_stream

    return ", ".join(task.name for task in load_stream("demo").tasks[:count])


JOB_OVERRIDES = ["train.steps_per_task=8", "eval.test_limit=8", "eval.probe_limit=8", f"tasks=[{_first_demo_tasks(2)}]"]
JOB_ENV_VARS = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"`{name}` is not installed next to {sys.executable} nor on PATH")
    return found


class LocalHead:
    """A `ray start --head --block` of our own, stopped by signalling only its process group."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.temp_dir = workdir / "ray"
        self.token_path = workdir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http_port,
         self.agent_grpc_port, self.runtime_env_port, self.metrics_port) = _free_ports(7)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.log_path = workdir / "head.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
        # The job's entrypoint runs with the head's PATH: the venv's `secura` first.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            _tool("ray"), "start", "--head", "--block",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            # Advertised on loopback: a single-node cluster that nothing else can join.
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={HEAD_NUM_CPUS}", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            # Every listening port of our own, so a second Ray on this machine never collides.
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--metrics-export-port={self.metrics_port}",
        ]
        log = self.log_path.open("w")
        self.process = subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:  # the health endpoint answers without a token
                with urllib.request.urlopen(f"{self.address}/api/gcs_healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"the Ray head was not healthy after {HEAD_START_TIMEOUT_S} s:\n{self.log_tail()}")

    def ray(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("ray"), *args], env=self.env, cwd=cwd or self.workdir,
                              capture_output=True, text=True, timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=30)
        self._kill_stragglers()

    def _kill_stragglers(self) -> None:
        """Processes of this head that left its process group (they name our temp dir)."""
        import psutil

        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if marker in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


class LocalNode:
    """A second node of a `LocalHead`'s cluster (`ray start --address --block`), with its own temp dir and ports."""

    def __init__(self, head: LocalHead, name: str, resources: dict[str, float]):
        self.head = head
        self.temp_dir = head.workdir / name
        self.log_path = head.workdir / f"{name}.log"
        (node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics) = _free_ports(6)
        self.command = [
            _tool("ray"), "start", "--block", f"--address={head.gcs_address}", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", f"--resources={json.dumps(resources)}", f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        ]
        self.process: subprocess.Popen | None = None

    def start(self, resource: str) -> None:
        """Join, and wait until the cluster lists the node's custom ``resource``."""
        log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, env=self.head.env, cwd=self.head.workdir, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the second node's ray start exited with {self.process.returncode}:\n"
                            f"{self.log_path.read_text()[-3000:]}")
            status = self.head.ray("status", "--address", self.head.gcs_address, timeout=60)
            if resource in status.stdout:
                return
            time.sleep(2)
        pytest.fail(f"the second node did not join within {HEAD_START_TIMEOUT_S} s:\n"
                    f"{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)


def _wait_for_job(head: LocalHead, submission_id: str, until: Callable[[], bool] | None = None) -> str:
    """Poll until the job ends (its status) or ``until()`` holds ("RUNNING"; checked twice a second)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status, raw, checked = "UNKNOWN", "", 0.0
    while time.monotonic() < deadline:
        if until is not None and until():
            return "RUNNING"
        if time.monotonic() - checked > 5:
            status, raw = _job_status(head, submission_id)
            checked = time.monotonic()
            if status in TERMINAL:
                return status
        time.sleep(0.5)
    head.ray("job", "stop", "--address", head.address, submission_id, timeout=60)
    logs = head.ray("job", "logs", "--address", head.address, submission_id, timeout=60).stdout
    pytest.fail(f"job {submission_id} is {status} after {JOB_TIMEOUT_S} s ({raw.strip()}); driver output:\n"
                f"{logs[-6000:]}")


@pytest.fixture()
def workdir():
    # Short and outside pytest's deep tmp_path: Ray's Unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="secura-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _job_status(head: LocalHead, submission_id: str) -> tuple[str, str]:
    """(status, detail) from the job API (through a subprocess: the head's token and
    address, not whatever Ray state this test process has); UNKNOWN when it gave none."""
    probe = ("import sys\n"
             "from ray.job_submission import JobSubmissionClient\n"
             "info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])\n"
             "print('STATUS', info.status.value, info.message or '')\n")
    try:
        result = subprocess.run([sys.executable, "-c", probe, head.address, submission_id], env=head.env,
                                cwd=head.workdir, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return "UNKNOWN", "the job API did not answer within 90 s"
    match = re.search(r"^STATUS (\w+) ?(.*)$", result.stdout, re.M)
    if not match:
        return "UNKNOWN", (result.stdout + result.stderr).strip()[-500:]
    return match.group(1), match.group(2)


@pytest.mark.timeout(HEAD_START_TIMEOUT_S + JOB_TIMEOUT_S + 180)
def test_ray_job_submit_secura_run(workdir):
    mlflow = pytest.importorskip("mlflow")
    assert (ROOT / DEMO_CONFIG).is_file(), f"{DEMO_CONFIG} is missing"
    _tool("secura")
    demo = yaml.safe_load((ROOT / DEMO_CONFIG).read_text())
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"  # sqlite:////tmp/... (absolute)
    output_dir = workdir / "out"
    submission_id = f"secura-e2e-{secrets.token_hex(4)}"

    head = LocalHead(workdir)
    try:
        head.start()
        # Token auth is really on: a client without the token is turned away.
        anonymous = subprocess.run([_tool("ray"), "job", "list", "--address", head.address],
                                   env={**{k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"},
                                        "RAY_AUTH_MODE": "disabled"},
                                   capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0, anonymous.stdout

        submitted = head.ray(
            "job", "submit", "--address", head.address, "--working-dir", ".",
            "--submission-id", submission_id, "--no-wait",
            # RAY_ADDRESS: Ray internals that look for "the" local Ray (Train's placement
            # group cleaner) would otherwise find several on a machine running other tests.
            "--runtime-env-json", json.dumps({"env_vars": {**JOB_ENV_VARS, "RAY_ADDRESS": head.gcs_address}}),
            "--", "secura", "run", DEMO_CONFIG, "--tracking-uri", tracking_uri, "--output-dir", str(output_dir),
            *[arg for override in JOB_OVERRIDES for arg in ("--set", override)],
            cwd=ROOT, timeout=180)
        assert submitted.returncode == 0, f"submit failed:\n{submitted.stdout}\n{submitted.stderr}"

        deadline = time.monotonic() + JOB_TIMEOUT_S
        status, raw = "UNKNOWN", ""
        while time.monotonic() < deadline:
            status, raw = _job_status(head, submission_id)
            if status in TERMINAL:
                break
            time.sleep(5)
        if status not in TERMINAL:
            head.ray("job", "stop", "--address", head.address, submission_id, timeout=60)
        logs = head.ray("job", "logs", "--address", head.address, submission_id, timeout=60).stdout
        assert status == "SUCCEEDED", (
            f"job {submission_id} is {status} after {JOB_TIMEOUT_S} s ({raw.strip()})"
            f"; driver output:\n{logs[-6000:]}")
    finally:
        head.stop()

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        runs = mlflow.search_runs(experiment_names=[demo["experiment"]], output_format="list")
    finally:
        mlflow.set_tracking_uri(previous)
    method = demo.get("method", {}).get("name", "secura")
    parent_name = f"{method} lr={demo['train']['lr']:g} seed={demo.get('seed', 0)}"
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == parent_name]
    assert len(parents) == 1, f"one parent run {parent_name!r}; runs: {[r.info.run_name for r in runs]}"
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = [r for r in nested if r.info.run_name.startswith("stage ")]
    assert len(stages) >= 2, f"one nested run per stage; nested: {[r.info.run_name for r in nested]}"
    assert all(r.info.status == "FINISHED" for r in stages), [(r.info.run_name, r.info.status) for r in stages]


# docs/cluster.md section 0: what the upload leaves home, and the one command submitted again after a failure.
CLUSTER_EXCLUDES = [".git", ".venv", "runs", "*.db"]


@pytest.mark.timeout(2 * HEAD_START_TIMEOUT_S + 2 * JOB_TIMEOUT_S + 240)
def test_a_cluster_of_your_own_machines(workdir):
    from mlflow import MlflowClient

    from pipelines.run import JOURNAL, Journal

    _tool("secura")
    output_dir = workdir / "shared" / "demo"  # one path every node sees (here: the same disk)
    head = LocalHead(workdir)
    node = LocalNode(head, "node2", {"second_node": 1})
    # long enough a second stage that the job is stopped in it
    overrides = [*JOB_OVERRIDES, "train.steps_per_task=400", "train.checkpoint_every=100",
                 "scaling.resources_per_worker={CPU: 1, second_node: 1}"]  # the stages run on the second node
    runtime_env = {"excludes": CLUSTER_EXCLUDES, "env_vars": {**JOB_ENV_VARS, "RAY_ADDRESS": head.gcs_address}}

    def submit(submission_id: str) -> None:
        done = head.ray("job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id",
                        submission_id, "--no-wait", "--runtime-env-json", json.dumps(runtime_env), "--",
                        "secura", "run", DEMO_CONFIG, "--resume", "--output-dir", str(output_dir),
                        *[arg for override in overrides for arg in ("--set", override)], cwd=ROOT, timeout=180)
        assert done.returncode == 0, f"submit failed:\n{done.stdout}\n{done.stderr}"

    def first_stage_done() -> bool:
        journal = Journal.load(output_dir / JOURNAL)
        return bool(journal and journal.done(1))

    first, second = (f"secura-cluster-{secrets.token_hex(4)}" for _ in range(2))
    try:
        head.start()
        node.start("second_node")
        submit(first)
        assert _wait_for_job(head, first, until=first_stage_done) == "RUNNING", "the first job ended early"
        head.ray("job", "stop", "--address", head.address, first, timeout=120)
        assert _wait_for_job(head, first) in ("STOPPED", "FAILED")
        submit(second)  # the same command again
        status = _wait_for_job(head, second)
        logs = head.ray("job", "logs", "--address", head.address, second, timeout=60).stdout
        assert status == "SUCCEEDED", logs[-6000:]
    finally:
        node.stop()
        head.stop()

    assert "stage 1 (jobs): done in an earlier attempt, skipped" in logs
    assert f"MLflow: sqlite:///{output_dir}/mlflow.db (UI: secura ui --output-dir {output_dir})" in logs.splitlines()
    assert "View run" not in logs
    client = MlflowClient(f"sqlite:///{output_dir}/mlflow.db")
    experiment = client.get_experiment_by_name(yaml.safe_load((ROOT / DEMO_CONFIG).read_text())["experiment"])
    parents = [run for run in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "one run, continued by --resume"
    assert parents[0].data.tags["secura.attempt"] == "2"
    assert experiment.artifact_location == (output_dir / "mlartifacts" / experiment.name).as_uri()
    # the working-dir copy the job ran in left .git and .venv at home
    packages = [p for p in workdir.glob("*/session_*/runtime_resources/working_dir_files/*")  # head's and node's
                if p.is_dir()]
    assert packages, "the job ran in an uploaded working dir"
    for package in packages:
        assert (package / "pipelines").is_dir() and not (package / ".git").exists() and not (package / ".venv").exists()


def test_k8s_configs_pass_full_validation():
    """The run and sweep configs the RayJobs ship (k8s/run, k8s/sweep) parse as the CLI would parse them."""
    config = pytest.importorskip("pipelines.config")
    run = yaml.safe_load((ROOT / "k8s" / "run" / "run.yaml").read_text())
    config.parse_run_config(run, source="k8s/run/run.yaml")
    with pytest.raises(ValueError):
        config.parse_run_config(dict(run, method={"name": "no-such-method"}), source="a broken copy")
    config.parse_run_config(yaml.safe_load((ROOT / "k8s" / "sweep" / "run.yaml").read_text()),
                            source="k8s/sweep/run.yaml")
    sweep_module = pytest.importorskip("tune.sweep")
    sweep = sweep_module.load_sweep(ROOT / "k8s" / "sweep" / "sweep.yaml")  # its base run.yaml sits beside it
    assert sweep.tracking_uri == "http://mlflow:5000"
