#!/bin/sh
# One-shot trainer: builds the artefacts of CONFIG into OUT. Where OUT's manifest already records the
# evaluate stage (the last one), was built with CONFIG's settings and loads with this image's packages,
# it exits 0; complete but not loadable: exits 1, naming why. A CONFIG edited since OUT was built runs the
# pipeline on OUT, which keeps what the edit leaves valid (new generator or evaluation settings keep the
# experts) and refuses, naming them, changes to what the experts were trained with.
#   usage: sglora-train [CONFIG] [OUT]
set -eu
CONFIG="${1:-configs/offline-default.yaml}"
OUT="${2:-/artifacts/offline-default}"

# exec: the check is this container's first process, so that `docker stop` reaches it (a shell as PID 1
# ignores SIGTERM); it execs `sglora pipeline` itself where there is work to do.
exec python3 - "$CONFIG" "$OUT" <<'PY'
import json
import os
import signal
import sys
from pathlib import Path

# As PID 1 a process ignores the signals it has no handler for: `docker stop` during the check exits 143.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
config, out = sys.argv[1], Path(sys.argv[2])
build = ["sglora", "pipeline", "--config", config, "--out", str(out)]
try:
    complete = "evaluate" in json.loads((out / "manifest.json").read_text()).get("stages", {})
except (OSError, ValueError, AttributeError):
    complete = False
if complete:
    from training.config import load_config
    from training.pipeline import config_changes

    try:
        changed = config_changes(out, load_config(config))
    except (OSError, ValueError) as e:  # the pipeline names what is wrong with the config or the run
        print(f"sglora-train: {e}", file=sys.stderr)
        changed = ["?"]
    if changed:
        print(f"sglora-train: {config} changed since {out} was built ({', '.join(changed)}): running the pipeline on it")
        complete = False
if not complete:
    print(f"sglora-train: building {out} from {config}", flush=True)
    os.execvp(build[0], build)

# Complete, but the API would load it with this image's packages: check that it does, so that a volume
# written under other package versions (or damaged) fails here, naming why, instead of the API restarting
# over and over.
from sglora.artifacts import load_artifacts

try:
    load_artifacts(out, "cpu")
except Exception as e:  # noqa: BLE001 - whatever stops the API loading it, named in one line, not a traceback
    print(f"sglora-train: {out} is complete but does not load here: {e}", file=sys.stderr)
    print(
        "sglora-train: remove the artifacts volume to build it again (docker volume rm <project>_artifacts; "
        "experts registered through POST /experts live there too)",
        file=sys.stderr,
    )
    sys.exit(1)
print(f"sglora-train: {out} is complete (evaluate stage done), built with {config}'s settings, and loads; nothing to do")
PY
