#!/usr/bin/env bash
# One device call for the launch-overhead measurements (benchmarks/gpu_graphs.py), about 5 minutes
# (GRAPHS=0 skips it; TRAINER_GRAPHS=1 adds the trainer's graphed step, SUITE_S=N the GPU suite):
#   here, once:   python benchmarks/pack_for_device.py
#   there:        OUT=$OUT benchmarks/gpu_graphs_day.sh          (device tool, carry [".device"])
#   CPU check:    DEVICE=cpu OUT=/tmp/gg_day benchmarks/gpu_graphs_day.sh
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null \
    | tee "$out/nvidia_smi.csv"
if [[ "${DEVICE:-cuda}" == cpu ]]; then args=(--device cpu --dry-run); else args=(); fi
if [[ "${GRAPHS:-1}" != 0 ]]; then
    cd "$here" && timeout --kill-after=10 "${GRAPHS_TIMEOUT:-420}" "$py" gpu_graphs.py "${args[@]}" \
        --workdir /tmp/diffprobe_gpu_graphs --json "$out/gpu_graphs.json" "$@" 2>&1 | tee "$out/gpu_graphs.log"
fi
# TRAINER_GRAPHS=1: the real trainer eager vs --cuda_graphs (diffprobe.training.graphed_step), ~1 minute
if [[ -n "${TRAINER_GRAPHS:-}" ]]; then
    cd "$here" && timeout --kill-after=10 "${TRAINER_GRAPHS_TIMEOUT:-150}" "$py" gpu_trainer_graphs.py "${args[@]}" \
        --json "$out/gpu_trainer_graphs.json" 2>&1 | tee "$out/gpu_trainer_graphs.log"
fi
# SUITE_S=200: then the GPU suite's agreement, peak, pretrain and predict sections (CPU vs CUDA with the
# CUDA-only paths of this change in place; compile, profile and ddp skipped)
if [[ -n "${SUITE_S:-}" ]]; then
    GPU_SUITE_TIMEOUT=$((SUITE_S + 30)) PYTHON="$py" "$here/gpu_suite.sh" --budget-s "$SUITE_S" \
        --skip ddp compile profile --workdir /tmp/diffprobe_gpu_suite --json "$out/gpu_suite.json" 2>&1 \
        | tee "$out/gpu_suite.log"
fi
