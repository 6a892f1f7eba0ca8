"""Replay a fault case of docs/reliability.md against an undisturbed run of the demo stream.

The audit method, as a script: one reference run, then each named fault case
in a fresh folder (the fault injected into `secura run`, then `secura run
--resume`), compared with the reference cell by cell (accuracy matrix) and
tensor by tensor (every stage's adapter), with the stage-2 loss at step 120,
the parent run's status and tags, and what the console said.

    .venv/bin/python benchmarks/fault_replay.py corrupt-checkpoint sigterm
    .venv/bin/python benchmarks/fault_replay.py sigterm --code /path/to/an/older/checkout   # "before"

Cases: ``driver-kill`` (SIGKILL of the driver after a stage-2 checkpoint),
``corrupt-checkpoint`` (the same, then 64 bytes XOR'ed in the middle of the
newest checkpoint's adapter, same size), ``sigterm`` (SIGTERM to the driver
after a stage-2 checkpoint). Results go to ``--out`` as JSON and a Markdown
table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CASES = ("driver-kill", "corrupt-checkpoint", "sigterm")
WAIT_FOR = "stage-02-step-0000[4-9]0"  # a stage-2 checkpoint with an earlier one beside it


def run_config(out: Path, code: Path) -> dict:
    """The audit's run: the demo stream's first two tasks, 150 steps each, a checkpoint every 10, local backend."""
    data = yaml.safe_load((code / "configs" / "demo.yaml").read_text())
    from pipelines.streams import load_stream

    first, second = [task.name for task in load_stream("demo").tasks][:2]
    data.update(output_dir=str(out), tasks=[first, second], experiment="faults")
    data["train"].update(steps_per_task=150, log_every=10, checkpoint_every=10, batch_size=8, torch_threads=1)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"].update(backend="local", num_workers=1, resources_per_worker={"CPU": 1})
    return data


class Secura:
    """`secura run` of one checkout (``code``) on one config file."""

    def __init__(self, code: Path, config: Path) -> None:
        self.code, self.config = code, config
        self.env = {**os.environ, "PYTHONPATH": str(code)}

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pipelines.cli", "run", str(self.config), *extra]

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*extra), cwd=self.code, env=self.env, capture_output=True, text=True,
                              timeout=1800)

    def signal_after_checkpoint(self, out: Path, signum: int) -> tuple[int, str]:
        """Start the run, send ``signum`` once a stage-2 checkpoint is written; (exit status, stderr)."""
        driver = subprocess.Popen(self.command(), cwd=self.code, env=self.env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 900
            while not sorted(out.glob(f"checkpoints/*/{WAIT_FOR}")):
                if time.monotonic() > deadline or driver.poll() is not None:
                    raise RuntimeError(f"no stage-2 checkpoint under {out}")
                time.sleep(0.05)
            driver.send_signal(signum)
            _, stderr = driver.communicate(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)  # the driver's local Ray and any orphaned worker
        return driver.wait(30), stderr


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def matrix(out: Path) -> list[list[str]]:
    path = out / "accuracy_matrix.csv"
    return [line.split(",") for line in path.read_text().splitlines()] if path.exists() else []


def adapters(out: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    folder = out / "stages"
    return {p.name: load_file(str(p / "adapter.safetensors")) for p in sorted(folder.iterdir())} if folder.exists() else {}


def tracking(out: Path) -> dict:
    """The parent's status and secura tags, and stage 2's loss at step 120, from the run's SQLite store."""
    import mlflow

    journal = json.loads((out / "journal.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    parent = client.get_run(journal["parent_run_id"])
    stages = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                              "and tags.`secura.stage` = '2'")
    loss = {m.step: m.value for m in client.get_metric_history(stages[0].info.run_id, "loss")} if stages else {}
    return {"status": parent.info.status, "loss_120": loss.get(120), "loss_steps": sorted(loss),
            "tags": {k: v for k, v in parent.data.tags.items() if k.startswith("secura.failure")}}


def compare(out: Path, reference: Path) -> dict:
    """Cell by cell and tensor by tensor against the reference."""
    import torch

    mine, theirs = matrix(out), matrix(reference)
    cells = [(r, c) for r, row in enumerate(theirs) for c, _ in enumerate(row) if r and c]
    differing = [f"{theirs[r][0]}/{theirs[0][c]}: {mine[r][c] if r < len(mine) and c < len(mine[r]) else '-'} vs "
                 f"{theirs[r][c]}" for r, c in cells
                 if not (r < len(mine) and c < len(mine[r]) and mine[r][c] == theirs[r][c])]
    a, b = adapters(out), adapters(reference)
    tensors = [(stage, key) for stage in b for key in b[stage]]
    unequal = [f"{stage}:{key}" for stage, key in tensors
               if stage not in a or key not in a[stage] or not torch.equal(a[stage][key], b[stage][key])]
    return {"cells": len(cells), "cells_differing": differing, "tensors": len(tensors), "tensors_differing": unequal}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def replay(case: str, secura: Secura, out: Path) -> dict:
    """Inject ``case``, then resume; what each step printed and returned."""
    record: dict = {"case": case}
    signum = signal.SIGTERM if case == "sigterm" else signal.SIGKILL
    record["fault_exit"], stderr = secura.signal_after_checkpoint(out, signum)
    record["fault_last_line"] = last_line(stderr)
    record["fault_tracebacks"] = stderr.count("Traceback") + stderr.count("*** SIG")
    if case == "sigterm":
        record["after_fault"] = tracking(out)
    if case == "corrupt-checkpoint":
        tampered = sorted(out.glob("checkpoints/*/stage-02-step-*"))[-1] / "adapter.safetensors"
        flip_bytes(tampered)
        record["tampered"] = str(tampered.relative_to(out))
    resumed = secura.run("--resume")
    record["resume_exit"] = resumed.returncode
    record["resume_warnings"] = [line for line in resumed.stderr.splitlines() if "Warning" in line]
    return record


def table(records: list[dict]) -> str:
    rows = ["| case | fault: exit, last line | resume exit, warnings | parent after resume | stage-2 loss @120 "
            "| matrix cells equal | adapter tensors equal |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["case"] == "reference":
            continue
        t, c = r["tracking"], r["comparison"]
        warned = "; ".join(w.split(": ", 1)[-1][:160] for w in r["resume_warnings"]) or "none"
        tags = ", ".join(f"{k}={v}" for k, v in t["tags"].items()) or "no failure tag"
        rows.append(f"| {r['case']} | {r['fault_exit']}, `{r['fault_last_line'][:80]}` | {r['resume_exit']}, {warned} "
                    f"| {t['status']}, {tags} | {t['loss_120']:.4f} (reference {r['reference_loss_120']:.4f}) "
                    f"| {c['cells'] - len(c['cells_differing'])}/{c['cells']} "
                    f"| {c['tensors'] - len(c['tensors_differing'])}/{c['tensors']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=CASES)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temp folder)")
    parser.add_argument("--reference", type=Path, help="an undisturbed run's folder to reuse")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "fault_replay.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.code))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault-replay-"))
    work.mkdir(parents=True, exist_ok=True)

    def prepared(name: str) -> tuple[Secura, Path]:
        out = work / name
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(run_config(out, args.code)))
        return Secura(args.code.resolve(), config), out

    reference = args.reference
    if reference is None:
        secura, reference = prepared("reference")
        done = secura.run()
        if done.returncode != 0:
            raise SystemExit(f"the reference run failed:\n{done.stderr[-2000:]}")
    reference_loss = tracking(reference)["loss_120"]
    records = []
    for case in args.cases:
        secura, out = prepared(case)
        started = time.time()
        record = replay(case, secura, out)
        record |= {"seconds": round(time.time() - started, 1), "tracking": tracking(out),
                   "comparison": compare(out, reference), "reference_loss_120": reference_loss}
        records.append(record)
        print(f"{case}: {json.dumps(record['comparison'])}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"code": str(args.code), "reference": str(reference), "records": records},
                                   indent=2))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
