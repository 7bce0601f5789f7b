import json

import pytest

from training.data import load_task_dataset, write_task_dataset
from training.procedural import procedural_dataset


def test_folder_format_round_trip(tmp_path):
    ds = procedural_dataset(seed=1, train_per_task=3, test_per_task=2, shapes=("circle", "square"), colour_tasks=2)
    write_task_dataset(ds, tmp_path)
    back = load_task_dataset(tmp_path)
    assert back.tasks == ds.tasks
    assert len(back.samples) == len(ds.samples)
    assert len(back.task_samples("circle", "train")) == 3
    colour_task = next(n for n, t in back.tasks.items() if t.kind == "classification")
    assert len(back.task_samples(colour_task, "test")) == 3 * 2  # untagged samples shared by class
    assert back.samples[0].load().size == (32, 32)


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"caption": "x", "task": "circle"}', "bad sample"),
        ('{"image": "a.png", "task": "nope", "caption": "x"}', "unknown task"),
        ('{"image": "a.png", "task": "circle"}', "needs a caption"),
        ('{"image": "../../etc/passwd", "task": "circle", "caption": "x"}', "leaves the dataset folder"),
        ('{"image": "a.png", "split": "dev", "task": "circle", "caption": "x"}', "split"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path, line, needle):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "circle", "description": "a photo of a circle"}]}))
    (tmp_path / "samples.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=needle):
        load_task_dataset(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        load_task_dataset(tmp_path)
