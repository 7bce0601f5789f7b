"""Where the time of a /generate cache miss goes, drawn from a `scripts/bench_service.py --json` result.

    python scripts/plot_service_bench.py bench.json --out docs/figures/service-miss-breakdown.png

Left: one client. The bare text-encoder forward (median) against a lone miss split into the server's
own stages (means from its /metrics: queue, text encoding, prior, sampling, serialisation, the rest of
the server) and what lies outside the server (HTTP and the client); the dashed line is the issue's
target, 1.25x the bare forward. Right: a model thread's time per miss with one client against 32
(stage means per request): N model threads (the run's "model_threads") serve at most N / that many
misses per second, so for the 3x throughput target the 32-client bar must stay under N times a third
of one client's time per miss (1 / its misses per second; dashed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sglora.io import atomic_path, figure_path_problem

STAGES = ("queue", "text_encoding", "prior", "sampling", "serialisation")
COLOURS = {
    "text encoding": "#4C72B0",
    "queue": "#8C8C8C",
    "prior": "#DD8452",
    "sampling": "#55A868",
    "serialisation": "#C44E52",
    "server, other": "#B0B0B0",
    "HTTP and client": "#E5E5E5",
}


def load(path: Path) -> dict:
    """The run of a bench_service.py JSON file (the last one of a list); SystemExit naming what is missing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read a JSON benchmark result: {e}") from e
    run = data[-1] if isinstance(data, list) and data else data
    need = ("bare_embed_ms", "miss_ms", "lone_miss_ms", "stage_ms_per_request", "throughput_ratio", "rps_1")
    missing = [k for k in need if not isinstance(run, dict) or k not in run]
    if not missing:
        lone = run["lone_miss_ms"] if isinstance(run["lone_miss_ms"], dict) else {}
        missing = [f"lone_miss_ms.{k}" for k in ("client", "server", *STAGES) if not isinstance(lone.get(k), int | float)]
    if missing:
        raise SystemExit(f"{path}: not a bench_service.py result with the per-stage breakdown (missing {', '.join(missing)})")
    return run


def segments(run: dict) -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]]]:
    """(lone miss, model thread per miss alone, model thread per miss at 32 clients): (label, ms) each."""
    lone = run["lone_miss_ms"]
    stages = [(s.replace("_", " "), lone[s]) for s in STAGES]
    server_other = max(0.0, lone["server"] - sum(v for _, v in stages))
    outside = max(0.0, lone["client"] - lone["server"])
    miss = stages + [("server, other", server_other), ("HTTP and client", outside)]
    alone = [(s.replace("_", " "), lone[s]) for s in STAGES if s != "queue"]
    loaded = [(s.replace("_", " "), run["stage_ms_per_request"].get(s, 0.0)) for s in STAGES if s != "queue"]
    return miss, alone, loaded


def threads_of(run: dict) -> int:
    """The run's model threads (1 where the JSON does not say, as before release 0.9.11)."""
    threads = run.get("model_threads", 1)
    return threads if isinstance(threads, int) and threads >= 1 else 1


def target_ms(run: dict) -> float:
    """The most model-thread ms per miss at 32 clients that still meets the 3x throughput target: N threads
    serve N * 1000 / ms misses per second, which must reach 3 * rps_1."""
    return threads_of(run) * 1000.0 / run["rps_1"] / 3


def plot(run: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    miss, alone, loaded = segments(run)
    bare, target = run["bare_embed_ms"], 1.25 * run["bare_embed_ms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.35, 1]})
    seen: set[str] = set()

    def bar(ax, y: float, parts: list[tuple[str, float]]) -> None:
        x = 0.0
        for label, ms in parts:
            ax.barh(y, ms, left=x, color=COLOURS[label], edgecolor="white", label=None if label in seen else label)
            if ms >= 0.9:
                ax.text(x + ms / 2, y, f"{ms:.1f}", ha="center", va="center", fontsize=8)
            seen.add(label)
            x += ms
        ax.text(x + 0.2, y, f"{x:.1f} ms", va="center", fontsize=9)

    bar(left, 1, [("text encoding", bare)])
    bar(left, 0, miss)
    left.axvline(target, color="black", linestyle="--", linewidth=1)
    left.text(target, 1.55, f" target 1.25x = {target:.1f} ms", fontsize=8, va="top")
    left.set_yticks([1, 0], ["bare text forward\n(median)", "lone miss\n(stage means)"])
    left.set_xlabel("ms")
    left.set_ylim(-0.6, 1.7)
    left.set_xlim(0, 1.18 * max(run["lone_miss_ms"]["client"], target))
    ratio = run["miss_ms"] / bare
    left.set_title(f"one client: median miss {run['miss_ms']:.1f} ms = {ratio:.2f}x the bare forward", fontsize=10)

    bar(right, 1, alone)
    bar(right, 0, loaded)
    one_client = 1000.0 / run["rps_1"]  # ms per miss with one client, as the throughput blocks measured it
    threads, limit = threads_of(run), target_ms(run)
    right.axvline(limit, color="black", linestyle="--", linewidth=1)
    scale = f"{threads} x " if threads > 1 else ""
    right.text(limit, 1.55, f" 3x target: {scale}{one_client:.1f} ms / 3", fontsize=8, va="top")
    right.set_xlim(0, 1.18 * max(limit, sum(v for _, v in alone), sum(v for _, v in loaded)))
    clients = run.get("clients", 32)
    batch = run.get("mean_batch")
    known = isinstance(batch, int | float) and batch == batch  # JSON null or NaN: not measured
    right.set_yticks([1, 0], ["1 client", f"{clients} clients\n(batch {batch:.0f})" if known else f"{clients} clients"])
    right.set_xlabel("model-thread ms per miss")
    right.set_ylim(-0.6, 1.7)
    gain = run["throughput_ratio"]
    right.set_title(f"{threads} model thread(s): {clients} clients {gain:.2f}x the misses/s of one", fontsize=10)
    handles, labels = [], []
    for ax in (left, right):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a JSON file written by scripts/bench_service.py --json")
    p.add_argument("--out", type=Path, default=Path("service-miss-breakdown.png"))
    args = p.parse_args(argv)
    if (problem := figure_path_problem(args.out)) is not None:
        p.error(problem)
    plot(load(args.result), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
