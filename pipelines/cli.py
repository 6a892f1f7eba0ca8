"""The `secura` command. Subcommands import their (heavy) modules lazily so
that `secura --help` answers at once."""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Sequence


def _version() -> str:
    try:
        return version("secura-cl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _lazy(target: str) -> Callable[[argparse.Namespace], int | None]:
    module_name, func_name = target.split(":")

    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module_name), func_name)(args)

    return run


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a task stream into cached Parquet shards (Ray Data)")
    p.add_argument("config", help="a stream YAML, a run YAML, or a built-in stream name (demo, cl-text)")
    p.add_argument("--output-dir", help="where shards and the manifest go (local path or s3://, gs://)")
    p.add_argument("--model-source", choices=["tiny", "gguf", "hf"], help="tokenizer source (overrides the config)")
    p.add_argument("--model-path", help="tokenizer path or hub name (overrides the config)")
    p.add_argument("--verify", action="store_true",
                   help="check every cached shard file's content hash, not only the small files'")
    p.add_argument("--prompt-format", choices=["auto", "chat", "raw"],
                   help="render prompts with the tokenizer's chat template (chat), the task's text (raw), or chat "
                   "when the tokenizer has a template (auto, the default)")
    p.add_argument("--validation-rows", type=_count_or_fraction, metavar="N",
                   help="carve N rows (or a fraction, e.g. 0.1) of every task's train split as its validation split")
    p.set_defaults(func=_lazy("pipelines.preprocess:prepare_command"))


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="continual fine-tuning of one model on a task stream (Ray Train + MLflow)")
    p.add_argument("config", help="run YAML (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue at the first unfinished stage of this run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under the output dir)")
    p.add_argument("--output-dir", help="overrides output_dir of the config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-3 (repeatable)")
    p.add_argument("--offline", action="store_true",
                   help="do not contact MLflow: keep every tracking event in the run's spool (secura sync sends it)")
    p.set_defaults(func=_lazy("pipelines.run:run_command"))


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune search over SECURA's hyperparameters on a stream")
    p.add_argument("config", help="sweep YAML (see configs/sweep-demo.yaml)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--output-dir", help="overrides output_dir of the sweep")
    p.set_defaults(func=_lazy("tune.sweep:sweep_command"))


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="methods x learning rates x seeds on one stream: retention-vs-accuracy frontier")
    p.add_argument("config", help="compare YAML (see configs/compare-smollm2.yaml)")
    p.add_argument("--resume", action="store_true", help="skip the runs already finished")
    p.add_argument("--only", action="append", default=[], metavar="METHOD", help="run only these methods")
    p.add_argument("--output-dir", help="overrides output_dir of the comparison")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at once, as Ray tasks (default 1); each gets cores/N torch threads")
    p.add_argument("--gpu", action="store_true", help="one GPU per run when the cluster has GPUs, else CPU")
    p.set_defaults(func=_lazy("pipelines.compare:compare_command"))


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="put a finished run's final adapter in the MLflow Model Registry")
    p.add_argument("run_id", help="the MLflow id of the stream's parent run")
    p.add_argument("name", help="the registered model's name (a new version when it exists)")
    p.add_argument("--output-dir", help="the run's output dir, whose mlflow.db holds the run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else --output-dir's)")
    p.set_defaults(func=_lazy("pipelines.registry:register_command"))


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 for the local store")
    p.add_argument("--output-dir", default="runs", help="the output dir whose mlflow.db to show")
    p.add_argument("--tracking-uri", help="an explicit backend store URI")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_lazy("pipelines.tracking:ui_command"))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the offline demo: one stream with SECURA and with LoRA, side by side")
    p.add_argument("config", nargs="?", default="configs/demo-compare.yaml",
                   help="a comparison YAML with one lr per method and one seed (default: configs/demo-compare.yaml)")
    p.add_argument("--output-dir", help="overrides output_dir of the config")
    p.set_defaults(func=_lazy("pipelines.demo:demo_command"))


def _add_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="send a run folder's spooled tracking events to MLflow (after an outage)")
    p.add_argument("output_dir", help="the run's output dir (holds tracking/spool)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under the output dir)")
    p.set_defaults(func=_lazy("pipelines.tracking:sync_command"))


VERBOSE_HELP = "show Ray's and MLflow's own output and full tracebacks (or SECURA_VERBOSE=1)"


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help=VERBOSE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """Global flags work before or after the subcommand (``secura --verbose run …``, ``secura run … -v``):
    a subcommand's copy has no default, so it only sets the value when given there."""
    parser = argparse.ArgumentParser(
        prog="secura", description="SECURA-CL: continual fine-tuning of LLMs with SECURA on Ray and MLflow."
    )
    parser.add_argument("--version", action="version", version=f"secura-cl {_version()}")
    _add_global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_prepare, _add_run, _add_sweep, _add_compare, _add_demo, _add_register, _add_sync, _add_ui):
        add(sub)
    for subcommand in sub.choices.values():
        _add_global_flags(subcommand, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; every error ends in one line naming what failed (the traceback with --verbose)."""
    from pipelines.console import configure
    from pipelines.signals import stop_on_sigterm

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    verbose = configure(args.verbose or None)
    stop_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (pipelines.signals.Terminated: exit 143)
        print(f"secura {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return getattr(interrupt, "exit_status", 130)
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns any error into a message
        if verbose:
            traceback.print_exc()
        print(f"secura {args.command}: error: {_describe(err)}", file=sys.stderr)
        if not verbose:
            print(f"(the full traceback: {shlex.join(['secura', *argv, '--verbose'])})", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError)) else 1


def _describe(err: BaseException) -> str:
    """The error's own message; a wrapped worker error (Ray's TrainingFailedError) by its root cause."""
    cause = err
    while getattr(cause, "__cause__", None) is not None and type(cause).__module__.startswith("ray"):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return _describe_os_error(cause)
    if isinstance(cause, (ValueError, FileNotFoundError)) and type(cause) in (ValueError, FileNotFoundError):
        return str(cause)
    return f"{type(cause).__name__}: {cause}".splitlines()[0] if str(cause) else type(cause).__name__


def _describe_os_error(err: OSError) -> str:
    """An OS error always names its path: the one the call reported, else the working directory when it
    is gone (a Ray job's working-dir copy removed under it), else it says that no path was given."""
    message = err.strerror or str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    if paths:
        return f"{message}: {' -> '.join(paths)}"
    try:
        os.getcwd()
    except FileNotFoundError:
        return f"{message}: the working directory {os.environ.get('PWD', '(unknown)')} no longer exists"
    return f"{type(err).__name__}: {message} (the system call named no path)"


if __name__ == "__main__":
    sys.exit(main())
