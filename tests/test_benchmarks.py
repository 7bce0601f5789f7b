"""Benchmark builders over Debian-packaged images (skipped when the packages are not installed)."""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import pytest

from training.benchmarks import FASHION_ROOT, TUX_ROOT, fashion_tasks, scan_tux_stamps, tux_retrieval
from training.config import DataConfig

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let a final newline through

needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)
needs_tux = pytest.mark.skipif(
    not TUX_ROOT.is_dir(),
    reason="Tux Paint stamps not installed: apt-get install -y --no-install-recommends tuxpaint-stamps-default",
)


def deb_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---- Fashion-MNIST --------------------------------------------------------------------------------------
@needs_fashion
def test_fashion_all_triples():
    cfg = DataConfig(kind="fashion-tasks", train_per_task=5, test_per_task=3)
    data = fashion_tasks(cfg)
    assert len(data.tasks) == 120  # C(10, 3)
    assert all(NAME_RE.fullmatch(n) for n in data.tasks)
    task = data.tasks["fashion-coat-pullover-shirt"]
    assert task.kind == "classification"
    assert task.classes == ("coat", "pullover", "shirt")
    assert task.description == "This is a classification task for recognizing coat, pullover and shirt"
    assert "fashion-ankle_boot-sneaker-tshirt" in data.tasks
    # Untagged samples, train/test per class.
    assert all(s.task is None and s.caption is None for s in data.samples)
    counts = collections.Counter((s.label, s.split) for s in data.samples)
    assert len(counts) == 20 and all(v == (5 if split == "train" else 3) for (_, split), v in counts.items())
    assert len(data.task_samples("fashion-coat-pullover-shirt", "train")) == 15
    assert len(data.task_samples("fashion-coat-pullover-shirt", "test")) == 9
    data.check(list(data.tasks), min_train=15, min_test=9)
    im = data.samples[0].load()
    assert im.mode == "RGB" and im.size == (28, 28)
    assert max(im.getextrema()[0]) > 0  # not a blank image


@needs_fashion
def test_fashion_subset_is_seeded():
    def names(seed: int) -> list[str]:
        return list(fashion_tasks(DataConfig(kind="fashion-tasks", seed=seed, options={"num_tasks": 10})).tasks)

    assert len(names(0)) == 10 and names(0) == names(0) and names(0) != names(1)
    pairs = fashion_tasks(DataConfig(kind="fashion-tasks", options={"classes_per_task": 2}))
    assert len(pairs.tasks) == 45
    assert pairs.tasks["fashion-bag-dress"].description == "This is a classification task for recognizing bag and dress"
    a = fashion_tasks(DataConfig(kind="fashion-tasks", seed=3, train_per_task=2, test_per_task=1))
    b = fashion_tasks(DataConfig(kind="fashion-tasks", seed=3, train_per_task=2, test_per_task=1))
    assert [s.load().tobytes() for s in a.samples[:4]] == [s.load().tobytes() for s in b.samples[:4]]


def test_fashion_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_tasks(DataConfig(kind="fashion-tasks", options={"root": str(tmp_path)}))
    with pytest.raises(ValueError, match="unknown key"):
        fashion_tasks(DataConfig(kind="fashion-tasks", options={"tasks": 3}))


@needs_fashion
def test_fashion_option_errors():
    with pytest.raises(ValueError, match="num_tasks"):
        fashion_tasks(DataConfig(kind="fashion-tasks", options={"num_tasks": 121}))
    with pytest.raises(ValueError, match="classes_per_task"):
        fashion_tasks(DataConfig(kind="fashion-tasks", options={"classes_per_task": 1}))


# ---- Tux Paint stamps -----------------------------------------------------------------------------------
@needs_tux
def test_tux_tasks_and_splits():
    cfg = DataConfig(kind="tux-retrieval", train_per_task=64, test_per_task=4)
    data = tux_retrieval(cfg)
    if deb_version("tuxpaint-stamps-default") == "2022.06.04-1":
        # Documented counts for this package version (depth 2, min_stamps 8).
        assert len(data.tasks) == 26
        assert sum(s.split == "train" for s in data.samples) == 452
        assert sum(s.split == "test" for s in data.samples) == 104
        assert sum(len(v) for v in scan_tux_stamps(TUX_ROOT).values()) == 785
    else:
        assert len(data.tasks) >= 5
    assert all(NAME_RE.fullmatch(n) for n in data.tasks)
    birds = data.tasks["tux-animals-birds"]
    assert birds.kind == "retrieval" and birds.description == "a photo of birds (animals)"
    for name in data.tasks:
        train, test = data.task_samples(name, "train"), data.task_samples(name, "test")
        assert len(test) == 4 and 2 <= len(train) <= 64
        assert all(s.caption and s.caption.strip() for s in train + test)
    data.check(list(data.tasks), min_train=2, min_test=4)
    # Disjoint, seeded held-out split.
    a = tux_retrieval(cfg)
    assert [(s.task, s.caption, s.split) for s in a.samples] == [(s.task, s.caption, s.split) for s in data.samples]
    assert (
        "tux-animals-birds"
        not in tux_retrieval(DataConfig(kind="tux-retrieval", test_per_task=4, options={"min_stamps": 40})).tasks
    )


@needs_tux
def test_tux_images_are_rgb_on_white():
    data = tux_retrieval(DataConfig(kind="tux-retrieval", train_per_task=8, test_per_task=4))
    for s in data.task_samples("tux-animals-birds", "test"):
        im = s.load()
        assert im.mode == "RGB" and max(im.size) <= 256
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited onto white


def test_tux_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="tuxpaint-stamps-default"):
        tux_retrieval(DataConfig(kind="tux-retrieval", options={"root": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="min_stamps"):
        tux_retrieval(DataConfig(kind="tux-retrieval", test_per_task=8, options={"root": str(tmp_path), "min_stamps": 5}))


def test_tux_scan_on_a_tiny_tree(tmp_path: Path):
    from PIL import Image

    def stamp(rel: str, caption: str | None) -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(p)
        if caption is not None:
            p.with_suffix(".txt").write_text(caption + "\nfr.utf8=Un truc.\n")

    for i in range(6):
        stamp(f"animals/birds/b{i}.png", f"A bird number {i}.")
    stamp("animals/birds/cartoon/c.png", "A cartoon bird.")  # style folder: merged into birds
    stamp("animals/birds/b0_mirror.png", None)  # no caption: skipped
    stamp("clothes/hat.png", "A hat.")
    data = tux_retrieval(
        DataConfig(kind="tux-retrieval", train_per_task=10, test_per_task=2, options={"root": str(tmp_path), "min_stamps": 4})
    )
    assert list(data.tasks) == ["tux-animals-birds"]
    assert len(data.task_samples("tux-animals-birds", "test")) == 2
    assert len(data.task_samples("tux-animals-birds", "train")) == 5
    assert data.samples[0].load().getpixel((0, 0)) == (255, 255, 255)
    assert {s.caption for s in data.samples} >= {"A cartoon bird."}
