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

from expert_store.prior import select_experts
from sglora import artifacts as art
from training import pipeline
from training.config import load_config


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
                    "cosine": float((x * y).sum()),
                    "same_top_k": same,
                    "max_alpha_change": float((a32 - a16).abs().max()) if same else None,
                }
            return e16

        engine.embed = embed  # the task descriptions only: evaluation encodes prompts with the backbone itself
        return loaded

    pipeline.art.load_artifacts = load_with_bf16_descriptions
    cfg = load_config(args.config)
    for on in args.on or ["test", "val"]:
        pipeline.stage_evaluate(cfg, args.copy, "cpu", on=on)
    (args.copy / "text_dtype.json").write_text(json.dumps(choices, indent=1) + "\n")
    same = sum(c["same_top_k"] for c in choices.values())
    alpha = max((c["max_alpha_change"] or 0.0) for c in choices.values())
    print(f"{len(choices)} descriptions: same top-K (in order) for {same}; lowest cosine", end=" ")
    print(f"{min(c['cosine'] for c in choices.values()):.6f}; largest alpha change where the same {alpha:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
