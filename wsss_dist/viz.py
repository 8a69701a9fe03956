"""Pictures: VOC palette label maps, CAM heat-map overlays, figure grids."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .data.voc import PALETTE


def colorize(label: np.ndarray) -> np.ndarray:
    """A label map [H, W] as an RGB image in the VOC palette."""
    return PALETTE[label.astype(np.uint8)]


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
