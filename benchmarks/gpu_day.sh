#!/usr/bin/env bash
# A GPU day in one device call: install the packed dependencies, run the GPU suite (issue 16), then the
# planned real-CT run and its whole-scan check (issue 14), leaving reports under $OUT.
#
# Here, once (needs the shared real CTs and PyPI):   python benchmarks/pack_for_device.py
# There (device tool, carry [".device"]), about 10 minutes:
#   benchmarks/gpu_day.sh                     # suite budget 170 s, real-CT budget 3 min: ~9.5 min, one
#                                             # 600-s call (2026-11-29: suite 201 s, real-CT run 364 s + 47 s)
#   SUITE_S=300 BUDGET_MIN=5 benchmarks/gpu_day.sh
# CPU check of this script (tiny sizes, no packed wheels needed where diffprobe is installed):
#   DEVICE=cpu OUT=/tmp/gpu_day benchmarks/gpu_day.sh
#
# What 2026-11-29's first GPU day ran by hand, as one script: docs/performance.md ("GPU day") and
# docs/results.md ("A GPU day").
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/device_env.sh"
device="${DEVICE:-cuda}"
suite_s="${SUITE_S:-170}"
budget_min="${BUDGET_MIN:-3}"

work=/tmp/diffprobe_gpu_day
rm -rf "$work"
if [[ "$device" == cpu ]]; then
    suite_args=(--device cpu --dry-run --skip ddp)
    real_args=(--size_class tiny --bpr_steps 10 --diffusion_steps 10 --probe_steps 20 --threads 2)
    whole_s=900  # two whole CTs on 2 cores: minutes, where a GPU takes seconds
else
    suite_args=(--budget-s "$suite_s")
    real_args=(--budget_minutes "$budget_min" --threads "$(nproc)")
    # TRAIN_GRAPHS=1: pretrain with --cuda_graphs (planned in: the budget planner times the graphed step)
    if [[ -n "${TRAIN_GRAPHS:-}" ]]; then real_args+=(--override training.cuda_graphs=true); fi
fi
GPU_SUITE_TIMEOUT=$((${suite_s%.*} + 30)) PYTHON="$py" "$here/gpu_suite.sh" "${suite_args[@]}" \
    --workdir "$work/suite" --json "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.log"
timeout 480 "$py" "$here/real_ct.py" --work "$work/rc" --device "$device" --target_spacing 3 1.5 1.5 --name gpu \
    "${real_args[@]}" 2>&1 | tee "$out/real_ct.log"
timeout "${whole_s:-120}" "$py" "$here/real_ct_whole_scans.py" --work "$work/rc" --names gpu__fpn --device "$device" 2>&1 \
    | tee "$out/whole_scans.log"
cp "$work/rc/real_ct_report.json" "$work/rc/whole_scans/gpu__fpn.png" "$out/" 2>/dev/null
(cd "$work/rc" && tar czf "$out/real_ct_small.tgz" pred/summary.json real_ct_whole_scans.jsonl \
    preprocessed/*/diffprobe/plans.json results/*/diffprobe/gpu__fpn/fold_all/validation/summary.json \
    results/pretrained/gpu/*.png results/pretrained/gpu/*.json 2>/dev/null)
ls -la "$out"
