"""PCA of the LoRA space for one unseen task (like the paper's figures 7 and 9).

Plots the expert means, the task's oracle snapshots, N sg-lora samples and the
top-K merges, projected on the first two principal components of all of them.

    python scripts/plot_lora_space.py --artifacts artifacts/offline-default --out docs/figures/lora-space-fashion.png
    python scripts/plot_lora_space.py --artifacts artifacts/offline-default --task TASK --out docs/figures/lora-space-tux.png

One artefact directory holds the tasks of every kind (fashion and tux): without --task the first test
task is plotted; --task picks another of the "test" tasks in its splits.json (e.g. the first tux one).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sglora.artifacts import ArtifactError, load_artifacts  # noqa: E402
from sglora.io import atomic_path, figure_path_problem  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--task", help="unseen task to plot (default: the first test task)")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--out", type=Path, required=True, help="the figure (its suffix names the format; none: PNG)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    if (problem := figure_path_problem(args.out)) is not None:
        p.error(problem)
    try:
        a = load_artifacts(args.artifacts)  # refuses artefacts whose generator stage has not run
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = json.loads((Path(args.artifacts) / "splits.json").read_text())
    if not splits.get("test"):
        print(f"error: {args.artifacts} has no unseen test tasks (splits.json)", file=sys.stderr)
        return 2
    task = args.task or splits["test"][0]
    if task not in splits["test"]:
        print(f"error: {task!r} is not an unseen test task of these artefacts", file=sys.stderr)
        return 2
    from safetensors import safe_open

    with safe_open(str(Path(args.artifacts) / "snapshots" / f"{task}.safetensors"), "pt") as f:
        desc = f.metadata()["description"]
    oracle = a.snapshots(task)
    emb = a.engine.embed([desc])[0]
    sg = torch.stack([a.engine.generate(emb, "sg-lora", seed=s).lora for s in range(args.samples)])
    topk = a.engine.generate(emb, "topk-weighted")
    means = a.repository.stacked()[0]
    chosen = {e.name for e in topk.experts}
    allx = torch.cat([means, oracle, sg, topk.lora[None]])
    centre = allx.mean(0)
    _, _, v = torch.linalg.svd(allx - centre, full_matrices=False)
    proj = lambda x: ((x - centre) @ v[:2].T).numpy()  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.5, 5))
    pm = proj(means)
    for i, n in enumerate(a.repository.names):
        ax.scatter(*pm[i], marker="s", s=60 if n in chosen else 30, c="tab:red" if n in chosen else "tab:gray", zorder=3)
        if n in chosen:  # label only the chosen experts: the rest would be unreadable
            ax.annotate(n[:40], pm[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.scatter(*proj(oracle).T, c="tab:green", s=14, label=f"oracle snapshots ({len(oracle)})")
    # The prior mean as a hollow star under the samples: they often lie within its outline.
    star = proj(topk.lora[None]).T
    ax.scatter(*star, facecolors="none", edgecolors="black", marker="*", s=220, zorder=4, label="topk-weighted (prior mean)")
    ax.scatter(*proj(sg).T, c="tab:blue", s=10, alpha=0.7, zorder=5, label=f"sg-lora samples ({args.samples})")
    ax.scatter([], [], marker="s", c="tab:red", label="chosen experts")
    ax.scatter([], [], marker="s", c="tab:gray", label="other experts")
    ax.set_title("\n".join(textwrap.wrap(f"LoRA space, unseen task: {desc}", 90)), fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(args.out) as tmp:  # a failed write leaves an older figure as it was
        fig.savefig(tmp, dpi=110, format=args.out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
