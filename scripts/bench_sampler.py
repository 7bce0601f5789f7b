"""In-process A/B of the CVAE sampling path: the generator's own ``F.linear`` layers (releases <= 0.5.0)
against its oneDNN copy (``CVAE.packed``, what the engine samples with on the CPU).

    python scripts/bench_sampler.py --artifacts artifacts/offline-default [--threads 1]

Each step encodes fresh descriptions first, so the generator's weights are as cold as they are in the
service after a text encoding, then times ``Engine.generate_many`` (priors, CVAE passes) for a lone
sg-lora request and for 16 at once. The two variants alternate step by step, so a drift in the
machine's speed falls on both. Prints each variant's pass rows and the medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the service's default: 1 per model thread)")
    p.add_argument("--text-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=300, help="lone-request steps; 16-request steps are 2/5 of it")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the two variants alternate step by step), got {args.steps}")

    import torch

    from sglora.artifacts import ArtifactError, load_artifacts
    from sglora.engine import Request

    torch.set_num_threads(args.threads)
    try:
        a = load_artifacts(args.artifacts, "cpu")
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.backbone.set_text_dtype(getattr(torch, args.text_dtype))
    packed = a.engine
    plain = copy.copy(packed)
    plain.sampler, plain._pass_rows = a.generator, None
    variants = {"F.linear": plain, "oneDNN": packed}
    print(
        f"{args.threads} torch thread(s); pass rows: "
        + ", ".join(f"{k} {list(e.pass_rows)}" for k, e in variants.items())
        + ("" if packed.sampler is not a.generator else " (this torch has no oneDNN: both variants are F.linear)")
    )
    for rows, steps in ((1, args.steps), (16, max(2, args.steps * 2 // 5))):
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode():
            for i in range(steps):
                name = list(variants)[i % 2]
                engine = variants[name]
                texts = [f"This is a classification task for recognizing item number {i}-{j}" for j in range(rows)]
                emb = engine.embed(texts)
                t0 = time.perf_counter()
                engine.generate_many(emb, [Request("sg-lora", seed=1000 * i + j) for j in range(rows)])
                times[name].append(1000 * (time.perf_counter() - t0))
        med = {k: statistics.median(v[10:] if len(v) > 20 else v) for k, v in times.items()}
        print(
            f"{rows:2d} request(s): F.linear {med['F.linear']:.2f} ms, oneDNN {med['oneDNN']:.2f} ms "
            f"({med['oneDNN'] / med['F.linear']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
