"""Pictures: label maps in the dataset's palette, CAM heat-map overlays, figure grids, legends."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data.voc import PALETTE
from .registry import get_dataset


def palette(dataset: str) -> np.ndarray:
    """The 256×3 uint8 colour map of ``dataset``'s label maps (its registry entry's ``palette``).

    ``voc``: the bit-interleaved VOC colour map, one distinct colour for every label 0..255 (VOC's 21, COCO's 81, a
    folder's up to 254 classes; 255, ignore, is its cream)."""
    name = get_dataset(dataset).palette
    if name == "voc":
        return PALETTE
    raise ValueError(f"dataset {dataset!r}: unknown palette {name!r}")


def colorize(label: np.ndarray, colours: np.ndarray = PALETTE) -> np.ndarray:
    """A label map [H, W] as an RGB image in ``colours`` (a 256×3 palette; default VOC's)."""
    return colours[label.astype(np.uint8)]


def legend_entries(classes: Sequence[str], colours: np.ndarray, present: Iterable[int] | None = None,
                   most: int = 21) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(label, name, RGB) of a figure's legend: background + every class when there are at most ``most`` labels,
    else only the labels in ``present`` (those the figure shows: 81 COCO entries would not be readable)."""
    names = ["background", *classes]
    labels = range(len(names))
    if len(names) > most and present is not None:
        keep = {int(v) for v in present}
        labels = [i for i in labels if i in keep]
    return [(i, names[i], tuple(int(x) for x in colours[i])) for i in labels]


def heatmap(cams: np.ndarray) -> np.ndarray:
    """Max over CAMs [K, H, W] in [0, 1] as a jet-like RGB heat map [H, W, 3]."""
    v = np.clip(cams.max(0) if len(cams) else np.zeros(cams.shape[1:]), 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB picture over an RGB image."""
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], titles: list[str], cell: int = 128) -> Image.Image:
    """A figure grid: one row per image, one titled column per picture kind."""
    th = 14
    canvas = Image.new("RGB", (cell * len(titles), th + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((j * cell + 3, 1), t[:20], fill="black")
    for i, row in enumerate(rows):
        for j, pic in enumerate(row):
            im = Image.fromarray(pic)
            im.thumbnail((cell, cell))
            canvas.paste(im, (j * cell + (cell - im.width) // 2, th + i * cell + (cell - im.height) // 2))
    return canvas
