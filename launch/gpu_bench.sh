#!/usr/bin/env bash
# The benchmark on a CUDA machine, in well under 8 minutes: training images/s at 384 px in bf16 for
# batch 64 and 128 (CRNN and bare ResNet-50, both memory layouts), evaluation images/s, the input
# pipeline and the DataLoader with all cores, outlier scoring, peak memory, and model FLOP
# utilisation against the GPU's dense bf16 peak (PEAK_TFLOPS, 989 for an H100/H200 SXM), batched JPEG
# decoding with nvJPEG vs a CPU worker; then, at batch 128, the step with the trunk under torch.compile
# (model.compile_trunk) vs eager and its one-off compile time.
# Writes bench_gpu.json and bench_gpu_compile.json (and prints the tables). Usage: ./launch/gpu_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
WORKERS="$(nproc)"
python -c "import crnn_art" 2>/dev/null || python -m pip install -q -e .
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
timeout 270 python -m crnn_art bench --device cuda --image-size 384 --precision bf16 --batch 64 128 \
  --steps 10 --workers "$WORKERS" --peak-tflops "$PEAK_TFLOPS" --json | tee "$OUT/bench_gpu.json"
timeout 180 python -m crnn_art bench --device cuda --image-size 384 --precision bf16 --batch 128 \
  --steps 10 --workers "$WORKERS" --compile --json > "$OUT/bench_gpu_compile.json" || true
python - "$OUT/bench_gpu.json" "$OUT/bench_gpu_compile.json" <<'PY'
import json, sys
from crnn_art.bench import print_report
for path in sys.argv[1:]:
    try:
        reports = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(f"{path}: no report ({exc})")
        continue
    for report in reports if isinstance(reports, list) else [reports]:
        print_report(report)
PY
