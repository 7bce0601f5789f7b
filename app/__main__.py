import os
import signal
import sys


def _stop_before_start_up(signum: int, frame: object) -> None:
    sys.stderr.write(f"{signal.Signals(signum).name} during start-up: stopped\n")
    sys.stderr.flush()
    os._exit(0)


# Before the imports (torch, uvicorn: a second or more): a signal then ends the start-up with status 0, as
# one later in the start-up does (app/serve.py), instead of the default action's -15 (143 in a shell).
for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _stop_before_start_up)

# Before torch loads (with the app, once app.serve's checks of the settings and the address passed): libgomp
# reads it once, when torch loads it. See docs/service.md.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from app.serve import main  # noqa: E402

sys.exit(main())
