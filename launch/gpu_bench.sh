#!/usr/bin/env bash
# The benchmark on a CUDA machine, in well under 8 minutes: training images/s at 384 px in bf16 for
# batch 64 and 128 (CRNN and bare ResNet-50, both memory layouts), evaluation images/s, the input
# pipeline and the DataLoader with all cores, outlier scoring, peak memory, and model FLOP
# utilisation against the GPU's dense bf16 peak (PEAK_TFLOPS, 989 for an H100/H200 SXM).
# Writes bench_gpu.json (and prints the tables). Usage: ./launch/gpu_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
WORKERS="$(nproc)"
python -c "import crnn_art" 2>/dev/null || python -m pip install -q -e .
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
timeout 450 python -m crnn_art bench --device cuda --image-size 384 --precision bf16 --batch 64 128 \
  --steps 10 --workers "$WORKERS" --peak-tflops "$PEAK_TFLOPS" --json | tee "$OUT/bench_gpu.json"
python - "$OUT/bench_gpu.json" <<'PY'
import json, sys
from crnn_art.bench import print_report
for report in json.load(open(sys.argv[1])):
    print_report(report)
PY
