"""A synthetic dataset in the VOC2012 + SBD on-disk layout, where image-level WSSS is a real problem.

Each of the (VOC's) 20 classes is an object whose body (shape, colour, texture) is shared with four other classes (four body
types) and that is told apart only by a small two-colour marker (top half / bottom half, a colour pair unique to the
class; flip-invariant under horizontal flips). A classifier therefore fires on the marker, and CAM refinement has the
rest of the body to recover. Images hold 1–3 objects (same-class repeats allowed) on cluttered textured backgrounds;
VOC masks carry a ~2 px void (255) band at object borders, SBD masks (GTcls.Segmentation) none, as the real files.
Everything is deterministic from ``ToyCfg.seed``; a stamp file makes :func:`generate` idempotent.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .. import runs
from ..config import ToyCfg
from ..registry import DATASETS
from .voc import write_mask_png

CLASSES = DATASETS["toy"].classes  # the toy data uses VOC's classes and layout

logger = logging.getLogger(__name__)

TOY_VERSION = 1
STAMP = "toy.json"
MARKER_COLOURS = np.array([(235, 25, 25), (25, 205, 45), (35, 60, 235), (250, 225, 15), (225, 35, 225)], np.float32)
MARKER_PAIRS = [(a, b) for a in range(5) for b in range(5) if a != b]  # 20 ordered pairs: one per class
BODY_COLOURS = np.array([(150, 115, 80), (115, 130, 150), (105, 145, 110), (155, 120, 145)], np.float32)
N_BODIES = len(BODY_COLOURS)
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by wsss_dist.data.toy"


def body_type(c: int) -> int:
    """The shared body (shape, colour, texture) of class index ``c`` (0..19)."""
    return c % N_BODIES


def _shape_mask(kind: int, h: int, w: int) -> np.ndarray:
    """Boolean [h, w] silhouette of a body type inside its box: ellipse, rounded box, triangle, diamond."""
    y = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    x = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    yy, xx = y[:, None], x[None, :]
    if kind == 0:
        return xx**2 + yy**2 <= 1
    if kind == 1:
        return (np.abs(xx) ** 4 + np.abs(yy) ** 4) <= 1
    if kind == 2:
        return (yy >= -1) & (np.abs(xx) <= (yy + 1) / 2)
    return np.abs(xx) + np.abs(yy) <= 1


def _texture(kind: int, h: int, w: int, phase: float) -> np.ndarray:
    """Body texture in [-1, 1]: stripes, dots, diagonal stripes, checker."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        return np.sign(np.sin(yy * 1.3 + phase))
    if kind == 1:
        return (np.sin(yy * 1.2 + phase) * np.sin(xx * 1.2 + phase) > 0.5) * 2.0 - 1
    if kind == 2:
        return np.sign(np.sin((xx + yy) * 0.9 + phase))
    return np.sign(np.sin(xx * 0.8 + phase) * np.sin(yy * 0.8 + phase))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered background float32 [h, w, 3]: smooth colour field, a random grating, noise, small shapes."""
    grid = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), np.float32).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.9)
    img += (rng.uniform(8, 25) * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * freq))[..., None]
    for _ in range(int(rng.integers(3, 8))):  # clutter: single-coloured rectangles, ellipses and bars
        col = rng.uniform(0, 255, 3).astype(np.float32)
        sh, sw = (int(rng.integers(2, max(3, s // 5))) for s in (h, w))
        y0, x0 = int(rng.integers(0, h - sh)), int(rng.integers(0, w - sw))
        kind = int(rng.integers(0, 3))
        if kind == 2:  # a thin bar
            if rng.random() < 0.5:
                sh = 2
            else:
                sw = 2
        region = img[y0:y0 + sh, x0:x0 + sw]
        m = _shape_mask(0, sh, sw) if kind == 1 else np.ones((sh, sw), bool)
        region[m] = col
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return img


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """One image: RGB uint8 [H, W, 3], label map uint8 [H, W] (0 bg, 1..len(CLASSES); no void band), objects (class, box)."""
    H, W = (int(round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    if H == W:
        W += 1
    img = _background(rng, H, W)
    lab = np.zeros((H, W), np.uint8)
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    classes: list[int] = []
    for _ in range(n):
        c = int(rng.choice(classes)) if classes and rng.random() < 0.25 else int(rng.integers(0, len(CLASSES)))
        classes.append(c)
        side = min(H, W) * rng.uniform(0.35, 0.65)
        ar = rng.uniform(0.6, 1.6)
        oh, ow = int(np.clip(side / np.sqrt(ar), 12, H - 2)), int(np.clip(side * np.sqrt(ar), 12, W - 2))
        kind = body_type(c)
        shape = _shape_mask(kind, oh, ow)
        best = None
        for _ in range(6):  # place with as little overlap with earlier objects as possible
            y0, x0 = int(rng.integers(0, H - oh + 1)), int(rng.integers(0, W - ow + 1))
            overlap = int(np.count_nonzero(lab[y0:y0 + oh, x0:x0 + ow][shape]))
            if best is None or overlap < best[0]:
                best = (overlap, y0, x0)
        _, y0, x0 = best
        body = BODY_COLOURS[kind] * rng.uniform(0.85, 1.15)
        tex = _texture(kind, oh, ow, float(rng.uniform(0, 6.3)))[..., None] * 22
        patch = body + tex + rng.normal(0, 5, size=(oh, ow, 3)).astype(np.float32)
        # the discriminative part: a small square, top half colour a, bottom half colour b
        ms = max(4, int(round(min(oh, ow) * rng.uniform(0.24, 0.32))))
        ms += ms % 2
        inside = None
        for _ in range(8):
            my = int(np.clip(oh / 2 + rng.uniform(-0.3, 0.3) * oh / 2 - ms / 2, 0, oh - ms))
            mx = int(np.clip(ow / 2 + rng.uniform(-0.3, 0.3) * ow / 2 - ms / 2, 0, ow - ms))
            if shape[my:my + ms, mx:mx + ms].all():
                inside = (my, mx)
                break
        my, mx = inside or (int(np.clip(oh * 0.6 - ms / 2, 0, oh - ms)), (ow - ms) // 2)
        a, b = MARKER_PAIRS[c]
        patch[my:my + ms // 2, mx:mx + ms] = MARKER_COLOURS[a]
        patch[my + ms // 2:my + ms, mx:mx + ms] = MARKER_COLOURS[b]
        shape = shape.copy()
        shape[my:my + ms, mx:mx + ms] = True
        img[y0:y0 + oh, x0:x0 + ow][shape] = patch[shape]
        lab[y0:y0 + oh, x0:x0 + ow][shape] = c + 1
    objects = []
    for c in sorted(set(classes)):
        ys, xs = np.nonzero(lab == c + 1)
        if ys.size:
            objects.append((c, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return np.clip(img, 0, 255).astype(np.uint8), lab, objects


def void_band(lab: np.ndarray) -> np.ndarray:
    """VOC-style mask: pixels whose 3×3 neighbourhood holds two labels become 255 (a ~2 px band at borders)."""
    from scipy.ndimage import maximum_filter, minimum_filter

    out = lab.copy()
    out[maximum_filter(lab, 3, mode="nearest") != minimum_filter(lab, 3, mode="nearest")] = 255
    return out


def _xml(image_id: str, w: int, h: int, objects: list) -> str:
    objs = "".join(
        f"<object><name>{CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for c, (x0, y0, x1, y1) in objects
    )
    return (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>1</segmented>{objs}</annotation>\n")


def _mat_bytes(lab: np.ndarray) -> bytes:
    """An SBD-style ``GTcls`` struct .mat (Segmentation, CategoriesPresent), with a fixed header for determinism."""
    import scipy.io

    buf = io.BytesIO()
    present = np.unique(lab)
    scipy.io.savemat(buf, {"GTcls": {"Segmentation": lab.astype(np.uint8),
                                     "CategoriesPresent": present[present > 0].astype(np.uint8)}})
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.ljust(116)  # the header text holds a creation time; fix it so bytes are reproducible
    return bytes(data)


def _split_ids(cfg: ToyCfg) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """(VOC train, VOC val, SBD-only, SBD train list, SBD val list), all sorted."""
    rng = np.random.default_rng([cfg.seed, 1])
    n_voc = cfg.n_train + cfg.n_val
    order = rng.permutation(n_voc)
    voc = [f"2007_{i + 1:06d}" for i in range(n_voc)]
    train = sorted(voc[i] for i in order[:cfg.n_train])
    val = sorted(voc[i] for i in order[cfg.n_train:])
    sbd_only = [f"2008_{i + 1:06d}" for i in range(cfg.n_sbd)]
    # real SBD overlaps VOC: it holds some VOC train and some VOC val images (hence "− VOC val" in train_aug)
    overlap = [t for t in train if rng.random() < 0.5] + [v for v in val if rng.random() < 0.25]
    sbd = np.array(sorted(sbd_only + overlap))
    in_train = rng.random(len(sbd)) < 0.8
    return train, val, sbd_only, sorted(sbd[in_train].tolist()), sorted(sbd[~in_train].tolist())


def _stamp(cfg: ToyCfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("root", None)
    return {"version": TOY_VERSION, "cfg": d}


def generate(root: Path, cfg: ToyCfg) -> tuple[Path, Path]:
    """Write the toy VOC2012 + SBD layout under ``root`` (unless the same cfg is already there); return (voc, sbd)."""
    root = Path(root)
    voc_root, sbd_root = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE"
    stamp_path = root / STAMP
    want = _stamp(cfg)
    if stamp_path.is_file() and voc_root.is_dir() and sbd_root.is_dir():
        try:
            if json.loads(stamp_path.read_text()) == want:
                logger.info("toy data in %s is up to date (same config), nothing to do", root)
                return voc_root, sbd_root
        except ValueError:
            pass
    if min(cfg.n_train, cfg.n_val) < 1 or cfg.n_sbd < 0 or cfg.size < 24:
        from ..errors import ConfigError

        raise ConfigError("data.toy: n_train and n_val must be ≥ 1, n_sbd ≥ 0 and size ≥ 24")
    stamp_path.unlink(missing_ok=True)
    train, val, sbd_only, sbd_train, sbd_val = _split_ids(cfg)
    sbd_ids = set(sbd_train) | set(sbd_val)
    all_ids = train + val + sbd_only
    logger.info("generating the toy dataset in %s: %d images of ~%d px", root, len(all_ids), cfg.size)
    with runs.atomic_path(root / "VOCdevkit") as tmp_voc, runs.atomic_path(root / "benchmark_RELEASE") as tmp_sbd:
        v, s = tmp_voc / "VOC2012", tmp_sbd / "dataset"
        for d in (v / "JPEGImages", v / "SegmentationClass", v / "Annotations", v / "ImageSets" / "Segmentation", s / "cls"):
            d.mkdir(parents=True)
        voc_seg = set(train) | set(val)
        for image_id in all_ids:
            rng = np.random.default_rng([cfg.seed, 2, int(image_id[:4]), int(image_id[5:])])
            img, lab, objects = render(rng, cfg.size)
            h, w = lab.shape
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            (v / "JPEGImages" / f"{image_id}.jpg").write_bytes(buf.getvalue())
            (v / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, w, h, objects))
            if image_id in voc_seg:
                (v / "SegmentationClass" / f"{image_id}.png").write_bytes(write_mask_png(None, void_band(lab)))
            if image_id in sbd_ids:
                (s / "cls" / f"{image_id}.mat").write_bytes(_mat_bytes(lab))
        for name, ids in (("train", train), ("val", val)):
            (v / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
        for name, ids in (("train", sbd_train), ("val", sbd_val)):
            (s / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    runs.write_json(stamp_path, want)
    return voc_root, sbd_root
