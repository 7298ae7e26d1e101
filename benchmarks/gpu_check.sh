#!/usr/bin/env bash
# The first GPU session's checks in one call, at most 8 minutes (see benchmarks/gpu_check.py):
# the CUDA-marked tests, benchmarks/speed.py device=cuda for cnn3 and resnet20 with
# throughput=[1,2,4], and a short real study with workers=2, all figures in one JSON file.
#
#   bash benchmarks/gpu_check.sh [OUT.json]          # default benchmarks/results/gpu_check.json
#   GPU_CHECK_MODE=cpu bash benchmarks/gpu_check.sh  # the CPU smoke run CI does (toy sizes)
#
# PYTHON picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# 460 s for the steps (each gets its share of what is left), then a hard stop at 8 minutes.
exec timeout --kill-after=10 470 "$PYTHON" benchmarks/gpu_check.py \
    "mode=${GPU_CHECK_MODE:-cuda}" "out=${1:-benchmarks/results/gpu_check.json}" \
    "budget=${GPU_CHECK_BUDGET:-460}"
