"""What Ray Train costs on a continual stream: the same demo run on both backends, and a plain PyTorch loop.

    .venv/bin/python benchmarks/train_overhead.py [--config configs/demo.yaml] [--repeats 2]

Three measurements of the same stages (model, method, seed, batches):

* ``ray_train`` and ``local``: `run_continual` end to end (shards cached,
  base-model scores cached after the first run), so the ratio is what a user
  waits for, evaluation included; target ray_train ≤ 1.15 × local;
* ``plain loop``: model, AdamW and the same micro-batches in a bare loop (no
  checkpoints, no reports, no evaluation), per step and per stage: the floor
  for both backends.

Runs alternate between the backends (ray, local, ray, local, ...) and the
medians are reported, so a machine that gets busier part-way hurts both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stream_wall(data: dict, out: Path, backend: str) -> float:
    from pipelines.config import parse_run_config
    from pipelines.run import run_continual

    data = {**data, "output_dir": str(out), "scaling": {**data["scaling"], "backend": backend}}
    started = time.perf_counter()
    run_continual(parse_run_config(data))
    return time.perf_counter() - started


def plain_loop(data: dict, shards_root: Path) -> tuple[float, float, int]:
    """Seconds per stage and per step of a bare loop over the same stages."""
    import torch

    from pipelines.config import parse_run_config
    from pipelines.models import load_model
    from pipelines.preprocess import prepare_stream
    from pipelines.run import select_tasks
    from pipelines.streams import load_stream
    from pipelines.train import micro_batches, read_train_columns, shuffle_seed, steps_for_stage, trim_padding
    from secura.methods import build_method

    run = parse_run_config(data)
    torch.set_num_threads(run.train.torch_threads or 1)
    stream = load_stream(run.stream)
    manifest = prepare_stream(stream, run.model_config_obj(), str(shards_root), progress=False)
    stage_times, steps = [], 0
    for index, task in enumerate(select_tasks(stream, run.tasks), start=1):
        split = manifest.task(task.name).split("train")
        total = steps_for_stage(run.train.model_dump(), split.rows, 1)
        started = time.perf_counter()
        model = build_method(run.method_config_obj()).wrap(load_model(run.model_config_obj(), seed=run.seed))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.train.lr)
        columns = read_train_columns(split.path)
        batches = micro_batches(columns, run.train.batch_size, lambda e: shuffle_seed(run.seed, index, e),
                                torch.device("cpu"), total)
        for batch in batches:
            model(**trim_padding(batch)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stage_times.append(time.perf_counter() - started)
        steps += total
    return statistics.fmean(stage_times), sum(stage_times) / steps, len(stage_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from pipelines.run import init_ray

    data = yaml.safe_load(Path(args.config).read_text())
    data.pop("output_dir", None)
    init_ray()
    walls: dict[str, list[float]] = {"ray_train": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        shared = {**data, "storage_path": str(Path(tmp) / "store")}  # shards and base scores built once
        stream_wall(shared, Path(tmp) / "warm-up", "local")
        for repeat in range(args.repeats):
            for backend in ("ray_train", "local"):
                walls[backend].append(stream_wall(shared, Path(tmp) / f"{backend}-{repeat}", backend))
                print(f"  {backend} run {repeat + 1}: {walls[backend][-1]:.1f} s", flush=True)
        per_stage, per_step, stages = plain_loop(shared, Path(tmp) / "store")

    ray_s, local_s = statistics.median(walls["ray_train"]), statistics.median(walls["local"])
    print(f"\n{Path(args.config).name}: {stages} stages, medians of {args.repeats} runs per backend\n")
    print("| path | wall per stream (s) | per stage (s) | ratio to local |")
    print("|---|---|---|---|")
    print(f"| Ray Train (one worker group) | {ray_s:.1f} | {ray_s / stages:.1f} | {ray_s / local_s:.2f} |")
    print(f"| local (same loop, in process) | {local_s:.1f} | {local_s / stages:.1f} | 1.00 |")
    print(f"| plain PyTorch loop (training only) | {per_stage * stages:.1f} | {per_stage:.2f} "
          f"({per_step * 1000:.1f} ms/step) | {per_stage * stages / local_s:.2f} |")
    verdict = "met" if ray_s <= 1.15 * local_s else "missed"
    print(f"\ntarget Ray Train ≤ 1.15 × local: {verdict} ({ray_s / local_s:.2f})")


if __name__ == "__main__":
    main()
