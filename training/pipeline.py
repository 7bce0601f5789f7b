"""The offline pipeline: experts -> repository -> generator -> evaluation, each stage on its own or all.

Each stage writes its folder through a temporary directory that is renamed into place, then
marks itself done in ``manifest.json``; an interrupted run leaves no half-written stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from expert_store.repository import INDEX_FILE, Expert, ExpertRepository, locked
from models.backbone import Backbone, create_backbone
from sglora import __version__
from sglora import artifacts as art
from sglora.io import atomic_dir, fsync_path, make_dirs, read_json, sha256_file, write_json, write_safetensors
from sglora.methods import SAMPLING_METHODS
from training.config import METHODS, GeneratorTrainingConfig, PipelineConfig, SplitConfig, with_defaults
from training.data import Sample, TaskDataset, load_task_dataset
from training.evaluate import evaluate_lora
from training.experts import FeatureCache, prepare_task, train_expert
from training.generator import build_data, train_generator
from training.procedural import procedural_dataset

ROLES = ("experts", "train", "val", "test")


@dataclass(frozen=True)
class Splits:
    experts: tuple[str, ...]
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def all(self) -> list[str]:
        return [*self.experts, *self.train, *self.val, *self.test]

    def to_dict(self) -> dict:
        return {r: list(getattr(self, r)) for r in ROLES}


# The datasets a pipeline run has loaded, by their config: each stage asks for its dataset, and a run loads
# (probes every image header of, and warns about) each once. None outside a run: loaded afresh each time.
# A context variable: runs in two threads (or tasks) keep their own.
_run_datasets: ContextVar[dict[str, TaskDataset] | None] = ContextVar("sglora_run_datasets", default=None)


@contextmanager
def _datasets_loaded_once() -> Iterator[None]:
    token = _run_datasets.set({})
    try:
        yield
    finally:
        _run_datasets.reset(token)


def load_data(cfg: PipelineConfig) -> TaskDataset:
    loaded = _run_datasets.get()
    if loaded is None:
        return _load_source(cfg.data)
    key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
    if key not in loaded:
        loaded[key] = _load_source(cfg.data)
    return loaded[key]


def _load_source(d) -> TaskDataset:
    if d.kind == "procedural":
        from training.benchmarks import check_options

        settings = ("seed", "image_size", "train_per_task", "test_per_task")  # data settings of their own
        options = check_options(d, set(inspect.signature(procedural_dataset).parameters) - set(settings))
        return procedural_dataset(d.seed, d.image_size, d.train_per_task, d.test_per_task, **options)
    if d.kind == "folder":
        return load_task_dataset(Path(d.path))
    if d.kind == "combined":
        parts = [_load_source(s) for s in d.sources]
        tasks: dict = {}
        for part in parts:
            # case-folded: each task's snapshots are a file named after it (see load_task_dataset)
            seen = {n.casefold(): n for n in tasks}
            pairs = [(seen[n.casefold()], n) for n in part.tasks if n.casefold() in seen]
            clash = sorted(a if a == b else f"{a}/{b}" for a, b in pairs)
            if clash:
                raise ValueError(f"data.sources: task names occur in two sources (letter case aside): {clash[:3]}")
            tasks.update(
                {n: t if t.group else dataclasses.replace(t, group=f"source{len(tasks)}") for n, t in part.tasks.items()}
            )
        return CombinedDataset(parts, tasks)
    from training import benchmarks

    return benchmarks.fashion_tasks(d) if d.kind == "fashion-tasks" else benchmarks.tux_retrieval(d)


class CombinedDataset(TaskDataset):
    """Union of several sources; each task is answered by the source that owns it."""

    def __init__(self, parts: list[TaskDataset], tasks: dict):
        super().__init__(tasks, [s for p in parts for s in p.samples])
        self._owner = {n: p for p in parts for n in p.tasks}

    def task_samples(self, name: str, split: str):
        return self._owner[name].task_samples(name, split)

    def class_prompt(self, name: str, cls: str) -> str:
        return self._owner[name].class_template.format(cls)


def resolve_split(split: SplitConfig, dataset: TaskDataset) -> Splits:
    names = sorted(dataset.tasks)
    explicit = {r: getattr(split, r) for r in ROLES if isinstance(getattr(split, r), tuple)}
    for role, listed in explicit.items():
        unknown = [n for n in listed if n not in dataset.tasks]
        if unknown:
            raise ValueError(f"split.{role}: unknown task(s) {unknown[:5]}")
    taken = [n for listed in explicit.values() for n in listed]
    roles_of: dict[str, list[str]] = {}
    for role, listed in explicit.items():
        for n in listed:
            roles_of.setdefault(n, []).append(role)
    if twice := {n: r for n, r in roles_of.items() if len(r) > 1}:
        # (twice in one role: refused by SplitConfig)
        shown = "; ".join(f"{n!r} in {' and '.join(r)}" for n, r in list(twice.items())[:5])
        raise ValueError(f"split: a task may have one role only: {shown}")
    held = set(split.holdout_classes)
    if held:
        known = {c for t in dataset.tasks.values() for c in t.classes}
        if held - known:
            raise ValueError(f"split.holdout_classes: no task has the class(es) {sorted(held - known)}")

    def trained_on_held(n: str) -> bool:
        return bool(held & set(dataset.tasks[n].classes))

    def allowed(role: str, n: str) -> bool:  # held-out classes: test tasks only, and every class-based test task has one
        if not held:
            return True
        if role == "test":
            return trained_on_held(n) or not dataset.tasks[n].classes
        return not trained_on_held(n)

    for role, listed in explicit.items():
        bad = [n for n in listed if trained_on_held(n)]
        if role != "test" and bad:
            raise ValueError(f"split.{role}: task(s) {bad[:5]} have a class of split.holdout_classes")
    pool = [n for n in names if n not in set(taken)]
    random.Random(split.seed).shuffle(pool)
    groups = sorted({t.group for t in dataset.tasks.values()})
    out: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        v = getattr(split, role)
        if isinstance(v, tuple):
            out[role] = v
            continue
        counts = v if isinstance(v, dict) else {None: v}
        for g in counts:
            if g is not None and g not in groups:
                if groups == [""]:  # was "the dataset has ['']"
                    raise ValueError(
                        f"split.{role}: counts by task group ({g!r}), but no task of the dataset has a group; "
                        f"give split.{role} a number of tasks, or each task a group"
                    )
                named = [x for x in groups if x]
                raise ValueError(f"split.{role}: unknown task group {g!r}; the dataset has {named}")
        chosen: list[str] = []
        for g, n in counts.items():
            avail = [t for t in pool if (g is None or dataset.tasks[t].group == g) and allowed(role, t)]
            if n > len(avail):
                where = "" if g is None else f" of group {g!r}"
                rule = " that split.holdout_classes allows there" if held else ""
                raise ValueError(f"split.{role}: asks for {n} tasks{where} but only {len(avail)} unassigned tasks{rule} remain")
            chosen += avail[:n]
        out[role] = tuple(chosen)
        pool = [t for t in pool if t not in set(chosen)]
    if not out["experts"]:
        raise ValueError("split.experts: at least one expert task is needed")
    if not out["test"]:
        raise ValueError("split.test: at least one unseen test task is needed")
    return Splits(**out)


def _log(msg: str) -> None:
    tqdm.write(msg)


def prepare_data(cfg: PipelineConfig) -> tuple[TaskDataset, Splits]:
    """The dataset and its split, every task of the split checked for its samples (ValueError naming the
    first that falls short): what the experts stage starts from, and what ``check-config --data`` checks."""
    dataset = load_data(cfg)
    splits = resolve_split(cfg.split, dataset)
    dataset.check(splits.all(), cfg.experts.min_train_samples, cfg.experts.min_test_samples)
    by_text: dict[str, list[str]] = {}
    for name in splits.all():
        by_text.setdefault(dataset.tasks[name].description.casefold(), []).append(name)
    if same := [names for names in by_text.values() if len(names) > 1]:
        # Not refused (two tasks may well be described alike), but the experts' selection goes by the words:
        # such tasks are one point of the description space, and a test task among them finds its twin first.
        shown = "; ".join(", ".join(map(repr, names[:4])) for names in same[:3])
        warnings.warn(
            f"tasks with the same description (letter case aside), which the experts' selection cannot tell apart: {shown}",
            stacklevel=2,
        )
    g = cfg.generator
    if g.task_weight > 0:  # the generator stage's refusal, found here rather than after every expert trained
        trains = list(splits.train) + (list(splits.experts) if g.include_experts else [])
        if not any(dataset.tasks[n].kind in g.task_kinds for n in trains):
            raise ValueError(
                f"generator.task_weight > 0 but no training task is of a kind in generator.task_kinds {list(g.task_kinds)}"
            )
    return dataset, splits


def check_descriptions(backbone: Backbone, dataset: TaskDataset, tasks: Iterable[str]) -> None:
    """ValueError naming the first task whose description the text tower would cut: the service refuses
    such a description (``POST /experts`` too), so an expert trained under it could never be asked for."""
    for name in tasks:
        try:
            backbone.check_text_length(dataset.tasks[name].description)
        except ValueError as e:
            raise ValueError(f"task {name!r}: its description {e}") from None


def warn_long_captions(backbone: Backbone, dataset: TaskDataset, tasks: Iterable[str]) -> int:
    """Warns (once, with a count and the first by its line) of the retrieval captions of ``tasks`` longer
    than the text tower reads: its tokenizer cuts them, in training and in evaluation alike, so words
    past the cut change nothing. Not refused: a dataset's captions are what they are. Returns the count."""
    wanted = set(tasks)
    over: list[tuple[Sample, tuple[int, int]]] = []
    seen: set[str] = set()
    for sample in dataset.samples:
        if sample.caption is None or sample.task not in wanted or sample.caption in seen:
            continue
        seen.add(sample.caption)
        if (cut := backbone.text_overflow(sample.caption)) is not None:
            over.append((sample, cut))
    if over:
        first, (tokens, context) = over[0]
        where = f"{first.where}, " if first.where else ""
        warnings.warn(
            f"{len(over)} caption(s) longer than the text tower reads ({context} tokens, its start and end "
            f"included) are cut there in training and evaluation; the first: {where}task {first.task!r}, "
            f"{tokens} tokens",
            stacklevel=2,
        )
    return len(over)


# ---- stages ----------------------------------------------------------------------------------
def _not_a_first_attempt(out: Path) -> list[str]:
    """What in ``out`` (which holds no trained task and no manifest) an earlier attempt of the pipeline cannot
    have written: such an attempt stopped before its first task, so it left at most the backbone folder,
    config.json, splits.json, an empty snapshots folder, the lock and temporary copies. Anything else (a
    user's own folder, or an eval/ of theirs) would be replaced or overwritten."""
    first = {"backbone", "config.json", "splits.json", "snapshots", PIPELINE_LOCK}
    temporary = tuple(f".{name}." for name in OWN_FILES)
    old_copies = {f".{name}.old" for name in OWN_FOLDERS}  # atomic_dir's; a file leaves none
    out_of_place = []
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if (p.name.startswith(temporary) and p.name.endswith(".tmp")) or p.name in old_copies:
            continue
        if p.name not in first:
            out_of_place.append(p.name)
        elif p.name == "backbone" and p.is_dir() and any(p.iterdir()) and not (p / art.BACKBONE_FILE).is_file():
            out_of_place.append("backbone/ without backbone.json")
        elif p.name == "snapshots" and p.is_dir() and any(p.iterdir()):
            out_of_place.append("snapshots/ with other files")
    return out_of_place[:5]


def _refuse_foreign(out: Path) -> bool:
    """Whether ``out`` holds work to resume (a stage done, or a task trained); ValueError where it holds
    none but files that no earlier attempt of the pipeline wrote (:func:`_not_a_first_attempt`)."""
    built = (out / art.MANIFEST).exists() or any((out / "snapshots").glob("*.safetensors"))
    if not built and (foreign := _not_a_first_attempt(out)):
        raise ValueError(
            f"{out} is not empty and holds no run of the pipeline ({', '.join(foreign)}): the stages replace "
            "their folders whole and overwrite config.json; use an empty or new --out directory"
        )
    return built


def stage_experts(cfg: PipelineConfig, out: Path, device: str = "cpu") -> None:
    t0 = time.perf_counter()
    dataset, splits = prepare_data(cfg)
    data = dataset.fingerprint()
    make_dirs(out)
    # Work to resume: a stage done, or a task trained. Without any, what an earlier attempt wrote (a run that
    # failed on a bad setting before its first task) is replaced; with some, it must match.
    built = _refuse_foreign(out)
    if built:
        if not (out / "config.json").exists():
            raise ValueError(
                f"{out} holds trained tasks but no config.json to tell what they were trained with; "
                "use a new --out directory (or put its config.json back)"
            )
        if expert_changes := _expert_changes(out, cfg):
            raise ValueError(
                f"{out} was built with another config ({', '.join(expert_changes)} differ): its experts were trained "
                "with other settings; use a new --out directory"
            )
        # Only later stages' settings differ (the generator's, the evaluation's): the experts are kept, and
        # config.json keeps naming what the later stages were built with until each of them runs again.
    manifest = art.read_manifest(out) if (out / art.MANIFEST).exists() else {}  # refuses a damaged one by name
    tasks = splits.all()
    kept = _check_snapshot_data(out, manifest, tasks, data)
    if built and (out / "splits.json").exists() and read_json(out / "splits.json", "task splits") != splits.to_dict():
        raise ValueError(f"{out}: the dataset's tasks changed since it was built (another split); use a new --out directory")
    backbone = create_backbone(cfg.backbone, device=device)
    check_descriptions(backbone, dataset, tasks)  # before anything is written
    warn_long_captions(backbone, dataset, tasks)
    with atomic_dir(out / "backbone") as tmp:
        art.save_backbone(tmp, backbone, cfg.to_dict()["backbone"])
    if not built:  # else config.json exists (checked above) and its expert sections are these
        write_json(out / "config.json", cfg.to_dict())
    write_json(out / "splits.json", splits.to_dict())
    cache = FeatureCache(backbone)
    fp = backbone.spec.fingerprint()
    _log(f"[experts] {len(tasks)} tasks, LoRA of {backbone.spec.num_params} parameters ({len(backbone.spec.targets)} targets)")
    pinned = manifest.get("files", {})
    task_data = {name: dataset.task_fingerprint(name) for name in tasks}
    trained = []
    todo = []
    for name in tasks:
        rel = f"snapshots/{name}.safetensors"
        if name in kept and kept[name].get("lora_fingerprint") == fp:
            # A snapshot without task_data was checked against the whole dataset's fingerprint (_check_snapshot_data).
            if kept[name].get("task_data", task_data[name]) != task_data[name]:
                _log(f"[experts] {name}: its data (samples or task definition) changed since it was trained; training it again")
            elif rel not in pinned or sha256_file(out / rel) == pinned[rel]:
                continue  # resumable: trained by an earlier run (pinned, or not yet: that run was interrupted)
            else:
                _log(f"[experts] {name}: its snapshot file differs from the one the manifest pins; training it again")
        todo.append(name)
    # Every image file of the tasks to train decoded first: one that cannot be read was found when its task
    # came, after the tasks before it had trained (hours, on a large dataset). (Images made in memory, as the
    # benchmarks' are, are not read.)
    if todo:
        dataset.check_images(todo)
    # The bar starts at the tasks already trained: counted as done in no time, they made its rate and time
    # left after a resume a fraction of the real ones.
    for name in tqdm(todo, desc="experts", unit="task", total=len(tasks), initial=len(tasks) - len(todo)):
        path = out / "snapshots" / f"{name}.safetensors"
        trained.append(name)
        task = prepare_task(backbone, dataset, name, cache)
        snaps = train_expert(backbone, task, cfg.experts)
        info = dataset.tasks[name]
        meta = {"task": name, "description": info.description, "kind": info.kind, "lora_fingerprint": fp, "data": data}
        meta.update(task_data=task_data[name], **_earlier_descriptions(kept.get(name, {}), info.description))
        write_safetensors(path, {"snapshots": snaps}, metadata=meta)
    if len(trained) < len(tasks):
        _log(f"[experts] {len(tasks) - len(trained)} of {len(tasks)} tasks already trained (resumed); trained {len(trained)}")
    # Snapshots the later stages were built from changed: their results are stale until they run again.
    invalidate = art.STAGES[1:] if trained else ()
    extra = {"seconds": round(time.perf_counter() - t0, 1), "tasks": len(tasks), "data": data}
    art.update_manifest(out, "experts", extra, invalidate=invalidate)


# What a later stage advises when the dataset changed: the experts stage keeps the tasks whose data did not.
RETRAIN = "rerun the pipeline from its experts stage (it trains again the tasks whose data changed) or use a new --out directory"


def _check_data(out: Path, manifest: dict, data: str, advice: str = RETRAIN) -> None:
    """ValueError when the dataset's tasks or samples differ from those ``out``'s experts were trained on
    (directories built before the fingerprint was recorded are not checked): the later stages read the tasks'
    samples, and the experts stage records the dataset once every task's snapshot was trained on it."""
    recorded = (manifest.get("stages", {}).get("experts") or {}).get("data")
    if recorded is not None and recorded != data:
        raise ValueError(
            f"{out}: the dataset changed since its experts were trained (tasks or samples differ: fingerprint {data}, "
            f"built on {recorded}); {advice}"
        )


def _check_snapshot_data(out: Path, manifest: dict, tasks: list[str], data: str) -> dict[str, dict[str, str]]:
    """The metadata of the snapshots kept for resuming, by task. Each records the fingerprint of its own task's
    data (``task_data``), which keeps it or trains it again whatever else of the dataset changed; ValueError when
    one written before snapshots recorded that was trained on other tasks or samples: only the fingerprint of the
    whole dataset (its own, or the manifest's once the experts stage completed) ties it to the data it was trained
    on, and it cannot tell which tasks changed."""
    paths = {name: out / "snapshots" / f"{name}.safetensors" for name in tasks}
    kept = {name: _snapshot_metadata(path) for name, path in paths.items() if path.exists()}
    older = [name for name, meta in kept.items() if meta and "task_data" not in meta]  # unreadable ({}): trained again
    if older:
        _check_data(out, manifest, data, advice="use a new --out directory")
    for name in older:
        recorded = kept[name].get("data")
        if recorded is not None and recorded != data:
            raise ValueError(
                f"{out}: the dataset changed since task {name!r} was trained (tasks or samples differ: fingerprint {data}, "
                f"its snapshot was trained on {recorded}); use a new --out directory"
            )
    return kept


def _earlier_descriptions(meta: dict[str, str], description: str) -> dict[str, str]:
    """The descriptions that earlier snapshots of a task had (``meta``: the one a new snapshot replaces), as the
    new snapshot's metadata: a rebuilt repository takes its expert of one of them, with the run's snapshot count,
    for the run's own, built before the description changed, not for an expert the service replaced."""
    earlier = json.loads(meta.get("earlier_descriptions", "[]")) + [meta.get("description")]
    earlier = [d for d in dict.fromkeys(earlier) if d is not None and d != description]
    return {"earlier_descriptions": json.dumps(earlier)} if earlier else {}


def _snapshot_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable leftovers are retrained
        return {}


def _require(out: Path, stage: str, cfg: PipelineConfig) -> dict:
    if out.is_dir() and not (out / art.MANIFEST).exists():  # an empty or unrelated folder: no stage has run there
        raise ValueError(f"{out}: no stage has run there (no {art.MANIFEST}); run the pipeline from its 'experts' stage")
    manifest = art.read_manifest(out)
    if stage not in manifest.get("stages", {}):
        raise ValueError(f"{out}: run the '{stage}' stage first")
    if changed := _expert_changes(out, cfg):
        raise ValueError(f"{out} was built with other {', '.join(changed)} settings; use a new --out directory")
    return manifest


def _expert_changes(out: Path, cfg: PipelineConfig) -> list[str]:
    """The sections of what the experts were trained with (:data:`~sglora.artifacts.EXPERT_SECTIONS`) among
    :func:`config_changes`, in that order."""
    changed = set(config_changes(out, cfg))
    return [k for k in art.EXPERT_SECTIONS if k in changed]


def config_changes(out: Path, cfg: PipelineConfig) -> list[str]:
    """The top-level sections in which ``cfg`` differs from the config ``out`` records, both read as this
    release writes them: none for a complete run built with ``cfg`` (each stage records what it used)."""
    built, wanted = _built_config(out), with_defaults(cfg.to_dict())
    return sorted(k for k in built.keys() | wanted.keys() if built.get(k) != wanted.get(k))


def _record_config(out: Path, cfg: PipelineConfig) -> None:
    """After a later stage succeeds: config.json holds the prior/generator settings it used."""
    if _built_config(out) != cfg.to_dict():
        write_json(out / "config.json", cfg.to_dict())


def _built_config(out: Path) -> dict:
    """The config an artefact directory was built with, with defaults filled in: a setting added in a
    later release (at its default) does not make older artefacts look built with another config."""
    return with_defaults(read_json(out / "config.json", "pipeline config"))


def _task_snapshots(out: Path, name: str) -> torch.Tensor:
    path = out / "snapshots" / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"snapshots of task {name!r} missing: {path}")
    return load_file(str(path))["snapshots"]


def _descriptions(out: Path, names: list[str]) -> list[str]:
    from safetensors import safe_open

    descs = []
    for n in names:
        with safe_open(str(out / "snapshots" / f"{n}.safetensors"), "pt") as f:
            descs.append(f.metadata()["description"])
    return descs


@contextmanager
def locked_repository(directory: Path) -> Iterator[None]:
    """The repository folder's writer lock, held while it is read and replaced (a new folder: nothing to hold)."""
    if not directory.is_dir():
        yield
        return
    with locked(directory):
        yield


def _service_changes(
    directory: Path, experts: dict[str, tuple[str, int]], earlier: dict[str, list[str]], config: dict, backbone
) -> tuple[list[Expert], list[str]]:
    """What the service changed in an existing repository (POST/DELETE /experts): the experts to keep as it
    left them (those it added, and a pipeline expert it replaced: another description or snapshot count
    than ``experts`` = name -> (description, snapshots) of the pipeline's own) and the pipeline's experts
    it removed. A rebuild keeps these changes: it dropped the added experts, files and all, and brought the
    removed ones back. Nothing for a new folder, a damaged one, or one of another run (other experts
    settings or backbone: copied in; its experts are not this run's to keep). An expert with one of the
    ``earlier`` descriptions of its task (name -> those of its snapshots before the dataset changed it, see
    :func:`_earlier_descriptions`) and the run's snapshot count is the run's own, built before: rebuilt."""
    if not (directory / "repository.json").exists():
        return [], []
    try:
        old = ExpertRepository.load(directory, expect_spec=backbone.spec)
    except (OSError, ValueError) as e:  # damaged: rebuilt from the snapshots, as before
        _log(f"[repository] the existing {directory} does not load ({e}); building it from the snapshots alone")
        return [], []
    if art.foreign_repository(old, config, backbone) is not None:
        _log(f"[repository] the existing {directory} holds another run's experts; building it from the snapshots alone")
        return [], []

    def own(n: str) -> bool:
        e = old[n]
        return n in experts and e.num_snapshots == experts[n][1] and e.description in (experts[n][0], *earlier[n])

    return [old[n] for n in old.names if not own(n)], [n for n in experts if n not in old]


def stage_repository(cfg: PipelineConfig, out: Path, device: str = "cpu") -> None:
    t0 = time.perf_counter()
    manifest = _require(out, "experts", cfg)
    art.verify_files(out, manifest, ("backbone", "snapshots"))
    backbone = art.load_backbone_from(out, device)
    splits = read_json(out / "splits.json", "task splits")
    names = splits["experts"]
    descriptions = _descriptions(out, names)
    embeddings = backbone.encode_text(descriptions).cpu()
    config = read_json(out / "config.json", "pipeline config")
    repo = ExpertRepository(backbone.spec, backbone.embed_dim, backbone.fingerprint(), provenance=art.experts_settings(config))
    snapshots = {name: _task_snapshots(out, name) for name in names}
    own = {name: (desc, len(snapshots[name])) for name, desc in zip(names, descriptions, strict=True)}
    meta = {n: _snapshot_metadata(out / "snapshots" / f"{n}.safetensors") for n in names}
    earlier = {n: json.loads(meta[n].get("earlier_descriptions", "[]")) for n in names}
    with locked_repository(out / "repository"):  # no expert change by a service meanwhile
        kept, removed = _service_changes(out / "repository", own, earlier, config, backbone)
        left = set(removed) | {e.name for e in kept}
        for name, desc, emb in zip(names, descriptions, embeddings, strict=True):
            if name not in left:
                repo.add(Expert.from_snapshots(name, desc, snapshots[name], emb))
        for expert in kept:
            repo.add(expert)
        with atomic_dir(out / "repository") as tmp:
            repo.save(tmp)
    if kept or removed:
        changed, gone = ", ".join(sorted(e.name for e in kept)) or "none", ", ".join(sorted(removed)) or "none"
        _log(f"[repository] kept the service's expert changes: added or replaced {changed}; removed {gone}")
    _log(f"[repository] {len(repo)} experts")
    # No _record_config: this stage uses none of the prior/generator settings, and recording the config's would
    # label a generator trained with others as made with them (its stale check would then pass).
    # "provenance": this stage's index records the experts' settings, so one without them is not its own (loading
    # refuses it); indexes of releases before the record carry none, and their manifests do not say this.
    art.update_manifest(
        out, "repository", {"seconds": round(time.perf_counter() - t0, 1), "experts": len(repo), "provenance": True}
    )


def _inputs_digest(out: Path, manifest: dict, settings: dict, pinned: tuple[str, ...], data: bool) -> str:
    """sha256 of what a stage builds from: this release's code, ``settings``, the files the manifest pins under
    ``pinned``, the repository's files (the service may have changed it: the manifest pins none), and with
    ``data`` the dataset the experts stage recorded."""
    pins = {k: v for k, v in manifest.get("files", {}).items() if k.split("/")[0] in pinned}
    repository = {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in sorted((out / "repository").rglob("*"))
        if p.is_file() and not p.name.startswith(".")  # its lock file and temporary copies
    }
    recorded = manifest.get("stages", {}).get("experts", {}).get("data") if data else None
    blob = {"code": __version__, "settings": settings, "files": pins, "repository": repository, "data": recorded}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _done_on_the_same_inputs(
    out: Path, cfg: PipelineConfig, stage: str, inputs: Callable[[Path, PipelineConfig, dict], str]
) -> tuple[dict, dict] | None:
    """(the manifest, ``stage``'s record) where ``stage`` is marked done on inputs that hash as ``inputs`` does
    now; else None."""
    if not (out / art.MANIFEST).is_file():
        return None
    manifest = art.read_manifest(out)
    done = manifest.get("stages", {}).get(stage)
    if not done or done.get("inputs") != inputs(out, cfg, manifest):
        return None
    return manifest, done


def generator_inputs(out: Path, cfg: PipelineConfig, manifest: dict) -> str:
    """sha256 of what the generator stage trains from: this release's code, every setting but the
    evaluation's, the backbone, snapshots and splits as the manifest pins them, the repository's files, and
    (with the task loss, which reads the tasks' images) the dataset the experts stage recorded. Recorded
    with the generator; a full rerun whose inputs hash alike keeps it (:func:`generator_unchanged`)."""
    settings = {k: v for k, v in with_defaults(cfg.to_dict()).items() if k != "evaluation"}
    return _inputs_digest(out, manifest, settings, ("backbone", "snapshots", "splits.json"), cfg.generator.task_weight > 0)


def generator_unchanged(out: Path, cfg: PipelineConfig) -> str | None:
    """Why the generator ``out`` holds can be kept by a full rerun with ``cfg`` (None: train it): it is
    marked done, was trained from inputs that hash as :func:`generator_inputs` does now, and its files
    still match the manifest. Training it again would spend minutes on the same weights (on one machine
    kind; another rounds differently: ``--stage generator`` trains it regardless)."""
    if (found := _done_on_the_same_inputs(out, cfg, "generator", generator_inputs)) is None:
        return None
    manifest, done = found
    try:
        art.verify_files(out, manifest, ("generator",))
    except art.ArtifactError as e:
        _log(f"[generator] trained again: {e}")
        return None
    when = done.get("completed", "an earlier run")
    return f"kept the generator of {when}: its repository, snapshots, settings and code are unchanged"


def evaluation_inputs(out: Path, cfg: PipelineConfig, manifest: dict) -> str:
    """sha256 of what the evaluation scores: this release's code, every setting (the evaluation's included),
    the backbone, snapshots, splits and generator as the manifest pins them, the repository's files, and the
    dataset the experts stage recorded (the test tasks' images). Recorded with the evaluation; a full rerun
    whose inputs hash alike keeps it (:func:`evaluation_unchanged`)."""
    pinned = ("backbone", "snapshots", "splits.json", "generator")
    return _inputs_digest(out, manifest, with_defaults(cfg.to_dict()), pinned, True)


def evaluation_unchanged(out: Path, cfg: PipelineConfig) -> str | None:
    """Why the evaluation ``out`` holds can be kept by a full rerun with ``cfg`` (None: evaluate again): it is
    marked done, scored inputs that hash as :func:`evaluation_inputs` does now, and its files still match the
    manifest. A generator trained again unmarks it (:func:`stage_generator`)."""
    if (found := _done_on_the_same_inputs(out, cfg, "evaluate", evaluation_inputs)) is None:
        return None
    manifest, done = found
    # Its files are reports, which loading only warns about (art.verify_files): any change is checked here.
    for rel, digest in manifest.get("files", {}).items():
        p = out / rel
        if rel.startswith("eval/") and (p.is_symlink() or not p.is_file() or sha256_file(p) != digest):
            _log(f"[evaluate] evaluated again: {p} is not the file the evaluation wrote")
            return None
    when = done.get("completed", "an earlier run")
    return f"kept the evaluation of {when}: its generator, repository, data, settings and code are unchanged"


def stage_generator(cfg: PipelineConfig, out: Path, device: str = "cpu", only_tasks: Collection[str] | None = None) -> None:
    """Trains the CVAE on the ``train`` tasks (and the experts, with leave-one-out priors, when
    ``generator.include_experts``); ``only_tasks`` keeps those of them it names (for ablations, e.g.
    scripts/generator_learning_curve.py)."""
    t0 = time.perf_counter()
    manifest = _require(out, "repository", cfg)
    art.verify_files(out, manifest, ("backbone", "snapshots"))
    inputs = generator_inputs(out, cfg, manifest) if only_tasks is None else None  # an ablation's generator: never kept
    backbone = art.load_backbone_from(out, device)
    repo = ExpertRepository.load(out / "repository")
    splits = read_json(out / "splits.json", "task splits")
    train_names = list(splits["train"]) + (list(splits["experts"]) if cfg.generator.include_experts else [])
    if only_tasks is not None:
        keep = set(only_tasks)
        train_names = [n for n in train_names if n in keep]
    if not train_names:
        raise ValueError("the generator needs training tasks: set split.train > 0 or generator.include_experts")
    if len(train_names) < 2:  # its per-coordinate normalisation is one task's snapshots: near-identical values
        _log(
            f"[generator] warning: one training task ({train_names[0]}): the generator learns little from one, and "
            "sg-lora will be about the top-K weighted merge; give it more (split.train, generator.include_experts)"
        )

    def tasks_of(names: list[str]) -> dict:
        embs = backbone.encode_text(_descriptions(out, names)).cpu()
        return {n: (_task_snapshots(out, n), e) for n, e in zip(names, embs, strict=True)}

    prior = dataclasses.replace(cfg.prior, top_k=min(cfg.prior.top_k, len(repo)))
    train = build_data(repo, tasks_of(train_names), prior, leave_one_out=True)
    val = build_data(repo, tasks_of(list(splits["val"])), prior) if splits["val"] else None
    if cfg.generator.task_weight > 0:  # the task loss needs each task's training images (cached features)
        dataset, cache = load_data(cfg), FeatureCache(backbone)
        _check_data(out, manifest, dataset.fingerprint())
        names = tqdm(train_names + (list(splits["val"]) if val is not None else []), desc="generator tasks' images", unit="task")
        prepared = [prepare_task(backbone, dataset, n, cache, ("train",)).train for n in names]
        train.tasks = prepared[: len(train_names)]
        if val is not None:
            val.tasks = prepared[len(train_names) :]
    _log(f"[generator] {len(train.x)} training snapshots from {len(train_names)} tasks")
    model, history = train_generator(train, val, cfg.generator, backbone=backbone)
    kept = kept_epoch(history)
    with atomic_dir(out / "generator") as tmp:
        art.save_generator(tmp, model, history)
        _plot_history(history, tmp / "history.png", cfg.generator)
    how = "the last; no validation tasks"
    if "val_loss" in history[0]:
        how = f"lowest validation loss, {history[kept]['val_loss']:.4g}"
    _log(f"[generator] {len(history)} of {cfg.generator.epochs} epochs; kept the weights of epoch {kept} ({how})")
    _record_config(out, cfg)
    extra = {"seconds": round(time.perf_counter() - t0, 1), "snapshots": len(train.x), "epochs": len(history), "kept_epoch": kept}
    if inputs is not None:
        extra["inputs"] = inputs
    art.update_manifest(out, "generator", extra, invalidate=("evaluate",))  # eval/ scored the previous generator


def kept_epoch(history: list[dict]) -> int:
    """The epoch whose weights :func:`train_generator` returns: the first with the lowest validation loss,
    the last one without validation tasks."""
    best, kept = float("inf"), history[-1]["epoch"]
    if "val_loss" in history[0]:
        for h in history:
            if h["val_loss"] < best:
                best, kept = h["val_loss"], h["epoch"]
    return kept


# history.json's training terms, as the plot names them (each the epoch's mean, unweighted)
HISTORY_TERMS = {
    "reconstruction": "reconstruction (eq. 9)",
    "kl": "KL (eq. 9, summed over the latent)",
    "task": "task loss of sampled LoRAs",
    "prior_path": "prior-path reconstruction",
}


def history_title(history: list[dict], cfg: GeneratorTrainingConfig | None = None) -> str:
    """history.png's title: the epochs run (of those configured, when it stopped early) and the kept one,
    numbered from 0 as history.json, the plot's axis and the manifest's kept_epoch number them."""
    run = (
        f"{len(history)} epochs"
        if cfg is None or len(history) >= cfg.epochs
        else f"{len(history)} of {cfg.epochs} epochs (stopped early)"
    )
    return f"CVAE training: {run}, numbered from 0; weights of epoch {kept_epoch(history)} kept"


def _plot_history(history: list[dict], path: Path, cfg: GeneratorTrainingConfig | None = None) -> None:
    """Left: the training terms per epoch as history.json records them (unweighted). Right: the validation
    loss that picks the kept epoch (eq. 9 with its weights plus the weighted task term), the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    val = "val_loss" in history[0]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 6, 3.8), squeeze=False)
    ep = [h["epoch"] for h in history]
    kept = kept_epoch(history)
    ax = axes[0][0]
    for key, label in HISTORY_TERMS.items():
        if key in history[0]:
            ax.plot(ep, [h[key] for h in history], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss term (epoch mean, unweighted)")
    ax.set_title("training terms")
    ax.legend(fontsize=8)
    if val:
        ax = axes[0][1]
        ax.plot(ep, [h["val_loss"] for h in history], color="C4")
        best = next(h["val_loss"] for h in history if h["epoch"] == kept)
        ax.plot([kept], [best], "o", color="C3", label=f"kept: epoch {kept}")
        weight = f" + {cfg.task_weight:g} x task" if cfg is not None and cfg.task_weight > 0 else ""
        ax.set_ylabel(f"validation loss (eq. 9{weight})")
        ax.set_xlabel("epoch")
        ax.set_title("validation loss (picks the kept epoch)")
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(history_title(history, cfg), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage_evaluate(
    cfg: PipelineConfig, out: Path, device: str = "cpu", methods: tuple[str, ...] | None = None, on: str = "test"
) -> dict:
    """Evaluates every method on the unseen ``test`` tasks (or the ``val`` tasks, for tuning; written to eval-val/).
    With ``methods`` that leave out some of the config's, the results go to eval-partial/ (eval-val-partial/)."""
    t0 = time.perf_counter()
    partial = methods is not None and not set(cfg.evaluation.methods) <= set(methods)
    methods = methods or cfg.evaluation.methods
    manifest = _require(out, "experts", cfg)
    inputs = evaluation_inputs(out, cfg, manifest)  # before it runs: what it scores
    built = _built_config(out)
    stale = [k for k in ("prior", "generator") if built.get(k) != cfg.to_dict()[k]]
    if stale:
        raise ValueError(f"{out}: the config's {', '.join(stale)} settings differ from the built ones; rerun the generator stage")
    a = art.load_artifacts(out, device, require_generator=any(m in SAMPLING_METHODS for m in methods))
    dataset = load_data(cfg)
    _check_data(out, manifest, dataset.fingerprint())
    splits = read_json(out / "splits.json", "task splits")
    cache = FeatureCache(a.backbone)
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    if not splits.get(on):
        raise ValueError(f"{out}: the split has no {on!r} tasks")
    if unknown := [n for n in splits[on] if n not in dataset.tasks]:
        raise ValueError(f"{out / 'splits.json'}: its {on!r} tasks {unknown[:5]} are not in the dataset")
    for name in tqdm(splits[on], desc=f"evaluate ({on})", unit="task"):
        task = prepare_task(a.backbone, dataset, name, cache, ("test",))
        emb = a.engine.embed([task.info.description])[0]
        row: dict[str, dict[str, float]] = {}
        for m in methods:
            if m == "oracle":
                row[m] = evaluate_lora(a.backbone, task, _task_snapshots(out, name).mean(0))
            elif m in SAMPLING_METHODS:
                gens = [a.engine.generate(emb, m, seed=cfg.evaluation.seed + s) for s in range(cfg.evaluation.sg_samples)]
                runs = [evaluate_lora(a.backbone, task, g.lora, spec=g.spec) for g in gens]
                row[m] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
            else:
                g = a.engine.generate(emb, m)
                row[m] = evaluate_lora(a.backbone, task, None if m == "zero-shot" else g.lora, spec=g.spec)
        per_task[name] = row
    averaged = {m: _mean([per_task[t][m] for t in per_task]) for m in methods}
    results = {
        "methods": averaged,
        "tasks": per_task,
        "config": cfg.name,
        "evaluated_on": on,
        "test_tasks": list(splits[on]),
        "top_k": a.engine.top_k,
        "temperature": a.engine.temperature,
        "sg_samples": cfg.evaluation.sg_samples,
        "seed": cfg.evaluation.seed,  # the sampling methods' LoRAs: seeds seed .. seed + sg_samples - 1
        "paired": paired_differences(per_task),
    }
    # Some of the methods only: beside the full results, never over them (eval-partial/, eval-val-partial/).
    folder = ("eval" if on == "test" else f"eval-{on}") + ("-partial" if partial else "")
    with atomic_dir(out / folder) as tmp:
        write_json(tmp / "results.json", results)
        (tmp / "results.md").write_text(results_table(results))
        plot_results(results, tmp / "results.png")
    _log(f"[evaluate] results in {out / folder}")
    if on == "test" and not partial:
        _record_config(out, cfg)
        art.update_manifest(out, "evaluate", {"seconds": round(time.perf_counter() - t0, 1), "inputs": inputs})
    _log_results(results, out / folder)
    return results


def _log_results(results: dict, folder: Path) -> None:
    """The averages table of an evaluation, and where its per-task scores are."""
    _log(results_table(results, per_task=False) + f"(per-task scores: {folder / 'results.md'})")


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


# (method, the method it should beat): the order of methods, and each exact merge against its
# flat-average counterpart and against each other.
PAIRS = (
    ("sg-lora", "topk-weighted"),
    ("topk-weighted", "adapter-soup"),
    ("adapter-soup", "model-soup"),
    ("model-soup", "zero-shot"),
    ("sg-lora-exact", "topk-exact"),
    ("topk-exact", "topk-weighted"),
)
PAIRED_METRICS = ("accuracy", "i2t_r1", "t2i_r1")


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n); None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((x - mean) ** 2 for x in values) / (len(values) - 1) / len(values)) ** 0.5


def paired_differences(per_task: dict[str, dict[str, dict[str, float]]]) -> list[dict]:
    """Per-task differences a - b for each pair of :data:`PAIRS` both evaluated, on each metric of
    :data:`PAIRED_METRICS` the tasks report: mean, standard error of the mean over tasks (None for one
    task), wins / ties / losses. The same tasks score both methods, so the task-to-task spread cancels; a mean within about
    two standard errors of 0 is not a difference these tasks can resolve."""
    out = []
    for a, b in PAIRS:
        for key in PAIRED_METRICS:
            d = [row[a][key] - row[b][key] for row in per_task.values() if a in row and b in row and key in row[a]]
            if not d:
                continue
            mean, se = mean_stderr(d)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "metric": key,
                    "tasks": len(d),
                    "mean": mean,
                    "stderr": se,
                    "wins": sum(x > 0 for x in d),
                    "ties": sum(x == 0 for x in d),
                    "losses": sum(x < 0 for x in d),
                }
            )
    return out


METRIC_NAMES = {"accuracy": "accuracy", "i2t_r1": "Recall@1 image->text", "t2i_r1": "Recall@1 text->image"}


def _what_was_scored(results: dict) -> str:
    return scored_tasks(len(results["test_tasks"]), results.get("evaluated_on", "test"), results["config"])


def scored_tasks(n: int, on: str, config: str | None = None) -> str:
    """Which tasks a table averages: the unseen test tasks, or the validation tasks (which picked the
    generator's epoch and the settings: not unseen)."""
    if on == "val":
        where = f"{config}; " if config else ""
        return f"{n} validation tasks ({where}not unseen: they chose the generator's epoch and the settings)"
    what = f"{n} unseen test tasks" if on == "test" else f"{n} {on!r} tasks"
    return f"{what} ({config})" if config else what


def _how_it_was_scored(results: dict) -> list[str]:
    """Units and what each method's number is: the metrics, the samples behind the sampling methods, K and tau."""
    methods = results["methods"]
    lines = [
        "Scores in %: accuracy of the argmax over the task's class prompts; i2t_rK / t2i_rK: Recall@K image->text / text->image."
    ]
    sampled = [m for m in SAMPLING_METHODS if m in methods]
    n = results.get("sg_samples")
    if sampled and n:
        seed = results.get("seed")
        seeds = "" if seed is None else f", seed {seed}" if n == 1 else f", seeds {seed}-{seed + n - 1}"
        lines.append(f"{' and '.join(sampled)}: the mean over {n} LoRA(s) sampled per task{seeds}.")
    if results.get("top_k") is not None:
        lines.append(f"Top-K merges and the prior: K = {results['top_k']}, temperature {results['temperature']}.")
    if "oracle" in methods:
        lines.append("oracle: the task's own expert (the mean of its snapshots, trained on its data): a reference, not a method.")
    return lines


def oracle_gain(methods: dict[str, dict[str, float]], key: str) -> dict[str, float | None]:
    """(method - zero-shot) / (oracle - zero-shot) in % on the averages of ``key``, per method but those two;
    None for every method where the oracle does not beat zero-shot (no gain to recover)."""
    if "zero-shot" not in methods or "oracle" not in methods or key not in methods["oracle"]:
        return {}
    base, top = methods["zero-shot"][key], methods["oracle"][key]
    names = [m for m in METHODS if m in methods and m not in ("zero-shot", "oracle") and key in methods[m]]
    if top <= base:
        return dict.fromkeys(names)
    return {m: 100.0 * (methods[m][key] - base) / (top - base) for m in names}


def share_table(note: str, metrics: list[str], rows: dict[str, list[str]]) -> list[str]:
    """Markdown lines of a share-of-the-oracle's-gain table (results.md, scripts/compare_runs.py): its
    heading, what ``note`` adds to the formula, and one row of cells per method."""
    lines = ["", f"Share of the oracle's gain, (method - zero-shot) / (oracle - zero-shot) {note}", ""]
    lines += ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    return lines + [f"| {m} | " + " | ".join(cells) + " |" for m, cells in rows.items()]


def results_table(results: dict, per_task: bool = True) -> str:
    """results.md: the averages, the share of the oracle's gain, the paired differences and (``per_task``)
    every task's score on the metrics of :data:`PAIRED_METRICS`."""
    methods = results["methods"]
    keys = [
        k
        for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "accuracy")
        if any(k in v for v in methods.values())
    ]
    # Each column averages the tasks that have its metric (retrieval: recall, classification: accuracy).
    tasks = results.get("tasks", {})
    have = {
        kind: sum(any(k in m for m in t.values()) for t in tasks.values())
        for kind, k in (("retrieval recall", "i2t_r1"), ("accuracy", "accuracy"))
        if k in keys
    }
    split = ""
    if len(have) > 1:
        split = ": each column over the tasks that have it (" + ", ".join(f"{kind}: {n}" for kind, n in have.items()) + ")"
    lines = [
        f"Averaged over {_what_was_scored(results)}{split}.",
        "",
        *_how_it_was_scored(results),
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for m in METHODS:
        if m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{methods[m].get(k, float('nan')):.2f}" for k in keys) + " |")
    gains = {k: oracle_gain(methods, k) for k in PAIRED_METRICS if k in keys}
    gains = {k: g for k, g in gains.items() if g}
    if gains:
        rows = {
            m: ["" if m not in g else "n/a" if g[m] is None else f"{g[m]:.1f}" for g in gains.values()]
            for m in METHODS
            if any(m in g for g in gains.values())
        }
        note = "on the averages above, in % (n/a: the oracle does not beat zero-shot there):"
        lines += share_table(note, list(gains), rows)
    cos = {m: methods[m]["image_cosine"] for m in METHODS if "image_cosine" in methods.get(m, {})}
    if cos:
        lines += [
            "",
            "Retrieval tasks: mean cosine between a task's held-out image embeddings (1.000: every image on one embedding):",
            "",
            "| " + " | ".join(cos) + " |",
            "|" + "---|" * len(cos),
            "| " + " | ".join(f"{v:.3f}" for v in cos.values()) + " |",
        ]
    paired = results.get("paired") or []
    if paired:
        lines += ["", "Paired per-task differences (a - b on the same tasks; mean ± standard error, wins/ties/losses):"]
        lines += ["", *paired_table(paired)]
    for key in PAIRED_METRICS if per_task else ():
        rows = {t: r for t, r in tasks.items() if any(key in v for v in r.values())}
        if not rows:
            continue
        cols = [m for m in METHODS if any(m in r and key in r[m] for r in rows.values())]
        name = key if METRIC_NAMES[key] == key else f"{key} ({METRIC_NAMES[key]})"
        lines += ["", f"Per task, {name} in %:", "", "| task | " + " | ".join(cols) + " |"]
        lines.append("|---|" + "---|" * len(cols))
        for t, r in rows.items():
            cells = [f"{r[m][key]:.2f}" if m in r and key in r[m] else "" for m in cols]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> bool:
    """Every task's score under each method (one grey line per task, so that the pairing shows) and the
    mean over the tasks ± standard error, one panel per metric of :data:`PAIRED_METRICS` the tasks have.
    False (nothing written) when no task has one."""
    per_task = results.get("tasks", {})
    panels = []
    for key in PAIRED_METRICS:
        rows = [r for r in per_task.values() if any(key in v for v in r.values())]
        cols = [m for m in METHODS if any(m in r and key in r[m] for r in rows)]
        if rows and cols:
            panels.append((key, rows, cols))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.6, 4.2), squeeze=False)
    for ax, (key, rows, cols) in zip(axes[0], panels, strict=True):
        x = range(len(cols))
        for r in rows:
            ax.plot(x, [r[m][key] if m in r and key in r[m] else float("nan") for m in cols], color="0.75", lw=0.8, zorder=1)
        for i, m in enumerate(cols):
            v = [r[m][key] for r in rows if m in r and key in r[m]]
            mean, se = mean_stderr(v)
            ax.errorbar(i, mean, yerr=se or 0.0, fmt="o", color="C3" if m == "sg-lora" else "k", capsize=3, zorder=2)
        ax.set_xticks(list(x), cols, rotation=45, ha="right")
        ax.set_ylabel(f"{METRIC_NAMES[key]} (%)")
        ax.set_title(f"{key}, {len(rows)} task{'s' if len(rows) > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{_what_was_scored(results).split(' (')[0]} ({results['config']}): grey line = one task, dot = mean ± s.e.",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def paired_table(paired: list[dict]) -> list[str]:
    """Markdown rows of :func:`paired_differences`' output."""
    lines = ["| a - b | metric | tasks | mean ± s.e. | w / t / l |", "|---|---|---|---|---|"]
    for p in paired:
        se = "n/a" if p["stderr"] is None else f"{p['stderr']:.2f}"
        lines.append(
            f"| {p['a']} - {p['b']} | {p['metric']} | {p['tasks']} | {p['mean']:+.2f} ± {se} "
            f"| {p['wins']} / {p['ties']} / {p['losses']} |"
        )
    return lines


STAGE_FUNCS = {"experts": stage_experts, "repository": stage_repository, "generator": stage_generator, "evaluate": stage_evaluate}


PIPELINE_LOCK = ".pipeline.lock"
# What the stages write at the top of an artefact directory (atomic_path/atomic_dir name their temporary
# copies ".NAME.<random>.tmp", and a replaced folder's old copy ".NAME.old"); snapshots/ holds TASK.safetensors.
OWN_FOLDERS = ("backbone", "repository", "generator", "eval", "eval-partial", "eval-val", "eval-val-partial")
OWN_FILES = (*OWN_FOLDERS, "config.json", "splits.json", art.MANIFEST)


@contextmanager
def pipeline_lock(out: Path) -> Iterator[None]:
    """One pipeline (or evaluation) at a time on the artefact directory ``out``: two at once trained the same
    tasks with two configs, and the resumed directory then held snapshots of both under one config.json.
    Refused at once (ValueError). Under the lock, what a killed run left of the stages' own files is
    removed: their temporary copies, and a replaced folder's old copy once its replacement is in place."""
    gone = f"{out} no longer exists (a run on it that failed as this one began removes the folder it made); rerun the command"
    if not out.is_dir():
        raise ValueError(gone)
    if not os.access(out, os.W_OK):  # found now, not after an evaluation's whole work
        raise ValueError(f"{out} is not writable: the stages write their results there")
    with ExitStack() as stack:
        try:
            held = stack.enter_context(locked(out, wait=False, name=PIPELINE_LOCK))
        except FileNotFoundError:
            raise ValueError(gone) from None
        if not held:
            raise ValueError(f"{out}: another `sglora pipeline` or `sglora evaluate` is running on it; wait for it to end")
        # A run killed between the two renames of a folder's replacement (io.atomic_dir) left its old copy and
        # no folder: the old copy is what the manifest still describes, and may hold experts the service added,
        # which a rerun would otherwise rebuild without.
        for name in OWN_FOLDERS:  # atomic_dir's; files are replaced in one rename (io.atomic_path)
            old, path = out / f".{name}.old", out / name
            if old.is_dir() and not path.exists() and (name != "repository" or (old / INDEX_FILE).is_file()):
                os.replace(old, path)
                fsync_path(out)
                _log(f"[pipeline] put {path} back from {old.name}, left by a run stopped while replacing it")
        leftovers = [p for name in OWN_FILES for p in out.glob(f".{name}.*.tmp")]
        # Only folders have old copies (atomic_dir); a `.config.json.old` is not this code's to remove.
        leftovers += [out / f".{name}.old" for name in OWN_FOLDERS if (out / f".{name}.old").exists() and (out / name).exists()]
        leftovers += list((out / "snapshots").glob(".*.safetensors.*.tmp"))
        for leftover in leftovers:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            _log(f"[pipeline] removed {leftover}, left by a run that was stopped")
        yield


def run_pipeline(
    cfg: PipelineConfig,
    out: Path,
    stages: tuple[str, ...] = art.STAGES,
    device: str = "cpu",
    keep_unchanged: bool | None = None,
) -> None:
    """Runs ``stages`` in order on ``out``. ``keep_unchanged``: a generator trained from the same inputs
    (:func:`generator_unchanged`) is kept rather than trained again, and an evaluation of the same inputs
    (:func:`evaluation_unchanged`) rather than run again; by default in a run of every stage (`sglora
    pipeline` without ``--stage``), not where stages are named."""
    if keep_unchanged is None:
        keep_unchanged = tuple(stages) == art.STAGES
    out = Path(os.path.realpath(out))  # links followed, then "..": mkdir of "q/../r" made "q" too, and left it
    try:  # safetensors takes UTF-8 paths only: such a folder failed after the experts were trained, every rerun too
        os.fsencode(out).decode("utf-8")
    except UnicodeDecodeError:
        shown = os.fsencode(out).decode("utf-8", "backslashreplace")
        raise ValueError(f"{shown}: the artefact directory's path is not valid UTF-8 (safetensors cannot write there)") from None
    created = [d for d in (out, *out.parents) if not d.exists()]  # this run's folders, innermost first
    if "experts" in stages:
        if out.is_dir():  # another's folder is refused before the lock: its lock file would be left in it
            _refuse_foreign(out)
        make_dirs(out)
    # Else only an artefact directory is locked (and tidied); in any other folder the first stage says what is wrong.
    built = "experts" in stages or (out / art.MANIFEST).is_file()
    with pipeline_lock(out) if built else nullcontext():  # a run refused here removes nothing: the folder is another's
        try:
            with _datasets_loaded_once():
                for s in stages:
                    t = time.perf_counter()
                    if s == "generator" and keep_unchanged and (kept := generator_unchanged(out, cfg)):
                        _log(f"[generator] {kept} (`--stage generator` trains it again)")
                        continue
                    if s == "evaluate" and keep_unchanged and (kept := evaluation_unchanged(out, cfg)):
                        _log(f"[evaluate] {kept} (`--stage evaluate` evaluates again)")
                        _log_results(read_json(out / "eval" / "results.json", "evaluation results"), out / "eval")
                        continue
                    STAGE_FUNCS[s](cfg, out, device)
                    _log(f"[{s}] done in {time.perf_counter() - t:.1f} s")
        except BaseException:
            if created and built:
                _remove_if_unused(created)  # under the lock: no other run is using the folder
            raise
    _log(json.dumps({"artifacts": str(out)}))


def _remove_if_unused(created: list[Path]) -> None:
    """Removes the ``--out`` folder (and the parents it needed), created by a run that failed before writing
    anything to it (a refused config or dataset), so that a refusal leaves no folder behind. Anything else
    in it is work to resume: kept."""
    out = created[0]
    try:
        if {p.name for p in out.iterdir()} <= {PIPELINE_LOCK}:
            (out / PIPELINE_LOCK).unlink(missing_ok=True)
            for d in created:
                d.rmdir()  # fails, and keeps the folder, if anything else was written to it meanwhile
    except OSError:
        pass
