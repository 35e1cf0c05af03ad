#!/usr/bin/env bash
# GPU suite (issue 16): CUDA vs CPU agreement, pretraining patches/s and TFLOP/s against the bf16 matmul
# peak (channels_last / torch.compile on and off), predict seconds on a 512x512x300 volume at the
# planned GPU size class, 2-process DDP when 2 GPUs are present. Logic and options: gpu_suite.py.
#
#   benchmarks/gpu_suite.sh                          # on a GPU machine: at most 8 minutes
#   benchmarks/gpu_suite.sh --device cpu --dry-run   # CPU check of the same code paths (< 2 minutes)
#
# The hard limit (GPU_SUITE_TIMEOUT seconds, default 480) kills the run whatever happens; the
# Python side skips sections that no longer fit its own --budget-s (default 440) and rewrites its
# JSON after every section, so a killed run still leaves what it measured.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=15 "${GPU_SUITE_TIMEOUT:-480}" "${PYTHON:-python}" "$here/gpu_suite.py" "$@"
