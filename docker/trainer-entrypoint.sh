#!/bin/sh
# One-shot trainer: builds the artefacts of CONFIG into OUT, unless OUT's manifest already records
# the evaluate stage (the last one) and OUT loads with this image's packages, in which case it exits 0;
# complete but not loadable: exits 1, naming why.
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
    # Complete, but the API would load it with this image's packages: check that it does, so that a volume
    # written under other package versions (or damaged) fails here, naming why, instead of the API
    # restarting over and over.
    python3 - "$OUT" <<'PY'
import sys

from sglora.artifacts import load_artifacts

try:
    load_artifacts(sys.argv[1], "cpu")
except Exception as e:  # noqa: BLE001 - whatever stops the API loading it, named in one line, not a traceback
    print(f"sglora-train: {sys.argv[1]} is complete but does not load here: {e}", file=sys.stderr)
    print("sglora-train: remove the artifacts volume (docker compose down -v) to build it again", file=sys.stderr)
    sys.exit(1)
PY
    echo "sglora-train: $OUT is complete (evaluate stage done) and loads; nothing to do"
    exit 0
fi
echo "sglora-train: building $OUT from $CONFIG"
exec sglora pipeline --config "$CONFIG" --out "$OUT"
