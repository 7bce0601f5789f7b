#!/usr/bin/env bash
# Service benchmark on a CUDA machine, on the ViT-B-16 shape (configs/bench-vitb16.yaml): trains the
# small artefact set on the GPU, runs scripts/bench_service.py (with BASE=<another checkout's root>, also
# that checkout's bench_service.py against the same artefacts, for an A/B in one run; with REDIS_HITS=1
# also this checkout's with SGLORA_HOT_KEYS=0: every hit from Redis; with THREADS="1 4" also with those
# torch thread counts), a short load test, and the test files that exercise the GPU path (everything
# loads on CUDA by default there).
# Needs a Redis at $REDIS_URL and `redis-server` on PATH (the load test starts its own). Writes logs
# and JSON to $OUT_DIR. Docs: docs/benchmarks.md, "GPU: one H200".
set -uo pipefail
OUT_DIR=${OUT_DIR:-bench-out}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/15}
ART=$(realpath -m "${ART:-artifacts/bench-vitb16}")
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}; CONFIG=${CONFIG:-configs/bench-vitb16.yaml}  # DEVICE=cpu CONFIG=configs/tiny.yaml: a dry run
TESTS=${TESTS:-tests/test_engine.py tests/test_app_service.py tests/test_app_generate.py tests/test_app_retrieve.py tests/test_app_experts.py
  tests/test_cvae.py tests/test_open_clip_backbone.py tests/test_open_clip_lora.py tests/test_pipeline.py}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case $CONFIG in /*) ;; *) CONFIG=$ROOT/$CONFIG ;; esac  # a relative CONFIG names a file of this checkout
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac  # a relative path to a python: the tests run in $ROOT
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this checkout's packages, installed or not
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'; } 2>&1 | tee "$OUT_DIR/gpu.txt"
if [ ! -f "$ART/manifest.json" ]; then
  "$PY" -m sglora.cli pipeline --config "$CONFIG" --out "$ART" --device "$DEVICE" \
    > "$OUT_DIR/pipeline.log" 2>&1 || { tail -40 "$OUT_DIR/pipeline.log"; exit 1; }
  grep -a "done in" "$OUT_DIR/pipeline.log"
fi
runs="this ${BASE:+base}"; [ "${REDIS_HITS:-0}" = 1 ] && runs="$runs redis-hits"
for t in ${THREADS:-}; do runs="$runs threads-$t"; done
for run in $runs; do
  root=$ROOT env=() args=()
  case $run in
    base) root=$BASE ;;
    redis-hits) env=(SGLORA_HOT_KEYS=0) ;;
    threads-*) args=(--threads "${run#threads-}") ;;
  esac
  env "${env[@]}" PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} "$PY" "$root/scripts/bench_service.py" --artifacts "$ART" --device "$DEVICE" \
    "${args[@]}" --redis-url "$REDIS_URL" --json "$OUT_DIR/bench-$run.json" 2> "$OUT_DIR/bench-$run.err" | tee "$OUT_DIR/bench-$run.md"
  tail -5 "$OUT_DIR/bench-$run.err"
done
"$PY" "$ROOT/scripts/loadtest.py" --artifacts "$ART" --device "$DEVICE" --clients 200 --duration 20 --warmup 8 \
  --json "$OUT_DIR/load.json" > "$OUT_DIR/load.md" 2> "$OUT_DIR/load.err"
tail -12 "$OUT_DIR/load.md"
# shellcheck disable=SC2086  # TESTS: several paths
cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider -rfE $TESTS > "$OUT_DIR/pytest.log" 2>&1
rc=$?
echo "pytest exit $rc"; tail -15 "$OUT_DIR/pytest.log"
exit "$rc"  # the tests' status, for whoever runs this script
