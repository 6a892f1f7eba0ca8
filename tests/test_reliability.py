"""Fault injection on the demo stream (docs/reliability.md): each test reproduces one case in which the
pipeline used to lose work or give a silently wrong result, against an undisturbed run as reference."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors.torch import load_file

from pipelines.config import parse_run_config
from pipelines.run import run_continual

ROOT = Path(__file__).resolve().parents[1]


def _demo_tasks() -> list[str]:
    from pipelines.streams import load_stream

    return [task.name for task in load_stream("demo").tasks]


FIRST, SECOND = _demo_tasks()[:2]


def fault_config(out: Path, **scaling) -> dict:
    """Two stages, long enough that a kill lands mid-stage; a checkpoint every 10 steps."""
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data.update(output_dir=str(out), tasks=[FIRST, SECOND], experiment="faults")
    data["train"].update(steps_per_task=150, log_every=10, checkpoint_every=10, batch_size=8, torch_threads=1)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"].update({"backend": "local", "num_workers": 1, "resources_per_worker": {"CPU": 1}, **scaling})
    return data


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """The undisturbed run (local backend: both backends train the same batches, see test_backends_agree)."""
    out = tmp_path_factory.mktemp("reference")
    return run_continual(parse_run_config(fault_config(out)))


def _adapters(out: Path) -> dict:
    return {p.name: load_file(str(p / "adapter.safetensors")) for p in sorted((out / "stages").iterdir())}


def assert_same_result(out: Path, result, reference) -> None:
    import torch

    assert result.matrix.to_rows() == reference.matrix.to_rows()
    mine, theirs = _adapters(out), _adapters(reference.output_dir)
    assert mine.keys() == theirs.keys()
    for stage in theirs:
        assert all(torch.equal(mine[stage][k], theirs[stage][k]) for k in theirs[stage]), f"{stage} differs"


# Stage 2's loss, every 10 steps, on the stream-wide step (stage 1 had 150): what both stage run and parent hold.
STAGE_2_LOSS_STEPS = list(range(160, 301, 10))


def stage_loss_steps(out: Path, parent_run_id: str, stage: int) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("faults").experiment_id
    run = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                           f"tags.`secura.stage` = '{stage}'")[0]
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))


def parent_loss_steps(out: Path, parent_run_id: str) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(parent_run_id, "loss"))


def _wait_for_checkpoint(out: Path, pattern: str, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(out.glob(f"checkpoints/*/{pattern}"))
        if found:
            return found[-1]
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint {pattern} under {out} within {timeout}s")


def _train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "RayTrainWorker" in text:
            pids.append(process.info["pid"])
    return pids


@pytest.mark.slow
def test_a_killed_ray_train_worker_resumes_mid_stage_to_the_same_result(reference, tmp_path):
    """SIGKILL of the worker right after a stage-2 checkpoint: it used to restart at step 1 and log 7 points."""
    out = tmp_path / "worker-kill"
    config = parse_run_config(fault_config(out, backend="ray_train"))
    killed: list[int] = []

    def killer() -> None:
        _wait_for_checkpoint(out, "stage-02-step-0000[1-9]0")
        for pid in _train_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_continual(config)
    thread.join(5)
    assert killed, "the worker was killed mid-stage"
    assert_same_result(out, result, reference)
    steps = stage_loss_steps(out, result.parent_run_id, 2)
    assert steps == STAGE_2_LOSS_STEPS, "every step logged once, none from a superseded attempt"
    assert parent_loss_steps(out, result.parent_run_id) == list(range(10, 301, 10)), "the stream's loss: one curve"

    again = run_continual(config)  # a new run in the finished run's folder starts afresh
    assert again.parent_run_id != result.parent_run_id
    assert again.matrix.to_rows() == reference.matrix.to_rows()


def signal_driver(out: Path, config_path: Path, pattern: str, signum: int) -> tuple[list[str], str]:
    """Start `secura run`, send ``signum`` once a checkpoint matching ``pattern`` exists; (command, its stderr)."""
    command = [sys.executable, "-m", "pipelines.cli", "run", str(config_path)]
    driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, pattern)
        driver.send_signal(signum)
        _, stderr = driver.communicate(timeout=120)
        if signum == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the dead driver's local Ray and its orphaned workers
    driver.wait(30)
    return command, stderr


def assert_resumes_to_reference(out: Path, command: list[str], reference) -> subprocess.CompletedProcess:
    """`--resume` ends the run with the undisturbed run's matrix and adapters, each loss step logged once."""
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from pipelines.metrics import AccuracyMatrix
    from pipelines.run import JOURNAL, Journal

    journal = Journal.load(out / JOURNAL)
    assert journal.finished
    matrix = AccuracyMatrix.from_csv((out / "accuracy_matrix.csv").read_text())
    assert_same_result(out, type("R", (), {"matrix": matrix})(), reference)
    assert stage_loss_steps(out, journal.parent_run_id, 2) == STAGE_2_LOSS_STEPS
    assert parent_loss_steps(out, journal.parent_run_id) == list(range(10, 301, 10))
    return resumed


def _run_yaml(tmp_path: Path, out: Path, **scaling) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fault_config(out, **scaling)))
    return path


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_same_result(reference, tmp_path):
    """SIGKILL of `secura run` mid-stage, then `--resume`: the row order used to restart at epoch 0."""
    out = tmp_path / "driver-kill"
    command, _ = signal_driver(out, _run_yaml(tmp_path, out), "stage-02-step-0000[2-9]0", signal.SIGKILL)
    assert_resumes_to_reference(out, command, reference)


def flip_bytes(path: Path, count: int = 64) -> None:
    """XOR ``count`` bytes in the middle of ``path``: same size, other content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_rejected_and_the_resume_still_ends_at_the_reference(reference, tmp_path):
    """Driver killed after a stage-2 checkpoint, 64 bytes of its adapter flipped: the resume used the
    corrupted adapter silently (exit 0, loss at step 120 3.88 against 0.18, rows 2 and 3 of the matrix wrong)."""
    out = tmp_path / "corrupt"
    command, _ = signal_driver(out, _run_yaml(tmp_path, out), "stage-02-step-0000[4-9]0", signal.SIGKILL)
    newest = sorted(out.glob("checkpoints/*/stage-02-step-*"))[-1]
    tampered = newest / "adapter.safetensors"
    size = tampered.stat().st_size
    flip_bytes(tampered)
    assert tampered.stat().st_size == size
    resumed = assert_resumes_to_reference(out, command, reference)
    assert f"{tampered}: content differs" in resumed.stderr
    assert f"checkpoint {newest.name} not used; resuming from stage-02-step-" in resumed.stderr


def test_backends_agree_for_the_same_seed(ray_local, tmp_path):
    """One worker on Ray Train and the local loop train the same batches: the same matrix."""

    def config(name: str, backend: str):
        data = fault_config(tmp_path / name, backend=backend)
        data["tasks"] = [FIRST]
        data["train"].update(steps_per_task=6, checkpoint_every=0, log_every=3)
        return parse_run_config(data)

    local = run_continual(config("local", "local"))
    ray = run_continual(config("ray", "ray_train"))
    assert ray.matrix.to_rows() == local.matrix.to_rows()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_an_unreachable_tracking_server_fails_before_ray_starts(tmp_path):
    out = tmp_path / "closed-port"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fault_config(out)))
    started = time.monotonic()
    done = _cli("run", str(path), "--tracking-uri", "http://127.0.0.1:9")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "http://127.0.0.1:9" in lines[-2] and "--offline" in lines[-2]
    assert "Traceback" not in done.stderr
    assert not (out / "shards").exists(), "nothing was prepared"
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("override, field", [
    ("method.adapter.k=999", "method.adapter.k: 999 exceeds"),
    ("method.target_modules=[nonexistent_proj]", "method.target_modules"),
])
def test_a_method_that_cannot_fit_the_model_fails_before_ray_starts(tmp_path, override, field):
    out = tmp_path / "bad-method"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fault_config(out)))
    done = _cli("run", str(path), "--set", override)
    assert done.returncode == 2
    assert field in done.stderr and "Traceback" not in done.stderr
    assert not (out / "shards").exists() and not (out / "mlflow.db").exists()


def test_every_failure_ends_the_parent_run_as_failed_with_its_reason(ray_local, tmp_path, monkeypatch):
    from pipelines.run import Evaluator

    real = Evaluator.score

    def broken(self, state_dir):
        if state_dir is not None:
            raise RuntimeError("evaluation crashed")
        return real(self, state_dir)

    monkeypatch.setattr(Evaluator, "score", broken)
    data = fault_config(tmp_path / "failed")
    data["tasks"] = [FIRST]
    data["train"].update(steps_per_task=2, checkpoint_every=0)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_continual(parse_run_config(data))
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'failed').resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert "evaluation crashed" in parent.data.tags["secura.failure"]
    assert {r.info.status for r in runs} == {"FAILED"}


def _short_run_yaml(tmp_path: Path, out: Path, name: str = "run.yaml") -> Path:
    data = fault_config(out)
    data["tasks"] = [FIRST]
    data["train"].update(steps_per_task=150, checkpoint_every=0)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _second_run_is_refused(out: Path, path: Path) -> None:
    """While one `secura run` holds ``out``, a second one (another --set) fails at once naming folder and holder."""
    from pipelines.folder_lock import HOLDER

    command = [sys.executable, "-m", "pipelines.cli", "run", str(path)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / HOLDER).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _cli("run", str(path), "--set", "train.lr=1e-3")
        assert first.poll() is None, "refused while the first run still trains, before its own Ray start"
        assert second.returncode == 1
        line = [x for x in second.stderr.splitlines() if x.strip()][-2]
        assert f"{out.resolve()} is in use by secura run (pid {first.pid} on" in line, second.stderr
        assert "Traceback" not in second.stderr
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-2000:]
    assert "UNIQUE constraint" not in stderr and "duplicate column" not in stderr
    from pipelines.run import JOURNAL, Journal

    journal = Journal.load(out / JOURNAL)
    assert journal.finished
    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                              f"tags.`mlflow.parentRunId` = '{journal.parent_run_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one stage run, the first run's own"
    parent = client.get_run(journal.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["train.lr"]) == yaml.safe_load(path.read_text())["train"]["lr"], "not 1e-3"


@pytest.mark.slow
def test_a_second_run_on_a_fresh_folder_is_refused_at_once(tmp_path):
    """It used to fail after 10 s with a misleading `duplicate column name: step` (a race creating the store)."""
    out = tmp_path / "fresh"
    _second_run_is_refused(out, _short_run_yaml(tmp_path, out))


@pytest.mark.slow
def test_a_second_run_on_a_used_folder_is_refused_at_once(tmp_path):
    """Both used to exit 0, each recording the other's results, one parent with two stage-2 runs."""
    out = tmp_path / "used"
    path = _short_run_yaml(tmp_path, out)
    assert _cli("run", str(path), timeout=600).returncode == 0
    _second_run_is_refused(out, path)


def parent_run(out: Path):
    from pipelines.run import JOURNAL, Journal

    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    return client.get_run(Journal.load(out / JOURNAL).parent_run_id)


@pytest.mark.slow
def test_sigterm_ends_the_run_like_ctrl_c_and_it_resumes_to_the_reference(reference, tmp_path):
    """What Kubernetes, `timeout` and schedulers send: the driver used to die by SIGABRT (exit 134) with Ray's
    native stack dump and no line of ours. After the resume, the old failure tag stayed on the FINISHED parent."""
    out = tmp_path / "sigterm"
    command, stderr = signal_driver(out, _run_yaml(tmp_path, out), "stage-02-step-0000[3-9]0", signal.SIGTERM)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "secura run: terminated (SIGTERM)", stderr[-2000:]
    assert "Traceback" not in stderr and "SIGABRT" not in stderr and "*** " not in stderr
    assert sorted(out.glob("checkpoints/*/stage-02-step-*")), "the last checkpoint is kept"
    parent = parent_run(out)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["secura.failure"] == "Terminated: terminated (SIGTERM)"

    assert_resumes_to_reference(out, command, reference)
    parent = parent_run(out)
    assert parent.info.status == "FINISHED"
    assert "secura.failure" not in parent.data.tags
    assert parent.data.tags["secura.failure.attempt-1"] == "Terminated: terminated (SIGTERM)"


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of ``request.param`` (e.g. "1500k") mounted on a fresh folder; unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["1200k", "1500k"], indirect=True)
def test_a_full_disk_ends_the_run_failed_naming_the_path(small_disk, tmp_path):
    """Output on a tmpfs that fills up mid-run: the last line was `OSError: [Errno 28] No space left on device`
    without a path, after hundreds of lines of SQLAlchemy tracebacks and "Exception in thread secura-tracking";
    the parent and stage 1 stayed RUNNING."""
    out = small_disk / "out"
    done = _cli("run", str(_run_yaml(tmp_path, out)), timeout=600)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "No space left on device" in lines[-2] and str(small_disk) in lines[-2], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr[-3000:]
    assert len(lines) < 60, "our lines only"

    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)  # room again
    synced = _cli("sync", str(out))
    assert synced.returncode == 0, synced.stderr
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED", synced.stdout
    assert "No space left on device" in parent.data.tags.get("secura.failure", ""), (parent.data.tags, synced.stdout)
    assert "RUNNING" not in {r.info.status for r in runs}


@pytest.mark.parametrize("case, message", [
    ("missing", "source.path: not found: {root}/nowhere"),
    ("malformed", "{data}/train.jsonl:2: malformed JSON"),
    ("not-utf8", "{data}/test.jsonl:2: not UTF-8 text (invalid start byte at byte 41)"),
    ("empty-probe", "task 'p' split 'test': no usable rows in {data}/probe.jsonl"),
])
def test_a_bad_stream_file_fails_before_ray_starts_naming_file_and_line(tmp_path, case, message):
    """They used to come 12–17 s in, after a local Ray had started (config errors: 4–5 s); the non-UTF-8 one
    gave a byte offset, not a line, and printed the path twice."""
    data = tmp_path / "data"
    data.mkdir()
    rows = b'{"text": "a", "label": "yes"}\n{"text": "b", "label": "no"}\n'
    (data / "train.jsonl").write_bytes(rows.replace(b'"b"', b'"b') if case == "malformed" else rows)
    (data / "test.jsonl").write_bytes(rows.replace(b'"b"', b'"b\xff"') if case == "not-utf8" else rows)
    (data / "probe.jsonl").write_bytes(b"" if case == "empty-probe" else rows)
    labels = ["no", "yes"]
    stream = {"name": "small", "tasks": [{"name": "t", "type": "classification", "labels": labels, "max_length": 32,
                                          "source": "nowhere" if case == "missing" else "data"}],
              "probe": [{"name": "p", "type": "classification", "labels": labels, "source": "data/probe.jsonl"}]}
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "stream": "stream.yaml", "model": {"source": "tiny"}, "output_dir": str(out),
        "method": {"name": "lora", "adapter": {"r": 4}}, "scaling": {"backend": "ray_train"}}))
    done = _cli("run", str(tmp_path / "run.yaml"))
    assert done.returncode == 2, done.stderr
    line = [x for x in done.stderr.splitlines() if x.strip()][-2]
    assert message.format(data=data, root=tmp_path) in line, done.stderr
    assert line.count(str(tmp_path)) == 1, "the path once"
    assert "Traceback" not in done.stderr
    assert not (out / "shards").exists() and not (out / "mlflow.db").exists() and not (out / "ray").exists()


def test_a_worker_failure_is_told_by_its_first_failing_workers_exception():
    """The one-line error used to be cut to "WorkerGroupError: Training failed due to worker errors:"."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from pipelines.cli import _describe
    from pipelines.run import worker_failure

    traceback_text = "Traceback (most recent call last):\n  File ...\nRuntimeError: CUDA error: out of memory"
    failures = {1: RuntimeError("NCCL timeout"),
                0: UserExceptionWithTraceback(MemoryError("cannot allocate 2 GiB"), traceback_text)}
    error = WorkerGroupError("[Rank 0] ...\n[Rank 1] ...", failures)
    assert _describe(worker_failure(error)) == "StageFailed: worker 0 failed: MemoryError: cannot allocate 2 GiB"
    plain = RuntimeError("not a worker group")
    assert worker_failure(plain) is plain
