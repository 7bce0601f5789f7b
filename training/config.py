"""Pipeline configuration: YAML loaded into frozen dataclasses; unknown keys and bad values name themselves."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expert_store.prior import check_temperature
from models.backbone import BackboneConfig, LoraConfig
from sglora.engine import MAX_SEED
from sglora.methods import EVALUATION_METHODS

METHODS = EVALUATION_METHODS
DATA_KINDS = ("procedural", "folder", "fashion-tasks", "tux-retrieval", "combined")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "procedural"  # one of DATA_KINDS
    path: str | None = None  # dataset folder for kind "folder" (see training/data.py for the format)
    seed: int = 0
    image_size: int = 32  # procedural images
    train_per_task: int = 24  # procedural / benchmark: training images per task
    test_per_task: int = 16  # held-out images per task
    options: dict[str, Any] = field(default_factory=dict)  # benchmark-specific knobs
    # kind "combined": the union of these sources (task names must not collide).
    sources: tuple[DataConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if (self.kind == "combined") != bool(self.sources):
            raise ValueError("data.sources must be given exactly when data.kind is 'combined'")
        if self.kind == "folder" and not self.path:
            raise ValueError("data.path is required when data.kind is 'folder'")
        if self.train_per_task < 1 or self.test_per_task < 1:
            raise ValueError("data.train_per_task and data.test_per_task must be >= 1")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {self.image_size}")


@dataclass(frozen=True)
class SplitConfig:
    """Which tasks are experts, generator-training, generator-validation and unseen test tasks.

    Either list names, or give counts for a seeded random split of all the dataset's tasks,
    or counts per task group ({fashion: 30, tux: 8}) for a split stratified by group.
    ``holdout_classes``: classes that no expert, generator-training or validation task may have; the test
    tasks drawn by count are then classification tasks with at least one of them (or tasks without classes,
    such as retrieval tasks), so that every unseen class-based task brings a class nothing was trained on.
    """

    experts: tuple[str, ...] | int | dict[str, int] = 4
    train: tuple[str, ...] | int | dict[str, int] = 2
    val: tuple[str, ...] | int | dict[str, int] = 0
    test: tuple[str, ...] | int | dict[str, int] = 2
    seed: int = 0
    holdout_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for role in ("experts", "train", "val", "test"):
            value = getattr(self, role)
            counts = value.values() if isinstance(value, dict) else [value] if isinstance(value, int) else []
            if any(n < 0 for n in counts):
                raise ValueError(f"split.{role}: task counts must be >= 0, got {value!r}")
            if isinstance(value, tuple) and len(set(value)) < len(value):
                twice = sorted({t for t in value if value.count(t) > 1})
                raise ValueError(f"split.{role}: task(s) {twice} listed more than once")
        if len(set(self.holdout_classes)) < len(self.holdout_classes):
            raise ValueError(f"split.holdout_classes: a class is listed more than once: {list(self.holdout_classes)}")

    def count(self, role: str) -> int:
        """The number of ``role`` tasks this split asks for (listed, or counted)."""
        value = getattr(self, role)
        return len(value) if isinstance(value, tuple) else sum(value.values()) if isinstance(value, dict) else value


@dataclass(frozen=True)
class ExpertTrainingConfig:
    epochs: int = 20  # total epochs per task
    keep_last: int = 10  # M: snapshots kept from the last M epochs (paper: 100)
    lr: float = 1e-3  # Adam
    batch_size: int = 32
    weight_decay: float = 0.0
    min_train_samples: int = 4  # a task with fewer training samples is an error
    min_test_samples: int = 2
    seed: int = 0  # shared LoRA init (same A for every task) and data order
    # Train A as well as B (paper). False keeps every expert's A at the shared initialisation
    # (LoRA-FA): then averaging [B, A] vectors is exactly averaging the dense updates B @ A.
    train_a: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"experts.epochs must be >= 1, got {self.epochs}")
        if not 1 <= self.keep_last <= self.epochs:
            raise ValueError(f"experts.keep_last must be in [1, epochs={self.epochs}], got {self.keep_last}")
        if not self.lr > 0:
            raise ValueError(f"experts.lr must be > 0, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"experts.batch_size must be >= 2, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"experts.weight_decay must be >= 0, got {self.weight_decay}")
        # An expert trains on >= 2 images; a retrieval task's evaluation ranks >= 2 of them.
        for key in ("min_train_samples", "min_test_samples"):
            if getattr(self, key) < 2:
                raise ValueError(f"experts.{key} must be >= 2, got {getattr(self, key)}")


@dataclass(frozen=True)
class PriorConfig:
    top_k: int = 4  # K (paper: 4)
    temperature: float = 0.1  # tau in eq. 6

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"prior.top_k must be >= 1, got {self.top_k}")
        check_temperature(self.temperature, "prior.temperature")


@dataclass(frozen=True)
class GeneratorTrainingConfig:
    latent_dim: int = 32
    hidden_dim: int = 256
    kl_weight: float = 1.0  # lambda (paper: 1)
    residual: bool = True
    use_variance: bool = True
    epochs: int = 200
    lr: float = 1e-3
    batch_size: int = 64
    # Also train on each expert with a leave-one-out prior from the other experts.
    include_experts: bool = False
    seed: int = 0
    # Decoupled weight decay (AdamW) of the CVAE's weights; 0: plain Adam.
    weight_decay: float = 0.0
    # Not in the paper (0: its eq. 9 alone). > 0 adds this weight times a task loss: each step, the LoRAs
    # that the sampling path makes for ``task_tasks`` training tasks (z ~ p(z | c), as at inference) are
    # applied to the backbone on ``task_images`` of each task's training images and scored with the
    # experts' own loss (training/experts.py task_loss).
    task_weight: float = 0.0
    task_tasks: int = 4
    task_images: int = 64
    task_kinds: tuple[str, ...] = ("classification", "retrieval")  # the kinds of task the term scores
    # Not in the paper (0: eq. 9 alone). > 0 adds this weight times the reconstruction error of LoRAs drawn
    # through the sampling path, z ~ p(z | c), as the hybrid objective of Sohn et al. (2015, the CVAE
    # paper's "GSNN" term): eq. 9 trains the decoder only on z from the encoder, so what the prior network
    # proposes for a condition is otherwise held only by the KL term.
    prior_path_weight: float = 0.0
    # Early stopping: end training once the validation loss has not improved for this many epochs (the
    # best epoch is kept either way). None: train all ``epochs``. Needs validation tasks.
    patience: int | None = None
    # Clip the gradient's global norm to this each step (torch.nn.utils.clip_grad_norm_); None: no clipping.
    max_grad_norm: float | None = None
    # Not in the paper (c = {mu*, sigma*^2} there): condition the generator on the task's description
    # embedding d* as well, c = {mu*, sigma*^2, d*}.
    condition_on_description: bool = False
    # Keep an exponential moving average of the generator's weights, with this decay per step, and
    # validate and return the average instead of the last weights; None: no average.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"generator.epochs must be >= 1, got {self.epochs}")
        for name in ("latent_dim", "hidden_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"generator.kl_weight must be >= 0, got {self.kl_weight}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"generator.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"generator.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"generator.patience must be >= 1 or null, got {self.patience}")
        if self.weight_decay < 0:
            raise ValueError(f"generator.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lr > 0:
            raise ValueError(f"generator.lr must be > 0, got {self.lr}")
        for name in ("task_weight", "prior_path_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"generator.{name} must be >= 0, got {getattr(self, name)}")
        bad = [k for k in self.task_kinds if k not in ("classification", "retrieval")]
        if bad or not self.task_kinds:
            raise ValueError(f"generator.task_kinds: {bad or 'empty'}; choose from classification, retrieval")
        for name in ("task_tasks", "task_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvaluationConfig:
    methods: tuple[str, ...] = METHODS
    sg_samples: int = 1  # sg-lora LoRAs drawn per task (seeds 0..n-1); metrics are averaged
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"evaluation.methods: {f'unknown {bad}' if bad else 'empty'}; choose from {METHODS}")
        if self.sg_samples < 1:
            raise ValueError("evaluation.sg_samples must be >= 1")
        if not 0 <= self.seed <= MAX_SEED - (self.sg_samples - 1):  # sg-lora's samples take seed .. seed + sg_samples - 1
            raise ValueError(f"evaluation.seed must be between 0 and {MAX_SEED} - (sg_samples - 1), got {self.seed}")


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pipeline"
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    experts: ExpertTrainingConfig = field(default_factory=ExpertTrainingConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    generator: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        # What the generator stage would refuse, refused here: else found only after the experts stage.
        experts, n = self.split.experts, self.split.count("experts")
        if self.generator.include_experts and n < 2:
            raise ValueError(
                f"generator.include_experts needs at least 2 experts (split.experts is {experts!r}): an expert "
                "trains the generator against the prior of the other experts, and a lone expert has none"
            )

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts a YAML value against a (simple) type annotation; raises ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: expected null")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2:
            return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            # Every seed seeds a torch generator (a 64-bit integer): found here, not after the experts trained.
            if where.rsplit(".", 1)[-1] == "seed" and not 0 <= value <= MAX_SEED:
                raise ValueError(f"{where}: a seed is between 0 and {MAX_SEED}, got {value}")
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-3 (no dot) as a string, 5.0e-3 as a number
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every "< 0" check, and no setting means infinity
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    raise ValueError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own checks name their field with its section or without it
        named = where == "config" or str(e).startswith(f"{where}.")
        raise ValueError(str(e) if named else f"{where}: {e}") from e


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: YAML keeps the last silently, so a
    second ``experts:`` section dropped the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": flattened by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # "? [1, 2]": a key YAML allows and a dict cannot hold
                raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark) from None
            if twice:
                message = f"the key {key!r} is given twice in one mapping"
                raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file; give the YAML config (e.g. configs/offline-default.yaml)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from e
    if data is None:  # every setting defaulted would be a random-weight ViT-B-16: surely not what was meant
        raise ValueError(f"{path}: the config is empty (write {{}} to take every default)")
    cfg = from_dict(PipelineConfig, data)
    check_config_file(cfg)
    # A checkpoint file relative to the config's folder (as data paths are), else to the working directory.
    return _checkpoint_absolute(dataclasses.replace(cfg, data=_resolve_paths(cfg.data, path.parent)), (path.parent, Path()))


def _checkpoint_absolute(cfg: PipelineConfig, folders: tuple[Path, ...]) -> PipelineConfig:
    """``cfg`` with a relative ``backbone.pretrained`` that names a file in one of ``folders`` (the first that
    has it) made absolute: artefacts rebuild the backbone from it, so that they load from any working directory,
    not only the one they were trained in. A tag ("openai") names no file and stays as it is."""
    pretrained = cfg.backbone.pretrained
    if not pretrained or Path(pretrained).is_absolute():
        return cfg
    found = next((f / pretrained for f in folders if (f / pretrained).is_file()), None)
    if found is None:
        return cfg
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=str(found.resolve())))


def check_config_file(cfg: PipelineConfig) -> None:
    """ValueError naming what a config file asks for that cannot work: what the generator stage would refuse
    after every expert had trained, and settings that nothing reads (a non-zero top-level ``seed``: a user
    "running another seed" got the same run again; a folder dataset's generator settings). Checked on the
    files users write (:func:`load_config`), not on the config.json of artefacts built before these checks."""
    if cfg.split.count("train") == 0 and not cfg.generator.include_experts:
        raise ValueError("the generator needs training tasks: set split.train > 0 or generator.include_experts")
    if cfg.generator.patience is not None and cfg.split.count("val") == 0:
        raise ValueError("generator.patience needs validation tasks (split.val > 0) to watch")
    if cfg.seed != 0:
        raise ValueError(
            f"seed: {cfg.seed}: the top-level seed is not used (kept at 0 for older configs); set the seed of what "
            "should change: split.seed (the split), experts.seed (their LoRA init and data order), generator.seed, "
            "evaluation.seed (sg-lora's samples), data.seed, backbone.seed (random-init weights)"
        )
    for d in (cfg.data, *cfg.data.sources):
        if d.kind == "folder":  # the folder's own files say everything
            bare = _without_unread(d)
            unused = [f.name for f in dataclasses.fields(d) if getattr(d, f.name) != getattr(bare, f.name)]
            if unused:
                raise ValueError(
                    f"data ({d.path}): {', '.join(unused)} do nothing for kind 'folder' (its samples.jsonl lists every "
                    "image and its split): leave them out"
                )


def _resolve_paths(data: DataConfig, base: Path) -> DataConfig:
    """Dataset paths (data.path, and each combined source's) relative to the config file's folder."""
    if data.path and not Path(data.path).is_absolute():
        data = dataclasses.replace(data, path=str((base / data.path).resolve()))
    if data.sources:
        data = dataclasses.replace(data, sources=tuple(_resolve_paths(s, base) for s in data.sources))
    return data


def with_defaults(data: dict) -> dict:
    """A config as written (``config.json``), with this release's defaults filled in: a setting added in a
    later release at its default is then no difference. One this release cannot read is returned as
    written (so it differs, loudly, from any it can). What earlier releases wrote otherwise is written as
    this release would: a relative checkpoint path found from the working directory (the only place such
    artefacts loaded from) absolute, and a folder dataset's settings that nothing reads at their defaults."""
    try:
        cfg = from_dict(PipelineConfig, data)
    except ValueError:
        return data
    return dataclasses.replace(_checkpoint_absolute(cfg, (Path(),)), data=_without_unread(cfg.data)).to_dict()


def _without_unread(data: DataConfig) -> DataConfig:
    """``data`` with a folder source's settings that nothing reads at their defaults (see :func:`check_config_file`)."""
    if data.kind == "folder":
        return DataConfig(kind="folder", path=data.path)
    if data.sources:
        return dataclasses.replace(data, sources=tuple(_without_unread(s) for s in data.sources))
    return data


def backbone_from_dict(data: dict) -> BackboneConfig:
    return from_dict(BackboneConfig, data, "backbone")


__all__ = ["PipelineConfig", "LoraConfig", "load_config", "from_dict", "METHODS", "backbone_from_dict", "with_defaults"]
