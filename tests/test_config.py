from pathlib import Path

import pytest

from training.config import PipelineConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.experts.keep_last <= cfg.experts.epochs


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,needle",
    [
        ("generator: {latnt_dim: 3}", "latnt_dim"),
        ("experts: {epochs: 5, keep_last: 9}", "keep_last"),
        ("prior: {temperature: 0}", "temperature"),
        ("prior: {temperature: 1.0e-300}", "prior.temperature must be between"),
        ("prior: {top_k: two}", "prior.top_k"),
        ("backbone: {kind: tensorflow}", "backbone.kind"),
        ("evaluation: {methods: [sg-lora, magic]}", "magic"),
        ("data: {kind: folder}", "data.path"),
        ("bogus: 1", "bogus"),
        ("split: {test: -1}", r"split.test: task counts must be >= 0"),
        ("split: {experts: {fashion: -2}}", r"split.experts: task counts must be >= 0"),
        ("split: {test: [a, a]}", r"split.test: task\(s\) \['a'\] listed more than once"),
        ("experts: {min_test_samples: 1}", "experts.min_test_samples must be >= 2"),
        ("experts: {min_train_samples: 0}", "experts.min_train_samples must be >= 2"),
        ("experts: {epochs: 0}", r"^experts\.epochs must be >= 1, got 0$"),  # the section named once
        ("prior: {top_k: 0}", r"^prior\.top_k must be >= 1, got 0$"),
        # Once a traceback or a late, unnamed failure (after the experts stage had run):
        ("data: {image_size: 0}", r"data\.image_size must be >= 1"),
        ("experts: {weight_decay: -1}", r"experts\.weight_decay must be >= 0"),
        ("generator: {batch_size: 0}", r"generator\.batch_size must be >= 1"),
        ("generator: {latent_dim: 0}", r"generator\.latent_dim must be >= 1"),
        ("generator: {hidden_dim: 0}", r"generator\.hidden_dim must be >= 1"),
        ("generator: {kl_weight: -1}", r"generator\.kl_weight must be >= 0"),
        ("evaluation: {methods: []}", r"evaluation\.methods: empty"),  # a results table of no methods
        # Found only after every expert had trained, or named after the wrong setting:
        ("generator: {seed: 1180591620717411303424}", r"generator\.seed: a seed is between 0 and 9223372036854775807"),
        ("experts: {seed: -1}", r"experts\.seed: a seed is between 0"),
        ("backbone: {seed: 18446744073709551616}", r"backbone\.seed: a seed is between 0"),
        ("evaluation: {seed: 9223372036854775807, sg_samples: 3}", r"evaluation\.seed must be between 0 and"),
        ("generator: {kl_weight: .nan}", r"generator\.kl_weight: expected a finite number, got nan"),
        ("experts: {lr: .inf}", r"experts\.lr: expected a finite number, got inf"),
        ("experts: {weight_decay: .nan}", r"experts\.weight_decay: expected a finite number"),
        ("experts: {lr: fast}", r"experts\.lr: expected a number, got 'fast'"),
        ("split: {experts: 1}\ngenerator: {include_experts: true}", r"generator\.include_experts needs at least 2 experts"),
        ("split: {experts: [a]}\ngenerator: {include_experts: true}", r"split\.experts is \('a',\)"),
        # Settings that did nothing: the top-level seed, a folder dataset's generators' settings.
        ("seed: 1", r"seed: 1: the top-level seed is not used .* split\.seed"),
        ("data: {kind: folder, path: ds, train_per_task: 5}", r"data \(.*ds\): train_per_task do nothing for kind 'folder'"),
        ("data: {kind: folder, path: ds, seed: 2, options: {class_template: x}}", r"seed, options do nothing"),
        # The generator stage's refusals, once found only after every expert had trained:
        ("split: {train: 0}", r"the generator needs training tasks: set split\.train > 0"),
        ("split: {train: {fashion: 0}}", r"the generator needs training tasks"),
        ("generator: {patience: 2}", r"generator\.patience needs validation tasks \(split\.val > 0\)"),
        ("experts: {epochs: 5}\nprior: {top_k: 2}\nexperts: {lr: 0.01}\n", "the key 'experts' is given twice"),
        ("", "the config is empty"),  # all defaults would be a random-weight ViT-B-16
        ("# a comment only\n", "the config is empty"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(_write(tmp_path, text))


def test_a_number_pyyaml_reads_as_a_string_is_a_number(tmp_path):
    """PyYAML 1.1 reads 5e-3 (no dot) as a string: it was refused as "expected a number, got '5e-3'"."""
    assert load_config(_write(tmp_path, "experts: {lr: 5e-3}")).experts.lr == 0.005


def test_an_explicit_empty_mapping_takes_every_default(tmp_path):
    assert load_config(_write(tmp_path, "{}")).backbone.kind == PipelineConfig().backbone.kind


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_folder_given_as_the_config_is_named(tmp_path):
    """A run folder passed where the YAML goes was a raw '[Errno 21] Is a directory' (the CLI's exit
    status: test_pipeline's file-system errors)."""
    with pytest.raises(ValueError, match="not a file; give the YAML config"):
        load_config(tmp_path)


def test_dataset_paths_are_relative_to_the_config_file_also_in_combined_sources(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    text = "data: {kind: combined, sources: [{kind: folder, path: ../ds}, {kind: procedural}]}"
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's folder
    cfg = load_config(_write(tmp_path / "cfg", text))
    assert cfg.data.sources[0].path == str((tmp_path / "ds").resolve()) and cfg.data.sources[1].path is None


def test_a_relative_checkpoint_path_is_made_absolute_and_a_tag_left_alone(tmp_path, monkeypatch):
    """Artefacts on a pretrained checkpoint rebuild the backbone from it: a relative path loaded only from the
    folder the pipeline ran in."""
    (tmp_path / "cfg" / "weights").mkdir(parents=True)
    (tmp_path / "cfg" / "weights" / "vit.pt").write_bytes(b"x")
    (tmp_path / "cwd.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for given, want in (
        ("weights/vit.pt", tmp_path / "cfg" / "weights" / "vit.pt"),  # beside the config
        ("cwd.pt", tmp_path / "cwd.pt"),  # in the working directory
        ("openai", "openai"),  # a tag
    ):
        cfg = load_config(_write(tmp_path / "cfg", f"backbone: {{model: ViT-B-32, pretrained: {given}}}"))
        assert cfg.backbone.pretrained == str(want)


def test_yaml_merge_keys_still_load_and_an_unhashable_key_is_named(tmp_path):
    """The duplicate-key check must leave YAML's merge key (<<) to the loader, and name a key a mapping cannot hold."""
    cfg = load_config(_write(tmp_path, "experts: {<<: [{epochs: 3}, {keep_last: 2}], lr: 0.01}\n"))
    assert (cfg.experts.epochs, cfg.experts.keep_last, cfg.experts.lr) == (3, 2, 0.01)
    with pytest.raises(ValueError, match="unhashable key"):
        load_config(_write(tmp_path, "experts: {? [1, 2] : 3}\n"))


def test_settings_that_do_nothing_are_refused_in_files_not_in_built_artefacts(tmp_path):
    """The config.json of artefacts built before the refusal still reads (sglora evaluate, a resume)."""
    from training.config import from_dict

    built = {"seed": 3, "data": {"kind": "folder", "path": "/ds", "image_size": 64}}
    cfg = from_dict(PipelineConfig, built)
    assert cfg.seed == 3 and cfg.data.image_size == 64
    with pytest.raises(ValueError, match="top-level seed is not used"):
        load_config(_write(tmp_path, "seed: 3"))
    with pytest.raises(ValueError, match=r"image_size do nothing for kind 'folder'"):  # in a combined source too
        load_config(_write(tmp_path, "data: {kind: combined, sources: [{kind: folder, path: ds, image_size: 64}]}"))


def test_what_older_releases_wrote_compares_as_this_release_writes_it(tmp_path, monkeypatch):
    """Artefacts built with a relative checkpoint path, or a folder dataset's settings that did nothing, were
    refused as "built with other backbone/data settings" once the config file said it as this release wants."""
    from training.config import with_defaults

    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    old = with_defaults({"backbone": {"model": "ViT-B-32", "pretrained": "w.pt"}})
    assert old["backbone"] == with_defaults({"backbone": {"model": "ViT-B-32", "pretrained": str(tmp_path / "w.pt")}})["backbone"]
    old = with_defaults({"data": {"kind": "folder", "path": "/ds", "image_size": 64, "options": {"x": 1}}})
    assert old["data"] == with_defaults({"data": {"kind": "folder", "path": "/ds"}})["data"]
    assert with_defaults({"data": {"kind": "procedural", "image_size": 64}})["data"]["image_size"] == 64  # read there
