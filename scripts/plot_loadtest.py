"""Load-test timelines, drawn from `scripts/loadtest.py --json` results: answers and cache hits per second.

    python scripts/plot_loadtest.py a.json b.json --label "5 s back-off" --label "0.5 s back-off" \
        --out docs/figures/loadtest-redis-stall.png

One panel per result, stacked, on the same axes: per second of the measured phase, the answers (all
statuses), the cache hits among them, and the 429s and errors when there were any; the Redis pauses the
run asked for (``--redis-pause``) are shaded. A panel's title is its label (default: the file's name)
with the run's throughput and hit ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sglora.io import atomic_path, figure_path_problem


def load(path: Path) -> dict:
    """A loadtest.py JSON result with a timeline; SystemExit naming what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read a JSON load-test result: {e}") from e
    timeline = data.get("run", {}).get("timeline") if isinstance(data, dict) else None
    if not isinstance(timeline, dict) or not timeline.get("answers"):
        raise SystemExit(f"{path}: no run timeline in it (written by scripts/loadtest.py --json of release 0.9.9 or later?)")
    return data


def plot(results: list[dict], labels: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), sharex=True, sharey=True, squeeze=False)
    top = 0
    for ax, r, label in zip(axes[:, 0], results, labels, strict=True):
        run, t = r["run"], r["run"]["timeline"]
        # Whole seconds only (a last, partial second would read as a drop); each drawn as a step of width one.
        n = max(1, min(len(t["answers"]), int(run["seconds"])))
        seconds = list(range(n + 1))

        def steps(values: list[int], n: int = n) -> list[int]:
            return [*values[:n], values[n - 1]]

        for p in r.get("redis_pauses", []):
            ax.axvspan(p["at_s"], p["at_s"] + p["ms"] / 1000, color="#C44E52", alpha=0.25, lw=0)
        ax.step(seconds, steps(t["answers"]), where="post", color="#4C72B0", label="answers/s")
        ax.step(seconds, steps(t["hits"]), where="post", color="#55A868", label="cache hits/s")
        for key, colour, name in (("throttled_429", "#DD8452", "429s/s"), ("errors", "#000000", "errors/s")):
            if any(t.get(key, [])[:n]):
                ax.step(seconds, steps(t[key]), where="post", color=colour, label=name)
        top = max(top, *t["answers"][:n])
        ax.set_title(f"{label}: {run['throughput_rps']} req/s, {100 * run['hit_ratio']:.1f} % hits", fontsize=10)
        ax.set_ylabel("per second")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(0, 1.08 * top or 1)  # shared by every panel
    axes[-1, 0].set_xlabel("seconds into the measured phase (shaded: Redis paused)")
    handles: dict[str, object] = {}  # every panel's lines, once each (429s and errors only where there were any)
    for ax in axes[:, 0]:
        for h, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by scripts/loadtest.py --json")
    p.add_argument("--label", action="append", default=[], help="a panel's name, in the order of the files")
    p.add_argument("--out", type=Path, default=Path("loadtest-timeline.png"))
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.results):
        raise SystemExit(f"plot_loadtest: {len(args.label)} --label for {len(args.results)} files: give one per file or none")
    if (problem := figure_path_problem(args.out)) is not None:
        p.error(problem)
    plot([load(f) for f in args.results], args.label or [f.stem for f in args.results], args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
