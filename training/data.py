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

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from expert_store.repository import check_name
from sglora.images import to_rgb
from sglora.text import clean_text

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
        try:
            check_name(self.name)  # a task name becomes a file name (snapshots, expert files)
        except ValueError as e:
            raise ValueError(str(e).replace("expert name", "task name")) from None
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not self.description or not self.description.strip():
            raise ValueError(f"task {self.name!r}: description must not be empty")
        try:  # what the service and the CLI refuse (control characters, bytes that were not UTF-8, nothing visible)
            clean_text(self.description)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {self.name!r}: description {e}") from None
        if self.kind == "classification" and len(self.classes) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least 2 classes")


@dataclass
class Sample:
    image: Callable[[], Image.Image] | str  # a loader or a path
    caption: str | None = None
    task: str | None = None
    label: str | None = None
    split: str = "train"
    where: str = field(default="", compare=False, repr=False)  # "samples.jsonl:LINE" of a folder's sample

    def load(self) -> Image.Image:
        if callable(self.image):
            return self.image()
        try:
            return open_image(Path(self.image))
        except ValueError as e:  # cut short or damaged inside its pixel data: found when decoded
            raise ValueError(f"{self.where}: {e}" if self.where else str(e)) from e.__cause__


def open_image(path: Path) -> Image.Image:
    """The image as RGB (see :func:`sglora.images.to_rgb`: EXIF orientation applied, 16-bit scaled);
    ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _probe_image(path: Path, where: str) -> None:
    """ValueError when ``path`` is not an image PIL can open (an empty file, a text file, an HTML error page
    saved as .jpg): read from its header alone, so found before anything trains. A file cut short inside its
    pixel data is found when decoded (``sglora check-config --data`` decodes every image)."""
    try:
        with Image.open(path):
            pass
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from e


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

    def fingerprint(self) -> str:
        """A hash of what the tasks and samples say: names, descriptions, kinds, classes and class prompts,
        each sample's image path (for files), caption, task, label and split. Not the images' pixels."""
        tasks = [self._task_row(n) for n in self.tasks]
        samples = [_sample_row(s) for s in self.samples]
        return hashlib.sha256(json.dumps([tasks, samples]).encode()).hexdigest()[:16]

    def task_fingerprint(self, name: str) -> str:
        """:meth:`fingerprint` of what one task's expert depends on: the task as :meth:`fingerprint` hashes it (its
        class prompt too) and the samples :meth:`task_samples` gives it, in order, in every split. An untagged
        classification sample is in every task that lists its label, and so in each of their fingerprints;
        nothing else ties one task's expert to another's data (each starts from the seeded initialisation of
        the experts settings). The test split counts although training reads the train split alone: the later
        stages score the task on it, and training the task again is what marks them stale."""
        samples = [[_sample_row(s) for s in self.task_samples(name, split)] for split in SPLITS]
        return hashlib.sha256(json.dumps([self._task_row(name), samples]).encode()).hexdigest()[:16]

    def _task_row(self, name: str) -> list:
        t = self.tasks[name]
        return [t.name, t.description, t.kind, list(t.classes), t.group, self.class_prompt(t.name, "{}")]

    def check_images(self, names: Sequence[str]) -> int:
        """Decodes every image file of the named tasks (ValueError naming the first that cannot be read);
        returns how many were read. Images generated in memory (procedural, benchmarks) are not read."""
        first = {}  # path -> its first sample (whose line an error names)
        for n in names:
            for split in SPLITS:
                for s in self.task_samples(n, split):
                    if isinstance(s.image, str):
                        first.setdefault(s.image, s)
        paths = sorted(first)
        for path in tqdm(paths, desc="reading images", unit="img", leave=False, disable=not paths):
            first[path].load()
        return len(paths)

    def check(self, names: Sequence[str], min_train: int, min_test: int) -> None:
        """Raises ValueError naming the first task that is unknown or has too few samples."""
        for n in names:
            if n not in self.tasks:
                raise ValueError(f"unknown task {n!r} (the dataset has {len(self.tasks)} tasks)")
            for split, need in (("train", min_train), ("test", min_test)):
                have = self.task_samples(n, split)
                if len(have) < need:
                    raise ValueError(f"task {n!r} has {len(have)} {split} samples; at least {need} are needed")
                if self.tasks[n].kind == "classification":
                    missing = sorted(set(self.tasks[n].classes) - {s.label for s in have})
                    if missing:
                        raise ValueError(f"task {n!r}: class(es) {missing} have no {split} samples")


def _sample_row(s: Sample) -> list:
    return [s.image if isinstance(s.image, str) else "", s.caption, s.task, s.label, s.split]


TASK_KEYS = ("name", "description", "kind", "classes", "group")
SAMPLE_KEYS = ("image", "caption", "task", "label", "split")


def _text(value: object, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    return value


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def _task(t: object, where: str) -> TaskInfo:
    if not isinstance(t, dict):
        raise ValueError(f"{where}: a task must be a JSON object, got {type(t).__name__} {t!r}")
    unknown = sorted(set(t) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a task has {', '.join(TASK_KEYS)}")
    for key in ("name", "description"):
        if key not in t:
            raise ValueError(f"{where}: task lacks {key!r}")
    name = _text(t["name"], f"{where}: name")
    classes = t.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{where}: classes must be a list of strings, got {classes!r}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ValueError(f"{where}: class(es) {twice} listed more than once")
    padded = [c for c in classes if c != c.strip() or not c]
    if padded:  # a label matches a class exactly: "circle " never met a sample's "circle"
        raise ValueError(f"{where}: class name(s) {padded} blank or with spaces around them")
    kind, group = _text(t.get("kind", "retrieval"), f"{where}: kind"), _text(t.get("group", ""), f"{where}: group")
    if classes and kind != "classification":
        raise ValueError(f"{where}: classes are for classification tasks (this one's kind is {kind!r})")
    description = _text(t["description"], f"{where}: description")
    try:  # stored as the service reads a description: whitespace runs collapsed (a tab broke `sglora select`'s table)
        description = clean_text(description)
    except ValueError:
        pass  # TaskInfo refuses it, naming the task
    try:
        return TaskInfo(name, description, kind, tuple(classes), group)
    except ValueError as e:  # its own checks: name, kind, description, classes
        raise ValueError(f"{where}: {e}") from None


def load_task_dataset(directory: Path) -> TaskDataset:
    """Reads a dataset folder in the format above; errors name the file and the task or line.

    Strict, because a sample this loader cannot place would otherwise be dropped without a word: unknown
    keys (a misspelt ``label``) and a sample with neither task nor label are errors; labels that no
    classification task lists (a pool may hold more classes than the tasks use) are one warning."""
    directory = Path(directory)
    tasks_path, samples_path = directory / TASKS_FILE, directory / SAMPLES_FILE
    for p in (tasks_path, samples_path):
        if not p.is_file():
            raise FileNotFoundError(f"dataset file not found: {p}")
    try:
        raw = json.loads(_read_text(tasks_path), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{tasks_path}: invalid JSON: {e}") from e
    except _DuplicateKey as e:
        raise ValueError(f"{tasks_path}: key {e.args[0]!r} given twice in one object") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise ValueError(f'{tasks_path}: expected {{"tasks": [...]}}, a JSON object with a list of tasks')
    if extra := sorted(set(raw) - {"tasks"}):
        raise ValueError(f'{tasks_path}: unknown key(s) {extra}; the file holds {{"tasks": [...]}} alone')
    tasks: dict[str, TaskInfo] = {}
    for i, t in enumerate(raw["tasks"]):
        info = _task(t, f"{tasks_path}: task #{i}")
        if info.name in tasks:
            raise ValueError(f"{tasks_path}: duplicate task name {info.name!r}")
        # Each task's snapshots are one file named after it: on a case-insensitive file system (macOS,
        # Windows, Docker Desktop volumes) "Cat" and "cat" would share one, and a resume would take either's.
        same = next((n for n in tasks if n.casefold() == info.name.casefold()), None)
        if same is not None:
            raise ValueError(f"{tasks_path}: task names {same!r} and {info.name!r} differ only in case (they name files)")
        tasks[info.name] = info
    if not tasks:
        raise ValueError(f"{tasks_path}: no tasks")
    all_classes = {c for t in tasks.values() if t.kind == "classification" for c in t.classes}
    unused: dict[str, int] = {}  # labels no classification task lists -> first line
    samples = []
    for lineno, line in enumerate(_read_text(samples_path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{samples_path}:{lineno}"
        try:
            s = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad sample ({e})") from e
        except _DuplicateKey as e:  # json keeps the last one without a word
            raise ValueError(f"{where}: key {e.args[0]!r} given twice") from None
        if not isinstance(s, dict):
            raise ValueError(f"{where}: a sample must be a JSON object, got {type(s).__name__}")
        unknown = sorted(set(s) - set(SAMPLE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a sample has {', '.join(SAMPLE_KEYS)}")
        if "image" not in s:
            raise ValueError(f"{where}: bad sample (no 'image')")
        image = _text(s["image"], f"{where}: image")
        caption = _text(s.get("caption"), f"{where}: caption", optional=True)
        task = _text(s.get("task"), f"{where}: task", optional=True)
        label = _text(s.get("label"), f"{where}: label", optional=True)
        split = s.get("split", "train")
        if split not in SPLITS:
            raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        if task is not None and task not in tasks:
            raise ValueError(f"{where}: unknown task {task!r}")
        kind = tasks[task].kind if task is not None else None
        if kind == "retrieval" and not (caption and caption.strip()):  # a blank one pairs its image with nothing
            raise ValueError(f"{where}: a retrieval sample needs a caption")
        if caption and caption.strip():
            # Refused where the service's /retrieve refuses a caption (control characters). Kept as written:
            # its whitespace is neutral to both tokenizers, and the data fingerprint hashes it as written (a
            # normalised caption made every run of a dataset with trailing spaces train its experts again).
            try:
                clean_text(caption)
            except ValueError as e:
                raise ValueError(f"{where}: caption {e}") from None
        if kind == "retrieval" and label is not None:  # a retrieval task pairs images with captions, not labels
            raise ValueError(f"{where}: a sample of retrieval task {task!r} has a caption, not a label")
        if kind == "classification" and label is None:
            raise ValueError(f"{where}: a sample of classification task {task!r} needs a label")
        if kind == "classification" and label not in tasks[task].classes:
            raise ValueError(f"{where}: label {label!r} is not one of the classes of task {task!r}: {list(tasks[task].classes)}")
        if task is None and label is None:
            raise ValueError(f"{where}: a sample needs a task (retrieval: with a caption) or a label (classification)")
        if task is None and label not in all_classes:
            unused.setdefault(label, lineno)
        path = (directory / image).resolve()
        # Inside the folder as written (no `..` out of it, no absolute path elsewhere); a symlink inside it (an
        # images folder kept on another disk) may point anywhere.
        written = Path(os.path.normpath(directory.absolute() / image))
        if not (written.is_relative_to(os.path.normpath(directory.absolute())) or path.is_relative_to(directory.resolve())):
            raise ValueError(f"{where}: image path leaves the dataset folder: {image!r}")
        if not path.is_file():  # found now, not after the tasks before it have trained
            raise ValueError(f"{where}: image {'path is a folder, not a file' if path.is_dir() else 'not found'}: {path}")
        _probe_image(path, where)
        samples.append(Sample(str(path), caption, task, label, split, where))
    if unused:  # a pool may hold more classes than the tasks use, but a misspelt label lands here too
        shown = ", ".join(f"{label!r} (line {n})" for label, n in list(unused.items())[:5])
        warnings.warn(f"{samples_path}: labels no classification task lists, their samples unused: {shown}", stacklevel=2)
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
