"""The artefact directory written by ``sglora pipeline`` and loaded by the CLI and the service.

    DIR/
      manifest.json            format, code version, stages done, sha256 of every file below but the repository's
      config.json              the pipeline config that produced it
      splits.json              expert / train / val / test task names
      backbone/backbone.json   backbone config + fingerprint (+ weights for randomly initialised ones)
      snapshots/<task>.safetensors   (M, P) flattened LoRAs of each trained task
      repository/              the expert repository (its own index with per-expert sha256; it changes
                               when experts are added or removed, so the manifest does not pin it)
      generator/cvae.json + cvae.safetensors + history.json
      eval/results.json + results.md

Loading checks every sha256 in the manifest (a report under eval*/ or generator/history.* that is missing
or changed is only a warning: nothing loads it) and the consistency of backbone, LoRA layout
and embedding size across parts, and refuses with a message naming the problem.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from expert_store.repository import INDEX_FILE, ExpertRepository
from models.backbone import BACKBONE_FILE, Backbone, BackboneConfig, load_backbone
from models.cvae import CVAE, CVAEConfig
from sglora import __version__
from sglora.devices import resolve_device
from sglora.engine import Engine, Generation
from sglora.io import read_json, read_json_and_bytes, sha256_file, write_json, write_safetensors

MANIFEST = "manifest.json"
FORMAT = "sglora-artifacts"
FORMAT_VERSION = 1
GENERATOR_CONFIG = "generator/cvae.json"
GENERATOR_WEIGHTS = "generator/cvae.safetensors"
# The config sections the experts stage trains with: the later stages must not change them.
EXPERT_SECTIONS = ("backbone", "data", "split", "experts")


def experts_settings(config: dict) -> dict:
    """The settings an artefact directory's experts were trained with: ``config.json``'s
    :data:`EXPERT_SECTIONS` as written. The repository stage records them in the repository, so that a
    repository copied in from another run is refused at load (:func:`same_experts`)."""
    return {k: config.get(k) for k in EXPERT_SECTIONS}


def same_experts(recorded: dict, config: dict) -> bool:
    """Whether ``recorded`` (:func:`experts_settings` of a repository) are ``config``'s, each with this
    release's defaults filled in: a setting added since with its default is not a difference."""
    from training.config import with_defaults

    def filled(sections: dict) -> dict:
        return experts_settings(with_defaults({k: v for k, v in sections.items() if v is not None}))

    return isinstance(recorded, dict) and filled(recorded) == filled(experts_settings(config))


def foreign_repository(repository: ExpertRepository, config: dict, backbone: Backbone) -> str | None:
    """Why ``repository`` is not the one the run of ``config`` built on ``backbone`` (copied in from another
    run, or built on another backbone), or None."""
    if repository.provenance is not None and not same_experts(repository.provenance, config):
        return (
            f"built from the experts of another run (trained with other {', '.join(EXPERT_SECTIONS)} settings "
            "than config.json's); rerun the repository stage"
        )
    if repository.backbone_fingerprint not in backbone.fingerprints():
        return "experts were built on another backbone"
    return None


# Files a completed stage always wrote and loading reads: each must be pinned (an edited manifest that drops one
# would let any file load in its place).
PINNED_BY = {"experts": ("config.json", "backbone/backbone.json"), "generator": (GENERATOR_CONFIG, GENERATOR_WEIGHTS)}
STAGES = ("experts", "repository", "generator", "evaluate")
log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """An artefact directory is missing, corrupt or inconsistent."""


def _files_under(root: Path, subdirs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for sub in subdirs:
        p = root / sub
        if p.is_file():
            out[sub] = sha256_file(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    out[str(f.relative_to(root))] = sha256_file(f)
    return out


# What each stage writes, so what it pins (config.json: every stage records the settings it ran with).
STAGE_FILES = {
    "experts": ("config.json", "splits.json", "backbone", "snapshots"),
    "repository": ("config.json",),
    "generator": ("config.json", "generator"),
    "evaluate": ("config.json", "eval"),
}


def update_manifest(root: Path, stage: str, extra: dict | None = None, invalidate: tuple[str, ...] = ()) -> dict:
    """Marks ``stage`` done and pins the files it wrote; the others keep the digests their own stages
    recorded (re-hashing them here would pin a file damaged since). ``invalidate``: stages whose results
    are stale now (built from what ``stage`` just changed): unmarked, so loading refuses until they run
    again. The manifest is written atomically."""
    path = root / MANIFEST
    manifest = read_json(path, "artefact manifest") if path.exists() else {"format": FORMAT, "version": FORMAT_VERSION}
    manifest["code_version"] = __version__
    stages = manifest.setdefault("stages", {})
    for s in invalidate:
        stages.pop(s, None)
    stages[stage] = {"completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    mine = STAGE_FILES[stage]
    kept = {k: v for k, v in manifest.get("files", {}).items() if not (k in mine or k.startswith(tuple(f"{d}/" for d in mine)))}
    manifest["files"] = dict(sorted({**kept, **_files_under(root, mine)}.items()))
    write_json(path, manifest)
    return manifest


def save_backbone(d: Path, backbone: Backbone, config_dict: dict) -> None:
    """Writes ``backbone/``: the backbone's own files plus backbone.json describing it."""
    backbone.save(d)
    write_json(
        d / BACKBONE_FILE,
        {
            "config": config_dict,
            "fingerprint": backbone.fingerprint(),
            "embed_dim": backbone.embed_dim,
            "lora": backbone.spec.to_dict(),
            "lora_fingerprint": backbone.spec.fingerprint(),
        },
    )


def save_generator(d: Path, model: CVAE, history: list[dict]) -> None:
    """Writes ``generator/``: CVAE config, weights (with normalisation statistics) and loss history."""
    write_safetensors(d / "cvae.safetensors", dict(model.state_dict()), metadata={"format": "sglora-cvae"})
    write_json(d / "cvae.json", {"cvae": model.config.to_dict(), "lora_dim": model.config.lora_dim})
    write_json(d / "history.json", history)


def read_manifest(root: Path) -> dict:
    """The artefact directory's manifest, checked; :class:`ArtifactError` naming what is wrong."""
    return _read_manifest(Path(root))[0]


def _read_manifest(root: Path) -> tuple[dict, bytes]:
    """(:func:`read_manifest`, the bytes it was parsed from): one read."""
    if not root.is_dir():
        raise ArtifactError(f"artefact directory not found: {root}")
    try:
        manifest, data = read_json_and_bytes(root / MANIFEST, "artefact manifest")
    except (FileNotFoundError, ValueError) as e:
        raise ArtifactError(str(e)) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{root / MANIFEST}: not a version-{FORMAT_VERSION} {FORMAT} manifest")
    files, stages = manifest.get("files"), manifest.get("stages")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{root / MANIFEST}: 'files' must map each pinned file to its sha256")
    if not isinstance(stages, dict):
        raise ArtifactError(f"{root / MANIFEST}: 'stages' must map each stage done to its record")
    for rel in files:  # pinned files live inside the directory: no absolute paths, no '..', no devices
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ArtifactError(f"{root / MANIFEST}: pinned path {rel!r} leaves the artefact directory")
    return manifest, data


def is_report(rel: str) -> bool:
    """Files written for people (result tables, plots, the loss history): nothing loads them."""
    return rel.split("/", 1)[0].startswith("eval") or rel.startswith("generator/history.")


def verify_files(root: Path, manifest: dict, prefixes: tuple[str, ...] | None = None) -> None:
    """Checks every pinned file (those under ``prefixes`` only, when given) against its sha256. A model
    file missing, changed or not a regular file raises :class:`ArtifactError`; a report (:func:`is_report`)
    is only logged as a warning, since nothing loads it and rerunning its stage rewrites it."""
    for rel, digest in manifest["files"].items():
        if prefixes is not None and not rel.startswith(prefixes):
            continue
        p = root / rel
        if p.is_symlink() or (p.exists() and not p.is_file()):
            problem = f"artefact file is not a regular file: {p}"
        elif not p.exists():
            problem = f"artefact file missing: {p}"
        elif sha256_file(p) != digest:
            problem = f"artefact file corrupt (sha256 mismatch): {p}"
        else:
            continue
        if not is_report(rel):
            raise ArtifactError(problem)
        log.warning("%s (a report: loading goes on; rerunning its stage writes it again)", problem)


def _fields(meta: object, path: Path, *keys: str) -> None:
    """ArtifactError naming the file and the field when a JSON artefact lacks one this release reads."""
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ArtifactError(
            f"{path}: no {', '.join(repr(k) for k in missing)} field: not written by this release's pipeline "
            f"(release {__version__}); rebuild the artefacts with it"
        )


def load_backbone_from(root: Path, device: str | torch.device = "cpu") -> Backbone:
    from training.config import backbone_from_dict

    path = root / "backbone" / BACKBONE_FILE
    meta = read_json(path, "backbone description")
    _fields(meta, path, "config", "lora_fingerprint", "fingerprint")
    cfg: BackboneConfig = backbone_from_dict(meta["config"])
    if "quick_gelu" not in meta["config"]:
        _check_legacy_activation(root, cfg)
    backbone = load_backbone(root / "backbone", cfg, device=device)
    if backbone.spec.fingerprint() != meta["lora_fingerprint"]:
        raise ArtifactError(f"{root / 'backbone'}: the rebuilt backbone's LoRA layout differs from the recorded one")
    if meta["fingerprint"] not in backbone.fingerprints():  # the recorded one: this release's, or the legacy one
        raise ArtifactError(f"{root / 'backbone'}: the rebuilt backbone's weights differ from those the artefacts were built on")
    return backbone


def _check_legacy_activation(root: Path, cfg: BackboneConfig) -> None:
    """Artefacts written before ``backbone.quick_gelu`` existed were built with the architecture's own
    activation; a config that says nothing now follows the pretrained tag. Where the two differ (a
    plain ViT-B-16 on the 'openai' weights: GELU then, QuickGELU now) the rebuilt backbone is not the
    one the experts were trained on: refused with the reason rather than as a weight mismatch."""
    if cfg.kind != "open_clip" or cfg.model_config is not None:
        return
    from models.open_clip_backbone import architecture_quick_gelu, tag_quick_gelu

    needed, built = tag_quick_gelu(cfg.model, cfg.pretrained), architecture_quick_gelu(cfg.model)
    if needed is not None and needed != built:
        act = {True: "QuickGELU", False: "GELU"}
        raise ArtifactError(
            f"{root / 'backbone'}: built with {act[built]}, the default of {cfg.model} before backbone.quick_gelu existed, "
            f"but the {cfg.pretrained!r} weights were trained with {act[needed]}, which a backbone now follows; "
            "rebuild the artefacts (sglora pipeline, a new --out) to use the right activation"
        )


def load_generator(root: Path, device: str | torch.device = "cpu") -> CVAE:
    meta = read_json(root / GENERATOR_CONFIG, "generator config")
    _fields(meta, root / GENERATOR_CONFIG, "cvae")
    try:
        model = CVAE(CVAEConfig(**meta["cvae"]))
    except TypeError as e:  # a field this release does not know (a later release's), or a missing one
        raise ArtifactError(f"{root / GENERATOR_CONFIG}: its 'cvae' settings do not fit this release ({__version__}): {e}") from e
    try:
        state = load_file(str(root / GENERATOR_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"generator weights unreadable: {root / GENERATOR_WEIGHTS}: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"generator weights do not fit its config ({root / GENERATOR_WEIGHTS}): {e}") from e
    return model.to(device).eval()


def artefact_version(root: Path) -> str:
    """Changes whenever the manifest or the expert repository changes (used for cache keys)."""
    idx = root / "repository" / "repository.json"
    return version_of((root / MANIFEST).read_bytes(), idx.read_bytes() if idx.exists() else b"")


def version_of(manifest: bytes, index: bytes) -> str:
    """:func:`artefact_version` of a directory holding these bytes in its manifest and repository index."""
    return hashlib.sha256(manifest + index).hexdigest()[:16]


@dataclass
class Artifacts:
    root: Path
    manifest: dict
    config: dict
    backbone: Backbone
    repository: ExpertRepository
    generator: CVAE | None
    engine: Engine
    manifest_bytes: bytes = field(default=b"", repr=False)  # the manifest as loaded: what the version hashes
    _version: tuple[int, str] | None = field(default=None, init=False, repr=False)  # (repository.changes, version)

    @property
    def version(self) -> str:
        """The artefact version (cache keys, a LoRA file's metadata) of the experts this object generates from:
        the directory's as loaded; after a change of :attr:`repository` (``add_and_save``, ``remove_and_save``,
        or in memory alone), that of the manifest as loaded and the repository's index now. A change another
        process makes on disk is not this object's: load the directory again to generate from it."""
        changes = self.repository.changes
        if self._version is None or self._version[0] != changes:
            self._version = (changes, version_of(self.manifest_bytes, self.repository.state_index_bytes()))
        return self._version[1]

    def reset_version(self) -> None:
        """After :attr:`repository` was replaced by another object (loaded again): work the version out anew."""
        self._version = None

    def snapshots(self, task: str) -> torch.Tensor:
        """The (M, P) LoRA snapshots the experts stage trained for ``task``, checked against the manifest's
        sha256; KeyError naming the task where the manifest pins none (an unknown task, or a path)."""
        rel = f"snapshots/{task}.safetensors"
        digest = self.manifest.get("files", {}).get(rel) if isinstance(task, str) and "/" not in task else None
        if digest is None:
            raise KeyError(f"{self.root}: no snapshots of a task {task!r} (the manifest pins none)")
        try:
            data = (self.root / rel).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{self.root / rel}: missing (the manifest pins it)") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{self.root / rel}: sha256 mismatch with the manifest (corrupt or replaced)")
        return load_safetensors(data)["snapshots"]

    def check_description_length(self, description: str) -> None:
        """ValueError where the text tower would cut ``description`` short (it would then make the LoRA of
        its first tokens alone, whatever follows)."""
        try:
            self.backbone.check_text_length(description)
        except ValueError as e:
            raise ValueError(f"description {e}") from None

    def lora_file(
        self,
        description: str,
        method: str = "sg-lora",
        *,
        seed: int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        zipped: bool = False,
    ) -> tuple[bytes, Generation]:
        """A LoRA for ``description`` as the file ``sglora generate`` writes (the same request and seed give
        the same bytes on the same device, and the CLI's default is 'auto'; so does ``POST /generate`` with
        the text tower in the same dtype): safetensors with
        PEFT names and the generation's metadata, or with ``zipped`` a zipped PEFT adapter folder; and the
        engine's Generation (experts, weights, seed). The description is cleaned as the CLI and the service
        clean it."""
        from sglora.export import generation_metadata, hf_base_model, peft_zip_bytes, safetensors_bytes
        from sglora.text import clean_description

        if not isinstance(zipped, bool):
            raise TypeError(f"zipped must be True or False, got {zipped!r}")
        description = clean_description(description)
        self.check_description_length(description)
        g = self.engine.generate(self.engine.embed([description])[0], method, seed=seed, top_k=top_k, temperature=temperature)
        meta = generation_metadata(self, description, g)
        spec = g.spec or self.backbone.spec
        if zipped:
            return peft_zip_bytes(spec, g.lora, meta, hf_base_model(self.backbone.config)), g
        return safetensors_bytes(spec, g.lora, meta), g


def load_artifacts(root: str | Path, device: str | torch.device = "cpu", require_generator: bool = True) -> Artifacts:
    """Loads and cross-checks a whole artefact directory; raises :class:`ArtifactError` naming what is wrong.
    ``device``: a torch device, or a name as the CLI takes it ('auto': CUDA where torch sees a GPU, else
    the CPU); another device (an unknown name, 'meta', 'mps') or a CUDA device that is not there is a
    ValueError saying so, before any file is read."""
    if isinstance(device, torch.device):
        device = str(device)  # 'cpu', 'cuda:0', 'meta', ...
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a name (auto, cpu, cuda, cuda:N), got {type(device).__name__}")
    device = resolve_device(device)
    root = Path(root)
    manifest, manifest_bytes = _read_manifest(root)  # compared at the end with the file then
    verify_files(root, manifest)
    stages = manifest.get("stages", {})
    for needed in ("experts", "repository") + (("generator",) if require_generator else ()):
        if needed not in stages:
            raise ArtifactError(f"{root}: stage '{needed}' has not been run (manifest stages: {sorted(stages)})")
    pinned = manifest.get("files", {})
    for stage, files in PINNED_BY.items():  # a file the manifest does not pin would load unchecked
        unpinned = [f for f in files if stage in stages and f not in pinned]
        if unpinned:
            raise ArtifactError(f"{root}: the manifest pins no sha256 for {', '.join(unpinned)}, which its '{stage}' stage wrote")
    config = read_json(root / "config.json", "pipeline config")
    try:
        backbone = load_backbone_from(root, device)
        repository = ExpertRepository.load(root / "repository", expect_spec=backbone.spec)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ArtifactError(str(e)) from e
    except SafetensorError as e:  # a weights file damaged in a way its manifest entry was made to match
        raise ArtifactError(f"{root}: a backbone or repository file is not readable safetensors: {e}") from e
    if repository.provenance is None and stages["repository"].get("provenance"):  # its record dropped from the index
        raise ArtifactError(
            f"{root / 'repository'}: its index records no experts settings, which the repository stage wrote: "
            "not the repository this run built; rerun the repository stage"
        )
    if (foreign := foreign_repository(repository, config, backbone)) is not None:
        raise ArtifactError(f"{root / 'repository'}: {foreign}")
    generator = load_generator(root, device) if "generator" in stages else None
    if generator is not None and generator.config.lora_dim != backbone.spec.num_params:
        raise ArtifactError(
            f"{root / GENERATOR_WEIGHTS}: generator makes {generator.config.lora_dim}-parameter LoRAs, "
            f"the backbone takes {backbone.spec.num_params}"
        )
    prior = config.get("prior", {})
    if not isinstance(prior, dict):
        raise ArtifactError(f"{root / 'config.json'}: 'prior' is not a mapping of settings (top_k, temperature)")
    engine = Engine(
        backbone,
        repository,
        generator,
        top_k=min(prior.get("top_k", 4), len(repository)),
        temperature=prior.get("temperature", 0.1),
    )
    a = Artifacts(root, manifest, config, backbone, repository, generator, engine, manifest_bytes)
    try:
        now, index_bytes = (root / MANIFEST).read_bytes(), (root / "repository" / INDEX_FILE).read_bytes()
    except OSError:
        now = index_bytes = b""
    if now != manifest_bytes or hashlib.sha256(index_bytes).hexdigest() != repository.index_sha256:
        raise ArtifactError(f"{root}: changed while it was loaded (a pipeline run, an expert change); load it again")
    a._version = (repository.changes, version_of(manifest_bytes, index_bytes))  # artefact_version(root), as loaded
    return a
