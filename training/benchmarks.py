"""Real-image benchmarks built from Debian packages (read in place, never copied into the repo).

``fashion_tasks`` (data.kind "fashion-tasks"): Debian ``dataset-fashion-mnist``
    (/usr/share/datasets/fashion-mnist/*-ubyte.gz, 60k train + 10k test, 28x28 grey, Expat).
    Classification tasks over subsets of ``classes_per_task`` (default 3) of the 10 classes:
    all C(10, 3) = 120 triples by default, or a seeded subset of ``num_tasks``. A task is
    named ``fashion-coat-pullover-shirt`` (class slugs in alphabetical order) and described
    'This is a classification task for recognizing coat, pullover and shirt'. Samples are
    untagged (shared by every task listing their label): ``train_per_task`` images **per
    class** from the train file and ``test_per_task`` per class from the test file (seeded),
    so a 3-class task has 3 x train_per_task training images.

``tux_retrieval`` (data.kind "tux-retrieval"): Debian ``tuxpaint-stamps-default``
    (/usr/share/tuxpaint/stamps/<category>/<subcategory>/..., GPL-2). Every PNG stamp with a
    ``.txt`` beside it is an (image, caption) pair; the caption is the txt's first line
    ("A blackbird."). SVG stamps are skipped (PIL cannot read them), so are ``*_mirror.png``
    variants (they have no txt). A task is a folder at depth ``depth`` (default 2, e.g.
    ``animals/birds``); stamps deeper down belong to their depth-``depth`` ancestor, stamps
    directly in a shallower folder (``clothes/*.png``) to that folder, and the style folders
    ``cartoon``, ``toys``, ``plastic`` are merged into their parent. Tasks with fewer than
    ``min_stamps`` stamps (default max(8, test_per_task + 2)) are skipped. Per task, a seeded
    ``test_per_task`` stamps are held out for test; train = the rest, at most
    ``train_per_task``. Stamps have transparency: they are composited onto white.

``cfg.options`` for fashion: ``num_tasks`` (int, default all), ``classes_per_task`` (default 3),
``root`` (folder override). For tux: ``depth``, ``min_stamps``, ``root``, ``max_side`` (stamps
are downscaled on load so their longer side is at most this, default 256).
"""

from __future__ import annotations

import gzip
import itertools
import random
import re
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from expert_store.repository import NAME_RE  # task names become expert names
from training.config import DataConfig
from training.data import Sample, TaskDataset, TaskInfo

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
# Label index -> (readable class name used in prompts, slug used in task names).
FASHION_CLASSES = (
    ("T-shirt", "tshirt"),
    ("trouser", "trouser"),
    ("pullover", "pullover"),
    ("dress", "dress"),
    ("coat", "coat"),
    ("sandal", "sandal"),
    ("shirt", "shirt"),
    ("sneaker", "sneaker"),
    ("bag", "bag"),
    ("ankle boot", "ankle_boot"),
)
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

TUX_ROOT = Path("/usr/share/tuxpaint/stamps")
TUX_PACKAGE = "tuxpaint-stamps-default"
TUX_STYLE_DIRS = frozenset({"cartoon", "toys", "plastic"})
TUX_READABLE = {
    "arttools": "art tools",
    "body_parts": "body parts",
    "masstransit": "mass transit",
    "naturalforces": "natural forces",
    "newyears": "new years",
    "roadsigns": "road signs",
}


def check_options(cfg: DataConfig, allowed: set[str]) -> dict[str, Any]:
    """``cfg.options``, refused with the keys a dataset kind does not take."""
    unknown = sorted(set(cfg.options) - allowed)
    if unknown:
        raise ValueError(f"data.options: unknown key(s) {unknown} for kind {cfg.kind!r}; allowed: {sorted(allowed)}")
    return dict(cfg.options)


def _positive_int(opts: dict[str, Any], key: str, default: int) -> int:
    v = opts.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"data.options.{key} must be a positive integer, got {v!r}")
    return v


# ---- Fashion-MNIST ------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {arr.size}")
    return arr.reshape(dims)


@lru_cache(maxsize=4)
def load_fashion_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split; cached per process."""
    img_file, lbl_file = FASHION_FILES[split]
    images, labels = _read_idx(Path(root) / img_file), _read_idx(Path(root) / lbl_file)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels


def _fashion_image(root: str, split: str, index: int) -> Image.Image:
    images, _ = load_fashion_split(root, split)
    return Image.fromarray(images[index]).convert("RGB")


def fashion_tasks(cfg: DataConfig) -> TaskDataset:
    """Fashion-MNIST classification tasks over class subsets (see the module docstring)."""
    opts = check_options(cfg, {"num_tasks", "classes_per_task", "root"})
    root = Path(opts.get("root", FASHION_ROOT))
    missing = [f for pair in FASHION_FILES.values() for f in pair if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {missing}); install the Debian package: "
            f"apt-get install -y {FASHION_PACKAGE}"
        )
    k = _positive_int(opts, "classes_per_task", 3)
    if not 2 <= k <= len(FASHION_CLASSES):
        raise ValueError(f"data.options.classes_per_task must be in [2, {len(FASHION_CLASSES)}], got {k}")
    combos = list(itertools.combinations(range(len(FASHION_CLASSES)), k))
    rng = random.Random(cfg.seed)
    if "num_tasks" in opts:
        n = _positive_int(opts, "num_tasks", len(combos))
        if n > len(combos):
            raise ValueError(f"data.options.num_tasks={n} but only C(10, {k}) = {len(combos)} class subsets exist")
        combos = sorted(rng.sample(combos, n))

    tasks: dict[str, TaskInfo] = {}
    for combo in combos:
        members = sorted((FASHION_CLASSES[i] for i in combo), key=lambda c: c[1])
        names = [m[0] for m in members]
        name = "fashion-" + "-".join(m[1] for m in members)
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        tasks[name] = TaskInfo(
            name, f"This is a classification task for recognizing {listed}", "classification", tuple(names), group="fashion"
        )

    samples: list[Sample] = []
    for split, per_class in (("train", cfg.train_per_task), ("test", cfg.test_per_task)):
        _, labels = load_fashion_split(str(root), split)
        split_rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
        for label, (readable, _) in enumerate(FASHION_CLASSES):
            pool = np.flatnonzero(labels == label)
            if len(pool) < per_class:
                raise ValueError(f"Fashion-MNIST {split} has {len(pool)} images of {readable}; {per_class} requested")
            for idx in sorted(split_rng.choice(pool, size=per_class, replace=False).tolist()):
                samples.append(Sample(partial(_fashion_image, str(root), split, int(idx)), None, None, readable, split))
    return TaskDataset(tasks, samples, class_template="a photo of a {}")


# ---- Tux Paint stamps ---------------------------------------------------------------------------
def _tux_image(path: str, max_side: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    if max(rgba.size) > max_side:
        rgba.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _caption(txt: Path) -> str | None:
    try:
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return first[0].strip() if first and first[0].strip() else None


def _task_key(rel_dir: tuple[str, ...], depth: int) -> tuple[str, ...]:
    parts = tuple(p for p in rel_dir if p not in TUX_STYLE_DIRS)
    return parts[:depth]


def _readable(part: str) -> str:
    return TUX_READABLE.get(part, part.replace("_", " ").replace("-", " "))


def scan_tux_stamps(root: Path, depth: int = 2) -> dict[tuple[str, ...], list[tuple[Path, str]]]:
    """{task folder key: [(png path, caption), ...]} for every PNG stamp with a caption, sorted."""
    groups: dict[tuple[str, ...], list[tuple[Path, str]]] = {}
    for png in sorted(root.rglob("*.png")):
        caption = _caption(png.with_suffix(".txt"))
        if caption is None:
            continue
        key = _task_key(png.parent.relative_to(root).parts, depth)
        if not key:
            continue  # a stamp directly under the root belongs to no category
        groups.setdefault(key, []).append((png, caption))
    return groups


def tux_retrieval(cfg: DataConfig) -> TaskDataset:
    """Tux Paint stamp retrieval tasks, one per stamp folder (see the module docstring)."""
    opts = check_options(cfg, {"depth", "min_stamps", "root", "max_side"})
    depth = _positive_int(opts, "depth", 2)
    min_stamps = _positive_int(opts, "min_stamps", max(8, cfg.test_per_task + 2))
    if min_stamps < cfg.test_per_task + 2:
        raise ValueError(
            f"data.options.min_stamps={min_stamps} must be >= test_per_task + 2 = {cfg.test_per_task + 2} "
            "(a task needs its held-out stamps plus at least 2 training stamps)"
        )
    max_side = _positive_int(opts, "max_side", 256)
    root = Path(opts.get("root", TUX_ROOT))
    if not root.is_dir() or not any(root.iterdir()):
        raise FileNotFoundError(
            f"Tux Paint stamps not found in {root}; install the Debian package: "
            f"apt-get install -y --no-install-recommends {TUX_PACKAGE}"
        )
    groups = scan_tux_stamps(root, depth)
    if not groups:
        raise FileNotFoundError(f"no captioned PNG stamps under {root}; is {TUX_PACKAGE} installed completely?")

    tasks: dict[str, TaskInfo] = {}
    samples: list[Sample] = []
    for key in sorted(groups):
        stamps = groups[key]
        if len(stamps) < min_stamps:
            continue
        name = "tux-" + "-".join(p.replace("_", "") for p in key)
        name = re.sub(r"[^A-Za-z0-9._-]", "", name)[:64]
        if not NAME_RE.fullmatch(name) or name in tasks:
            raise ValueError(f"tux stamp folder {'/'.join(key)} gives an invalid or duplicate task name {name!r}")
        words = _readable(key[-1]) + (f" ({_readable(key[0])})" if len(key) > 1 else "")
        tasks[name] = TaskInfo(name, f"a photo of {words}", "retrieval", group="tux")
        order = list(range(len(stamps)))
        random.Random(f"{cfg.seed}:{name}").shuffle(order)
        test = order[: cfg.test_per_task]
        train = order[cfg.test_per_task : cfg.test_per_task + cfg.train_per_task]
        for split, idxs in (("test", test), ("train", train)):
            for i in sorted(idxs):
                path, caption = stamps[i]
                samples.append(Sample(partial(_tux_image, str(path), max_side), caption, name, None, split))
    if not tasks:
        raise ValueError(f"no stamp folder under {root} has >= {min_stamps} captioned PNG stamps (data.options.min_stamps)")
    return TaskDataset(tasks, samples)
