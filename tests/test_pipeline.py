import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sglora.artifacts import ArtifactError, load_artifacts
from sglora.cli import main
from sglora.io import sha256_file
from training.config import METHODS


def test_full_pipeline_writes_every_stage(tiny_artifacts_session):
    out = tiny_artifacts_session
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"experts", "repository", "generator", "evaluate"}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for m in METHODS:
        keys = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "image_cosine"}
        assert set(results["methods"][m]) == keys
        assert -1.0 <= results["methods"][m]["image_cosine"] <= 1.0
    assert set(results["tasks"]) == set(results["test_tasks"])
    assert "| sg-lora |" in (out / "eval" / "results.md").read_text()
    first = results["paired"][0]  # tiny is a retrieval benchmark: no accuracy
    want = ("sg-lora", "topk-weighted", "i2t_r1", len(results["tasks"]))
    assert (first["a"], first["b"], first["metric"], first["tasks"]) == want
    assert "| sg-lora - topk-weighted | i2t_r1 |" in (out / "eval" / "results.md").read_text()
    assert "mean cosine between a task's held-out image embeddings" in (out / "eval" / "results.md").read_text()
    assert (out / "generator" / "history.png").stat().st_size > 0
    assert (out / "eval" / "results.png").stat().st_size > 0  # every task's score per method, beside the tables
    assert results["seed"] == 0 and results["sg_samples"] == 2
    history = json.loads((out / "generator" / "history.json").read_text())
    generator = manifest["stages"]["generator"]
    assert (generator["epochs"], generator["kept_epoch"]) == (len(history), len(history) - 1)  # no val tasks: the last
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["experts"]) & set(splits["test"])


def test_paired_differences_by_hand():
    from training.pipeline import paired_differences

    rows = {
        "t1": {"sg-lora": {"accuracy": 80.0}, "topk-weighted": {"accuracy": 70.0}},
        "t2": {"sg-lora": {"accuracy": 60.0}, "topk-weighted": {"accuracy": 60.0}},
        "t3": {"sg-lora": {"accuracy": 50.0}, "topk-weighted": {"accuracy": 52.0}},
        "t4": {"sg-lora": {"i2t_r1": 1.0}, "topk-weighted": {"i2t_r1": 0.0}},  # another benchmark's task
    }
    (acc, r1) = paired_differences(rows)
    # differences 10, 0, -2: mean 8/3, sample sd sqrt(((22/3)^2 + (8/3)^2 + (14/3)^2) / 2), s.e. sd / sqrt(3)
    sd = (((22 / 3) ** 2 + (8 / 3) ** 2 + (14 / 3) ** 2) / 2) ** 0.5
    assert acc["metric"] == "accuracy" and acc["tasks"] == 3
    assert acc["mean"] == pytest.approx(8 / 3) and acc["stderr"] == pytest.approx(sd / 3**0.5)
    assert (acc["wins"], acc["ties"], acc["losses"]) == (1, 1, 1)
    assert r1["metric"] == "i2t_r1" and r1["tasks"] == 1 and r1["stderr"] is None  # one task: no spread
    assert paired_differences({"t1": {"sg-lora": {"accuracy": 1.0}}}) == []  # b not evaluated


def test_oracle_lora_beats_zero_shot_on_its_own_training_data(tiny_artifacts_session):
    # Sanity of expert training: a task's LoRA lowers that task's training loss.
    from training.experts import FeatureCache, prepare_task, task_loss
    from training.pipeline import load_data

    a = load_artifacts(tiny_artifacts_session)
    cfg = json.loads((tiny_artifacts_session / "config.json").read_text())
    from training.config import PipelineConfig, from_dict

    dataset = load_data(from_dict(PipelineConfig, cfg))
    name = a.repository.names[0]
    task = prepare_task(a.backbone, dataset, name, FeatureCache(a.backbone))
    d = task.train
    with torch.no_grad():
        base = task_loss(a.backbone, torch.zeros(a.backbone.spec.num_params), d.features, d.texts, d.labels)
        tuned = task_loss(a.backbone, a.repository[name].mean, d.features, d.texts, d.labels)
    assert tuned < base


def test_generate_cli_is_reproducible_and_self_describing(tiny_artifacts_session, tmp_path, capsys):
    args = ["generate", "a photo of a circle", "--artifacts", str(tiny_artifacts_session), "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.safetensors")]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["method"] == "sg-lora" and meta["seed"] == "3" and meta["description"] == "a photo of a circle"
    experts = json.loads(meta["experts"])
    assert len(experts) == 3 and abs(sum(e["weight"] for e in experts) - 1) < 1e-5
    assert all(k.startswith("base_model.model.vision_model.encoder.layers.") for k in keys)
    assert main(args[:-1] + ["4", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").read_bytes() != (tmp_path / "a.safetensors").read_bytes()
    assert (
        main(
            [
                "generate",
                "a photo of a circle",
                "--artifacts",
                str(tiny_artifacts_session),
                "--method",
                "topk-weighted",
                "--out",
                str(tmp_path / "d.zip"),
            ]
        )
        == 0
    )
    import zipfile

    assert sorted(zipfile.ZipFile(tmp_path / "d.zip").namelist()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "   ", "--out", "x.safetensors"], "description must not be empty"),
        (["generate", "a cat", "--top-k", "99", "--out", "x.safetensors"], "top_k"),
        # refused for a method that ignores it too, as the API refuses it (was a warning and a LoRA)
        (["generate", "a cat", "--method", "model-soup", "--top-k", "99", "--out", "x.safetensors"], "top_k must be between 1"),
        (["generate", "a cat", "--method", "adapter-soup", "--temperature", "0", "--out", "x.safetensors"], "temperature"),
        (["generate", "a cat", "--temperature", "0", "--out", "x.safetensors"], "temperature"),
    ],
)
def test_generate_cli_bad_input(tiny_artifacts_session, tmp_path, capsys, argv, needle):
    argv = argv[:-1] + [str(tmp_path / argv[-1]), "--artifacts", str(tiny_artifacts_session)]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_generate_cli_warns_of_options_the_method_ignores(tiny_artifacts_session, tmp_path, capsys):
    """model-soup mixes every expert with equal weights and samples nothing: --top-k, --temperature and --seed
    were ignored without a word."""
    base = ["generate", "a photo of a circle", "--artifacts", str(tiny_artifacts_session)]
    out = ["--out", str(tmp_path / "m.safetensors")]
    assert main([*base, "--method", "model-soup", "--top-k", "2", "--seed", "1", *out]) == 0
    assert "warning: --seed and --top-k do nothing for model-soup" in capsys.readouterr().err
    assert main([*base, "--method", "adapter-soup", "--temperature", "0.5", "--top-k", "2", *out]) == 0
    assert "warning: --temperature does nothing for adapter-soup" in capsys.readouterr().err
    assert main([*base, "--method", "sg-lora", "--seed", "1", "--top-k", "2", "--temperature", "0.5", *out]) == 0
    assert "warning" not in capsys.readouterr().err


def test_generate_cli_never_writes_into_the_artefact_directory(tiny_artifacts_session, capsys):
    """--out art/generator/cvae.safetensors wrote the LoRA over the generator: every command then refused
    the directory (sha256 mismatch). Any path inside it is refused, before anything is made."""
    before = sorted(p.relative_to(tiny_artifacts_session) for p in tiny_artifacts_session.rglob("*"))
    for out in (tiny_artifacts_session / "generator" / "cvae.safetensors", tiny_artifacts_session / "loras" / "a.safetensors"):
        argv = ["generate", "a photo of a circle", "--artifacts", str(tiny_artifacts_session), "--out", str(out)]
        assert main(argv) == 2
        assert "is inside the artefact directory" in capsys.readouterr().err
    assert sorted(p.relative_to(tiny_artifacts_session) for p in tiny_artifacts_session.rglob("*")) == before


def test_a_pipeline_into_a_path_that_is_not_utf8_is_refused_before_any_work(tiny_config, tmp_path):
    """safetensors writes UTF-8 paths only: the experts were trained, then the repository stage failed with
    a traceback, and every rerun again."""
    import os

    from training.pipeline import run_pipeline

    out = tmp_path / os.fsdecode(b"art\xfe")
    with pytest.raises(ValueError, match=r"art\\xfe: the artefact directory's path is not valid UTF-8"):
        run_pipeline(tiny_config, out)
    assert not out.exists()


def test_generate_cli_checks_its_out_path_first_and_names_it(tmp_path, capsys, monkeypatch):
    """A bad --out was found after the artefacts loaded and the LoRA was made, and named the temporary file."""
    from sglora import artifacts

    monkeypatch.setattr(artifacts, "load_artifacts", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "x.safetensors"  # under a file, not a folder
    assert main(["generate", "a cat", "--artifacts", str(tmp_path), "--out", str(out)]) == 2
    assert f"--out {out}: {tmp_path / 'file'} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "-5", "inf"])
def test_serve_refuses_a_graceful_timeout_that_is_not_a_finite_duration(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--artifacts", "x", "--graceful-timeout", value])
    assert e.value.code == 2 and "must be a finite number of seconds >= 0" in capsys.readouterr().err


def test_missing_artifacts_dir(tmp_path, capsys):
    assert main(["generate", "a cat", "--artifacts", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "artefact directory not found" in capsys.readouterr().err


def test_corrupt_generator_is_refused_by_name(tiny_artifacts):
    f = tiny_artifacts / "generator" / "cvae.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ArtifactError, match="cvae.safetensors"):
        load_artifacts(tiny_artifacts)


def test_damage_its_manifest_was_made_to_match_is_refused_by_name_not_a_traceback(tiny_artifacts):
    """A truncated backbone weights file whose sha256 the manifest was edited to match, and a config.json whose
    prior is not a mapping: an ArtifactError naming the problem (the CLI's and the service's message), not a
    SafetensorError or AttributeError traceback."""
    manifest_path = tiny_artifacts / "manifest.json"

    def rehash(path):
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.relative_to(tiny_artifacts).as_posix()] = sha256_file(path)
        manifest_path.write_text(json.dumps(manifest))

    config = tiny_artifacts / "config.json"
    saved = config.read_text()
    config.write_text(json.dumps({**json.loads(saved), "prior": "x"}))
    rehash(config)
    with pytest.raises(ArtifactError, match="'prior' is not a mapping"):
        load_artifacts(tiny_artifacts)
    config.write_text(saved)
    rehash(config)
    weights = [p for p in (tiny_artifacts / "backbone").glob("*.safetensors")]
    assert weights, "the tiny backbone writes its weights as safetensors"
    weights[0].write_bytes(weights[0].read_bytes()[:-7])
    rehash(weights[0])
    with pytest.raises(ArtifactError, match="not readable safetensors"):
        load_artifacts(tiny_artifacts)


def test_evaluate_names_split_tasks_the_dataset_lacks(tiny_config, tiny_artifacts):
    """A splits.json naming a test task the dataset does not have failed with the bare key ("nonexistent")."""
    from training.pipeline import stage_evaluate

    path = tiny_artifacts / "splits.json"
    splits = json.loads(path.read_text())
    path.write_text(json.dumps({**splits, "test": [*splits["test"], "nonexistent"]}))
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    manifest["files"]["splits.json"] = sha256_file(path)
    (tiny_artifacts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"splits\.json: its 'test' tasks \['nonexistent'\] are not in the dataset"):
        stage_evaluate(tiny_config, tiny_artifacts, methods=("topk-weighted",))


def test_a_deleted_or_edited_report_warns_and_its_stage_writes_it_again(tiny_config, tiny_artifacts, caplog):
    # Reports (tables, plots, loss history) are pinned but loaded by nothing: losing one must not lock the
    # directory, not even against the rerun that would write it again.
    from training.pipeline import stage_evaluate

    (tiny_artifacts / "eval" / "results.md").unlink()
    (tiny_artifacts / "generator" / "history.png").write_bytes(b"edited")
    with caplog.at_level("WARNING", logger="sglora.artifacts"):
        assert load_artifacts(tiny_artifacts).generator is not None
    warned = caplog.text
    assert "artefact file missing" in warned and "results.md" in warned
    assert "sha256 mismatch" in warned and "history.png" in warned
    stage_evaluate(tiny_config, tiny_artifacts, methods=tuple(tiny_config.evaluation.methods))
    assert (tiny_artifacts / "eval" / "results.md").is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="sglora.artifacts"):
        load_artifacts(tiny_artifacts)
    assert "results.md" not in caplog.text and "history.png" in caplog.text
    # A model file stays strict.
    (tiny_artifacts / "generator" / "cvae.json").unlink()
    with pytest.raises(ArtifactError, match="artefact file missing: .*cvae.json"):
        load_artifacts(tiny_artifacts)


def test_repository_index_without_its_record_of_the_experts_settings_is_refused(tiny_artifacts):
    """A repository copied in from another run is refused by the experts settings its index records; with that
    record deleted from the index (a file the manifest does not pin: expert changes rewrite it) it loaded."""
    idx = tiny_artifacts / "repository" / "repository.json"
    data = json.loads(idx.read_text())
    assert data.pop("provenance")
    idx.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="its index records no experts settings"):
        load_artifacts(tiny_artifacts)


def test_repository_with_another_rank_is_refused(tiny_artifacts):
    idx = tiny_artifacts / "repository" / "repository.json"
    data = json.loads(idx.read_text())
    data["lora"]["rank"] = 4
    data["lora"]["num_params"] *= 2
    from models.lora import LoraSpec

    data["lora_fingerprint"] = LoraSpec.from_dict(data["lora"]).fingerprint()
    idx.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="rank 4"):
        load_artifacts(tiny_artifacts)


def test_stage_by_stage_and_nan_snapshot_is_refused(tiny_config, tmp_path, capsys):
    import dataclasses

    from training.pipeline import run_pipeline

    out = tmp_path / "staged"
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config.to_dict()))
    assert main(["pipeline", "--config", str(cfg_path), "--out", str(out), "--stage", "experts"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["stages"]) == {"experts"}
    # The generator stage before the repository stage is a clear error.
    assert main(["pipeline", "--config", str(cfg_path), "--out", str(out), "--stage", "generator"]) == 2
    assert "run the 'repository' stage first" in capsys.readouterr().err
    # A NaN in an expert's snapshots is caught (the manifest hash catches the edit first).
    splits = json.loads((out / "splits.json").read_text())
    path = out / "snapshots" / f"{splits['experts'][0]}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    snaps = load_file(str(path))["snapshots"]
    snaps[0, 0] = float("nan")
    save_file({"snapshots": snaps}, str(path), metadata=meta)
    assert main(["pipeline", "--config", str(cfg_path), "--out", str(out), "--stage", "repository"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (out / "repository").exists()
    # With the edit pinned in the manifest (a NaN the experts stage itself wrote), the NaN check refuses it.
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.relative_to(out).as_posix()] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))
    assert main(["pipeline", "--config", str(cfg_path), "--out", str(out), "--stage", "repository"]) == 2
    assert f"expert {splits['experts'][0]} snapshots contains 1 NaN/Inf values" in capsys.readouterr().err
    assert not (out / "repository").exists()
    # The same config into the same folder resumes; other experts settings are refused.
    other = dataclasses.replace(tiny_config, experts=dataclasses.replace(tiny_config.experts, lr=0.5))
    with pytest.raises(ValueError, match=r"another config \(experts differ\)"):
        run_pipeline(other, out, ("experts",))


def test_a_folder_that_holds_no_run_is_refused_before_anything_of_the_users_is_replaced(tiny_config, tmp_path):
    """--out into a folder of the user's: the stages replace eval/, backbone/ and the rest whole and overwrite
    config.json, so a folder that holds no trained task and anything a first attempt cannot have written is
    refused, untouched; what an attempt stopped before its first task left (the backbone, config.json) is not."""
    from training.pipeline import run_pipeline

    out = tmp_path / "mine"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "notes.txt").write_text("precious")
    (out / "config.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r"holds no run of the pipeline \(eval\).*use an empty or new --out"):
        run_pipeline(tiny_config, out, ("experts",))
    assert (out / "eval" / "notes.txt").read_text() == "precious" and (out / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "eval"]  # refused before the lock: no lock file left
    (out / "eval" / "notes.txt").unlink()
    (out / "eval").rmdir()
    (out / "backbone").mkdir()
    (out / "backbone" / "weights.bin").write_bytes(b"theirs")
    with pytest.raises(ValueError, match=r"backbone/ without backbone.json"):
        run_pipeline(tiny_config, out, ("experts",))
    assert (out / "backbone" / "weights.bin").read_bytes() == b"theirs"
    # A first attempt's own leftovers: its backbone folder and config.json. The run goes on.
    (out / "backbone" / "weights.bin").unlink()
    (out / "backbone" / "backbone.json").write_text("{}")
    run_pipeline(tiny_config, out, ("experts",))
    assert (out / "manifest.json").is_file()


def test_a_full_rerun_with_new_generator_settings_keeps_the_experts(tiny_artifacts, tiny_config, capsys):
    """The whole pipeline rerun with another generator setting was refused ("use a new --out directory"), which
    threw every trained expert away, although --stage generator takes exactly that change."""
    from sglora.artifacts import STAGES
    from training.pipeline import run_pipeline

    before = {p.name: p.read_bytes() for p in (tiny_artifacts / "snapshots").glob("*.safetensors")}
    built = json.loads((tiny_artifacts / "config.json").read_text())
    cfg = dataclasses.replace(
        tiny_config, generator=dataclasses.replace(tiny_config.generator, epochs=built["generator"]["epochs"] + 1)
    )
    capsys.readouterr()
    run_pipeline(cfg, tiny_artifacts)
    out, err = capsys.readouterr()
    assert "tasks already trained (resumed); trained 0" in out
    n = len(before)
    assert "experts: 100%" in err and f" {n}/{n} " in err and f" 0/{n} " not in err  # the bar starts at the trained tasks
    assert {p.name: p.read_bytes() for p in (tiny_artifacts / "snapshots").glob("*.safetensors")} == before
    assert json.loads((tiny_artifacts / "config.json").read_text())["generator"]["epochs"] == built["generator"]["epochs"] + 1
    assert set(json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]) == set(STAGES)
    load_artifacts(tiny_artifacts)


def test_a_full_rerun_keeps_a_generator_trained_from_the_same_inputs(tiny_artifacts, tiny_config, tmp_path, capsys):
    """A rerun of a finished pipeline with its config (the README's first command, run twice) trained the
    generator again: minutes for the same weights. It is kept while what it trains from is unchanged; a
    changed repository, a damaged generator file or ``--stage generator`` trains it again."""
    from sglora.cli import main
    from training.pipeline import run_pipeline

    def generator_stage() -> dict:
        return json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]["generator"]

    weights = tiny_artifacts / "generator" / "cvae.safetensors"
    trained, stage = weights.read_bytes(), generator_stage()
    assert len(stage["inputs"]) == 64  # recorded when it was trained
    capsys.readouterr()
    run_pipeline(tiny_config, tiny_artifacts)
    out = capsys.readouterr().out
    assert "[generator] kept the generator of" in out and "`--stage generator` trains it again" in out
    assert generator_stage() == stage and weights.read_bytes() == trained
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"experts", "repository", "generator", "evaluate"}  # evaluated again
    load_artifacts(tiny_artifacts)

    # An expert the service removed from the repository: the generator's leave-one-out priors change.
    index = tiny_artifacts / "repository" / "repository.json"
    repository = json.loads(index.read_text())
    repository["experts"] = repository["experts"][1:]
    index.write_text(json.dumps(repository))
    from training.pipeline import generator_unchanged

    assert generator_unchanged(tiny_artifacts, tiny_config) is None
    # A damaged generator file is trained again, not kept.
    capsys.readouterr()
    run_pipeline(tiny_config, tiny_artifacts)  # trains it again (the removal stays: the service's change)
    assert "kept the generator" not in capsys.readouterr().out
    assert generator_unchanged(tiny_artifacts, tiny_config) is not None
    retrained = weights.read_bytes()
    weights.write_bytes(retrained[:-4] + b"\0\0\0\0")
    assert generator_unchanged(tiny_artifacts, tiny_config) is None
    assert "artefact file corrupt" in capsys.readouterr().out

    # Named, the stage runs regardless.
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(json.dumps(tiny_config.to_dict()))
    weights.write_bytes(retrained)
    assert generator_unchanged(tiny_artifacts, tiny_config) is not None
    capsys.readouterr()
    assert main(["pipeline", "--config", str(cfg_path), "--out", str(tiny_artifacts), "--stage", "generator"]) == 0
    assert "kept the generator" not in capsys.readouterr().out and generator_stage()["completed"] >= stage["completed"]
    assert "evaluate" not in json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]


def test_a_full_rerun_keeps_an_evaluation_of_the_same_inputs(tiny_artifacts, tiny_config, capsys):
    """With the generator kept, a rerun evaluated every method again on the same LoRAs and images (12-19 s on
    the offline default, for the same table). It is kept, and its table shown, while what it scores is
    unchanged; other evaluation settings, a damaged results file or ``--stage evaluate`` evaluate again."""
    from training.pipeline import evaluation_unchanged, run_pipeline

    def evaluate_stage() -> dict:
        return json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]["evaluate"]

    results = tiny_artifacts / "eval" / "results.json"
    scored, stage = results.read_bytes(), evaluate_stage()
    assert len(stage["inputs"]) == 64  # recorded when it ran
    capsys.readouterr()
    run_pipeline(tiny_config, tiny_artifacts)
    out = capsys.readouterr().out
    assert "[evaluate] kept the evaluation of" in out and "`--stage evaluate` evaluates again" in out
    assert "| sg-lora |" in out and str(tiny_artifacts / "eval" / "results.md") in out  # the table, as a run shows it
    assert evaluate_stage() == stage and results.read_bytes() == scored
    load_artifacts(tiny_artifacts)

    more = dataclasses.replace(
        tiny_config, evaluation=dataclasses.replace(tiny_config.evaluation, seed=tiny_config.evaluation.seed + 1)
    )
    assert evaluation_unchanged(tiny_artifacts, more) is None  # another setting of its own
    table = tiny_artifacts / "eval" / "results.md"
    table.write_text(table.read_text() + "edited")
    assert evaluation_unchanged(tiny_artifacts, tiny_config) is None  # a file no longer what it wrote
    assert "results.md is not the file the evaluation wrote" in capsys.readouterr().out
    run_pipeline(tiny_config, tiny_artifacts)
    assert "kept the evaluation" not in capsys.readouterr().out and "edited" not in table.read_text()
    assert evaluation_unchanged(tiny_artifacts, tiny_config) is not None
    run_pipeline(tiny_config, tiny_artifacts, stages=("evaluate",))  # named: it runs regardless
    assert "kept the evaluation" not in capsys.readouterr().out


def test_too_few_samples_names_the_task(tiny_config, tmp_path):
    import dataclasses

    from training.pipeline import stage_experts

    cfg = dataclasses.replace(tiny_config, experts=dataclasses.replace(tiny_config.experts, min_train_samples=1000))
    with pytest.raises(ValueError, match=r"task '.*' has 24 train samples; at least 1000"):
        stage_experts(cfg, tmp_path / "x")
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_later_stages_take_new_prior_settings_but_not_new_experts_settings(tiny_artifacts):
    import dataclasses

    from training.config import PipelineConfig, from_dict
    from training.pipeline import stage_evaluate, stage_generator

    built = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    new_prior = dataclasses.replace(built, prior=dataclasses.replace(built.prior, top_k=2))
    with pytest.raises(ValueError, match="rerun the generator stage"):
        stage_evaluate(new_prior, tiny_artifacts)
    stage_generator(new_prior, tiny_artifacts)
    assert "evaluate" not in json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]  # eval/ is stale
    assert json.loads((tiny_artifacts / "config.json").read_text())["prior"]["top_k"] == 2
    assert load_artifacts(tiny_artifacts).engine.top_k == 2
    other_experts = dataclasses.replace(built, experts=dataclasses.replace(built.experts, lr=0.5))
    with pytest.raises(ValueError, match="other experts settings"):
        stage_generator(other_experts, tiny_artifacts)


def test_artefacts_built_before_a_new_setting_existed_still_evaluate(tiny_artifacts):
    # config.json of an older release lacks settings added since (here generator.weight_decay): they
    # are read at their defaults, so the artefacts are not taken for ones built with another config.
    from sglora import artifacts as art
    from training.config import PipelineConfig, from_dict
    from training.pipeline import stage_evaluate

    path = tiny_artifacts / "config.json"
    written = json.loads(path.read_text())
    del written["generator"]["weight_decay"]
    path.write_text(json.dumps(written))
    art.update_manifest(tiny_artifacts, "generator")  # as an older release would have hashed it
    cfg = from_dict(PipelineConfig, written)
    assert cfg.generator.weight_decay == 0.0
    assert stage_evaluate(cfg, tiny_artifacts, methods=("zero-shot", "sg-lora"))["methods"]["sg-lora"]
    written["generator"]["weight_decay"] = 0.5  # a setting that does differ still does
    with pytest.raises(ValueError, match="rerun the generator stage"):
        stage_evaluate(from_dict(PipelineConfig, written), tiny_artifacts)


def test_generator_stage_on_a_subset_of_its_tasks(tiny_artifacts):
    """only_tasks (ablations): the generator trains on the named tasks alone, M snapshots each."""
    from training.config import PipelineConfig, from_dict
    from training.pipeline import stage_generator

    cfg = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    splits = json.loads((tiny_artifacts / "splits.json").read_text())
    full = json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]["generator"]["snapshots"]
    one = splits["train"][0]
    stage_generator(cfg, tiny_artifacts, only_tasks=[one, "no-such-task"])
    subset = json.loads((tiny_artifacts / "manifest.json").read_text())["stages"]["generator"]["snapshots"]
    assert subset == cfg.experts.keep_last < full
    assert load_artifacts(tiny_artifacts).generator is not None


def test_generate_cli_writes_an_exact_merge_at_its_rank(tiny_artifacts_session, tmp_path):
    """sglora generate --method topk-exact: a PEFT folder whose rank is K*r, in its config and its tensors."""
    import zipfile

    from safetensors.torch import load

    out = tmp_path / "exact.zip"
    argv = ["generate", "a photo of a circle", "--artifacts", str(tiny_artifacts_session), "--out", str(out)]
    assert main(argv + ["--method", "topk-exact", "--top-k", "3"]) == 0
    a = load_artifacts(tiny_artifacts_session)
    with zipfile.ZipFile(out) as z:
        config = json.loads(z.read("adapter_config.json"))
        tensors = load(z.read("adapter_model.safetensors"))
    assert config["r"] == 3 * a.backbone.spec.rank and config["lora_alpha"] == config["r"]
    assert {t.shape[1] for k, t in tensors.items() if "lora_B" in k} == {3 * a.backbone.spec.rank}


def test_generator_task_loss_term_makes_samples_fit_their_training_tasks(tiny_artifacts):
    """generator.task_weight > 0: the LoRAs the generator samples for its own training tasks score a lower
    task loss there than those of the generator trained on eq. 9 alone (same seeds, same data)."""
    import dataclasses

    from training.config import PipelineConfig, from_dict
    from training.experts import FeatureCache, prepare_task, task_loss
    from training.pipeline import load_data, stage_generator

    cfg = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    train_names = json.loads((tiny_artifacts / "splits.json").read_text())["train"]

    def sampled_loss(task_weight: float) -> float:
        c = dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, task_weight=task_weight))
        stage_generator(c, tiny_artifacts)
        engine = load_artifacts(tiny_artifacts).engine
        data, cache = load_data(c), FeatureCache(engine.backbone)
        losses = []
        for name in train_names:
            task = prepare_task(engine.backbone, data, name, cache, ("train",))
            emb = engine.embed([task.info.description])[0]
            for seed in range(4):
                lora = engine.generate(emb, "sg-lora", seed=seed).lora
                with torch.no_grad():
                    losses.append(
                        float(task_loss(engine.backbone, lora, task.train.features, task.train.texts, task.train.labels))
                    )
        history = json.loads((tiny_artifacts / "generator" / "history.json").read_text())
        assert ("task" in history[-1]) == (task_weight > 0)
        return sum(losses) / len(losses)

    assert sampled_loss(30.0) < 0.95 * sampled_loss(0.0)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "a cat", "--temperature", "1e-300", "--out", "x.safetensors"], "temperature must be between"),
        (["generate", "a cat", "--temperature", "inf", "--out", "x.safetensors"], "temperature must be between"),
        (["generate", "\u200b", "--out", "x.safetensors"], "description must contain a visible character"),
        (["generate", "a cat", "--out", "x.txt"], "give a FILE.safetensors or a FILE.zip"),
        (["select", "a cat", "--temperature", "1e-300"], "temperature must be between"),
    ],
)
def test_cli_refuses_what_the_service_refuses(tiny_artifacts_session, tmp_path, capsys, argv, needle):
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / argv[argv.index("--out") + 1])
    assert main(argv + ["--artifacts", str(tiny_artifacts_session)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_file_system_and_device_errors_are_messages(tiny_artifacts_session, tmp_path, capsys):
    import torch

    art = ["--artifacts", str(tiny_artifacts_session)]
    (tmp_path / "d.safetensors").mkdir()
    assert main(["generate", "a cat", "--out", str(tmp_path / "d.safetensors"), *art]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path)]) == 2
    assert "not a file; give the YAML config" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["pipeline", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "file")]) == 2
    assert "--out " + str(tmp_path / "file") + " is a file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"
    assert main(["evaluate", "--artifacts", str(tmp_path / "none")]) == 2
    assert "artefact directory not found" in capsys.readouterr().err
    for out in ("", " "):  # an unset $OUT in a script: the artefacts were written into the working directory
        assert main(["pipeline", "--config", "configs/tiny.yaml", "--out", out]) == 2
        assert "--out is empty" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["check-config", str(tmp_path / "latin1.yaml")]) == 2
    assert f"{tmp_path / 'latin1.yaml'}: not UTF-8 text (byte 9)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    for stage in ("generator", "evaluate"):  # a folder no run has written to
        assert main(["pipeline", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "empty"), "--stage", stage]) == 2
        assert "no stage has run there (no manifest.json); run the pipeline from its 'experts' stage" in capsys.readouterr().err
    for argv, needle in (
        (["generate", "a cat", "--out", "x.safetensors", "--device", "gpu", *art], "unknown device 'gpu'"),
        (["serve", *art, "--port", "99999"], "must be between 0 and 65535"),
    ):
        with pytest.raises(SystemExit) as e:  # argparse: usage and status 2 before anything loads
            main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "a cat", "--out", str(tmp_path / "c.safetensors"), "--device", "cuda", *art]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    long = "a ring " * 20  # past the tiny text tower's 32 tokens: its tokenizer would cut the rest off
    for argv in (["generate", long, "--out", str(tmp_path / "l.safetensors"), *art], ["select", long, *art]):
        assert main(argv) == 2
        assert "description is 42 tokens long, and the text tower reads at most 32" in capsys.readouterr().err
    assert not (tmp_path / "l.safetensors").exists()
    with pytest.raises(SystemExit):  # the frozen backbone: an evaluation's reference, not a file to write
        main(["generate", "a cat", "--method", "zero-shot", "--out", str(tmp_path / "z.safetensors"), *art])
    assert "invalid choice: 'zero-shot'" in capsys.readouterr().err


def test_cli_description_is_normalised_as_the_service_does_and_zip_suffix_is_case_blind(tiny_artifacts_session, tmp_path):
    import zipfile

    art = ["--artifacts", str(tiny_artifacts_session), "--seed", "2"]
    assert main(["generate", "a photo of a circle", "--out", str(tmp_path / "a.safetensors"), *art]) == 0
    assert main(["generate", "  a photo\tof a   circle\n", "--out", str(tmp_path / "b.safetensors"), *art]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert main(["generate", "a photo of a circle", "--out", str(tmp_path / "c.ZIP"), *art]) == 0
    assert zipfile.is_zipfile(tmp_path / "c.ZIP")

    # The same files from Python: Artifacts.lora_file, as the README shows it.
    from sglora.artifacts import load_artifacts

    a = load_artifacts(tiny_artifacts_session, "auto")  # the CLI's device
    data, g = a.lora_file("a photo of a  circle ", seed=2)
    assert data == (tmp_path / "a.safetensors").read_bytes() and g.seed == 2 and g.method == "sg-lora"
    assert a.lora_file("a photo of a circle", seed=2, zipped=True)[0] == (tmp_path / "c.ZIP").read_bytes()
    with pytest.raises(ValueError, match="description must not contain control characters"):
        a.lora_file("a photo\x00of a circle", seed=2)
    # Bytes that were not UTF-8 (a shell argument): the file's metadata could not have been read back.
    with pytest.raises(ValueError, match="must be valid UTF-8 text"):
        a.lora_file("a\udcff photo", seed=2)
    args = ["generate", "a\udcff photo", "--artifacts", str(tiny_artifacts_session), "--out", str(tmp_path / "u.safetensors")]
    assert main(args) == 2
    assert not (tmp_path / "u.safetensors").exists()
    with pytest.raises(TypeError, match="description must be a string, got int"):
        a.lora_file(42, seed=2)
    with pytest.raises(TypeError, match="zipped must be True or False, got 'no'"):
        a.lora_file("a photo of a circle", zipped="no")  # was a zip


def test_a_tasks_snapshots_are_read_as_the_manifest_pins_them(tiny_artifacts):
    from sglora.artifacts import ArtifactError, load_artifacts

    a = load_artifacts(tiny_artifacts)
    task = json.loads((tiny_artifacts / "splits.json").read_text())["experts"][0]
    assert a.snapshots(task).shape[1] == a.backbone.spec.num_params
    for bad in ("no-such-task", "../repository/experts/" + task, 7):  # were a raw FileNotFoundError, a KeyError
        with pytest.raises(KeyError, match="no snapshots of a task"):
            a.snapshots(bad)
    path = tiny_artifacts / "snapshots" / f"{task}.safetensors"
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactError, match="sha256 mismatch with the manifest"):  # was read unchecked
        a.snapshots(task)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        a.snapshots(task)


def test_a_lora_files_version_is_that_of_the_experts_it_was_made_from(tiny_artifacts):
    """Artifacts.version hashed the directory at every call while the experts came from memory: another
    process's change on disk stamped the new version on a LoRA of the old experts, and a change in memory
    kept the old version on a LoRA of other experts."""
    from expert_store.repository import ExpertRepository
    from sglora.artifacts import artefact_version, load_artifacts
    from sglora.io import safetensors_metadata

    a = load_artifacts(tiny_artifacts)
    loaded = artefact_version(tiny_artifacts)
    assert a.version == loaded
    data, g = a.lora_file("a photo of a circle", "topk-weighted")
    assert safetensors_metadata(data)["artifact_version"] == loaded
    other = ExpertRepository.load(tiny_artifacts / "repository")  # another process's change
    other.remove_and_save(g.experts[0].name, tiny_artifacts / "repository")
    assert artefact_version(tiny_artifacts) != loaded
    again, g2 = a.lora_file("a photo of a circle", "topk-weighted")
    assert again == data and g2.experts == g.experts  # the experts this object holds, and their version
    fresh = load_artifacts(tiny_artifacts)
    assert fresh.version == artefact_version(tiny_artifacts) != loaded
    # A change through the object: the version of the directory it leaves (or, in memory, of the state)
    name = fresh.repository.names[0]
    removed = fresh.repository.remove_and_save(name, tiny_artifacts / "repository")
    assert fresh.version == artefact_version(tiny_artifacts)
    fresh.repository.add(removed)
    in_memory = fresh.version
    assert in_memory not in (artefact_version(tiny_artifacts), loaded)
    assert safetensors_metadata(fresh.lora_file("a photo of a circle", "topk-weighted")[0])["artifact_version"] == in_memory


@pytest.mark.parametrize("changed", ["manifest", "index"])
def test_a_directory_that_changes_while_it_is_loaded_is_refused(tiny_artifacts, monkeypatch, changed):
    """The manifest is read once and compared with the file at the end of the load: a pipeline run that
    rewrote it during the load (after a second read right at the start, which is what was compared) was
    missed, and the loaded object stamped the new version on LoRAs of the old experts."""
    import sglora.artifacts as art

    real = art.load_generator

    def load_generator_while_it_changes(root, device):
        path = root / (art.MANIFEST if changed == "manifest" else f"repository/{art.INDEX_FILE}")
        path.write_bytes(path.read_bytes() + b"\n")  # same content, other bytes: as a rewrite leaves it
        return real(root, device)

    monkeypatch.setattr(art, "load_generator", load_generator_while_it_changes)
    with pytest.raises(art.ArtifactError, match="changed while it was loaded.*load it again"):
        art.load_artifacts(tiny_artifacts)
    monkeypatch.setattr(art, "load_generator", real)
    assert art.load_artifacts(tiny_artifacts).version == art.artefact_version(tiny_artifacts)  # settled: loads


def test_a_rerun_retrains_a_snapshot_damaged_since_and_marks_the_later_stages_stale(tiny_artifacts, tiny_config, capsys):
    """The manifest pins every snapshot: a resumed experts stage trusts a file only if it still matches
    (else it trains the task again, never re-pins the damage), and once it trained anything, the stages
    built from the old snapshots are unmarked until they run again."""
    from sglora.io import sha256_file
    from training.pipeline import run_pipeline, stage_experts

    name = json.loads((tiny_artifacts / "splits.json").read_text())["experts"][0]
    path = tiny_artifacts / "snapshots" / f"{name}.safetensors"
    original = load_file(str(path))["snapshots"].clone()  # not a view of the file about to change
    damaged = bytearray(path.read_bytes())
    damaged[-97] ^= 0x40  # a bit in the tensor data: the header and its LoRA fingerprint still read
    path.write_bytes(bytes(damaged))
    stage_experts(tiny_config, tiny_artifacts)
    assert f"{name}: its snapshot file differs from the one the manifest pins" in capsys.readouterr().out
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert path.read_bytes() != bytes(damaged) and manifest["files"][f"snapshots/{name}.safetensors"] == sha256_file(path)
    # Seeded training: the same snapshots again (up to float rounding, were its features batched otherwise).
    torch.testing.assert_close(load_file(str(path))["snapshots"], original)
    assert set(manifest["stages"]) == {"experts"}
    with pytest.raises(ArtifactError, match="stage 'repository' has not been run"):
        load_artifacts(tiny_artifacts)
    stage_experts(tiny_config, tiny_artifacts)  # nothing to train: the later stages stay as they are
    run_pipeline(tiny_config, tiny_artifacts, ("repository", "generator"))
    assert load_artifacts(tiny_artifacts).generator is not None


def test_a_changed_dataset_is_refused_and_fingerprinted_by_what_it_says(tiny_artifacts, tiny_config, capsys):
    """The later stages refuse a dataset the experts stage did not record; the experts stage itself goes by what
    each snapshot records of its own task's data (the tests below), and records the dataset it resumed on."""
    from sglora.io import write_json
    from training.pipeline import load_data, stage_evaluate, stage_experts

    dataset = load_data(tiny_config)
    assert dataset.fingerprint() == load_data(tiny_config).fingerprint()
    dataset.samples[0].caption = (dataset.samples[0].caption or "") + " (edited)"
    assert dataset.fingerprint() != load_data(tiny_config).fingerprint()
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    manifest["stages"]["experts"]["data"] = "0" * 16  # as if built on other tasks or samples
    write_json(tiny_artifacts / "manifest.json", manifest)
    with pytest.raises(ValueError, match="the dataset changed since its experts were trained .*rerun the pipeline from its"):
        stage_evaluate(tiny_config, tiny_artifacts)
    stage_experts(tiny_config, tiny_artifacts)  # every snapshot was trained on its task's data as it is now
    assert "8 of 8 tasks already trained (resumed); trained 0" in capsys.readouterr().out
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert manifest["stages"]["experts"]["data"] == load_data(tiny_config).fingerprint()
    assert set(manifest["stages"]) == {"experts", "repository", "generator", "evaluate"}  # nothing trained: still valid
    stage_evaluate(tiny_config, tiny_artifacts)


def test_snapshots_of_an_interrupted_run_on_other_data_are_refused(tiny_artifacts, tiny_config, capsys):
    """The manifest records the dataset only when the experts stage completes; a run stopped before that
    (Ctrl-C, a bad image) left snapshots that their own metadata ties to the data. One written before snapshots
    recorded their own task's data (``task_data``) says only what the whole dataset was: on an edited dataset it is
    refused, never resumed on top of snapshots trained on the old one (nor with their old descriptions)."""
    from training.pipeline import load_data, stage_experts

    dataset = load_data(tiny_config)
    (tiny_artifacts / "manifest.json").unlink()  # as after an interrupted experts stage
    name = json.loads((tiny_artifacts / "splits.json").read_text())["experts"][0]
    path = tiny_artifacts / "snapshots" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["data"], meta["task_data"]) == (dataset.fingerprint(), dataset.task_fingerprint(name))
    snaps = load_file(str(path))["snapshots"]
    # Its own task's data as it is now, other samples elsewhere in the dataset: resumed.
    save_file({"snapshots": snaps}, str(path), metadata={**meta, "data": "0" * 16})
    stage_experts(tiny_config, tiny_artifacts)
    assert "8 of 8 tasks already trained" in capsys.readouterr().out
    (tiny_artifacts / "manifest.json").unlink()
    older = {k: v for k, v in meta.items() if k != "task_data"}
    save_file({"snapshots": snaps}, str(path), metadata={**older, "data": "0" * 16})  # trained on other samples
    with pytest.raises(ValueError, match=f"the dataset changed since task '{name}' was trained"):
        stage_experts(tiny_config, tiny_artifacts)
    assert not (tiny_artifacts / "manifest.json").exists()
    save_file({"snapshots": snaps}, str(path), metadata=older)  # the same data: resumed, nothing trained
    stage_experts(tiny_config, tiny_artifacts)
    assert "8 of 8 tasks already trained" in capsys.readouterr().out


def _folder_pipeline(tmp_path, stages: tuple[str, ...] = ("experts", "repository", "generator", "evaluate")):
    """The tiny config on a dataset folder (files a test can edit, as a user would) of four shape tasks, 4 training
    and 2 test images each: two experts, one training task, one test task. Returns the config and its artefacts,
    ``stages`` built."""
    from pathlib import Path

    import yaml

    from training.config import load_config
    from training.data import write_task_dataset
    from training.pipeline import run_pipeline
    from training.procedural import procedural_dataset

    shapes = ("circle", "square", "triangle", "diamond")
    write_task_dataset(procedural_dataset(seed=1, train_per_task=4, test_per_task=2, shapes=shapes), tmp_path / "ds")
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"kind": "folder", "path": "ds"}
    cfg["split"] = {"experts": 2, "train": 1, "val": 0, "test": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "c.yaml")
    run_pipeline(config, tmp_path / "out", stages)
    return config, tmp_path / "out"


def _edit_first_sample(ds, task: str, **changes) -> dict:
    """Changes the first sample of ``task`` in samples.jsonl (a training sample); returns it as it was."""
    rows = [json.loads(line) for line in (ds / "samples.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("task") == task)
    was = dict(row)
    row.update(changes)
    (ds / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return was


def _snapshot_digests(out) -> dict[str, str]:
    from sglora.io import sha256_file

    return {p.stem: sha256_file(p) for p in (out / "snapshots").glob("*.safetensors")}


def test_a_rerun_on_a_dataset_with_one_task_changed_trains_that_task_alone(tmp_path, capsys):
    """A caption fixed in one task's samples changed the dataset's fingerprint, and the rerun refused the folder
    and every trained task in it: each snapshot records the data of its own task, so the rerun trains that task
    again, keeps the others as they are, and the later stages, unmarked, run again on the changed data."""
    from sglora.artifacts import STAGES
    from training.pipeline import load_data, run_pipeline, stage_evaluate, stage_experts

    cfg, out = _folder_pipeline(tmp_path)
    name = json.loads((out / "splits.json").read_text())["experts"][0]
    before = _snapshot_digests(out)
    _edit_first_sample(tmp_path / "ds", name, caption="a fixed caption")
    with pytest.raises(ValueError, match="the dataset changed since its experts were trained .*rerun the pipeline from its"):
        stage_evaluate(cfg, out)
    capsys.readouterr()
    stage_experts(cfg, out)
    log = capsys.readouterr().out
    assert f"[experts] {name}: its data (samples or task definition) changed since it was trained; training it again" in log
    assert "3 of 4 tasks already trained (resumed); trained 1" in log and log.count("changed since it was trained") == 1
    after = _snapshot_digests(out)
    assert after.keys() == before.keys() and {n for n in before if after[n] != before[n]} == {name}
    dataset = load_data(cfg)
    with safe_open(str(out / "snapshots" / f"{name}.safetensors"), "pt") as f:
        assert f.metadata()["task_data"] == dataset.task_fingerprint(name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"experts"} and manifest["stages"]["experts"]["data"] == dataset.fingerprint()
    with pytest.raises(ArtifactError, match="stage 'repository' has not been run"):
        load_artifacts(out)
    run_pipeline(cfg, out, ("repository", "generator", "evaluate"))  # their checks of the dataset pass
    assert set(json.loads((out / "manifest.json").read_text())["stages"]) == set(STAGES)
    assert load_artifacts(out).generator is not None


def test_an_interrupted_run_resumes_on_a_dataset_with_one_task_changed(tmp_path, capsys):
    """Stopped before the experts stage completed (no manifest, a task not yet trained), then an image path fixed
    in one task's samples: that task trains again, so does the one not yet trained, the others are kept."""
    import shutil

    from training.pipeline import stage_experts

    cfg, out = _folder_pipeline(tmp_path, ("experts",))
    (out / "manifest.json").unlink()
    tasks = [n for role in json.loads((out / "splits.json").read_text()).values() for n in role]
    (out / "snapshots" / f"{tasks[-1]}.safetensors").unlink()  # its turn had not come
    ds = tmp_path / "ds"
    was = _edit_first_sample(ds, tasks[1], image="images/fixed.png")
    shutil.copy(ds / was["image"], ds / "images" / "fixed.png")  # the same picture, another file
    before = _snapshot_digests(out)
    capsys.readouterr()
    stage_experts(cfg, out)
    log = capsys.readouterr().out
    assert f"[experts] {tasks[1]}: its data (samples or task definition) changed" in log
    assert "2 of 4 tasks already trained (resumed); trained 2" in log
    after = _snapshot_digests(out)
    assert after.keys() == set(tasks) and {n for n in before if after[n] != before[n]} == {tasks[1]}


def test_snapshots_from_before_each_recorded_its_task_data_are_refused_on_a_changed_dataset(tmp_path):
    """A snapshot without ``task_data`` (written by an earlier release) cannot tell whether its own task's data
    changed: on a dataset that changed anywhere the folder is refused as before, not resumed."""
    from training.pipeline import stage_experts

    cfg, out = _folder_pipeline(tmp_path, ("experts",))
    tasks = [n for role in json.loads((out / "splits.json").read_text()).values() for n in role]
    path = out / "snapshots" / f"{tasks[0]}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "task_data"}
    save_file(load_file(str(path)), str(path), metadata=meta)
    _edit_first_sample(tmp_path / "ds", tasks[1], caption="a fixed caption")  # another task's samples
    with pytest.raises(ValueError, match="the dataset changed since its experts were trained .*; use a new --out directory"):
        stage_experts(cfg, out)
    (out / "manifest.json").unlink()  # an interrupted run: the snapshot's own record
    with pytest.raises(ValueError, match=f"the dataset changed since task '{tasks[0]}' was trained"):
        stage_experts(cfg, out)


def test_a_dataset_with_another_task_set_is_refused(tmp_path):
    """Other tasks make another split: the experts stage refuses the folder, whatever its snapshots record."""
    from training.pipeline import stage_experts

    cfg, out = _folder_pipeline(tmp_path, ("experts",))
    ds = tmp_path / "ds"
    index = json.loads((ds / "tasks.json").read_text())
    index["tasks"].append({"name": "star", "description": "a photo of a star", "kind": "retrieval"})
    (ds / "tasks.json").write_text(json.dumps(index))
    rows = [json.loads(line) for line in (ds / "samples.jsonl").read_text().splitlines()]
    stars = [{**r, "task": "star"} for r in rows if r.get("task") == "circle"]
    (ds / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + stars))
    before = _snapshot_digests(out)
    with pytest.raises(ValueError, match=r"the dataset's tasks changed since it was built \(another split\)"):
        stage_experts(cfg, out)
    assert _snapshot_digests(out) == before


def test_a_task_whose_description_changed_is_rebuilt_in_the_repository(tmp_path, capsys):
    """A task's description edited: it trains again, and the rebuilt repository holds its new expert, not the
    one built before, which has another description than the run's snapshots (as one the service replaced has)."""
    from expert_store.repository import ExpertRepository
    from training.pipeline import run_pipeline

    cfg, out = _folder_pipeline(tmp_path)
    name = json.loads((out / "splits.json").read_text())["experts"][0]
    ds = tmp_path / "ds"
    index = json.loads((ds / "tasks.json").read_text())
    task = next(t for t in index["tasks"] if t["name"] == name)
    old, task["description"] = task["description"], "a clear photo of a " + name
    (ds / "tasks.json").write_text(json.dumps(index))
    capsys.readouterr()
    run_pipeline(cfg, out)
    log = capsys.readouterr().out
    assert f"[experts] {name}: its data (samples or task definition) changed" in log
    assert "kept the service's expert changes" not in log
    assert ExpertRepository.load(out / "repository")[name].description == "a clear photo of a " + name
    with safe_open(str(out / "snapshots" / f"{name}.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["earlier_descriptions"]) == [old]


def test_a_partial_evaluation_goes_beside_the_full_results(tiny_artifacts, tiny_config, capsys):
    before = (tiny_artifacts / "eval" / "results.json").read_bytes()
    manifest = (tiny_artifacts / "manifest.json").read_bytes()
    assert main(["evaluate", "--artifacts", str(tiny_artifacts), "--method", "zero-shot"]) == 0
    partial = json.loads((tiny_artifacts / "eval-partial" / "results.json").read_text())
    assert list(partial["methods"]) == ["zero-shot"] and "eval-partial" in capsys.readouterr().out
    assert (tiny_artifacts / "eval" / "results.json").read_bytes() == before
    assert (tiny_artifacts / "manifest.json").read_bytes() == manifest
    with pytest.raises(SystemExit):
        main(["evaluate", "--artifacts", str(tiny_artifacts), "--method", "bogus"])  # argparse, before any work


def test_artefacts_take_the_umask_like_any_file(tiny_artifacts_session):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700): the final files get 0666/0777 less the umask,
    so another user (a service account) can read what the pipeline or `sglora generate` wrote."""
    from sglora.io import umask

    mask = umask()
    assert ((tiny_artifacts_session / "manifest.json").stat().st_mode & 0o777) == 0o666 & ~mask
    assert ((tiny_artifacts_session / "generator").stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((tiny_artifacts_session / "generator" / "cvae.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask
    # Every file and folder, the backbone's weights included (safetensors' save_file creates them 0600).
    wrong = {
        str(p.relative_to(tiny_artifacts_session)): oct(p.stat().st_mode & 0o777)
        for p in tiny_artifacts_session.rglob("*")
        if (p.stat().st_mode & 0o777) != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert wrong == {}


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: [], "not a version-1 sglora-artifacts manifest"),
        (lambda m: {**m, "files": []}, "'files' must map each pinned file"),
        (lambda m: {k: v for k, v in m.items() if k != "files"}, "'files' must map each pinned file"),
        (lambda m: {**m, "stages": list(m["stages"])}, "'stages' must map"),
        (lambda m: {**m, "files": {**m["files"], "../../../../dev/zero": "0" * 64}}, "leaves the artefact directory"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_refused_by_name(tiny_artifacts, tiny_config, edit, needle):
    from training.pipeline import stage_experts

    path = tiny_artifacts / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ArtifactError, match=needle):
        load_artifacts(tiny_artifacts, require_generator=False)
    with pytest.raises(ArtifactError, match=needle):  # a rerun too, before it writes anything
        stage_experts(tiny_config, tiny_artifacts)


def test_progress_bars_redraw_rarely_when_stderr_is_a_log(monkeypatch):
    import io
    import os

    from sglora.cli import LOG_PROGRESS_INTERVAL_S, progress_for

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    progress_for(Terminal())
    assert "TQDM_MININTERVAL" not in os.environ
    progress_for(io.StringIO())
    assert os.environ["TQDM_MININTERVAL"] == LOG_PROGRESS_INTERVAL_S
    monkeypatch.setenv("TQDM_MININTERVAL", "1")
    progress_for(io.StringIO())  # the user's own setting wins
    assert os.environ["TQDM_MININTERVAL"] == "1"


def test_check_config_with_data_checks_the_split_and_the_samples(tiny_config, tmp_path, capsys):
    import yaml

    cfg = tiny_config.to_dict()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path), "--data"]) == 0
    assert "data: 8 tasks" in capsys.readouterr().err
    cfg["experts"]["min_train_samples"] = 1000  # the config alone is valid; its data cannot meet it
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 0
    capsys.readouterr()
    assert main(["check-config", str(path), "--data"]) == 2
    assert "train samples; at least 1000 are needed" in capsys.readouterr().err


def _class_tasks():
    import itertools

    from training.data import TaskDataset, TaskInfo

    classes = ["a", "b", "c", "d", "e"]
    tasks = {
        f"{x}{y}": TaskInfo(f"{x}{y}", f"recognise {x} and {y}", "classification", (x, y), group="cls")
        for x, y in itertools.combinations(classes, 2)
    }
    tasks |= {f"r{i}": TaskInfo(f"r{i}", f"retrieve {i}", group="ret") for i in range(4)}
    return TaskDataset(tasks)


def test_holdout_classes_keep_a_class_out_of_every_trained_role():
    from training.config import SplitConfig
    from training.pipeline import resolve_split

    ds = _class_tasks()  # 10 two-class tasks over a..e (4 with "e"), 4 retrieval tasks
    counts = dict(experts={"cls": 3, "ret": 1}, train={"cls": 2, "ret": 1}, val=1, test=4)
    s = resolve_split(SplitConfig(**counts, holdout_classes=("e",)), ds)
    trained = s.experts + s.train + s.val
    assert not any("e" in ds.tasks[n].classes for n in trained)
    assert all("e" in ds.tasks[n].classes or not ds.tasks[n].classes for n in s.test)
    assert len(s.test) == 4
    # Without the option the same counts give "e" tasks trained roles too (seed 0 does).
    plain = resolve_split(SplitConfig(**counts), ds)
    assert any("e" in ds.tasks[n].classes for n in plain.experts + plain.train + plain.val)


@pytest.mark.parametrize(
    "split,needle",
    [
        (dict(experts=2, test=1, holdout_classes=("z",)), r"no task has the class\(es\) \['z'\]"),
        (dict(experts=("ae",), test=1, holdout_classes=("e",)), r"split.experts: task\(s\) \['ae'\] have a class"),
        (dict(experts={"cls": 7}, test=1, holdout_classes=("e",)), "only 6 unassigned tasks that split.holdout_classes allows"),
    ],
)
def test_holdout_classes_refusals_name_the_problem(split, needle):
    from training.config import SplitConfig
    from training.pipeline import resolve_split

    with pytest.raises(ValueError, match=needle):
        resolve_split(SplitConfig(**split), _class_tasks())
    with pytest.raises(ValueError, match="more than once"):
        SplitConfig(holdout_classes=("e", "e"))


def test_counts_by_group_name_the_groups_the_dataset_has():
    """Counts by a group that no task has: the groups there are, or, for a dataset without groups (a folder
    dataset), that it has none (was "unknown task group 'fashion'; the dataset has ['']")."""
    from training.config import SplitConfig
    from training.data import TaskDataset, TaskInfo
    from training.pipeline import resolve_split

    with pytest.raises(ValueError, match=r"^split\.experts: unknown task group 'fashion'; the dataset has \['cls', 'ret'\]$"):
        resolve_split(SplitConfig(experts={"fashion": 2}, test=1), _class_tasks())
    plain = TaskDataset({f"t{i}": TaskInfo(f"t{i}", f"task {i}") for i in range(40)})
    no_group = r"^split\.experts: counts by task group \('fashion'\), but no task of the dataset has a group"
    with pytest.raises(ValueError, match=no_group):
        resolve_split(SplitConfig(experts={"fashion": 2}, test=1), plain)
    assert len(resolve_split(SplitConfig(experts=2, test=1), plain).experts) == 2


def test_a_ctrl_c_while_a_finished_command_shuts_down_keeps_its_status():
    """The interpreter's shutdown takes a second with torch loaded: a Ctrl-C there killed a finished run by
    SIGINT (status 130 in a shell, no message), its work committed and reported. An atexit handler sends
    it, in the window itself."""
    code = (
        "import atexit, os, signal, sys\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "sys.argv = ['sglora', 'check-config', sys.argv[1]]\n"
        "from sglora.cli import entry\n"
        "entry()\n"
    )
    config = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")
    p = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert '"backbone"' in p.stdout and "KeyboardInterrupt" not in p.stderr  # (here: "Exception ignored in atexit")


def test_sigterm_stops_a_run_cleanly(tiny_config, tmp_path):
    """``docker stop`` on the trainer: SIGTERM is raised where the run is, as Ctrl-C is, so atomic writes
    remove their temporary files; the run says so and exits 128 + 15, its finished tasks kept for a rerun."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from app.processes import ROOT

    cfg = tiny_config.to_dict()
    cfg["experts"]["epochs"] = 400  # long enough to be stopped inside the experts stage
    path, out = tmp_path / "c.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "sglora.cli", "pipeline", "--config", str(path), "--out", str(out), "--stage", "experts"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "snapshots").glob("*.safetensors")):  # one task trained: the stage is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert "rerun the same command to resume" in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    from training.pipeline import prepare_data

    kept = len(list((out / "snapshots").glob("*.safetensors")))
    assert 1 <= kept < len(prepare_data(tiny_config)[1].all())  # stopped inside the stage: what a rerun resumes from


def test_results_table_says_how_many_tasks_each_column_averages():
    from training.pipeline import results_table

    recall = dict.fromkeys(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), 50.0)
    results = {
        "config": "mixed",
        "test_tasks": ["a", "b", "c"],
        "methods": {"zero-shot": {**recall, "accuracy": 40.0}},
        "tasks": {"a": {"zero-shot": recall}, "b": {"zero-shot": {"accuracy": 30.0}}, "c": {"zero-shot": {"accuracy": 50.0}}},
    }
    first = results_table(results).splitlines()[0]
    assert first == (
        "Averaged over 3 unseen test tasks (mixed): each column over the tasks that have it (retrieval recall: 1, accuracy: 2)."
    )
    results["methods"]["zero-shot"].pop("accuracy")
    assert results_table(results).splitlines()[0] == "Averaged over 3 unseen test tasks (mixed)."  # one kind: all tasks


def _scored(on: str = "test") -> dict:
    """results.json of two classification tasks scored by zero-shot, topk-weighted, sg-lora and the oracle."""
    scores = {"t1": (40.0, 70.0, 80.0, 90.0), "t2": (40.0, 60.0, 66.0, 70.0)}
    names = ("zero-shot", "topk-weighted", "sg-lora", "oracle")
    tasks = {t: {m: {"accuracy": v} for m, v in zip(names, row, strict=True)} for t, row in scores.items()}
    methods = {m: {"accuracy": sum(tasks[t][m]["accuracy"] for t in tasks) / 2} for m in names}
    return {
        "methods": methods,
        "tasks": tasks,
        "config": "c",
        "evaluated_on": on,
        "test_tasks": list(tasks),
        "top_k": 8,
        "temperature": 0.1,
        "sg_samples": 3,
        "seed": 5,
    }


def test_results_md_says_what_was_measured_and_shows_every_task(tmp_path):
    """results.md names the tasks it averages (validation tasks are not unseen), the unit, the samples and seeds
    behind sg-lora, K and tau; it gives the share of the oracle's gain the README quotes and every task's score;
    results.png draws them."""
    from training.pipeline import oracle_gain, paired_differences, plot_results, results_table

    results = _scored()
    results["paired"] = paired_differences(results["tasks"])
    md = results_table(results)
    assert md.startswith("Averaged over 2 unseen test tasks (c).")
    assert "Scores in %" in md and "sg-lora: the mean over 3 LoRA(s) sampled per task, seeds 5-7." in md
    assert "K = 8, temperature 0.1" in md
    # averages: zero-shot 40, topk-weighted 65, sg-lora 73, oracle 80 -> 62.5 % and 82.5 % of the gain
    assert oracle_gain(results["methods"], "accuracy") == {"topk-weighted": 62.5, "sg-lora": 82.5}
    assert "| topk-weighted | 62.5 |" in md and "| sg-lora | 82.5 |" in md
    assert "| t2 | 40.00 | 60.00 | 66.00 | 70.00 |" in md  # per task, in the tables' order of methods
    assert "| sg-lora - topk-weighted | accuracy | 2 | +8.00 ± 2.00 | 2 / 0 / 0 |" in md
    assert "| t2 |" not in results_table(results, per_task=False)  # the console's copy: the summary only
    assert results_table(_scored("val")).startswith(
        "Averaged over 2 validation tasks (c; not unseen: they chose the generator's epoch and the settings)."
    )
    below = _scored()
    below["methods"]["oracle"]["accuracy"] = 30.0  # no gain to recover
    assert oracle_gain(below["methods"], "accuracy") == {"topk-weighted": None, "sg-lora": None}
    assert "| sg-lora | n/a |" in results_table(below)
    one = {**_scored(), "sg_samples": 1}
    assert "sg-lora: the mean over 1 LoRA(s) sampled per task, seed 5." in results_table(one)  # not "seeds 5"
    assert plot_results(results, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 0
    assert not plot_results({**results, "tasks": {}}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_generator_history_plot_marks_the_kept_epoch(tmp_path):
    from training.config import GeneratorTrainingConfig
    from training.pipeline import _plot_history, history_title, kept_epoch

    rows = [{"epoch": e, "reconstruction": 1.0 / (e + 1), "kl": 2.0, "task": 0.5} for e in range(6)]
    assert kept_epoch(rows) == 5  # no validation loss: the last epoch's weights
    for row, val in zip(rows, (3.0, 2.0, 1.0, 1.0, 1.5, 2.0), strict=True):
        row["val_loss"] = val
    assert kept_epoch(rows) == 2  # the first of the lowest, as train_generator keeps it
    _plot_history(rows, tmp_path / "h.png", GeneratorTrainingConfig(epochs=10, task_weight=30.0))
    # 6 epochs run, numbered 0-5: not "after epoch 5 of 10", which reads as 5 of them
    assert history_title(rows, GeneratorTrainingConfig(epochs=10)) == (
        "CVAE training: 6 of 10 epochs (stopped early), numbered from 0; weights of epoch 2 kept"
    )
    assert history_title(rows, GeneratorTrainingConfig(epochs=6)).startswith("CVAE training: 6 epochs, numbered from 0;")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_progress_in_a_log_is_one_bar_per_stage(tiny_backbone, tiny_config, monkeypatch, capsys):
    """stderr not a terminal (capsys): the bars inside a task loop (a task's image features, an expert's epochs)
    stay off, and the generator's bar keeps TQDM_MININTERVAL (its per-epoch postfix does not force a redraw)."""
    from tqdm.auto import tqdm

    import training.generator as generator_module
    from training.config import GeneratorTrainingConfig
    from training.experts import FeatureCache, prepare_task, train_expert
    from training.generator import GeneratorData, train_generator
    from training.pipeline import load_data

    class TenSecondBar(tqdm):  # what TQDM_MININTERVAL=10 gives; tqdm reads that variable once, when imported
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 10})

    monkeypatch.setattr(generator_module, "tqdm", TenSecondBar)
    dataset = load_data(tiny_config)
    task = prepare_task(tiny_backbone, dataset, sorted(dataset.tasks)[0], FeatureCache(tiny_backbone))
    train_expert(tiny_backbone, task, tiny_config.experts)
    assert capsys.readouterr().err == ""
    torch.manual_seed(0)
    data = GeneratorData(torch.randn(16, 12), torch.randn(4, 12), torch.rand(4, 12) + 0.1, torch.arange(4).repeat_interleave(4))
    train_generator(data, None, GeneratorTrainingConfig(latent_dim=2, hidden_dim=8, epochs=25, batch_size=8))
    err = capsys.readouterr().err
    assert 1 <= err.count("generator:") <= 3, err  # opened and closed, not once per epoch


def test_one_pipeline_at_a_time_on_a_folder_and_a_killed_runs_leftovers_go(tiny_artifacts, tiny_config, capsys):
    """Two pipelines on one --out trained the same tasks with two configs; a resume then kept snapshots of
    both under one config.json. The second is refused at once; so is `sglora evaluate` beside a pipeline."""
    from expert_store.repository import locked
    from training.pipeline import PIPELINE_LOCK, pipeline_lock, run_pipeline

    with locked(tiny_artifacts, wait=False, name=PIPELINE_LOCK) as held:  # a pipeline running there
        assert held
        with pytest.raises(ValueError, match="another `sglora pipeline` or `sglora evaluate` is running on it"):
            run_pipeline(tiny_config, tiny_artifacts, ("evaluate",))
        assert main(["evaluate", "--artifacts", str(tiny_artifacts)]) == 2
        assert "is running on it" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:  # a read-only mount (root, who runs CI, passes chmod): said before any work
        mp.setattr("training.pipeline.os.access", lambda path, mode: False)
        assert main(["evaluate", "--artifacts", str(tiny_artifacts)]) == 2
        assert f"{tiny_artifacts} is not writable" in capsys.readouterr().err
    (tiny_artifacts / ".generator.x1.tmp").mkdir()  # SIGKILL inside atomic_dir
    (tiny_artifacts / ".eval-val.x3.tmp").mkdir()  # ... of `sglora evaluate --on val`
    (tiny_artifacts / ".eval-val-partial.x4.tmp").mkdir()
    (tiny_artifacts / ".notes.tmp").write_text("not the pipeline's")
    (tiny_artifacts / "snapshots" / ".circle.safetensors.x2.tmp").write_bytes(b"half")
    (tiny_artifacts / ".backbone.old").mkdir()  # killed after the replacement: the old copy stayed
    # Files are replaced in one rename and never leave an old copy: one beside a file is someone else's.
    (tiny_artifacts / ".splits.json.old").write_text("a copy kept by hand")
    # Killed between the two renames of the repository's replacement: its old copy is the only one, and the
    # one the manifest describes (with any expert the service added). It was kept aside, and a rerun rebuilt
    # the repository without those experts: it is put back.
    (tiny_artifacts / "repository").rename(tiny_artifacts / ".repository.old")
    with pipeline_lock(tiny_artifacts):
        pass
    left = sorted(p.name for d in (tiny_artifacts, tiny_artifacts / "snapshots") for p in d.glob(".*") if p.name != PIPELINE_LOCK)
    assert left == [".notes.tmp", ".splits.json.old"]
    assert "put " + str(tiny_artifacts / "repository") + " back from .repository.old" in capsys.readouterr().out
    from sglora.artifacts import load_artifacts

    assert len(load_artifacts(tiny_artifacts).repository) > 0  # whole again: every sha256 as the manifest pins it
    # Only a folder the pipeline replaces, and a repository only whole (a half-deleted copy would lose experts
    # again): a lone .config.json.old is not the pipeline's, and is not put back.
    (tiny_artifacts / "repository").rename(tiny_artifacts / ".repository.old")
    (tiny_artifacts / ".repository.old" / "repository.json").unlink()
    (tiny_artifacts / "config.json").rename(tiny_artifacts / ".config.json.old")
    with pipeline_lock(tiny_artifacts):
        pass
    assert not (tiny_artifacts / "repository").exists() and not (tiny_artifacts / "config.json").exists()


def test_a_rebuilt_repository_keeps_the_experts_the_service_added_and_removed(tiny_artifacts, tiny_config, capsys):
    """Rerunning the pipeline (a resume, the trainer container) rebuilt the repository from the snapshots:
    an expert registered through POST /experts was dropped, files and all, and a removed one came back."""
    from expert_store.repository import Expert, ExpertRepository
    from training.pipeline import stage_repository

    repo_dir = tiny_artifacts / "repository"
    repo = ExpertRepository.load(repo_dir)
    first, second = repo.names[:2]
    sunflower = Expert("sunflower", "a sunflower", repo[first].mean * 2, repo[first].variance, repo[first].embedding, 1)
    repo.add_and_save(sunflower, repo_dir)
    repo.remove_and_save(second, repo_dir)
    third = repo.names[2]  # replaced: removed, then registered again under its name
    replaced = Expert(third, "a new " + third, repo[third].mean * 3, repo[third].variance, repo[third].embedding, 1)
    repo.remove_and_save(third, repo_dir)
    repo.add_and_save(replaced, repo_dir)
    stage_repository(tiny_config, tiny_artifacts)
    assert f"added or replaced {third}, sunflower; removed {second}" in capsys.readouterr().out
    rebuilt = ExpertRepository.load(repo_dir)
    assert "sunflower" in rebuilt and second not in rebuilt and len(rebuilt) == len(repo.names)
    assert torch.equal(rebuilt["sunflower"].mean, sunflower.mean) and rebuilt[third].description == "a new " + third
    assert torch.equal(rebuilt[first].mean, repo[first].mean)  # the pipeline's own experts, from their snapshots
    # A repository of another run (other experts settings), copied in: rebuilt from this run's snapshots alone
    index = json.loads((repo_dir / "repository.json").read_text())
    index["provenance"]["experts"]["lr"] = 1.0
    (repo_dir / "repository.json").write_text(json.dumps(index))
    stage_repository(tiny_config, tiny_artifacts)
    assert "holds another run's experts; building it from the snapshots alone" in capsys.readouterr().out
    pipeline_experts = json.loads((tiny_artifacts / "splits.json").read_text())["experts"]
    assert sorted(ExpertRepository.load(repo_dir).names) == sorted(pipeline_experts)


def test_an_expert_the_service_added_survives_a_run_killed_while_replacing_the_repository(tiny_artifacts, tiny_config):
    """A SIGKILL between atomic_dir's two renames left the repository only as .repository.old: the rerun found
    no index, rebuilt the repository from the snapshots alone and dropped, without a word, the expert the
    service had added (its files then deleted with the old copy)."""
    from expert_store.repository import Expert, ExpertRepository
    from training.pipeline import run_pipeline

    repo_dir = tiny_artifacts / "repository"
    repo = ExpertRepository.load(repo_dir)
    first = repo.names[0]
    repo.add_and_save(
        Expert("sunflower", "a sunflower", repo[first].mean * 2, repo[first].variance, repo[first].embedding, 1), repo_dir
    )
    repo_dir.rename(tiny_artifacts / ".repository.old")  # the state the kill left
    run_pipeline(tiny_config, tiny_artifacts, ("repository",))
    assert "sunflower" in ExpertRepository.load(repo_dir) and not (tiny_artifacts / ".repository.old").exists()


def test_a_frozen_a_stays_at_its_initialisation_under_weight_decay(tiny_backbone, tiny_config):
    """experts.train_a: false keeps every expert's A at the shared initialisation; Adam's weight decay, added
    in step() after the gradient mask, moved it by 38 % (measured). B still decays."""
    import dataclasses

    from training.experts import FeatureCache, prepare_task, train_expert
    from training.pipeline import load_data

    dataset = load_data(tiny_config)
    task = prepare_task(tiny_backbone, dataset, sorted(dataset.tasks)[0], FeatureCache(tiny_backbone))
    spec = tiny_backbone.spec
    a = spec.b_mask() == 0
    init = spec.init_vector(torch.Generator().manual_seed(tiny_config.experts.seed))
    cfg = dataclasses.replace(tiny_config.experts, epochs=3, keep_last=1, train_a=False)
    plain, decayed = (
        train_expert(tiny_backbone, task, dataclasses.replace(cfg, weight_decay=wd), progress=False)[-1] for wd in (0.0, 0.5)
    )
    assert torch.equal(plain[a], init[a]) and torch.equal(decayed[a], init[a])
    assert decayed[~a].norm() < plain[~a].norm()


def test_the_backbone_fingerprint_hashes_weights_not_a_forward(tiny_artifacts, tiny_backbone):
    """The recorded fingerprint hashes frozen weights bit for bit: a forward a few ulps off (another device,
    CPU or kernel) cannot move it, other weights do. Artefacts that recorded the earlier fingerprint (a
    text embedding rounded to 4 decimals) still load."""
    import copy

    from sglora.artifacts import load_backbone_from
    from sglora.io import sha256_file

    noisy = copy.deepcopy(tiny_backbone)
    noisy._fingerprints = None
    plain = noisy._encode_tokens
    noisy._encode_tokens = lambda tokens: plain(tokens) + 1e-3
    assert noisy.fingerprint() == tiny_backbone.fingerprint()
    assert noisy.fingerprints()[1] != tiny_backbone.fingerprints()[1]  # the legacy one moved
    other = copy.deepcopy(tiny_backbone)
    other._fingerprints = None
    with torch.no_grad():
        other.model.text_projection.add_(1e-6)
    assert other.fingerprint() != tiny_backbone.fingerprint()

    path = tiny_artifacts / "backbone" / "backbone.json"
    meta = json.loads(path.read_text())
    backbone = load_backbone_from(tiny_artifacts)
    fingerprint, legacy = backbone.fingerprints()
    assert meta["fingerprint"] == fingerprint
    index_path = tiny_artifacts / "repository" / "repository.json"
    for recorded in (legacy, "0123456789abcdef"):
        meta["fingerprint"] = recorded
        path.write_text(json.dumps(meta))
        index = json.loads(index_path.read_text())
        index["backbone_fingerprint"] = recorded
        index_path.write_text(json.dumps(index))
        manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
        for rel, p in (("backbone/backbone.json", path), ("repository/repository.json", index_path)):
            manifest["files"][rel] = sha256_file(p)
        (tiny_artifacts / "manifest.json").write_text(json.dumps(manifest))
        if recorded == legacy:
            assert load_artifacts(tiny_artifacts).repository.backbone_fingerprint == legacy
        else:
            with pytest.raises(ArtifactError, match="the rebuilt backbone's weights differ"):
                load_artifacts(tiny_artifacts)


def test_a_procedural_option_it_does_not_take_is_named(tiny_config):
    from training.pipeline import load_data

    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, options={"bogus": 1}))
    with pytest.raises(ValueError, match=r"data\.options: unknown key\(s\) \['bogus'\] for kind 'procedural'"):
        load_data(cfg)  # was a TypeError from procedural_dataset()


def test_a_run_that_failed_before_any_task_does_not_lock_its_folder(tiny_config, tmp_path, monkeypatch):
    """config.json is written before the first task trains: a first run that failed there (a bad setting)
    left --out refusing the corrected config as "built with another config"."""
    from training import pipeline

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "train_expert", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("diverged")))
    with pytest.raises(RuntimeError, match="diverged"):
        pipeline.stage_experts(tiny_config, out)
    assert (out / "config.json").exists() and not (out / "manifest.json").exists()
    monkeypatch.undo()
    fixed = dataclasses.replace(tiny_config, experts=dataclasses.replace(tiny_config.experts, lr=0.002))
    pipeline.stage_experts(fixed, out)
    assert json.loads((out / "config.json").read_text())["experts"]["lr"] == 0.002


@pytest.mark.parametrize("where", ["gpu", "cpu"])
def test_the_cli_says_out_of_memory_and_what_to_lower_without_a_traceback(tmp_path, monkeypatch, capsys, where):
    from training import pipeline

    def out_of_memory(*args, **kwargs):
        if where == "gpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.6 GiB total capacity)")
        torch.empty(2**58, dtype=torch.uint8)  # past any address space: the CPU allocator's own failure, a RuntimeError

    monkeypatch.setattr(pipeline, "train_expert", out_of_memory)
    out = tmp_path / "out"
    argv = ["pipeline", "--config", "configs/tiny.yaml", "--out", str(out)]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "sglora pipeline: out of memory (" in err
        and "lower the config's batch sizes (experts.batch_size, generator.batch_size" in err
    )
    assert f"{out} are kept: rerun the same command to resume" in err and "Traceback" not in err
    # Any other error is still a bug's traceback, not a message
    monkeypatch.setattr(pipeline, "train_expert", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("diverged")))
    with pytest.raises(RuntimeError, match="diverged"):
        main(argv)


def test_trained_tasks_without_their_config_are_not_resumed_under_another(tiny_artifacts, tiny_config):
    """With config.json deleted, a resume under another experts config kept the old snapshots and recorded
    the new settings as theirs."""
    from training.pipeline import stage_experts

    (tiny_artifacts / "config.json").unlink()
    other = dataclasses.replace(tiny_config, experts=dataclasses.replace(tiny_config.experts, lr=0.02))
    with pytest.raises(ValueError, match="holds trained tasks but no config.json"):
        stage_experts(other, tiny_artifacts)
    assert not (tiny_artifacts / "config.json").exists()


def test_the_repository_stage_does_not_label_the_generator_with_settings_it_was_not_trained_with(tiny_artifacts):
    """--stage repository with a new prior/generator config recorded it in config.json, and the generator
    trained with the old settings then passed the evaluate stage's stale check."""
    from training.config import PipelineConfig, from_dict
    from training.pipeline import run_pipeline

    built = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    new = dataclasses.replace(built, prior=dataclasses.replace(built.prior, top_k=1))
    run_pipeline(new, tiny_artifacts, ("repository",))
    assert json.loads((tiny_artifacts / "config.json").read_text())["prior"]["top_k"] == built.prior.top_k
    with pytest.raises(ValueError, match="rerun the generator stage"):
        run_pipeline(new, tiny_artifacts, ("evaluate",))


@pytest.mark.parametrize(
    ("file", "edit", "needle"),
    [
        ("generator/cvae.json", lambda m: m.pop("cvae"), r"cvae\.json: no 'cvae' field"),
        ("generator/cvae.json", lambda m: m["cvae"].update(later=1), r"cvae\.json: its 'cvae' settings do not fit"),
        ("backbone/backbone.json", lambda m: m.pop("lora_fingerprint"), r"backbone\.json: no 'lora_fingerprint' field"),
    ],
)
def test_artefact_json_of_another_release_is_refused_by_file_and_field(tiny_artifacts, file, edit, needle):
    """Once a traceback (TypeError from CVAEConfig) or "error: 'lora_fingerprint'"."""
    from sglora.io import sha256_file

    path = tiny_artifacts / file
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    manifest["files"][file] = sha256_file(path)  # re-pinned: the content, not the hash, is what is refused
    (tiny_artifacts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=needle):
        load_artifacts(tiny_artifacts)


def test_stages_run_in_pipeline_order_whatever_order_they_are_given_in(tiny_config, tmp_path, monkeypatch):
    import yaml

    from training import pipeline

    ran = []
    monkeypatch.setattr(
        pipeline, "run_pipeline", lambda cfg, out, stages, device, keep_unchanged: ran.append((stages, keep_unchanged))
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config.to_dict()))
    argv = ["pipeline", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--stage", "evaluate", "--stage", "generator"]) == 0
    assert main(argv) == 0
    # A stage named runs regardless; a whole run keeps an unchanged generator.
    assert ran == [(("generator", "evaluate"), False), (pipeline.art.STAGES, True)]


def test_a_manifest_that_stops_pinning_a_model_file_is_refused(tiny_artifacts):
    """Deleting the generator's weights from the manifest's files and copying in another run's: loaded unchecked."""
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    del manifest["files"]["generator/cvae.safetensors"]
    (tiny_artifacts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="pins no sha256 for generator/cvae.safetensors"):
        load_artifacts(tiny_artifacts)


def test_a_repository_from_another_run_is_refused_and_its_provenance_survives_changes(tiny_artifacts):
    """A repository/ copied in from a run with other experts settings (same backbone) loaded, and its experts
    served as this run's: the repository stage now records the settings its experts were trained with,
    kept through the service's additions and removals."""
    from expert_store.repository import ExpertRepository
    from sglora.artifacts import experts_settings, same_experts

    config = json.loads((tiny_artifacts / "config.json").read_text())
    repo = ExpertRepository.load(tiny_artifacts / "repository")
    assert repo.provenance == experts_settings(config)
    removed = repo.remove_and_save(repo.names[0], tiny_artifacts / "repository")  # as DELETE /experts does
    again = ExpertRepository.load(tiny_artifacts / "repository")
    assert again.provenance == repo.provenance and removed.name not in again
    load_artifacts(tiny_artifacts)
    index_path = tiny_artifacts / "repository" / "repository.json"
    index = json.loads(index_path.read_text())
    # Recorded before a setting existed (its default now): the same experts.
    older = {**index["provenance"], "experts": {k: v for k, v in index["provenance"]["experts"].items() if k != "train_a"}}
    assert older != index["provenance"] and same_experts(older, config)
    # Another run's: its experts trained with another lr.
    index["provenance"] = {**index["provenance"], "experts": {**config["experts"], "lr": config["experts"]["lr"] * 2}}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="built from the experts of another run"):
        load_artifacts(tiny_artifacts)
    # A repository written before provenance was recorded (its manifest's repository stage does not say it is)
    # loads as before.
    del index["provenance"]
    index_path.write_text(json.dumps(index))
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    del manifest["stages"]["repository"]["provenance"]
    (tiny_artifacts / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifacts(tiny_artifacts).repository.provenance is None


def test_a_task_term_with_no_task_of_its_kind_is_refused_before_the_experts_train(tiny_config):
    """Found by the generator stage, after every expert had trained; check-config --data runs the same check."""
    from training.pipeline import load_data, prepare_data

    tasks = load_data(tiny_config).tasks
    retrieval = sorted(n for n, t in tasks.items() if t.kind == "retrieval")
    assert len(retrieval) >= 3
    split = dataclasses.replace(
        tiny_config.split, experts=tuple(retrieval[:1]), train=tuple(retrieval[1:2]), val=0, test=tuple(retrieval[2:3])
    )
    generator = dataclasses.replace(
        tiny_config.generator, task_weight=1.0, task_kinds=("classification",), include_experts=False, patience=None
    )
    cfg = dataclasses.replace(tiny_config, split=split, generator=generator)
    with pytest.raises(ValueError, match=r"no training task is of a kind in generator.task_kinds \['classification'\]"):
        prepare_data(cfg)
    prepare_data(dataclasses.replace(cfg, generator=dataclasses.replace(generator, task_kinds=("retrieval",))))


def test_a_generator_of_one_training_task_is_warned_about(tiny_artifacts, capsys):
    from training.config import PipelineConfig, from_dict
    from training.pipeline import stage_generator

    cfg = from_dict(PipelineConfig, json.loads((tiny_artifacts / "config.json").read_text()))
    one = json.loads((tiny_artifacts / "splits.json").read_text())["train"][0]
    stage_generator(cfg, tiny_artifacts, only_tasks=[one])
    assert f"[generator] warning: one training task ({one})" in capsys.readouterr().out


def test_a_task_description_past_the_text_context_is_refused_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
    """The tokenizer cut it off, and the service refuses the expert's description in a backup re-registered
    through POST /experts: the experts stage refuses it first, naming the task."""
    import training.pipeline as pl

    real = pl.prepare_data
    named = []

    def long_description(cfg):
        dataset, splits = real(cfg)
        named.append(splits.all()[0])
        dataset.tasks[named[0]] = dataclasses.replace(dataset.tasks[named[0]], description="a ring " * 20)
        return dataset, splits

    monkeypatch.setattr(pl, "prepare_data", long_description)
    with pytest.raises(ValueError, match="its description is 42 tokens long, and the text tower reads at most 32") as e:
        pl.stage_experts(tiny_config, tmp_path / "out")
    assert f"task {named[0]!r}" in str(e.value)
    assert not (tmp_path / "out" / "backbone").exists() and not (tmp_path / "out" / "config.json").exists()


def test_a_refused_run_leaves_no_out_folder_behind_and_keeps_one_it_did_not_make(tiny_config, tmp_path, capsys):
    """A config or dataset refused before anything is written used to leave ``--out`` (and its parents)
    created, holding only the run's lock file."""
    import yaml

    import training.pipeline as pl

    cfg = tiny_config.to_dict()
    cfg["experts"]["min_train_samples"] = 1000  # refused by the experts stage's first check
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "new" / "out"
    assert main(["pipeline", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "at least 1000 are needed" in err and "rerun the same command" not in err  # nothing kept to resume
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # the user's own, empty: kept as it was
    assert main(["pipeline", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()
    capsys.readouterr()

    def interrupted(*args):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # stopped with only the lock file in it: no work to resume is claimed
        mp.setitem(pl.STAGE_FUNCS, "experts", interrupted)
        assert main(["pipeline", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "mine")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "are kept" not in err


def test_a_run_refused_by_another_on_the_folder_it_would_make_removes_nothing(tiny_config, tmp_path, monkeypatch):
    """Two runs on one new --out: the one refused by the other's lock removed the folder it had found
    missing, lock file included, under the run that held it. Only a run holding the lock cleans up; and a
    relative --out through '..' does not count a folder it only passes through as its own."""
    import training.pipeline as pl

    out = tmp_path / "new" / "out"
    real = pl.pipeline_lock
    holder = {}

    def raced(folder):  # the other run starts between this one's look at the folder and its lock
        holder["lock"] = real(folder)
        holder["lock"].__enter__()
        return real(folder)

    monkeypatch.setattr(pl, "pipeline_lock", raced)
    with pytest.raises(ValueError, match="is running on it"):
        pl.run_pipeline(tiny_config, out, ("experts",))
    assert (out / pl.PIPELINE_LOCK).is_file()  # the other run's lock and folder are there still
    holder["lock"].__exit__(None, None, None)
    monkeypatch.setattr(pl, "pipeline_lock", real)
    experts = dataclasses.replace(tiny_config.experts, min_train_samples=1000)  # refused under this run's own lock
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="at least 1000 are needed"):
        pl.run_pipeline(dataclasses.replace(tiny_config, experts=experts), Path("q/../r"), ("experts",))
    assert not (tmp_path / "r").exists() and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="no longer exists"):  # removed so by a run that failed as this one began
        with pl.pipeline_lock(tmp_path / "r"):
            pass


def test_a_pipeline_run_loads_its_dataset_once(tmp_path, monkeypatch):
    """The experts, generator and evaluation stages each loaded the dataset (probing every image header
    again), and a loader's warning (unused labels) printed once per load."""
    import training.pipeline as pipeline

    loads = []
    real = pipeline._load_source
    monkeypatch.setattr(pipeline, "_load_source", lambda d: loads.append(d) or real(d))
    _folder_pipeline(tmp_path)
    assert len(loads) == 1
    from training.config import load_config

    pipeline.load_data(load_config(tmp_path / "c.yaml"))  # outside a run: loaded afresh
    assert len(loads) == 2


def test_tasks_described_alike_are_warned_of_and_a_task_in_two_roles_is_named(tmp_path):
    from training.config import SplitConfig
    from training.data import TaskDataset, TaskInfo
    from training.pipeline import resolve_split

    tasks = {n: TaskInfo(n, f"photos of {n}") for n in ("a", "b", "c", "d")}
    tasks["e"] = TaskInfo("e", "Photos of A")
    ds = TaskDataset(tasks)
    with pytest.raises(ValueError, match=r"one role only: 'b' in experts and test"):
        resolve_split(SplitConfig(experts=("a", "b"), train=1, val=0, test=("b",)), ds)

    import warnings

    import training.pipeline as pipeline

    cfg = types.SimpleNamespace(
        split=SplitConfig(experts=("a", "b", "e"), train=1, val=0, test=1),
        experts=types.SimpleNamespace(min_train_samples=0, min_test_samples=0),
        generator=types.SimpleNamespace(task_weight=0),
    )
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("always")
        m.setattr(pipeline, "load_data", lambda c: ds)
        m.setattr(TaskDataset, "check", lambda *a: None)
        pipeline.prepare_data(cfg)
    assert [str(w.message) for w in caught] == [
        "tasks with the same description (letter case aside), which the experts' selection cannot tell apart: 'a', 'e'"
    ]


def test_check_config_takes_config_as_pipeline_does_and_counts_description_tokens(tmp_path, capsys):
    from training.data import load_task_dataset

    config, _ = _folder_pipeline(tmp_path, stages=("experts",))
    path = str(tmp_path / "c.yaml")
    assert main(["check-config", "--config", path, "--data"]) == 0
    assert "data: " in capsys.readouterr().err
    ds = load_task_dataset(tmp_path / "ds")
    task = sorted(ds.tasks)[0]
    tasks = json.loads((tmp_path / "ds" / "tasks.json").read_text())
    for t in tasks["tasks"]:
        if t["name"] == task:
            t["description"] = " ".join(["circle"] * 200)  # longer than the tiny tower's context
    (tmp_path / "ds" / "tasks.json").write_text(json.dumps(tasks))
    assert main(["check-config", path, "--data"]) == 2
    assert f"task {task!r}: its description is " in capsys.readouterr().err
    assert main(["check-config", path, "--config", str(tmp_path / "other.yaml")]) == 2
    assert "two configs given" in capsys.readouterr().err
    assert main(["check-config"]) == 2
    assert "give a config" in capsys.readouterr().err


def test_cli_select_prints_the_experts_the_library_chooses(tiny_artifacts_session, capsys):
    """sglora select lists the top-K experts with their weights, similarities and descriptions, as the engine
    chose them (the exit code alone was checked)."""
    from sglora.artifacts import load_artifacts

    root = str(tiny_artifacts_session)
    assert main(["select", "a photo of a circle", "--artifacts", root, "--top-k", "2", "--temperature", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    a = load_artifacts(root, require_generator=False)
    g = a.engine.generate(a.engine.embed(["a photo of a circle"])[0], "topk-weighted", top_k=2, temperature=0.5)
    assert lines[0] == "top-2 experts for 'a photo of a circle' (temperature 0.5):"
    expected = [f"  {e.weight:6.3f}  sim {e.similarity:+.3f}  {e.name}: {a.repository[e.name].description}" for e in g.experts]
    assert lines[1:] == expected and len(expected) == 2
    assert abs(sum(e.weight for e in g.experts) - 1) < 1e-6


def test_cli_says_how_to_pass_a_description_starting_with_a_dash_and_prints_no_seed_for_a_merge(
    tiny_artifacts_session, tmp_path, capsys
):
    root = str(tiny_artifacts_session)
    with pytest.raises(SystemExit) as e:
        main(["select", "--artifacts", root, "-red"])
    assert e.value.code == 2
    assert "goes last, after '--' (e.g. ... -- -red)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", "--artifacts", root])  # no such word given: no such hint
    err = capsys.readouterr().err
    assert "required: description" in err and "'--'" not in err
    for given, named in (
        (["--art", root, "-red"], "-red"),  # an abbreviated option is not the word
        (["--artifacts", root, "--temperature", "-0.5", "-red"], "-red"),  # nor an option's negative value
    ):
        with pytest.raises(SystemExit):
            main(["select", *given])
        assert f"(e.g. ... -- {named})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", "--artifacts", root, "--"])  # a lone '--' is no such word either
    assert "'--'" not in capsys.readouterr().err
    assert main(["select", "--artifacts", root, "--", "-red"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "m.safetensors")
    assert main(["generate", "a photo of a circle", "--artifacts", root, "--method", "model-soup", "--out", out]) == 0
    line = capsys.readouterr().out
    assert "method=model-soup experts:" in line and "seed" not in line


def test_captions_longer_than_the_text_tower_reads_are_warned_of_once_with_the_first_named(tmp_path, recwarn):
    """They were cut by the tokenizer without a word, in training and in evaluation."""
    _folder_pipeline(tmp_path, stages=("experts",))
    ds = tmp_path / "ds"
    rows = [json.loads(line) for line in (ds / "samples.jsonl").read_text().splitlines()]
    long = [i for i, r in enumerate(rows) if r.get("caption")][:2]
    for i in long:
        rows[i]["caption"] = " ".join(["a red circle"] * 100) + f" {i}"
    (ds / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["check-config", str(tmp_path / "c.yaml"), "--data"]) == 0
    said = [str(w.message) for w in recwarn if "longer than the text tower reads" in str(w.message)]
    assert len(said) == 1
    assert said[0].startswith("2 caption(s) longer") and f"samples.jsonl:{long[0] + 1}, task {rows[long[0]]['task']!r}" in said[0]
