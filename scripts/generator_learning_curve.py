"""Learning curve of the generator: sg-lora on the validation tasks against the number of training tasks.

    python scripts/generator_learning_curve.py --artifacts artifacts/offline-default --config configs/offline-default.yaml

For each fraction of the generator's training tasks (the ``train`` split plus, with
``generator.include_experts``, the experts with leave-one-out priors) and each seed, a hard-linked copy
of the artefact directory gets a generator trained on a random subset of that size (the subset drawn
with the seed, which is also the generator's), and is evaluated on the validation tasks (sg-lora and
topk-weighted; never the test tasks). The experts, the repository and the priors stay those of
``--artifacts``. Writes ``learning-curve.json`` and ``learning-curve.png`` under ``--out``.

Question answered: would more training tasks help the generator beat its prior mean (topk-weighted)?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True, help="a directory built by `sglora pipeline` (left untouched)")
    p.add_argument("--config", type=Path, required=True, help="the config it was built with")
    p.add_argument("--out", type=Path, default=Path("learning-curve"), help="work and result directory")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("--fractions must lie in (0, 1]")

    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: give a directory (work copies and results go there)")
    if not (args.artifacts / "manifest.json").is_file():
        p.error(f"--artifacts {args.artifacts}: no artefacts there (no manifest.json)")

    import training.pipeline as pipeline
    from sglora import artifacts as art
    from sglora.io import atomic_path, read_json
    from training.config import load_config

    try:
        cfg = load_config(args.config)
        stages = art.read_manifest(args.artifacts).get("stages", {})
        built = pipeline._built_config(args.artifacts)
        splits = read_json(args.artifacts / "splits.json", "task splits")
    except (OSError, ValueError) as e:
        p.error(str(e))
    if "repository" not in stages:
        p.error(f"--artifacts {args.artifacts}: run the pipeline's 'repository' stage first")
    changed = [k for k in art.EXPERT_SECTIONS if built.get(k) != cfg.to_dict()[k]]
    if changed:
        p.error(f"--artifacts {args.artifacts} was built with other {', '.join(changed)} settings than --config {args.config}")
    if not isinstance(splits, dict) or not splits.get("val"):
        p.error(f"--artifacts {args.artifacts} has no validation tasks (split.val: 0): the curve is measured on them")
    pool = list(splits.get("train", [])) + (list(splits.get("experts", [])) if cfg.generator.include_experts else [])
    if not pool:
        p.error(
            f"--artifacts {args.artifacts}: the generator has no training tasks (split.train: 0, no generator.include_experts)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fraction in args.fractions:
        for seed in args.seeds:
            n = max(1, round(fraction * len(pool)))
            chosen = random.Random(seed).sample(pool, n)
            work = args.out / f"f{fraction:g}-s{seed}"
            if work.exists():
                shutil.rmtree(work)
            subprocess.run(["cp", "-al", str(args.artifacts), str(work)], check=True)  # stages write by rename
            run_cfg = dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, seed=seed))
            pipeline.stage_generator(run_cfg, work, only_tasks=chosen)
            result = pipeline.stage_evaluate(run_cfg, work, methods=("topk-weighted", "sg-lora"), on="val")
            row = {"fraction": fraction, "seed": seed, "tasks": n, **_summary(result)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work)
    with atomic_path(args.out / "learning-curve.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    _plot(rows, args.out / "learning-curve.png")
    return 0


def _summary(result: dict) -> dict:
    """Mean fashion accuracy and tux R@1 (I2T and T2I averaged) per method over the validation tasks."""
    out = {}
    for method in ("topk-weighted", "sg-lora"):
        acc = [r[method]["accuracy"] for r in result["tasks"].values() if "accuracy" in r[method]]
        r1 = [(r[method]["i2t_r1"] + r[method]["t2i_r1"]) / 2 for r in result["tasks"].values() if "i2t_r1" in r[method]]
        out[method] = {"accuracy": sum(acc) / len(acc) if acc else None, "r1": sum(r1) / len(r1) if r1 else None}
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Classification accuracy where the validation tasks have it (fashion-tasks), else retrieval R@1.
    metric = "accuracy" if all(r[m]["accuracy"] is not None for r in rows for m in ("sg-lora", "topk-weighted")) else "r1"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = sorted({r["tasks"] for r in rows})
    for method, style in (("sg-lora", "o-"), ("topk-weighted", "s--")):
        means = []
        for x in xs:
            vals = [r[method][metric] for r in rows if r["tasks"] == x]
            ax.scatter([x] * len(vals), vals, s=12, alpha=0.5, color="C0" if method == "sg-lora" else "C1")
            means.append(sum(vals) / len(vals))
        ax.plot(xs, means, style, label=method, color="C0" if method == "sg-lora" else "C1")
    ax.set_xlabel("generator training tasks")
    ax.set_ylabel("accuracy on the val tasks (%)" if metric == "accuracy" else "R@1 (I2T, T2I mean) on the val tasks (%)")
    ax.legend()
    ax.set_title("Generator learning curve (dots: seeds)")
    fig.tight_layout()
    from sglora.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
