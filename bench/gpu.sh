#!/usr/bin/env bash
# Inference and training benchmarks at SD-1.5 size on one GPU, in a few minutes; one JSON of results.
#
#   bash bench/gpu.sh                                        # a CUDA GPU: sd15, writes bench/results/gpu_sd15.json
#   BENCH_PRESET=tiny BENCH_DEVICE=cpu bash bench/gpu.sh     # dry run of the same steps on a CPU
#
# Without a CUDA GPU (and BENCH_DEVICE left at cuda) it stops at once with one error line, exit 2.
#
# Environment: BENCH_PRESET (sd15), BENCH_DEVICE (cuda), BENCH_IMAGES (16), BENCH_BATCH (8),
# BENCH_TRAIN_BATCHES (4,12), BENCH_COMPILE (1: also time ours with torch.compile; a failure there is
# reported, not fatal), BENCH_OUT (bench/results/gpu_${BENCH_PRESET}.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${BENCH_PRESET:-sd15}
DEVICE=${BENCH_DEVICE:-cuda}
IMAGES=${BENCH_IMAGES:-16}
BATCH=${BENCH_BATCH:-8}
TRAIN_BATCHES=${BENCH_TRAIN_BATCHES:-4,12}
COMPILE=${BENCH_COMPILE:-1}
OUT=${BENCH_OUT:-bench/results/gpu_${PRESET}.json}
PYTHON=${PYTHON:-python}

# Before any work: a CUDA device needs a GPU that torch can see (one line and exit 2 otherwise). No GPU
# device node at all answers at once; otherwise torch is asked (CUDA_VISIBLE_DEVICES, driver, build).
if [[ $DEVICE == cuda* ]]; then
    NO_GPU="error: bench/gpu.sh: BENCH_DEVICE=$DEVICE needs a CUDA GPU and none is visible; on a CPU run the same steps small with BENCH_PRESET=tiny BENCH_DEVICE=cpu (see bench/README.md)"
    if ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && [ ! -e /dev/kfd ]; then
        echo "$NO_GPU" >&2
        exit 2
    fi
    $PYTHON - "$NO_GPU" <<'PY' || exit 2
import sys

try:
    import torch
except ImportError as e:
    sys.exit(f"error: bench/gpu.sh: cannot import torch with {sys.executable} ({e}); set PYTHON to your environment's python")
if not torch.cuda.is_available():
    sys.exit(f"{sys.argv[1]} (torch {torch.__version__})")
PY
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== inference: upstream's way vs ours ($PRESET, $DEVICE)"
$PYTHON bench/bench_inference.py --config "$PRESET" --device "$DEVICE" --images "$IMAGES" --batch "$BATCH" \
    --repeats 2 --ablation --profile --output "$TMP/inference.json"
if [ "$COMPILE" = "1" ]; then
    echo "== inference with torch.compile"
    $PYTHON bench/bench_inference.py --config "$PRESET" --device "$DEVICE" --images "$IMAGES" --batch "$BATCH" \
        --repeats 2 --compile --output "$TMP/inference_compile.json" || echo "torch.compile run failed (reported in the JSON)"
fi
echo "== training step: measured and predicted ($PRESET, $DEVICE)"
# fp32, fp32 + checkpointing, bf16-mixed + checkpointing, bf16-mixed + checkpointing + fused AdamW
$PYTHON bench/bench_training.py --device "$DEVICE" --measure "$PRESET" --analyse "$PRESET" --batches "$TRAIN_BATCHES" \
    --settings 0,1,4,5 --steps 3 --output "$TMP/training.json"

$PYTHON - "$TMP" "$OUT" <<'PY'
import json, sys
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {name: json.loads((tmp / f"{name}.json").read_text()) if (tmp / f"{name}.json").is_file() else None
          for name in ("inference", "inference_compile", "training")}
if merged["inference_compile"] is None:
    merged["inference_compile"] = {"error": "not run or failed (see the log)"}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(merged, indent=2) + "\n")
print(f"wrote {out}")
PY
