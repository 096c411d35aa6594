#!/usr/bin/env bash
# The gpu preset on one GPU in under 10 minutes: its stages at a fraction of their steps,
# bench.py on CUDA (SDPA kernels of both layouts, MFU eager and compiled, pack time, bf16 vs
# float32 log-prob parity), then one summary. Without CUDA it runs the CPU-runnable part.
#     bash .ci/gpu_check.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  timeout 360 python fspo.py --preset gpu --sft-steps 50 --stage-steps oracle:20 --pref-steps 20 --eval-users 8 \
    --eval-questions 1 --curve-episodes 32 --out "$out/run" > "$out/fspo.log" 2>&1 \
    && echo "gpu preset stages: ok" || echo "gpu preset stages: FAILED (see $out/fspo.log)"
  timeout 200 python bench.py --preset gpu --device cuda --reps 3 | tee "$out/bench.txt"
else
  echo "gpu preset stages: skipped (no CUDA)"
  # the CPU-runnable part: compile, bf16 autocast code path, pack time, at the tiny shapes
  timeout 500 python bench.py --preset tiny --device cpu | tee "$out/bench.txt"
fi
echo "summary:"
grep -E "^(peak|speedup|compile|logps|data|sdpa|mfu|bf16 fspo)" "$out/bench.txt"
