"""A small procedural dataset of drawn shapes with captions, for tests and the tiny config.

Retrieval tasks: one per shape ("a photo of a circle"); each image is that shape in a
random colour, size and position, captioned "a red circle at the top left".
Classification tasks: triples of colours ("This is a classification task for recognizing
red, green and blue"); images are random shapes labelled by their colour.
Everything derives from the seed, images are drawn lazily.
"""

from __future__ import annotations

import math
import random
from functools import partial

from PIL import Image, ImageDraw

from training.data import Sample, TaskDataset, TaskInfo

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 40, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
}
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}


def draw_shape(shape: str, colour: str, position: str, size: int, scale: float, noise_seed: int) -> Image.Image:
    rng = random.Random(noise_seed)
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    cx, cy = (POSITIONS[position][0] * size, POSITIONS[position][1] * size)
    r = scale * size
    col = COLOURS[colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
    elif shape == "ring":
        d.ellipse(box, outline=col, width=max(1, int(r / 3)))
    elif shape == "bar":
        d.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=col)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r / 2.5
            ang = math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy - rad * math.sin(ang)))
        d.polygon(pts, fill=col)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def procedural_dataset(
    seed: int = 0,
    image_size: int = 32,
    train_per_task: int = 24,
    test_per_task: int = 16,
    shapes: tuple[str, ...] = SHAPES,
    colour_tasks: int = 0,
) -> TaskDataset:
    rng = random.Random(seed)
    tasks: dict[str, TaskInfo] = {}
    samples: list[Sample] = []

    def add(shape: str, colour: str, split: str, task: str | None, label: str | None) -> None:
        pos = rng.choice(list(POSITIONS))
        scale = rng.uniform(0.12, 0.22)
        img = partial(draw_shape, shape, colour, pos, image_size, scale, rng.randrange(1 << 30))
        samples.append(Sample(img, f"a {colour} {shape} at the {pos}", task, label, split))

    for shape in shapes:
        tasks[shape] = TaskInfo(shape, f"a photo of a {shape}", "retrieval")
        for split, n in (("train", train_per_task), ("test", test_per_task)):
            for _ in range(n):
                add(shape, rng.choice(list(COLOURS)), split, shape, None)
    colours = list(COLOURS)
    for _i in range(colour_tasks):
        trio = tuple(rng.sample(colours, 3))
        name = "colours-" + "-".join(trio)
        tasks[name] = TaskInfo(
            name, f"This is a classification task for recognizing {trio[0]}, {trio[1]} and {trio[2]}", "classification", trio
        )
    if colour_tasks:
        for colour in colours:
            for split, n in (("train", train_per_task), ("test", test_per_task)):
                for _ in range(n):
                    add(rng.choice(shapes), colour, split, None, colour)
    return TaskDataset(tasks, samples, class_template="a photo of something {}")
