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


def _script(name: str):
    """A script of scripts/ imported as a module (its main() called in this process: no torch start-up)."""
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _refused(capsys, name: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of a script's main(argv) that refuses its arguments: any exception but
    SystemExit (a traceback from the command line) fails the test."""
    capsys.readouterr()
    try:
        code = _script(name).main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # raise SystemExit("message"): printed by the interpreter, status 1
        code, err = 1, err + code
    return code, err


def _run(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=60)


def test_plot_service_bench_target_scales_with_model_threads():
    plot = _script("plot_service_bench")
    run = plot.load(ROOT / "docs" / "bench" / "cpu-offline-default-0.9.11-epyc25-mt2.json")
    assert run["model_threads"] == 2 and run["throughput_ratio"] > 3  # the run met the 3x target
    assert plot.target_ms(run) == pytest.approx(2 * 1000 / run["rps_1"] / 3)
    loaded = sum(v for _, v in plot.segments(run)[2])
    assert loaded < plot.target_ms(run) and loaded > plot.target_ms({**run, "model_threads": 1})  # drawn as met
    assert plot.target_ms({k: v for k, v in run.items() if k != "model_threads"}) == pytest.approx(1000 / run["rps_1"] / 3)


def test_plot_scripts_refuse_an_unwritable_out(tmp_path):
    bench = ROOT / "docs" / "bench" / "cpu-offline-default-0.9.11-epyc25-mt2.json"
    load = ROOT / "docs" / "bench" / "load-redis-pause-0.9.9-amx.json"
    for script, result in (("plot_service_bench.py", bench), ("plot_loadtest.py", load)):
        p = _run(script, str(result), "--out", str(tmp_path))
        assert p.returncode == 2 and "is a directory" in p.stderr and "Traceback" not in p.stderr, p.stderr
        p = _run(script, str(result), "--out", str(tmp_path / "x.xyz"))
        assert p.returncode == 2 and "cannot write .xyz" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_loadtest_refuses_bad_arguments_before_measuring(tmp_path):
    url = ["--url", "http://127.0.0.1:1"]
    for args, message in (
        ([*url, "--duration", "nan"], "--duration must be a finite number"),
        ([*url, "--duration", "0"], "--duration must be a finite number"),
        ([*url, "--max-requests", "0"], "--max-requests must be >= 1"),
        (["--url", "http://127.0.0.1:abc"], "--url http://127.0.0.1:abc"),
        (["--url", "http://127.0.0.1:99999"], "out of range"),
        ([*url, "--json", str(tmp_path)], "is a directory"),
        ([*url, "--json", str(tmp_path / "file" / "out.json")], "is not a directory"),
    ):
        (tmp_path / "file").write_text("")
        p = _run("loadtest.py", *args)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_bench_service_refuses_bad_arguments_before_measuring(tmp_path, capsys):
    code, err = _refused(capsys, "bench_service", ["--artifacts", str(tmp_path / "nope")])
    assert code == 1 and "artefact directory not found" in err
    for args, message in (
        (["--threads", "-1"], "--threads and --model-threads must be >= 0"),
        (["--model-threads", "-2"], "--threads and --model-threads must be >= 0"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--requests", "0"], "--requests, --throughput-requests, --clients, --replicas and --workers must be >= 1"),
        (["--clients", "0"], "--requests, --throughput-requests, --clients, --replicas and --workers must be >= 1"),
        (["--replicas", "0"], "--requests, --throughput-requests, --clients, --replicas and --workers must be >= 1"),
        (["--workers", "0"], "--requests, --throughput-requests, --clients, --replicas and --workers must be >= 1"),
    ):
        code, err = _refused(capsys, "bench_service", ["--artifacts", str(tmp_path), *args])
        assert code == 2 and message in err, (args, err)


def test_bench_service_reads_no_redis_cpu_from_a_redis_that_does_not_answer():
    """The service fails open without Redis, and a run measuring it must too: reading Redis's CPU raised."""
    import math

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_service
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert math.isnan(bench_service.redis_cpu_s("redis://127.0.0.1:1/0")) and math.isnan(bench_service.redis_cpu_s(""))
    meter = bench_service.CpuMeter([os.getpid()], "redis://127.0.0.1:1/0")
    with meter.measure():
        sum(i * i for i in range(200_000))
    cpu = meter.per_request_ms(10)
    assert math.isnan(cpu["redis"]) and cpu["clients"] > 0 and cpu["cores"] > 0


def test_bench_sampler_refuses_bad_steps_and_threads(tmp_path, capsys):
    for args, message in ((["--steps", "1"], "--steps must be >= 2"), (["--threads", "0"], "--threads must be >= 1")):
        code, err = _refused(capsys, "bench_sampler", ["--artifacts", str(tmp_path), *args])
        assert code == 2 and message in err, (args, err)


def test_compare_runs_refuses_what_is_not_an_evaluation(tmp_path, capsys):
    for i, (content, message) in enumerate((
        ({}, "no methods"),
        ([], "a JSON list"),
        ({"run": {"timeline": {}}}, "no methods"),  # a load-test result
        ({"methods": {}, "tasks": {}}, "empty or malformed 'methods'"),
        ({"methods": {"x": {"accuracy": 1}}, "tasks": {"t": {"x": {"accuracy": 1}}}}, "no method of"),
    )):  # fmt: skip
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(content))
        code, err = _refused(capsys, "compare_runs", [str(path)])
        assert code == 2 and message in err, (content, err)


def test_plot_lora_space_refuses_bad_arguments(tiny_artifacts_session, tmp_path, capsys):
    art = ["--artifacts", str(tiny_artifacts_session)]
    for args, message in (
        (["--artifacts", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")], "artefact directory not found"),
        ([*art, "--samples", "0", "--out", str(tmp_path / "a.png")], "--samples must be >= 1"),
        ([*art, "--out", str(tmp_path)], "is a directory"),
        ([*art, "--out", str(tmp_path / "a.xyz")], "cannot write .xyz"),
    ):
        code, err = _refused(capsys, "plot_lora_space", args)
        assert code == 2 and message in err, (args, err)
    assert list(tmp_path.iterdir()) == []


def test_eval_text_dtype_checks_before_copying(tiny_artifacts_session, tiny_config, tmp_path, capsys):
    import dataclasses

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config.to_dict()))
    other = tmp_path / "other.yaml"
    experts = dataclasses.replace(tiny_config.experts, epochs=tiny_config.experts.epochs + 1)
    other.write_text(yaml.safe_dump(dataclasses.replace(tiny_config, experts=experts).to_dict()))
    copy = tmp_path / "copy"
    base = ["--artifacts", str(tiny_artifacts_session), "--copy", str(copy)]
    for args, message in (
        (["--config", str(config), "--on", "val"], "has no val tasks"),  # the tiny config has none
        (["--config", str(tmp_path / "nope.yaml")], "config file not found"),
        (["--config", str(other)], "was built with other"),
    ):
        code, err = _refused(capsys, "eval_text_dtype", [*base, *args])
        assert code == 1 and message in err and not copy.exists(), (args, err)


def test_generator_learning_curve_refuses_bad_inputs(tiny_artifacts_session, tiny_config, tmp_path, capsys):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config.to_dict()))
    (tmp_path / "file").write_text("")
    out = tmp_path / "curve"
    art = ["--artifacts", str(tiny_artifacts_session)]
    for args, message in (
        (["--artifacts", str(tmp_path / "nope"), "--config", str(config), "--out", str(out)], "no artefacts there"),
        ([*art, "--config", str(tmp_path / "nope.yaml"), "--out", str(out)], "config file not found"),
        ([*art, "--config", str(config), "--out", str(tmp_path / "file")], "is a file"),
        ([*art, "--config", str(ROOT / "configs" / "offline-default.yaml"), "--out", str(out)], "was built with other"),
        ([*art, "--config", str(config), "--out", str(out)], "no validation tasks"),  # the tiny config has none
    ):
        code, err = _refused(capsys, "generator_learning_curve", args)
        assert code == 2 and message in err and "--out directory" not in err and not out.exists(), (args, err)


def test_bench_repository_small_run_grows_a_copy_and_measures_a_change(tiny_artifacts_session, tmp_path):
    """scripts/bench_repository.py end to end, small: the copy grows to 8 experts, the server serves them,
    an addition and a removal go through, and the original artefacts are left as they were."""
    index = tiny_artifacts_session / "repository" / "repository.json"
    before = index.read_bytes()
    out, work = tmp_path / "bench.json", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_repository.py"), "--artifacts", str(tiny_artifacts_session)]
    cmd += ["--experts", "8", "--work", str(work), "--requests", "2", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "SGLORA_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["experts_before"] == 4 and r["experts"] == 8 and index.read_bytes() == before
    assert (
        len(json.loads((work / "repository" / "repository.json").read_text())["experts"]) == 8
    )  # the removal undid the addition
    for key in ("startup_s", "lone_miss_ms", "add_ms", "next_after_add_ms", "remove_ms", "next_after_remove_ms"):
        assert r[key] > 0, key
    assert len(r["first_two_after_add_ms"]) == len(r["first_two_after_remove_ms"]) == 2
    assert r["generations_during_add"] >= 1 and r["longest_during_add_ms"] > 0  # a client generated meanwhile
    assert r["list_experts_bytes"] > 0 and "| POST /experts (an addition) |" in p.stdout
    assert "| the longest /generate while it ran (of one client's) |" in p.stdout


def test_bench_repository_refuses_bad_arguments_before_copying(tmp_path, capsys):
    (tmp_path / "work").mkdir()
    for args, message in (
        (["--experts", "0", "--work", str(tmp_path / "new")], "--experts and --requests must be >= 1"),
        (["--experts", "9", "--work", str(tmp_path / "work")], "exists; give a new path"),
        (["--experts", "9", "--work", str(tmp_path / "new"), "--json", str(tmp_path)], "is a directory"),
    ):
        code, err = _refused(capsys, "bench_repository", ["--artifacts", str(tmp_path), *args])
        assert code == 2 and message in err, (args, err)
    code, err = _refused(
        capsys, "bench_repository", ["--artifacts", str(tmp_path), "--experts", "9", "--work", str(tmp_path / "new")]
    )
    assert code == 1 and "holds no artefacts" in err and not (tmp_path / "new").exists()


def test_bench_protocol_times_both_protocols(tmp_path):
    """scripts/bench_protocol.py end to end, small: both servers answer every request on their one connection."""
    out = tmp_path / "protocol.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_protocol.py"), "--blocks", "2", "--requests", "3", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("plain_GET_median_us", "bounded_GET_median_us", "plain_POST_median_us", "bounded_POST_median_us"):
        assert r[key] > 0, key
    assert r["POST_median_ratio"] == r["bounded_POST_median_us"] / r["plain_POST_median_us"]
    assert "| POST |" in p.stdout and "bounded / plain" in p.stdout


def test_bench_protocol_refuses_bad_arguments(tmp_path, capsys):
    for args, message in (
        (["--blocks", "0"], "--blocks and --requests must be >= 1"),
        (["--json", str(tmp_path)], "is a directory"),
    ):
        code, err = _refused(capsys, "bench_protocol", args)
        assert code == 2 and message in err, (args, err)
