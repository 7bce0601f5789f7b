import json
from pathlib import Path

import pytest
from PIL import Image

from training.data import Sample, load_task_dataset, write_task_dataset
from training.procedural import procedural_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_folder_format_round_trip(tmp_path):
    ds = procedural_dataset(seed=1, train_per_task=3, test_per_task=2, shapes=("circle", "square"), colour_tasks=2)
    write_task_dataset(ds, tmp_path)
    with pytest.warns(UserWarning, match="labels no classification task lists, their samples unused: 'green'"):
        back = load_task_dataset(tmp_path)  # the procedural pool has more colours than its two colour tasks
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
        ('{"image": "a.png", "task": "circle", "caption": " \\t "}', "needs a caption"),
        # what the service's /retrieve refuses in a caption (a NUL, an information separator)
        ('{"image": "a.png", "task": "circle", "caption": "a\\u0000b"}', "jsonl:1: caption must not contain control characters"),
        ('{"image": "a.png", "task": "circle", "caption": "a\\u001fb"}', "caption must not contain control characters"),
        ('{"image": "../../etc/passwd", "task": "circle", "caption": "x"}', "leaves the dataset folder"),
        ('{"image": "a.png", "split": "dev", "task": "circle", "caption": "x"}', "split"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path, line, needle):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "circle", "description": "a photo of a circle"}]}))
    (tmp_path / "samples.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=needle):
        load_task_dataset(tmp_path)


def test_captions_keep_their_whitespace_so_the_data_fingerprint_does_not_change(tmp_path):
    """Checked as /retrieve checks captions (control characters refused, above), kept as written: the data
    fingerprint hashes them, and a normalised caption changed it for runs built before the check."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "circle", "description": "a photo of a circle"}]}))
    (tmp_path / "samples.jsonl").write_text(
        json.dumps({"image": "a.png", "task": "circle", "caption": " a  red\tcircle\n"}) + "\n"
    )
    assert [s.caption for s in load_task_dataset(tmp_path).samples] == [" a  red\tcircle\n"]


def test_a_symlink_inside_the_folder_may_point_elsewhere_a_path_as_written_may_not(tmp_path):
    """An images folder kept on another disk and linked into the dataset folder is the folder's own; a
    path that leaves the folder as written (`..`, an absolute path elsewhere) is refused."""
    elsewhere, ds = tmp_path / "disk2", tmp_path / "ds"
    elsewhere.mkdir()
    ds.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(elsewhere / "a.png")
    (ds / "img").symlink_to(elsewhere, target_is_directory=True)
    (ds / "tasks.json").write_text(json.dumps({"tasks": [{"name": "circle", "description": "a photo of a circle"}]}))
    (ds / "samples.jsonl").write_text('{"image": "img/a.png", "task": "circle", "caption": "x"}\n')
    (sample,) = load_task_dataset(ds).samples
    assert sample.load().getpixel((0, 0)) == (10, 20, 30)
    for image in ("../disk2/a.png", str(elsewhere / "a.png"), "img/../../disk2/a.png"):
        (ds / "samples.jsonl").write_text(json.dumps({"image": image, "task": "circle", "caption": "x"}) + "\n")
        with pytest.raises(ValueError, match="leaves the dataset folder"):
            load_task_dataset(ds)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        load_task_dataset(tmp_path)


TASKS = [
    {"name": "circle", "description": "a photo of a circle"},
    {"name": "colours", "description": "red or blue", "kind": "classification", "classes": ["red", "blue"]},
]


@pytest.mark.parametrize(
    "tasks,needle",
    [
        (TASKS, "a JSON object with a list of tasks"),
        ({"tasks": ["circle"]}, "task #0: a task must be a JSON object"),
        ({"tasks": [{"name": 7, "description": "x"}]}, "task #0: name must be a string"),
        ({"tasks": [{"name": "../../x", "description": "x"}]}, "task #0: invalid task name '../../x'"),
        ({"tasks": [{"name": "a circle", "description": "x"}]}, "invalid task name 'a circle'"),
        ({"tasks": [{"name": "c", "description": 42}]}, "task #0: description must be a string"),
        ({"tasks": [{"name": "c", "description": "x", "kinds": "retrieval"}]}, r"unknown key\(s\) \['kinds'\]"),
        ({"tasks": [{**TASKS[1], "classes": "red"}]}, "classes must be a list of strings"),
        ({"tasks": [{**TASKS[1], "classes": ["red", "red", "blue"]}]}, r"class\(es\) \['red'\] listed more than once"),
        # one snapshot file each: on a case-insensitive file system they would share it
        ({"tasks": [TASKS[0], {**TASKS[0], "name": "Circle"}]}, r"task names 'circle' and 'Circle' differ only in case"),
        # what was taken without a word before 0.9.20
        ({"tasks": TASKS, "class_template": "a drawing of a {}"}, r"unknown key\(s\) \['class_template'\]"),
        ({"tasks": [{**TASKS[1], "classes": ["red", "blue "]}]}, r"class name\(s\) \['blue '\] blank or with spaces"),
        ({"tasks": [{**TASKS[1], "classes": ["red", ""]}]}, r"class name\(s\) \[''\] blank"),
        ({"tasks": [{**TASKS[0], "classes": ["red", "blue"]}]}, "classes are for classification tasks"),
    ],
)
def test_bad_tasks_are_named_before_anything_is_trained(tmp_path, tasks, needle):
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    (tmp_path / "samples.jsonl").write_text("")
    with pytest.raises(ValueError, match=needle):
        load_task_dataset(tmp_path)


@pytest.mark.parametrize(
    "line,needle",
    [
        ('["a.png"]', ":1: a sample must be a JSON object"),
        ('{"image": 5, "label": "red"}', ":1: image must be a string"),
        ('{"image": "a.png", "label": ["red"]}', ":1: label must be a string"),
        ('{"image": "a.png", "task": "circle", "caption": 12345}', ":1: caption must be a string"),
        ('{"image": "a.png", "lable": "red"}', r":1: unknown key\(s\) \['lable'\]"),
        ('{"image": "a.png", "task": "colours"}', ":1: a sample of classification task 'colours' needs a label"),
        ('{"image": "a.png", "task": "colours", "label": "redd"}', ":1: label 'redd' is not one of the classes of task 'col"),
        ('{"image": "a.png", "task": "circle", "caption": "a ring", "label": "red"}', ":1: .* has a caption, not a label"),
        ('{"image": "a.png", "label": "red", "label": "blue"}', ":1: key 'label' given twice"),
        ('{"image": "a.png", "caption": "a circle"}', ":1: a sample needs a task"),
        ('{"image": "missing.png", "label": "red"}', ":1: image not found: "),
        ('{"image": "images", "label": "red"}', ":1: image path is a folder, not a file: "),
    ],
)
def test_bad_samples_are_named_by_line(tmp_path, line, needle):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": TASKS}))
    (tmp_path / "images").mkdir()
    (tmp_path / "samples.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=needle):
        load_task_dataset(tmp_path)


def test_text_that_is_not_utf8_names_its_file(tmp_path):
    (tmp_path / "tasks.json").write_bytes(json.dumps({"tasks": TASKS}).replace("red or blue", "r\u00e9d").encode("latin-1"))
    (tmp_path / "samples.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"tasks.json: not UTF-8 text"):
        load_task_dataset(tmp_path)
    (tmp_path / "tasks.json").write_text("\ufeff" + json.dumps({"tasks": TASKS}))  # a byte-order mark is fine
    (tmp_path / "samples.jsonl").write_bytes('{"image": "a.png", "label": "r\u00e9d"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"samples.jsonl: not UTF-8 text"):
        load_task_dataset(tmp_path)


def test_a_class_without_images_in_a_split_is_named(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": TASKS}))
    lines = [
        {"image": f"{i}.png", "label": c, "split": sp}
        for i, (c, sp) in enumerate([("red", "train"), ("blue", "train"), ("red", "test")])
    ]
    for x in lines:
        Image.new("RGB", (2, 2)).save(tmp_path / x["image"])  # only their headers are read on load
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = load_task_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"task 'colours': class\(es\) \['blue'\] have no test samples"):
        ds.check(["colours"], 1, 1)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation is applied (a phone photo is not trained on its side) and 16-bit greyscale is scaled
    (convert("RGB") clipped it to a white square); a floating-point image is refused by name. The service
    decodes uploads the same way, so retrieval sees what training saw."""
    import io

    import numpy as np

    from app.errors import APIError
    from app.images import decode_image, load_rgb
    from training.data import open_image

    picture = Image.new("RGB", (40, 20), (200, 50, 50))
    picture.paste((20, 20, 220), (0, 0, 10, 20))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    picture.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = open_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    assert np.asarray(upright)[2, 10, 2] > 150  # the blue band is now at the top
    grey = np.asarray(picture.convert("L")).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")  # 16-bit greyscale, mode I;16
    assert np.array_equal(np.asarray(open_image(tmp_path / "deep.png"))[..., 0], grey)
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif: a floating-point image \(mode F\)"):
        open_image(tmp_path / "float.tif")
    assert decode_image((tmp_path / "phone.jpg").read_bytes(), "images[0]", max_pixels=10_000).size == (20, 40)
    buf = io.BytesIO()
    Image.fromarray(grey * 257).save(buf, format="PNG")
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "images[0]", max_pixels=10_000))[..., 0], grey)
    with pytest.raises(APIError, match=r"unsupported image: a 32-bit integer image \(mode I\) with values 0 to 70000"):
        load_rgb(Image.fromarray(np.array([[0, 70_000]], dtype=np.int32)), "images[0]")
    # Older Pillow releases open a 16-bit PNG as mode I: the same pixels as mode I;16
    as_i = Image.fromarray((grey * 257).astype(np.int32))
    assert as_i.mode == "I" and np.array_equal(np.asarray(load_rgb(as_i, "images[0]"))[..., 0], grey)
    assert np.array_equal(np.asarray(load_rgb(Image.fromarray(grey.astype(np.int32)), "images[0]"))[..., 0], grey)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparency_is_composited_onto_white(tmp_path, fmt):
    """A transparent pixel shows white, as the tux benchmark's stamps are trained, not the colour it hides
    (convert("RGB") showed the hidden green, or black); a half-transparent one is blended."""
    from app.images import decode_image
    from training.data import open_image

    im = Image.new("RGBA", (4, 2), (0, 255, 0, 0))  # transparent, hiding green
    im.putpixel((1, 0), (200, 30, 30, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    if fmt == "GIF":  # a palette with one transparent index
        im = im.convert("RGB").quantize(4)
        im.info["transparency"] = im.getpixel((0, 0))
    path = tmp_path / f"stamp.{fmt.lower()}"
    im.save(path, format=fmt, lossless=True)
    for got in (open_image(path), decode_image(path.read_bytes(), "images[0]", 100)):
        assert got.mode == "RGB"
        assert got.getpixel((0, 0)) == (255, 255, 255)
        assert got.getpixel((1, 0)) == (200, 30, 30)
        if fmt != "GIF":
            assert all(126 <= c <= 129 for c in got.getpixel((2, 0)))  # black at half opacity over white
    la = Image.new("LA", (2, 1), (0, 0))  # grey with alpha: transparent black, then opaque grey
    la.putpixel((1, 0), (40, 255))
    la.save(tmp_path / "la.png")
    assert list(open_image(tmp_path / "la.png").getdata()) == [(255, 255, 255), (40, 40, 40)]


def test_unreadable_images_are_named_before_anything_trains(tmp_path, capsys):
    """An empty or non-image file is refused when the dataset loads (from its header); one cut short inside
    its pixels by ``check-config --data``, which decodes every image, rather than by the experts stage after
    the tasks before it have trained."""
    import yaml

    from sglora.cli import main
    from training.config import load_config

    shapes = ("circle", "square", "triangle")
    ds = procedural_dataset(seed=1, train_per_task=4, test_per_task=2, shapes=shapes, colour_tasks=0)
    write_task_dataset(ds, tmp_path / "ds")
    lines = (tmp_path / "ds" / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["image"]
    image = tmp_path / "ds" / first
    good = image.read_bytes()
    image.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"samples.jsonl:1: cannot read image .*{first}"):
        load_task_dataset(tmp_path / "ds")
    image.write_bytes(good[: len(good) // 2])  # the header reads, the pixels do not
    loaded = load_task_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=rf"samples.jsonl:1: cannot read image .*{first}"):  # and its line
        loaded.check_images(list(loaded.tasks))
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"kind": "folder", "path": "ds"}
    cfg["split"] = {"experts": 1, "train": 1, "val": 0, "test": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    load_config(tmp_path / "c.yaml")
    assert main(["check-config", str(tmp_path / "c.yaml"), "--data"]) == 2
    assert f"samples.jsonl:1: cannot read image {image}" in capsys.readouterr().err
    image.write_bytes(good)
    assert main(["check-config", str(tmp_path / "c.yaml"), "--data"]) == 0
    assert "3 tasks, 18 samples, 18 image files read" in capsys.readouterr().err


def test_a_task_fingerprint_changes_with_its_own_samples_and_definition_alone():
    """What a resumed experts stage keeps a task's snapshot by: its definition and the samples it is given, in
    every split; an untagged classification sample belongs to every task that lists its label."""
    import dataclasses

    def dataset():
        return procedural_dataset(seed=1, train_per_task=4, test_per_task=2, shapes=("circle", "square"), colour_tasks=2)

    base = dataset()
    before = {n: base.task_fingerprint(n) for n in base.tasks}
    assert len(set(before.values())) == len(before) and before == {n: dataset().task_fingerprint(n) for n in base.tasks}

    def changed(edit) -> set[str]:
        ds = dataset()
        edit(ds)
        assert ds.fingerprint() != base.fingerprint()
        return {n for n in ds.tasks if ds.task_fingerprint(n) != before[n]}

    def caption(ds):
        ds.task_samples("square", "test")[-1].caption = "a fixed caption"

    def description(ds):
        ds.tasks["circle"] = dataclasses.replace(ds.tasks["circle"], description="a round thing")

    colour = base.tasks[next(n for n in base.tasks if n.startswith("colours-"))].classes[0]
    listing = {n for n, t in base.tasks.items() if colour in t.classes}

    def label(ds):
        next(s for s in ds.samples if s.label == colour).image = "/elsewhere/fixed.png"

    def template(ds):
        ds.class_template = "a {} thing"

    def unused(ds):  # a sample of a label no task lists
        ds.samples.append(Sample("/x.png", None, None, "no-such-colour", "train"))

    assert changed(caption) == {"square"} and changed(description) == {"circle"}
    assert changed(label) == listing and changed(template) == set(base.tasks) and changed(unused) == set()


def test_combined_sources_with_task_names_that_differ_only_in_case_are_refused(tmp_path):
    from training.config import DataConfig, PipelineConfig
    from training.pipeline import load_data

    for folder, name in (("a", "circle"), ("b", "CIRCLE")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "x.png")
        (tmp_path / folder / "tasks.json").write_text(json.dumps({"tasks": [{"name": name, "description": "a circle"}]}))
        (tmp_path / folder / "samples.jsonl").write_text(json.dumps({"image": "x.png", "task": name, "caption": "c"}) + "\n")
    sources = tuple(DataConfig(kind="folder", path=str(tmp_path / f)) for f in ("a", "b"))
    cfg = PipelineConfig(data=DataConfig(kind="combined", sources=sources))
    with pytest.raises(ValueError, match=r"occur in two sources \(letter case aside\): \['circle/CIRCLE'\]"):
        load_data(cfg)


def test_the_clis_own_warnings_print_as_one_line():
    """The unused-labels warning printed as Python's UserWarning with a line of the loader's code after it."""
    import warnings

    from sglora import cli

    own = cli._format_warning("labels unused: 'green'", UserWarning, str(ROOT / "training" / "pipeline.py"), 66, "return x")
    assert own == "warning: labels unused: 'green'\n"
    other = cli._format_warning("deprecated", FutureWarning, "/usr/lib/x.py", 3, "y = 1")
    assert other == warnings.formatwarning("deprecated", FutureWarning, "/usr/lib/x.py", 3, "y = 1") and "x.py:3" in other


def test_an_unreadable_image_stops_the_experts_stage_before_any_task_trains(tmp_path):
    """Found when its task came, after the tasks before it had trained (hours, on a large dataset)."""
    import yaml

    from training.config import load_config
    from training.pipeline import prepare_data, stage_experts

    shapes = ("circle", "square", "triangle")
    write_task_dataset(
        procedural_dataset(seed=1, train_per_task=4, test_per_task=2, shapes=shapes, colour_tasks=0), tmp_path / "ds"
    )
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"kind": "folder", "path": "ds"}
    cfg["split"] = {"experts": 1, "train": 1, "val": 0, "test": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "c.yaml")
    dataset, splits = prepare_data(config)
    last = splits.all()[-1]  # the last task to train
    image = Path(dataset.task_samples(last, "train")[0].image)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # the header reads, the pixels do not
    with pytest.raises(ValueError, match=rf"cannot read image .*{image.name}"):
        stage_experts(config, tmp_path / "out")
    assert not list((tmp_path / "out").glob("snapshots/*.safetensors"))  # nothing trained


@pytest.mark.parametrize(
    "description,needle",
    [
        ("a photo \udcff x", "must be valid UTF-8 text"),  # a tasks.json written with surrogate escapes
        ("a\x00circle", "must not contain control characters"),
        ("\u200b", "must contain a visible character"),
    ],
)
def test_a_task_description_the_service_would_refuse_is_refused_on_load(description, needle):
    """Such a description passed `check-config --data`, then failed after a task had trained (an undecodable
    one, on writing its snapshot's metadata) or was trained as an expert whose description no request can
    match; now it is refused when the dataset is read, naming the task."""
    from training.data import TaskInfo

    with pytest.raises(ValueError, match=f"task 'disc': description {needle}"):
        TaskInfo("disc", description)


def test_a_task_description_is_stored_as_the_service_reads_it(tmp_path):
    """Whitespace runs collapse to one space, as in a request: a tab or newline kept as written broke
    `sglora select`'s table and stored a description no request could spell."""
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{**TASKS[0], "description": "  a photo \tof\n a ring "}]}))
    (tmp_path / "samples.jsonl").write_text("")
    assert load_task_dataset(tmp_path).tasks["circle"].description == "a photo of a ring"
