"""Task datasets: the documented on-disk format and its loader.

A dataset folder holds two files (paths in ``samples.jsonl`` are relative to the folder)::

    tasks.json      {"tasks": [{"name": "persian", "description": "a photo of a persian",
                                "kind": "retrieval"},
                               {"name": "footwear", "kind": "classification",
                                "description": "This is a classification task for recognizing sandal, sneaker and ankle boot",
                                "classes": ["sandal", "sneaker", "ankle boot"]}]}
    samples.jsonl   {"image": "img/0001.jpg", "caption": "a fluffy persian cat on a sofa", "task": "persian", "split": "train"}
                    {"image": "img/0002.png", "label": "sneaker", "split": "test"}

Retrieval tasks use (image, caption) pairs whose ``task`` names them. Classification
tasks use samples whose ``label`` is one of their ``classes``: either tagged with the
task, or untagged (``task`` absent) and then shared by every task listing that class.
``split`` is "train" or "test".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

TASK_KINDS = ("retrieval", "classification")
SPLITS = ("train", "test")
TASKS_FILE = "tasks.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    kind: str = "retrieval"
    classes: tuple[str, ...] = ()
    group: str = ""  # benchmark or source the task comes from; splits can be stratified by it

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not self.description or not self.description.strip():
            raise ValueError(f"task {self.name!r}: description must not be empty")
        if self.kind == "classification" and len(self.classes) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least 2 classes")


@dataclass
class Sample:
    image: Callable[[], Image.Image] | str  # a loader or a path
    caption: str | None = None
    task: str | None = None
    label: str | None = None
    split: str = "train"

    def load(self) -> Image.Image:
        if callable(self.image):
            return self.image()
        return open_image(Path(self.image))


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


@dataclass
class TaskDataset:
    tasks: dict[str, TaskInfo]
    samples: list[Sample] = field(default_factory=list)
    # Prompt for a class name in classification tasks.
    class_template: str = "a photo of a {}"

    def task_samples(self, name: str, split: str) -> list[Sample]:
        task = self.tasks[name]
        if task.kind == "retrieval":
            return [s for s in self.samples if s.task == name and s.split == split]
        classes = set(task.classes)
        return [s for s in self.samples if s.split == split and s.label in classes and (s.task is None or s.task == name)]

    def class_prompt(self, task: str, cls: str) -> str:
        return self.class_template.format(cls)

    def check(self, names: Sequence[str], min_train: int, min_test: int) -> None:
        """Raises ValueError naming the first task that is unknown or has too few samples."""
        for n in names:
            if n not in self.tasks:
                raise ValueError(f"unknown task {n!r} (the dataset has {len(self.tasks)} tasks)")
            for split, need in (("train", min_train), ("test", min_test)):
                have = len(self.task_samples(n, split))
                if have < need:
                    raise ValueError(f"task {n!r} has {have} {split} samples; at least {need} are needed")


def load_task_dataset(directory: Path) -> TaskDataset:
    """Reads a dataset folder in the format above; errors name the file and line."""
    directory = Path(directory)
    tasks_path, samples_path = directory / TASKS_FILE, directory / SAMPLES_FILE
    for p in (tasks_path, samples_path):
        if not p.exists():
            raise FileNotFoundError(f"dataset file not found: {p}")
    try:
        raw = json.loads(tasks_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{tasks_path}: invalid JSON: {e}") from e
    tasks: dict[str, TaskInfo] = {}
    for i, t in enumerate(raw.get("tasks", [])):
        try:
            info = TaskInfo(
                t["name"], t["description"], t.get("kind", "retrieval"), tuple(t.get("classes", ())), t.get("group", "")
            )
        except KeyError as e:
            raise ValueError(f"{tasks_path}: task #{i} lacks {e}") from e
        if info.name in tasks:
            raise ValueError(f"{tasks_path}: duplicate task name {info.name!r}")
        tasks[info.name] = info
    if not tasks:
        raise ValueError(f"{tasks_path}: no tasks")
    samples = []
    with open(samples_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
                image = s["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{samples_path}:{lineno}: bad sample ({e})") from e
            split = s.get("split", "train")
            if split not in SPLITS:
                raise ValueError(f"{samples_path}:{lineno}: split must be one of {SPLITS}, got {split!r}")
            task = s.get("task")
            if task is not None and task not in tasks:
                raise ValueError(f"{samples_path}:{lineno}: unknown task {task!r}")
            if task is not None and tasks[task].kind == "retrieval" and not s.get("caption"):
                raise ValueError(f"{samples_path}:{lineno}: a retrieval sample needs a caption")
            path = (directory / image).resolve()
            if not path.is_relative_to(directory.resolve()):
                raise ValueError(f"{samples_path}:{lineno}: image path leaves the dataset folder: {image!r}")
            samples.append(Sample(str(path), s.get("caption"), task, s.get("label"), split))
    return TaskDataset(tasks, samples)


def write_task_dataset(dataset: TaskDataset, directory: Path) -> None:
    """Writes any in-memory dataset (e.g. the procedural one) to the folder format, images as PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    tasks = [
        {
            "name": t.name,
            "description": t.description,
            "kind": t.kind,
            **({"classes": list(t.classes)} if t.classes else {}),
            **({"group": t.group} if t.group else {}),
        }
        for t in dataset.tasks.values()
    ]
    (directory / TASKS_FILE).write_text(json.dumps({"tasks": tasks}, indent=2))
    with open(directory / SAMPLES_FILE, "w") as f:
        for i, s in enumerate(dataset.samples):
            rel = f"images/{i:06d}.png"
            s.load().save(directory / rel)
            row = {"image": rel, "split": s.split}
            row.update({k: v for k, v in (("caption", s.caption), ("task", s.task), ("label", s.label)) if v is not None})
            f.write(json.dumps(row) + "\n")
