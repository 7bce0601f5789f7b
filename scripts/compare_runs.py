"""Pools the evaluations of several runs of one pipeline (other seeds) on the same unseen tasks.

Each run's ``eval/results.json`` scores every method on every test task. Per method and metric: the
mean over runs of each run's average, and the lowest and highest run; the same for each run's share of
the oracle's gain over zero-shot. Paired differences (as in one
run's results.md) of the per-task means over runs: the task stays the unit, so the standard error is
over tasks, with the seed-to-seed noise averaged inside each task.

    python scripts/compare_runs.py artifacts/od-seed0 artifacts/od-seed1 artifacts/od-seed2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import METHODS
from training.pipeline import PAIRED_METRICS as METRICS  # the metrics one run pairs, pooled over runs
from training.pipeline import oracle_gain, paired_differences, paired_table, scored_tasks, share_table


def load_runs(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        path = d / "eval" / "results.json" if d.is_dir() else d
        if not path.exists():
            raise ValueError(f"{path} not found: run the pipeline's evaluate stage there first")
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        if problem := _not_a_result(run):
            raise ValueError(f"{path}: not an evaluation result of the pipeline ({problem})")
        runs.append(run)
    if len({r.get("evaluated_on", "test") for r in runs}) > 1:
        raise ValueError("the runs were evaluated on different splits (test and validation); pool one split")
    tasks = [sorted(r["tasks"]) for r in runs]
    if any(t != tasks[0] for t in tasks):
        raise ValueError("the runs were evaluated on different tasks; pool only runs of one split")
    if not any(all(m in r["methods"] for r in runs) for m in METHODS):
        raise ValueError(f"no method of {', '.join(METHODS)} was evaluated in every run")
    return runs


def _not_a_result(run: object) -> str:
    """What makes ``run`` not a results.json of the evaluate stage ("" if nothing): an object with a
    method -> {metric: number} "methods" and a task -> {method -> {metric: number}} "tasks", neither empty."""
    if not isinstance(run, dict):
        return f"a JSON {type(run).__name__}, not an object"
    for key in ("methods", "tasks"):
        if not isinstance(run.get(key), dict) or not run[key]:
            return f"no {key}" if key not in run else f"empty or malformed {key!r}"
    if not all(isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()) for v in run["methods"].values()):
        return "malformed 'methods'"
    for task, row in run["tasks"].items():
        if not isinstance(row, dict) or not row or not all(isinstance(v, dict) for v in row.values()):
            return f"malformed scores of task {task!r}"
    return ""


def pool(runs: list[dict]) -> tuple[dict, list[dict]]:
    """(per method and metric: [each run's average], paired differences of the per-task means over runs)."""
    methods = [m for m in METHODS if all(m in r["methods"] for r in runs)]
    averages = {m: {k: [r["methods"][m][k] for r in runs] for k in METRICS if k in runs[0]["methods"][m]} for m in methods}
    per_task = {
        t: {
            m: {k: sum(r["tasks"][t][m][k] for r in runs) / len(runs) for k in runs[0]["tasks"][t][m] if k in METRICS}
            for m in methods
        }
        for t in runs[0]["tasks"]
    }
    return averages, paired_differences(per_task)


def report(runs: list[dict], names: list[str]) -> str:
    averages, paired = pool(runs)
    metrics = [k for k in METRICS if any(k in v for v in averages.values())]
    tasks = scored_tasks(len(runs[0]["tasks"]), runs[0].get("evaluated_on", "test"))
    lines = [
        f"{len(runs)} runs ({', '.join(names)}), {tasks} each.",
        "",
        "| method | " + " | ".join(f"{k}: mean (lowest–highest run)" for k in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for m, v in averages.items():
        cells = [f"{sum(v[k]) / len(v[k]):.2f} ({min(v[k]):.2f}–{max(v[k]):.2f})" if k in v else "" for k in metrics]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    gains = {k: [oracle_gain(r["methods"], k) for r in runs] for k in metrics}
    gains = {k: g for k, g in gains.items() if all(g)}  # every run has zero-shot and oracle on k
    if gains:
        rows = {m: [_share_cell([run.get(m, "") for run in g]) for g in gains.values()] for m in averages}
        note = "on each run's averages, in %: mean (lowest–highest run); n/a where the oracle does not beat zero-shot in some run"
        lines += share_table(note, list(gains), {m: cells for m, cells in rows.items() if any(cells)})
    lines += [
        "",
        "Paired differences of the per-task means over runs (mean ± standard error over tasks, wins/ties/losses):",
        "",
        *paired_table(paired),
    ]
    return "\n".join(lines) + "\n"


def _share_cell(shares: list) -> str:
    """ "" where a run lacks the method, "n/a" where some run's oracle does not beat zero-shot."""
    if "" in shares:
        return ""
    if None in shares:
        return "n/a"
    return f"{sum(shares) / len(shares):.1f} ({min(shares):.1f}–{max(shares):.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="artefact directories (or their eval/results.json)")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(runs, [str(d) for d in args.runs]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
