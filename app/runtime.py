"""The Python runtime under the service: garbage-collector pauses, and the start-up heap kept out of them.

A loaded service holds ~600k objects the cyclic garbage collector tracks (torch modules, transformers,
tokenizers), and a full collection walks all of them: 280 ms on the offline default, during which the
process holds the GIL and neither the event loop nor the model threads run. Under load such a
collection comes every few seconds, and each one stalls every request in flight (docs/benchmarks.md,
"Garbage-collector pauses"). :func:`freeze_heap` moves what start-up left alive to the collector's
permanent generation (``gc.freeze``): those objects are still freed by reference counting, but no
longer traversed, and a full collection then only walks what the service created since (the price: a
start-up object that later ends up in an unreachable reference cycle stays until shutdown; most of
them, the loaded model, live as long as the service anyway).
:class:`GcPauses` times every collection, for ``sglora_gc_pause_seconds``.
"""

from __future__ import annotations

import gc
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily

GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


_freezers = 0  # apps of this process that froze the heap and have not stopped yet
_freezers_lock = threading.Lock()


def freeze_heap() -> int:
    """Collects once, then freezes every object alive now; returns how many objects are frozen. The
    freeze is the process's, so it is counted: :func:`unfreeze_heap` undoes it when the last app of the
    process that froze it stops (tests run several apps in one process)."""
    global _freezers
    with _freezers_lock:
        gc.collect()
        gc.freeze()
        _freezers += 1
    return gc.get_freeze_count()


def unfreeze_heap() -> None:
    """Hands the frozen objects back to the collector once no app that froze them is left (on shutdown:
    what the service leaves behind in cycles can then be freed)."""
    global _freezers
    with _freezers_lock:
        _freezers = max(0, _freezers - 1)
        if _freezers == 0:
            gc.unfreeze()


def freezers() -> int:
    """How many apps of this process hold the heap frozen."""
    return _freezers


class GcPauses:
    """A Prometheus collector of the garbage collector's pauses per generation, timed by a
    ``gc.callbacks`` hook between :meth:`install` and :meth:`uninstall`.

    The hook only adds to plain counters: it may run on any thread, in the middle of any allocation,
    so it must not take a lock (a prometheus-client metric's lock could be held by that very thread).
    The histogram is built from the counters when /metrics is scraped."""

    def __init__(self) -> None:
        self._started: float | None = None  # None: no collection under way that this hook saw start
        self._counts = [[0] * (len(GC_BUCKETS) + 1) for _ in range(3)]  # per generation, per bucket (last: +Inf)
        self._sums = [0.0, 0.0, 0.0]

    def _hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed while a collection was under way: its start was not seen
            return
        pause, self._started = time.perf_counter() - self._started, None
        generation = info["generation"]
        self._sums[generation] += pause
        self._counts[generation][bisect_left(GC_BUCKETS, pause)] += 1

    def install(self) -> None:
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def uninstall(self) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "sglora_gc_pause_seconds",
            "pauses of Python's cyclic garbage collector (the whole process waits), by generation",
            labels=["generation"],
        )
        for generation in range(3):
            cumulative = list(accumulate(self._counts[generation]))
            buckets = [(str(b), c) for b, c in zip(GC_BUCKETS, cumulative, strict=False)] + [("+Inf", cumulative[-1])]
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family
