"""What the service's bfloat16 text tower does to quality: every method evaluated with the task
descriptions encoded in bfloat16 (class prompts, captions and images in float32, as the service runs
them), on a copy of an artefact directory, and how often the chosen experts change. With
``--generator-dtype bfloat16`` the CVAE samples in bfloat16 too, as the service does with
SGLORA_GENERATOR_DTYPE=bfloat16 (or auto, on a CPU with bf16 dot products).

    python scripts/eval_text_dtype.py --artifacts artifacts/offline-default --config configs/offline-default.yaml \
        --copy /tmp/od-bf16 [--on test --on val] [--generator-dtype bfloat16]

Writes the copy's eval/ (and eval-val/) as `sglora evaluate` does, plus text_dtype.json: per description
the cosine between its float32 and bfloat16 embeddings, whether the top-K experts (in order) are the
same, and the largest change of a mixing weight alpha when they are.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from expert_store.prior import select_experts
from sglora import artifacts as art
from sglora.io import atomic_path, read_json
from sglora.methods import SAMPLING_METHODS
from training import pipeline
from training.config import PipelineConfig, load_config


def check(artifacts: Path, config: Path, on: list[str] | None) -> tuple[PipelineConfig, list[str]]:
    """(the config, the splits to evaluate) once the artefacts, the config and the splits fit; SystemExit
    saying what does not. Run before anything is copied. A split not asked for explicitly (the default,
    test and val) is skipped with a note when the artefacts have no tasks in it."""
    try:
        cfg = load_config(config)
        built = pipeline._built_config(artifacts)
        changed = [k for k in (*art.EXPERT_SECTIONS, "prior", "generator") if built.get(k) != cfg.to_dict()[k]]
        if changed:
            raise ValueError(f"{artifacts} was built with other {', '.join(changed)} settings than {config}")
        sampling = any(m in SAMPLING_METHODS for m in cfg.evaluation.methods)
        art.load_artifacts(artifacts, "cpu", require_generator=sampling)
        splits = read_json(artifacts / "splits.json", "task splits")
    except (OSError, ValueError) as e:  # ArtifactError is a ValueError
        raise SystemExit(f"eval_text_dtype: {e}") from None
    wanted = on or ["test", "val"]
    missing = [s for s in wanted if not (isinstance(splits, dict) and splits.get(s))]
    if missing and on:
        raise SystemExit(
            f"eval_text_dtype: {artifacts} has no {' or '.join(missing)} tasks (splits.json); leave out --on {missing[0]}"
        )
    for s in missing:
        print(f"eval_text_dtype: {artifacts} has no {s} tasks (splits.json): not evaluated on them", file=sys.stderr)
    if len(missing) == len(wanted):
        raise SystemExit(f"eval_text_dtype: {artifacts} has no test or val tasks (splits.json)")
    return cfg, [s for s in wanted if s not in missing]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True, help="the config the artefacts were built with")
    p.add_argument("--copy", type=Path, required=True, help="where to copy the artefacts (evaluated there, not in place)")
    p.add_argument("--on", action="append", choices=["test", "val"], help="default: test and val")
    p.add_argument("--generator-dtype", choices=["float32", "bfloat16"], default="float32", help="what the CVAE samples in")
    args = p.parse_args(argv)
    if not (args.artifacts / "manifest.json").is_file():
        raise SystemExit(f"eval_text_dtype: {args.artifacts} holds no artefacts (no manifest.json)")
    if args.copy.exists():
        raise SystemExit(f"eval_text_dtype: {args.copy} exists; pass a new path")
    cfg, splits = check(args.artifacts, args.config, args.on)
    shutil.copytree(args.artifacts, args.copy)
    choices: dict[str, dict] = {}
    load = art.load_artifacts

    def load_with_bf16_descriptions(*a, **k):
        loaded = load(*a, **k)
        bf16 = copy.deepcopy(loaded.backbone)
        bf16.set_text_dtype(torch.bfloat16)
        engine, embed32 = loaded.engine, loaded.engine.embed
        engine.set_generator_dtype(getattr(torch, args.generator_dtype))
        stored = loaded.repository.stacked()[2]

        def embed(texts: list[str]) -> torch.Tensor:
            e32, e16 = embed32(texts), bf16.encode_text(texts).cpu()
            for text, x, y in zip(texts, e32, e16, strict=True):
                i32, a32, _ = select_experts(x, stored, engine.top_k, engine.temperature)
                i16, a16, _ = select_experts(y, stored, engine.top_k, engine.temperature)
                same = i32.tolist() == i16.tolist()
                choices[text] = {
                    "cosine": float(F.cosine_similarity(x.float(), y.float(), dim=0)),
                    "same_top_k": same,
                    "max_alpha_change": float((a32 - a16).abs().max()) if same else None,
                }
            return e16

        engine.embed = embed  # the task descriptions only: evaluation encodes prompts with the backbone itself
        return loaded

    pipeline.art.load_artifacts = load_with_bf16_descriptions
    for on in splits:
        pipeline.stage_evaluate(cfg, args.copy, "cpu", on=on)
    with atomic_path(args.copy / "text_dtype.json") as tmp:
        tmp.write_text(json.dumps(choices, indent=1) + "\n")
    same = sum(c["same_top_k"] for c in choices.values())
    alpha = max((c["max_alpha_change"] or 0.0) for c in choices.values())
    print(f"{len(choices)} descriptions: same top-K (in order) for {same}; lowest cosine", end=" ")
    print(f"{min(c['cosine'] for c in choices.values()):.6f}; largest alpha change where the same {alpha:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
