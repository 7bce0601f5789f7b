"""The benchmark and ablation scripts, small, on the tiny artefacts (their full runs are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The scripts import this checkout's packages (not those of another checkout installed in the venv).
ENV = {
    **os.environ,
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def test_bench_sampler_times_both_sampling_paths(tiny_artifacts_session):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_sampler.py"), "--artifacts", str(tiny_artifacts_session)]
    p = subprocess.run(cmd + ["--steps", "6"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if "request(s):" in line]
    assert len(lines) == 2, p.stdout
    for line in lines:
        m = re.search(r"F\.linear ([\d.]+) ms, oneDNN ([\d.]+) ms \(([\d.]+)x\)", line)
        assert m, line
        plain, packed, ratio = (float(x) for x in m.groups())
        # The ratio is of the unrounded medians; the times are printed to 0.005 ms.
        assert plain > 0 and packed > 0 and abs(ratio - packed / plain) <= 0.005 + 0.01 / plain
    assert "pass rows: F.linear" in p.stdout


def test_bench_sampler_refuses_a_missing_directory(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_sampler.py"), "--artifacts", str(tmp_path / "nope")]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_generator_learning_curve_trains_on_subsets(tiny_config, tmp_path):
    """On tiny artefacts with a validation task: one generator per fraction, evaluated on val; the source
    directory stays as it was (the work copies are hard links and every stage writes by rename)."""
    import dataclasses

    import yaml

    from training.pipeline import run_pipeline

    cfg = dataclasses.replace(
        tiny_config,
        split=dataclasses.replace(tiny_config.split, val=1, test=1),
        experts=dataclasses.replace(tiny_config.experts, epochs=4),
        generator=dataclasses.replace(tiny_config.generator, epochs=5),
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    art = tmp_path / "art"
    run_pipeline(cfg, art, stages=("experts", "repository", "generator"))
    before = {p.name: p.stat().st_mtime_ns for p in art.rglob("*")}
    manifest = (art / "manifest.json").read_text()

    out = tmp_path / "curve"
    cmd = [sys.executable, str(ROOT / "scripts" / "generator_learning_curve.py"), "--artifacts", str(art)]
    cmd += ["--config", str(config), "--out", str(out), "--fractions", "0.5", "1", "--seeds", "0"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    rows = json.loads((out / "learning-curve.json").read_text())
    assert [r["fraction"] for r in rows] == [0.5, 1.0] and rows[0]["tasks"] < rows[1]["tasks"]
    for r in rows:
        assert set(r["sg-lora"]) == {"accuracy", "r1"} and r["sg-lora"]["r1"] is not None
    assert (out / "learning-curve.png").stat().st_size > 0
    assert not [d for d in out.iterdir() if d.is_dir()]  # the work copies are gone
    assert {p.name: p.stat().st_mtime_ns for p in art.rglob("*")} == before
    assert (art / "manifest.json").read_text() == manifest


def _results(tmp_path: Path, name: str, scores: dict[str, dict[str, float]], on: str = "test") -> Path:
    """A results.json of fashion tasks (``on``: the split evaluated): scores[task][method] = accuracy."""
    methods = sorted({m for row in scores.values() for m in row})
    tasks = {t: {m: {"accuracy": a} for m, a in row.items()} for t, row in scores.items()}
    avg = {m: {"accuracy": sum(tasks[t][m]["accuracy"] for t in tasks) / len(tasks)} for m in methods}
    d = tmp_path / name / "eval"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"methods": avg, "tasks": tasks, "evaluated_on": on}))
    return tmp_path / name


def test_compare_runs_pools_seeds_per_task(tmp_path):
    a = _results(tmp_path, "s0", {"t1": {"sg-lora": 80, "topk-weighted": 70}, "t2": {"sg-lora": 60, "topk-weighted": 64}})
    b = _results(tmp_path, "s1", {"t1": {"sg-lora": 90, "topk-weighted": 70}, "t2": {"sg-lora": 60, "topk-weighted": 60}})
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(a), str(b)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # run averages: sg-lora 70 and 75, topk-weighted 67 and 65
    assert "| sg-lora | 72.50 (70.00–75.00) |" in p.stdout
    assert "| topk-weighted | 66.00 (65.00–67.00) |" in p.stdout
    # per-task means over runs: t1 85 - 70 = +15, t2 60 - 62 = -2: mean 6.5, s.e. |15 - (-2)| / 2 = 8.5
    assert "| sg-lora - topk-weighted | accuracy | 2 | +6.50 ± 8.50 | 1 / 0 / 1 |" in p.stdout


def test_compare_runs_pools_each_runs_share_of_the_oracle_gain(tmp_path):
    scores = {"zero-shot": 40, "sg-lora": 70, "topk-weighted": 60, "oracle": 80}
    a = _results(tmp_path, "s0", {"t1": scores, "t2": scores})  # sg-lora (70-40)/(80-40) = 75 %, top-K 50 %
    b = _results(tmp_path, "s1", {"t1": {**scores, "sg-lora": 80}, "t2": {**scores, "sg-lora": 80}})  # 100 %
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(a), str(b)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| sg-lora | 87.5 (75.0–100.0) |" in p.stdout
    assert "| topk-weighted | 50.0 (50.0–50.0) |" in p.stdout
    assert "| oracle | 80.00 (80.00–80.00) |" in p.stdout  # in the averages, not among the shares


def test_compare_runs_refuses_runs_of_other_tasks(tmp_path):
    a = _results(tmp_path, "s0", {"t1": {"sg-lora": 80}})
    b = _results(tmp_path, "s1", {"t2": {"sg-lora": 80}})
    script = str(ROOT / "scripts" / "compare_runs.py")
    p = subprocess.run([sys.executable, script, str(a), str(b)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "different tasks" in p.stderr and "Traceback" not in p.stderr
    missing = [sys.executable, script, str(tmp_path / "nope")]
    p = subprocess.run(missing, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_plot_service_bench_draws_the_miss_breakdown(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plot_service_bench as plot
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    run = {
        "bare_embed_ms": 8.0,
        "miss_ms": 12.0,
        "rps_1": 80.0,
        "throughput_ratio": 2.5,
        "mean_batch": 20.0,
        "lone_miss_ms": {"client": 13.0, "server": 12.0, "queue": 0.1, "text_encoding": 9.0, "prior": 0.5, "sampling": 1.2,
                         "serialisation": 0.3},
        "stage_ms_per_request": {"text_encoding": 4.0, "prior": 0.5, "sampling": 0.1, "serialisation": 0.5},
    }  # fmt: skip
    miss, alone, loaded = plot.segments(run)
    assert dict(miss)["server, other"] == pytest.approx(0.9) and dict(miss)["HTTP and client"] == 1.0  # what the stages leave
    assert sum(v for _, v in miss) == pytest.approx(13.0) and sum(v for _, v in loaded) == pytest.approx(5.1) and len(alone) == 4
    result = tmp_path / "bench.json"
    result.write_text(json.dumps([{"bare_embed_ms": 1.0}, run]))  # a list: the last run is drawn
    out = tmp_path / "figures" / "miss.png"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_service_bench.py"), str(result), "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob("*.tmp.png"))
    result.write_text(json.dumps({"bare_embed_ms": 1.0}))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_service_bench.py"), str(result)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode != 0 and "missing miss_ms" in p.stderr and "Traceback" not in p.stderr
    result.write_text(json.dumps({**run, "lone_miss_ms": {"client": 13.0}}))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_service_bench.py"), str(result)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode != 0 and "lone_miss_ms.server" in p.stderr and "Traceback" not in p.stderr


def test_compare_runs_names_the_split_and_refuses_to_mix_them(tmp_path):
    script = str(ROOT / "scripts" / "compare_runs.py")
    val = [_results(tmp_path, f"v{i}", {"t1": {"sg-lora": 80}}, on="val") for i in range(2)]
    p = subprocess.run([sys.executable, script, *map(str, val)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "1 validation tasks (not unseen: they chose the generator's epoch" in p.stdout, p.stderr
    test = _results(tmp_path, "t0", {"t1": {"sg-lora": 80}})
    p = subprocess.run(
        [sys.executable, script, str(test), str(val[0])], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and "different splits" in p.stderr and "Traceback" not in p.stderr
