"""``data=coco``: MS COCO 2014 as a WSSS dataset (../shared/notes/reference-implementations.md §16), read for the
shards stage.

Layout: ``data.coco_root`` holds ``train2014/``, ``val2014/`` (the JPEGs) and
``annotations/instances_{train,val}2014.json``. Splits: ``train`` and ``val`` = the images with at least one
annotation (82,081 and 40,137 of 82,783 and 40,504: the lists the WSSS references use), in file-name order.

* Classes: the 80 categories sorted by their ids (1..90 with 10 gaps) get the contiguous labels 1..80 (background 0);
  the names must be :data:`wsss_dist.registry.COCO_CLASSES`.
* Image-level labels: the categories of all the image's annotations, crowd ones included (ReCAM).
* Masks, rendered from the instances with pycocotools (polygons, RLE and uncompressed RLE): non-crowd objects painted
  in annotation order, a later object over an earlier one (ReCAM's ``annToMask``). Crowd regions (``data.coco_crowd``):
  ``ignore`` (default): 255 where no non-crowd object covers them (painted first, objects over them); ``background``:
  left 0 (ReCAM, reproduces its masks); ``class``: painted with their category in annotation order like any object
  (coco2voc keeps crowd as class).
* ``data.coco_masks``: a folder of already-rendered label PNGs (``<split>2014/<name>.png`` or ``<name>.png``; values
  0..80 and 255) used instead of rendering; image-level labels still come from the instances JSON.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..registry import DATASETS

logger = logging.getLogger(__name__)

ENTRY = DATASETS["coco"]
CROWD_RULES = ("ignore", "background", "class")


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The binary mask uint8 [H, W] of one COCO ``segmentation`` (polygons, RLE or uncompressed RLE), by pycocotools."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise DataError("data=coco needs pycocotools: pip install 'wsss-dist[coco]'") from None
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation of type {type(segmentation).__name__}")
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8).reshape(height, width)


def render_mask(anns: list[dict], height: int, width: int, label_of: dict[int, int], crowd: str = "ignore",
                ignore: int = ENTRY.ignore) -> np.ndarray:
    """The semantic label map uint8 [H, W] of an image's annotations (the module docstring's rules)."""
    if crowd not in CROWD_RULES:
        raise ValueError(f"crowd={crowd!r}: one of {', '.join(CROWD_RULES)}")
    out = np.zeros((height, width), np.uint8)
    if crowd == "ignore":
        for a in anns:
            if a.get("iscrowd"):
                out[annotation_mask(a["segmentation"], height, width) > 0] = ignore
    for a in anns:
        if a.get("iscrowd") and crowd != "class":
            continue
        out[annotation_mask(a["segmentation"], height, width) > 0] = label_of[a["category_id"]]
    return out


class COCOSource:
    """Read-only access to COCO-2014 (same interface as :class:`.voc.VOCSource`); each split's instances JSON is read
    when the split is first asked for."""

    classes: tuple[str, ...] = ENTRY.classes
    splits: tuple[str, ...] = ENTRY.splits
    seg_splits: tuple[str, ...] = ENTRY.seg_splits
    lists_dir = None

    def __init__(self, root: str | os.PathLike | None, masks: str | os.PathLike | None = None,
                 crowd: str = "ignore") -> None:
        if not root:
            raise DataError("data=coco needs data.coco_root (holding train2014/, val2014/ and annotations/)")
        self.root = Path(root).expanduser()
        self.masks_dir = Path(masks).expanduser() if masks else None
        if crowd not in CROWD_RULES:
            raise DataError(f"data.coco_crowd={crowd}: one of {', '.join(CROWD_RULES)}")
        self.crowd = crowd
        if not self.root.is_dir():
            raise DataError(f"{self.root}: COCO folder not found (data.coco_root)")
        for split in self.splits:
            if not self.annotations(split).is_file():
                raise DataError(f"{self.annotations(split)}: instances file not found (data.coco_root must hold "
                                f"annotations/instances_{split}2014.json)")
            if not (self.root / f"{split}2014").is_dir():
                raise DataError(f"{self.root / f'{split}2014'}: image folder not found")
        if self.masks_dir is not None and not self.masks_dir.is_dir():
            raise DataError(f"{self.masks_dir}: mask folder not found (data.coco_masks)")
        self._index: dict[str, dict[str, Any]] = {}
        self._split_of: dict[str, str] = {}

    def annotations(self, split: str) -> Path:
        """The instances JSON of ``split``."""
        return self.root / "annotations" / f"instances_{split}2014.json"

    def index(self, split: str) -> dict[str, Any]:
        """``{"ids", "images": {id: image entry}, "anns": {id: [annotations]}, "label_of": {category id: 1..80}}``."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; allowed: {', '.join(self.splits)}")
        if split in self._index:
            return self._index[split]
        path = self.annotations(split)
        try:
            data = json.loads(path.read_bytes())
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            images, annotations = data["images"], data["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
        names = tuple(str(c.get("name")) for c in cats)
        if names != self.classes:
            bad = next((f"{a!r} where {b!r} was expected" for a, b in zip(names, self.classes) if a != b),
                       f"{len(names)} categories, expected {len(self.classes)}")
            raise DataError(f"{path}: its categories in id order are not COCO's 80 ({bad})")
        label_of = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        by_id = {int(im["id"]): im for im in images}
        anns: dict[int, list[dict]] = {}
        for a in annotations:
            if int(a["category_id"]) not in label_of:
                raise DataError(f"{path}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
            if int(a["image_id"]) not in by_id:
                raise DataError(f"{path}: annotation {a.get('id')} names image {a['image_id']}, not in its images")
            anns.setdefault(int(a["image_id"]), []).append(a)
        keyed = {Path(by_id[i]["file_name"]).stem: i for i in anns}
        ids = sorted(keyed)
        dropped = len(by_id) - len(ids)
        logger.info("coco %s: %d images with annotations (%d without, dropped)", split, len(ids), dropped)
        self._index[split] = {"ids": ids, "images": {k: by_id[i] for k, i in keyed.items()},
                              "anns": {k: anns[i] for k, i in keyed.items()}, "label_of": label_of}
        for k in ids:
            self._split_of[k] = split
        return self._index[split]

    def restricted(self, ids: list[str]) -> "COCOSource":
        """A copy that knows only ``ids`` (their image entries and annotations): what one packing process is sent
        for one shard, instead of the whole instances index."""
        import copy

        part = copy.copy(self)
        part._index, part._split_of = {}, {}
        for image_id in ids:
            split, idx = self._entry(image_id)
            sub = part._index.setdefault(split, {"ids": [], "images": {}, "anns": {}, "label_of": idx["label_of"]})
            sub["ids"].append(image_id)
            sub["images"][image_id], sub["anns"][image_id] = idx["images"][image_id], idx["anns"][image_id]
            part._split_of[image_id] = split
        return part

    def _entry(self, image_id: str) -> tuple[str, dict[str, Any]]:
        if image_id not in self._split_of:
            for split in self.splits:
                self.index(split)
        split = self._split_of[image_id]
        return split, self._index[split]

    # ---- splits ----
    def list_files(self, split: str) -> list[Path]:
        """The files a split is built from: its instances JSON."""
        return [self.annotations(split)]

    def ids(self, split: str) -> list[str]:
        """Image ids (file names without extension) of ``split`` that have at least one annotation."""
        ids = list(self.index(split)["ids"])
        if not ids:
            raise DataError(f"{self.annotations(split)}: split {split!r} has no annotated image")
        return ids

    # ---- per-image files ----
    def jpeg_path(self, image_id: str) -> Path:
        """The JPEG of an id (``<split>2014/<file_name>``)."""
        split, idx = self._entry(image_id)
        p = self.root / f"{split}2014" / idx["images"][image_id]["file_name"]
        if not p.is_file():
            raise DataError(f"{p}: image not found (listed in {self.annotations(split)})")
        return p

    def jpeg_bytes(self, image_id: str) -> bytes:
        """The original JPEG bytes (never re-encoded; grayscale ones are made RGB when decoded)."""
        return self.jpeg_path(image_id).read_bytes()

    def mask_path(self, image_id: str) -> Path | None:
        """The pre-rendered label PNG of an id when ``data.coco_masks`` is set (else None: masks are rendered)."""
        if self.masks_dir is None:
            return None
        split, _ = self._entry(image_id)
        for p in (self.masks_dir / f"{split}2014" / f"{image_id}.png", self.masks_dir / f"{image_id}.png"):
            if p.is_file():
                return p
        return None

    def expected_mask_path(self, image_id: str) -> Path:
        """Where a pre-rendered mask is expected (for errors)."""
        split, _ = self._entry(image_id)
        return (self.masks_dir or self.root) / f"{split}2014" / f"{image_id}.png"

    def describe(self) -> dict[str, str]:
        """The manifest's ``source`` entry (the crowd rule is in its ``data`` settings)."""
        return {"coco_root": str(self.root), "coco_masks": str(self.masks_dir or ""), "coco_crowd": self.crowd}

    def extra_files(self) -> list[Path]:
        """Nothing besides the instances JSONs (the splits' list files)."""
        return []

    def files(self, image_id: str) -> list[Path]:
        """The JPEG and, when pre-rendered, the mask of an id."""
        return [p for p in (self.jpeg_path(image_id), self.mask_path(image_id)) if p is not None]

    def mask(self, image_id: str) -> np.ndarray:
        """The semantic mask uint8 [H, W] (0 bg, 1..80, 255 ignore): pre-rendered, else rendered from the instances."""
        split, idx = self._entry(image_id)
        with Image.open(self.jpeg_path(image_id)) as img:
            w, h = img.size
        p = self.mask_path(image_id)
        if self.masks_dir is not None:
            if p is None:
                raise DataError(f"{self.expected_mask_path(image_id)}: mask not found in data.coco_masks")
            from .voc import read_mask_png

            m = read_mask_png(p)
            bad = np.setdiff1d(np.unique(m), np.r_[np.arange(len(self.classes) + 1), ENTRY.ignore])
            if bad.size:
                raise DataError(f"{p}: mask values must be 0..{len(self.classes)} or {ENTRY.ignore}, found "
                                f"{bad.tolist()[:5]} (raw COCO category ids? remap them to 1..80)")
            where = p
        else:
            im = idx["images"][image_id]
            if (int(im["width"]), int(im["height"])) != (w, h):
                raise DataError(f"{self.annotations(split)}: image {image_id} is {im['width']}x{im['height']} there, "
                                f"its JPEG is {w}x{h}")
            try:
                m = render_mask(idx["anns"][image_id], h, w, idx["label_of"], self.crowd)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.annotations(split)}: a segmentation of image {image_id} cannot be rendered "
                                f"({type(e).__name__}: {e})") from None
            where = self.annotations(split)
        if m.shape != (h, w):
            raise DataError(f"{where}: mask of {image_id} is {m.shape[1]}x{m.shape[0]}, its image {w}x{h}")
        return m

    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels float32[80]: the categories of all the image's annotations (crowd included)."""
        _, idx = self._entry(image_id)
        y = np.zeros(len(self.classes), np.float32)
        for a in idx["anns"][image_id]:
            y[idx["label_of"][int(a["category_id"])] - 1] = 1
        return y
