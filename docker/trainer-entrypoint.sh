#!/bin/sh
# One-shot trainer: builds the artefacts of CONFIG into OUT, unless OUT's manifest already records
# the evaluate stage (the last one), in which case it exits 0 at once.
#   usage: sglora-train [CONFIG] [OUT]
set -eu
CONFIG="${1:-configs/offline-default.yaml}"
OUT="${2:-/artifacts/offline-default}"

if python3 - "$OUT/manifest.json" <<'PY'
import json, sys
try:
    with open(sys.argv[1]) as f:
        sys.exit(0 if "evaluate" in json.load(f).get("stages", {}) else 1)
except (OSError, ValueError):
    sys.exit(1)
PY
then
    echo "sglora-train: $OUT is complete (evaluate stage done); nothing to do"
    exit 0
fi
echo "sglora-train: building $OUT from $CONFIG"
exec sglora pipeline --config "$CONFIG" --out "$OUT"
