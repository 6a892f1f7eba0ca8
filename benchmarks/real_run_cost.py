"""What one calibrated real-model run costs, by part: today's fp32 path against the new default.

    PYTHONPATH=. .venv/bin/python benchmarks/real_run_cost.py                 # every part, then the table
    PYTHONPATH=. .venv/bin/python benchmarks/real_run_cost.py --parts new fp32 --fp32-stages 1
    PYTHONPATH=. .venv/bin/python benchmarks/real_run_cost.py --report         # the table from saved parts

The run is `configs/calibrate-smollm2.yaml`'s LoRA on q/v (SmolLM2-135M-Instruct, agnews → sst2 → qqp,
125 steps × 8 a task, 100 test items a task, the 80-item probe scored by log-likelihood and by greedy
generation after every stage), one seed, `run_continual` end to end in a fresh child process each,
every variant on its own fresh storage (shards, base-model scores, MLflow store):

* ``new``: this tree with the config as it is (``train.precision: auto``, length-grouped batches, the
  LM head on label positions, generation that stops at the answer's end);
* ``fp32``: today's path: the code of ``--baseline-ref`` (default: the commit this work started from),
  extracted with `git archive`, with ``train.precision: fp32``. ``--fp32-stages N`` stops it after
  stage N (the fp32 run alone is ~35 min on 2 cores); the ratio is then over the same first N stages
  and the table says so;
* ``ray``: ``new`` with ``scaling.backend: ray_train`` (target ≤ 1.05 × ``new``, end to end);
* ``trainer``: what a user would otherwise write: `transformers.Trainer` + peft LoRA (r 8, α 16, q/v)
  on the same agnews rows, batch, learning rate and precision, against this tree's trainer on one
  stage of the same rows; tokens/s of real (non-padding) tokens (target: ours ≥ 1.0 ×).

* ``steps``: the same comparison on a sample, both paths in one process, interleaved, so a shared
  machine's load falls on both alike: ``--sample-steps`` training steps of each task (today's: fp32,
  `transformers`' loss on every position, batches in plain shuffled order; new: the run's precision,
  the LM head on label positions, length-grouped batches), and ``--sample-items`` items of each
  evaluation (today's `pipelines/evaluate.py` of ``--baseline-ref`` against this tree's). It projects
  the run's compute from the counts (375 steps; after each of the 4 evaluations 300 task items and the
  80-item probe, by log-likelihood and by generation) and says that it is a projection.

Parts are timed inside the child by wrapping the functions that do them (exclusive time: a timed
call inside another counts only for the inner part): model load, data preparation (Ray Data),
Ray start-up, training (real tokens/s), each evaluation (log-likelihood of the task sets and of the
probe, generation of each), tracking (MLflow calls and the run report), and the rest.
Each part's result is saved to ``--out`` as JSON as soon as it ends.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "calibrate-smollm2.yaml"
LABEL = "lora-qv"
BASELINE_REF = "392106d"  # main before issue 25: fp32, LM head on every position, no length groups
PARTS = ("new", "fp32", "ray", "trainer", "steps")
SHARDS = Path(tempfile.gettempdir()) / "real-run-cost-shards"  # the steps and trainer parts' (cached) shards


# --- timing inside a child ----------------------------------------------------------------------


class Parts:
    """Exclusive wall time per part: a timed call's time minus that of the timed calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []

    @contextmanager
    def timed(self, part: str):
        self._stack.append([0.0])
        started = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - started
            inner = self._stack.pop()[0]
            self.seconds[part] += total - inner
            self.calls[part] += 1
            if self._stack:
                self._stack[-1][0] += total

    def wrap(self, owner: Any, name: str, part: str | Callable[..., str]) -> None:
        original = getattr(owner, name)

        def timed_call(*args, **kwargs):
            with self.timed(part(*args, **kwargs) if callable(part) else part):
                return original(*args, **kwargs)

        setattr(owner, name, timed_call)


def instrument(parts: Parts, tokens: dict[str, int], scores: list[dict]) -> None:
    """Wrap the functions of a run's parts; the same names exist in today's code and in this tree's."""
    import pipelines.evaluate as evaluate
    import pipelines.models as models
    import pipelines.preprocess as preprocess
    import pipelines.run as run
    import pipelines.run_report as run_report
    import pipelines.tracking as tracking
    import pipelines.train as train

    parts.wrap(models, "load_model", "model load")
    parts.wrap(preprocess, "prepare_stream", "data preparation (Ray Data)")
    parts.wrap(run, "init_ray", "Ray start-up")
    parts.wrap(train, "run_stage", "training")
    for name in ("log_run_start", "log_base_scores", "log_stage", "log_run_end"):
        parts.wrap(run_report, name, "tracking")
    for name in ("start_parent", "start_stage", "end_stage", "end_parent", "close", "flush", "__exit__"):
        parts.wrap(tracking.Tracker, name, "tracking")

    names: dict[int, tuple[str, str]] = {}  # id(rows) -> (set name, task type) of the evaluation running
    original_tasks = evaluate.evaluate_tasks

    def evaluate_tasks(model, tokenizer, eval_sets, **kwargs):
        names.update({id(rows): (name, kind) for name, (kind, rows) in eval_sets.items()})
        result = original_tasks(model, tokenizer, eval_sets, **kwargs)
        scores.append(result)
        return result

    evaluate.evaluate_tasks = evaluate_tasks

    def kind_of(rows) -> str:
        return "probe" if names.get(id(rows), ("", ""))[1] == "multiple_choice" else "task sets"

    parts.wrap(evaluate, "score_choices", lambda model, rows, **kw: f"eval log-likelihood, {kind_of(rows)}")
    parts.wrap(evaluate, "generate_answers", lambda model, tok, rows, **kw: f"eval generation, {kind_of(rows)}")

    original_trim = train.trim_padding

    def trim_padding(batch):
        trimmed = original_trim(batch)
        tokens["real"] += int(trimmed["attention_mask"].sum())
        tokens["padded"] += int(trimmed["attention_mask"].numel())
        return trimmed

    train.trim_padding = trim_padding


class StopAfter(Exception):
    """Raised after the last stage a partial run measures."""


def calibration_config(out: Path, precision: str | None, backend: str):
    """The calibration's LoRA q/v run (seed 0) as a RunConfig with its own storage and MLflow store."""
    from pipelines.compare import parse_compare
    from pipelines.files import read_yaml

    data = read_yaml(CONFIG, "compare config")
    data["overrides"]["scaling.backend"] = backend
    if precision is not None:
        data["overrides"]["train.precision"] = precision
    comparison = parse_compare(data, source=str(CONFIG), base_dir=CONFIG.parent, output_dir=str(out))
    plan = next(p for p in comparison.plans if p.label == LABEL)
    return plan.config, comparison.config_dir


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    """One calibrated run, timed by part (in a fresh process, so the model load is a cold one)."""
    from pipelines.run import run_continual

    parts, tokens, scores = Parts(), defaultdict(int), []
    instrument(parts, tokens, scores)
    out = Path(tempfile.mkdtemp(prefix=f"real-run-{args.child}-"))
    config, config_dir = calibration_config(out, args.precision, args.backend)
    stage_ends: list[float] = []

    def on_stage_end(stage: int, summary: dict) -> None:
        stage_ends.append(time.perf_counter() - STARTED)
        if args.stages and stage >= args.stages:
            raise StopAfter

    result = None
    try:
        result = run_continual(config, on_stage_end=on_stage_end, config_dir=config_dir)
    except StopAfter:
        pass
    wall = time.perf_counter() - STARTED
    seconds = dict(parts.seconds)
    seconds["other (imports, driver, checkpoints)"] = wall - sum(seconds.values())
    record = {"part": args.child, "wall_s": wall, "stage_end_s": stage_ends, "stages": len(stage_ends),
              "parts_s": seconds, "tokens": dict(tokens), "scores": scores, "code": os.environ.get("PYTHONPATH", ""),
              "precision": config.train.precision, "backend": config.scaling.backend}
    if result is not None:
        record["summary"] = result.summary
    return record


def child_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """This tree's trainer and a plain `transformers.Trainer` + peft loop on the same agnews rows."""
    import torch

    from pipelines.models import load_tokenizer
    from pipelines.precision import resolve_precision
    from pipelines.preprocess import prepare_stream
    from pipelines.train import BaseModels, LocalContext, StageSpec, read_train_columns, train_stream

    out = Path(tempfile.mkdtemp(prefix="real-run-trainer-"))
    config, config_dir = calibration_config(out, None, "local")
    data = config.to_dict()
    data["train"].update(steps_per_task=args.trainer_steps, log_every=args.trainer_steps)
    config = type(config).model_validate(data)
    stream = config.load_stream(config_dir)
    manifest = prepare_stream(stream, config.model_config_obj(), str(args.shards), progress=False)
    split = manifest.task("agnews").split("train")
    columns = read_train_columns(split.path)
    precision = resolve_precision(config.train.precision, "cpu")
    threads = config.train.torch_threads or int(config.scaling.resources_per_worker.get("CPU", 1))
    BaseModels.fresh(config)  # both loops start from a loaded model

    parts, tokens = Parts(), defaultdict(int)
    instrument(parts, tokens, [])
    spec = StageSpec(index=1, task="agnews", train_path=split.path, train_rows=split.rows)
    plan = {"run": config.to_dict(), "stages": [spec.__dict__], "checkpoint_root": str(out / "checkpoints")}
    started = time.perf_counter()
    list(train_stream(plan, LocalContext()))
    ours_s, ours_tokens = time.perf_counter() - started, tokens["real"]

    model, tokenizer = BaseModels.fresh(config), load_tokenizer(config.model_config_obj())
    trainer_s, trainer_tokens = plain_trainer(model, tokenizer, columns, config, precision, threads,
                                              args.trainer_steps, out / "hf")
    return {"part": "trainer", "steps": args.trainer_steps, "batch_size": config.train.batch_size,
            "precision": precision, "ours_s": ours_s, "ours_tokens": ours_tokens, "trainer_s": trainer_s,
            "trainer_tokens": trainer_tokens, "ours_tokens_per_s": ours_tokens / ours_s,
            "trainer_tokens_per_s": trainer_tokens / trainer_s, "threads": threads,
            "torch": torch.__version__}


def load_baseline_module(tree: Path, name: str):
    """One module of today's code, imported from its file under another name beside this tree's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"baseline_{name}", tree / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Both paths' unit costs in one process, interleaved: training steps per task, evaluation items."""
    import copy

    import torch

    from pipelines import evaluate
    from pipelines.models import load_tokenizer
    from pipelines.precision import autocast, resolve_precision
    from pipelines.preprocess import prepare_stream
    from pipelines.run import load_eval_sets
    from pipelines.train import (BaseModels, causal_lm_loss, micro_batches, read_train_columns, shuffle_seed,
                                 trim_padding)
    from secura.methods import build_method

    tree = baseline_tree(args.baseline_ref)
    old_eval = load_baseline_module(tree, "evaluate")
    config, config_dir = calibration_config(Path(tempfile.mkdtemp(prefix="real-run-steps-")), None, "local")
    threads = config.train.torch_threads or int(config.scaling.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(threads)
    precision = resolve_precision(config.train.precision, "cpu")
    stream = config.load_stream(config_dir)
    manifest = prepare_stream(stream, config.model_config_obj(), str(args.shards), progress=False)
    eval_sets = load_eval_sets(config, stream, manifest)
    tokenizer = load_tokenizer(config.model_config_obj())
    started = time.perf_counter()
    base = BaseModels.fresh(config)
    load_s = time.perf_counter() - started
    method = build_method(config.method_config_obj())
    models = {"fp32": method.wrap(base), "new": None}
    models["new"] = copy.deepcopy(models["fp32"])
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=config.train.lr)
                  for k, m in models.items()}

    def step(path: str, batch: dict) -> tuple[float, float]:
        """Wall and CPU seconds of one optimiser step (CPU time: what a shared machine's load does not stretch)."""
        model, optimizer = models[path], optimizers[path]
        model.train()
        begun, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        if path == "fp32":  # today's loop body: autocast off, the model's own loss on every position
            loss = model(**batch).loss
        else:
            with autocast(precision, "cpu"):
                loss = causal_lm_loss(model, model, batch)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.train.max_grad_norm)
        optimizer.step()
        return time.perf_counter() - begun, time.process_time() - cpu

    train: dict[str, dict[str, list[float]]] = {}
    for index, task in enumerate(config.tasks, start=1):
        columns = read_train_columns(manifest.task(task).split("train").path)
        order = lambda e, index=index: shuffle_seed(config.seed, index, e)  # noqa: E731
        batches = {"fp32": [trim_padding(b) for b in micro_batches(columns, config.train.batch_size, order,
                                                                     torch.device("cpu"), args.sample_steps)],
                   "new": [trim_padding(b) for b in micro_batches(columns, config.train.batch_size, order,
                                                                    torch.device("cpu"), args.sample_steps,
                                                                    group=config.train.length_groups)]}
        train[task] = {key: [] for key in ("fp32", "new", "fp32_cpu", "new_cpu", "fp32_tokens", "new_tokens")}
        for i in range(args.sample_steps):
            for path in ("fp32", "new") if i % 2 == 0 else ("new", "fp32"):
                wall, cpu = step(path, batches[path][i])
                train[task][path].append(wall)
                train[task][f"{path}_cpu"].append(cpu)
                train[task][f"{path}_tokens"].append(int(batches[path][i]["attention_mask"].sum()))
        print(f"[steps] {task}: {train[task]}", flush=True)

    model = models["new"]
    set_items: dict[str, int] = defaultdict(int)
    for kind, rows in eval_sets.values():
        set_items["probe" if kind == "multiple_choice" else "task sets"] += len(rows)
    evals: dict[str, dict[str, float]] = {}
    for name, (kind, rows) in eval_sets.items():
        rows = rows[: args.sample_items]
        group = "probe" if kind == "multiple_choice" else "task sets"
        runs = {
            f"log-likelihood, {group}|fp32": lambda: old_eval.choice_loglikelihoods(
                model, rows, batch_size=config.eval.batch_size),
            f"log-likelihood, {group}|new": lambda: evaluate.choice_loglikelihoods(
                model, rows, batch_size=config.eval.batch_size, precision=config.train.precision),
            f"generation, {group}|fp32": lambda: old_eval.generate_answers(
                model, tokenizer, rows, max_new_tokens=config.eval.generative_max_new_tokens,
                batch_size=config.eval.batch_size),
            f"generation, {group}|new": lambda: evaluate.generate_answers(
                model, tokenizer, rows, max_new_tokens=config.eval.generative_max_new_tokens,
                batch_size=config.eval.batch_size),
        }
        for key, run in runs.items():
            begun, cpu = time.perf_counter(), time.process_time()
            run()
            evals.setdefault(key, {"seconds": 0.0, "cpu_seconds": 0.0, "items": 0})
            evals[key]["seconds"] += time.perf_counter() - begun
            evals[key]["cpu_seconds"] += time.process_time() - cpu
            evals[key]["items"] += len(rows)
        print(f"[steps] {name}: {evals}", flush=True)
    return {"part": "steps", "precision": precision, "threads": threads, "sample_steps": args.sample_steps,
            "sample_items": args.sample_items, "set_items": dict(set_items), "model_load_s": load_s, "train": train, "eval": evals,
            "steps_per_task": config.train.steps_per_task, "test_items": config.eval.test_limit,
            "stages": len(config.tasks), "baseline_ref": args.baseline_ref}


def plain_trainer(model, tokenizer, columns, config, precision: str, threads: int, steps: int,
                  out: Path) -> tuple[float, int]:
    """`transformers.Trainer` + peft LoRA as its documentation shows it: rows without their padding,
    a collator that pads each batch, the model's own loss; seconds of `train()` and real tokens seen."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.set_num_threads(threads)
    model.hf_quantizer, model.is_quantized = None, False  # a dequantised GGUF: fp32 weights, trainable as any
    lengths = columns["attention_mask"].sum(dim=1).tolist()
    rows = {name: [row[:n].tolist() for row, n in zip(columns[name], lengths)]
            for name in ("input_ids", "attention_mask", "labels")}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen = [0]

    def counting(features):
        batch = collate(features)
        seen[0] += int(batch["attention_mask"].sum())
        return batch

    arguments = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=config.train.batch_size,
        learning_rate=config.train.lr, weight_decay=config.train.weight_decay, max_grad_norm=config.train.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, bf16=precision == "bf16", use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=config.seed,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=Dataset.from_dict(rows), data_collator=counting)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, seen[0]


# --- the parent: children, results, the table -----------------------------------------------------


def baseline_tree(ref: str) -> Path:
    """The code of ``ref`` in a temp folder (`git archive`): today's path, run as it is."""
    folder = Path(tempfile.mkdtemp(prefix="real-run-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "pipelines", "secura", "tune"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_child(part: str, args: argparse.Namespace) -> dict[str, Any]:
    code = str(baseline_tree(args.baseline_ref)) if part == "fp32" else str(ROOT)
    command = [sys.executable, "-W", "ignore", __file__, "--child", part]
    if part == "fp32":
        command += ["--precision", "fp32", "--stages", str(args.fp32_stages or 0)]
    if part == "ray":
        command += ["--backend", "ray_train", "--stages", str(args.ray_stages or 0)]
    if part == "trainer":
        command += ["--trainer-steps", str(args.trainer_steps), "--shards", str(args.shards)]
    if part == "steps":
        command += ["--sample-steps", str(args.sample_steps), "--sample-items", str(args.sample_items),
                    "--shards", str(args.shards), "--baseline-ref", args.baseline_ref]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as result:
        command += ["--result", result.name]
    env = {**os.environ, "PYTHONPATH": code}
    print(f"[real_run_cost] {part}: running ({'code of ' + args.baseline_ref if part == 'fp32' else 'this tree'})",
          flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    record = json.loads(Path(result.name).read_text())
    record["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record["load_avg"] = os.getloadavg()
    if part == "fp32":
        record["baseline_ref"] = args.baseline_ref
    return record


def machine() -> str:
    from pipelines.precision import cpu_supports_bf16

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{name}, {os.cpu_count()} CPUs, native bf16: {cpu_supports_bf16()}"


def _fmt(seconds: float) -> str:
    return f"{seconds:7.1f}"


def _matrix(record: dict) -> list[str]:
    """The accuracy matrix (log-likelihood / generative) of a run, one line per stage."""
    lines = []
    for stage, scores in enumerate(record.get("scores", [])):
        cells = [f"{name} {v['score']:.3f}" + (f"/{v['generative_accuracy']:.3f}" if "generative_accuracy" in v else "")
                 for name, v in scores.items()]
        lines.append(f"    stage {stage}: " + ", ".join(cells))
    return lines


def steps_report(r: dict) -> list[str]:
    """The sampled unit costs of both paths and the run's compute projected from them."""
    lines = [f"## sampled, both paths interleaved in one process ({r['precision']}, {r['threads']} threads, "
             f"{r.get('date', '')}, load {r.get('load_avg', '')}); today's path = code of {r['baseline_ref']}",
             f"{'part':36}{'today (fp32)':>14}{'new':>10}{'ratio':>8}{'CPU-time ratio':>16}"]
    projected = {"fp32": r["model_load_s"], "new": r["model_load_s"]}
    for task, t in r["train"].items():
        mean = {p: sum(t[p]) / len(t[p]) for p in ("fp32", "new")}
        cpu = {p: sum(t.get(f"{p}_cpu", [math.nan])) for p in ("fp32", "new")}
        rate = {p: sum(t[f"{p}_tokens"]) / sum(t[p]) for p in ("fp32", "new")}
        lines.append(f"{'train step, ' + task + ' (s)':36}{mean['fp32']:14.2f}{mean['new']:10.2f}"
                     f"{mean['fp32'] / mean['new']:7.2f}×{cpu['fp32'] / cpu['new']:15.2f}×")
        lines.append(f"{'  real tokens/s':36}{rate['fp32']:14.1f}{rate['new']:10.1f}{rate['new'] / rate['fp32']:7.2f}×")
        for p in projected:
            projected[p] += mean[p] * r["steps_per_task"]
    evaluations = r["stages"] + 1
    for key in sorted({k.split("|")[0] for k in r["eval"]}):
        per = {p: r["eval"][f"{key}|{p}"]["seconds"] / r["eval"][f"{key}|{p}"]["items"] for p in ("fp32", "new")}
        cpu = {p: r["eval"][f"{key}|{p}"].get("cpu_seconds", math.nan) for p in ("fp32", "new")}
        lines.append(f"{'eval ' + key + ' (s/item)':36}{per['fp32']:14.3f}{per['new']:10.3f}{per['fp32'] / per['new']:7.2f}×"
                     f"{cpu['fp32'] / cpu['new']:15.2f}×")
        group = key.split(", ")[1]
        for p in projected:
            projected[p] += per[p] * r["set_items"][group] * evaluations
    lines.append(f"{'projected run compute (s)':36}{projected['fp32']:14.0f}{projected['new']:10.0f}"
                 f"{projected['fp32'] / projected['new']:7.2f}×")
    lines.append(f"  projection: model load + {r['stages']} × {r['steps_per_task']} steps + {evaluations} evaluations of "
                 f"{r['set_items']} items from {r['sample_steps']} steps a task and {r['sample_items']} items a set; "
                 "data preparation, Ray start-up and tracking are the same code on both paths and not included")
    return lines


def report(results: dict[str, dict]) -> str:
    lines = [f"# real_run_cost — {machine()}"]
    new, fp32 = results.get("new"), results.get("fp32")
    runs = [(name, results[name]) for name in ("fp32", "new", "ray") if name in results]
    if runs:
        every = sorted({p for _, r in runs for p in r["parts_s"]}, key=lambda p: (p.startswith("other"), p))
        lines.append(f"{'part (s)':44}" + "".join(f"{name:>10}" for name, _ in runs))
        for part in every:
            lines.append(f"{part:44}" + "".join(f"{r['parts_s'].get(part, 0.0):10.1f}" for _, r in runs))
        lines.append(f"{'end to end':44}" + "".join(f"{r['wall_s']:10.1f}" for _, r in runs))
        lines.append(f"{'stages run':44}" + "".join(f"{r['stages']:10d}" for _, r in runs))
        lines.append(f"{'training tokens/s (real tokens)':44}" + "".join(
            f"{r['tokens']['real'] / max(r['parts_s'].get('training', 0), 1e-9):10.1f}" if r["backend"] == "local"
            else f"{'(worker)':>10}" for _, r in runs))
        lines.append(f"{'padding share of trained tokens':44}" + "".join(
            f"{1 - r['tokens']['real'] / r['tokens']['padded']:10.3f}" if r["tokens"].get("padded") else f"{'-':>10}"
            for _, r in runs))
        for name, r in runs:
            lines.append(f"  {name}: {r.get('date', '')}, load {r.get('load_avg', '')}, precision {r['precision']}, "
                         f"backend {r['backend']}" + (f", code of {r['baseline_ref']}" if "baseline_ref" in r else ""))
    if new and fp32:
        n = fp32["stages"]
        if n == new["stages"]:
            lines.append(f"fp32 ÷ new, end to end: {fp32['wall_s'] / new['wall_s']:.2f}× (target ≥ 4×)")
        else:
            lines.append(f"fp32 ÷ new through stage {n} of {new['stages']} (today's path measured on its first {n} "
                         f"stage(s) only): {fp32['stage_end_s'][n - 1] / new['stage_end_s'][n - 1]:.2f}× "
                         f"(target ≥ 4× end to end)")
        for part in ("training", "eval log-likelihood, task sets", "eval log-likelihood, probe",
                     "eval generation, task sets", "eval generation, probe"):
            if n == new["stages"] and part in fp32["parts_s"] and new["parts_s"].get(part):
                lines.append(f"  {part}: {fp32['parts_s'][part] / new['parts_s'][part]:.2f}×")
    if new and "ray" in results:
        ray = results["ray"]
        if ray["stages"] == new["stages"]:
            lines.append(f"ray_train ÷ local, end to end: {ray['wall_s'] / new['wall_s']:.3f}× (target ≤ 1.05×)")
        else:
            k = ray["stages"]
            lines.append(f"ray_train ÷ local through stage {k}: {ray['stage_end_s'][k - 1] / new['stage_end_s'][k - 1]:.3f}×"
                         f" (target ≤ 1.05× end to end)")
    if "trainer" in results:
        t = results["trainer"]
        lines.append(f"trainer: {t['steps']} steps × {t['batch_size']} rows of agnews, {t['precision']}, "
                     f"{t['threads']} threads: ours {t['ours_tokens_per_s']:.1f} tokens/s, transformers.Trainer + peft "
                     f"{t['trainer_tokens_per_s']:.1f} tokens/s: ours ÷ Trainer "
                     f"{t['ours_tokens_per_s'] / t['trainer_tokens_per_s']:.2f}× (target ≥ 1.0×)")
    if "steps" in results:
        lines.extend(steps_report(results["steps"]))
    for name, r in runs:
        lines.append(f"  matrix, {name} (log-likelihood/generative):")
        lines.extend(_matrix(r))
    return "\n".join(lines)


def load_results(out: Path) -> dict[str, dict]:
    return {part: json.loads((out / f"{part}.json").read_text()) for part in PARTS if (out / f"{part}.json").exists()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--fp32-stages", type=int, default=0, help="stop today's path after this stage (0: all)")
    parser.add_argument("--ray-stages", type=int, default=0, help="stop the Ray Train run after this stage (0: all)")
    parser.add_argument("--trainer-steps", type=int, default=60, help="steps of each loop in the trainer part")
    parser.add_argument("--sample-steps", type=int, default=6, help="steps: training steps of each path per task")
    parser.add_argument("--sample-items", type=int, default=32, help="steps: items of each evaluation set")
    parser.add_argument("--shards", type=Path, default=SHARDS, help="steps, trainer: where the shards are cached")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of today's path")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_run_cost")
    parser.add_argument("--report", action="store_true", help="only print the table of the saved parts")
    # inside a child
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        children = {"trainer": child_trainer, "steps": child_steps}
        record = children.get(args.child, child_run)(args)
        Path(args.result).write_text(json.dumps(record, default=str))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for part in args.parts:
            record = run_child(part, args)
            (args.out / f"{part}.json").write_text(json.dumps(record, indent=1, default=str))
    table = report(load_results(args.out))
    (args.out / "table.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
