#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): needs only python3 with torch, transformers, peft.
# Writes $OUT/gpu_check.md when OUT is set. Extra arguments go to the script (e.g. --smoke, --skip-8b).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "$@"
