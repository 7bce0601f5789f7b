"""A reduced offline default (few tasks, few epochs) on the real packages: pretrained towers and Debian data."""

import dataclasses
import json
from pathlib import Path

import pytest

from training.config import DataConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _reduced():
    cfg = load_config(ROOT / "configs" / "offline-default.yaml")
    fashion, tux = cfg.data.sources
    sources = (
        dataclasses.replace(fashion, train_per_task=12, test_per_task=8, options={"num_tasks": 12}),
        dataclasses.replace(tux, train_per_task=12),
    )
    return dataclasses.replace(
        cfg,
        data=DataConfig(kind="combined", sources=sources),
        split=dataclasses.replace(
            cfg.split,
            experts={"fashion": 4, "tux": 3},
            train={"fashion": 3, "tux": 2},
            val={"fashion": 1},
            test={"fashion": 2, "tux": 1},
        ),
        experts=dataclasses.replace(cfg.experts, epochs=4, keep_last=2),
        generator=dataclasses.replace(cfg.generator, epochs=5),
        evaluation=dataclasses.replace(cfg.evaluation, sg_samples=1),
    )


def test_reduced_offline_default_runs_end_to_end(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from sglora.artifacts import load_artifacts
    from training.config import METHODS
    from training.pipeline import run_pipeline

    cfg = _reduced()
    out = tmp_path / "od"
    run_pipeline(cfg, out)
    results = json.loads((out / "eval" / "results.json").read_text())
    for m in METHODS:
        assert {"accuracy", "i2t_r1", "t2i_r10"} <= set(results["methods"][m]), m
    assert len(results["test_tasks"]) == 3
    # Mixed-source repository; a footwear paraphrase picks footwear experts when there are any.
    a = load_artifacts(out)
    assert {n.split("-")[0] for n in a.repository.names} == {"fashion", "tux"}
    g = a.engine.generate(a.engine.embed(["tell footwear apart: sandals, sneakers and boots"])[0], "topk-weighted", top_k=2)
    assert all(e.name.startswith("fashion") for e in g.experts)
