#!/usr/bin/env bash
# Service benchmark on a CUDA machine, on the ViT-B-16 shape (configs/bench-vitb16.yaml): trains the
# small artefact set on the GPU, then runs scripts/bench_service.py twice: with the start-up
# batch-invariance check (SGLORA_BATCH_INVARIANCE=require, the default) and with batching forced on.
# Needs a Redis at $REDIS_URL. Writes logs and JSON to $OUT_DIR.
set -euo pipefail
OUT_DIR=${OUT_DIR:-bench-out}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/15}
ART=${ART:-artifacts/bench-vitb16}
PY=${PY:-python3}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' | tee -a "$OUT_DIR/gpu.txt"
if [ ! -f "$ART/manifest.json" ]; then
  "$PY" -m sglora.cli pipeline --config configs/bench-vitb16.yaml --out "$ART" --device cuda \
    > "$OUT_DIR/pipeline.log" 2>&1 || { tail -40 "$OUT_DIR/pipeline.log"; exit 1; }
  grep -a "done in" "$OUT_DIR/pipeline.log"
fi
for mode in require ignore; do
  SGLORA_BATCH_INVARIANCE=$mode "$PY" scripts/bench_service.py --artifacts "$ART" --device cuda \
    --redis-url "$REDIS_URL" --json "$OUT_DIR/bench-$mode.json" 2> "$OUT_DIR/bench-$mode.err" | tee "$OUT_DIR/bench-$mode.md"
  tail -5 "$OUT_DIR/bench-$mode.err"
done
