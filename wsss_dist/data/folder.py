"""``data=folder``: the user's own images, a labels file (CSV or JSON: image → class names), optional masks and
split lists, read for the shards stage (docs/usage.md, "Your own data").

* Labels, CSV: one line per image, ``image,class[,class...]`` (an image with no class: ``image,``); an optional
  header line whose first cell is ``image``; ``#`` lines are comments. JSON: ``{"image": ["class", ...], ...}`` or
  ``{"classes": [...], "images": {"image": [...]}}``. ``image`` is a file name in ``data.root`` (``cat1.jpg``,
  ``sub/cat1.jpg``) or its id (the name without extension); the id is the file's stem and must be letters, digits,
  ``_`` and ``-``.
* Classes: ``data.classes`` (comma-separated, or a text file with one name per line), else the JSON's
  ``classes``, else every name of the labels file, sorted. Label i+1 is the i-th name.
* Masks (``data.masks``): ``<id>.png``, palette or greyscale, of the image's size: 0 background, i the i-th class,
  255 ignore. Split lists (``data.split_lists``): ``train.txt``, ``val.txt`` (ids or file names, one per line).

Every malformed line is a one-line :class:`DataError` naming the file and the line (with the count of the others).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..registry import DATASETS

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
ENTRY = DATASETS["folder"]


def _raise_all(path: Path, problems: list[tuple[int, str]]) -> None:
    """One DataError for the first malformed line, counting (and naming the lines of) the others."""
    if not problems:
        return
    (line, what), rest = problems[0], problems[1:]
    more = f" (and {len(rest)} more malformed line{'s' * (len(rest) > 1)}: {', '.join(str(n) for n, _ in rest[:8])}" \
           f"{' ...' if len(rest) > 8 else ''})" if rest else ""
    raise DataError(f"{path}: line {line}: {what}{more}")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_labels_file(path: str | os.PathLike) -> tuple[list[tuple[int, str, list[str]]], list[str] | None]:
    """The entries ``(line, image, class names)`` of a CSV or JSON labels file, and the JSON's ``classes`` if any."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        return _read_json(path, text)
    entries, problems = [], []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and cells[0].lower() in ("image", "file", "filename", "id"):
            continue  # a header
        if not cells[0]:
            problems.append((n, "no image name in the first column (expected image,class[,class...])"))
            continue
        names = [c for c in cells[1:] if c]
        if len(cells) == 1:
            problems.append((n, f"{cells[0]!r} has no class column (expected image,class[,class...]; an image "
                                "with no class: image,)"))
            continue
        entries.append((n, cells[0], names))
    _raise_all(path, problems)
    return entries, None


def _line_of(text: str, needle: str) -> int:
    """The line of ``text`` where the JSON string ``needle`` first appears (1 when not found)."""
    i = text.find(json.dumps(needle))
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def _read_json(path: Path, text: str) -> tuple[list[tuple[int, str, list[str]]], list[str] | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    classes = None
    if isinstance(obj, dict) and "images" in obj:
        classes = obj.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise DataError(f"{path}: line {_line_of(text, 'classes')}: \"classes\" must be a list of names")
        obj = obj["images"]
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line 1: expected a JSON object {{image: [class, ...]}}, got a {type(obj).__name__}")
    entries, problems = [], []
    for image, names in obj.items():
        line = _line_of(text, image)
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            problems.append((line, f"{image!r}: expected a list of class names, got {json.dumps(names)[:60]}"))
            continue
        entries.append((line, image.strip(), [c.strip() for c in names if c.strip()]))
    _raise_all(path, problems)
    return entries, classes


def parse_classes(value: str | None) -> list[str] | None:
    """``data.classes``: a text file with one name per line, or comma-separated names; None when unset."""
    if not value:
        return None
    p = Path(value).expanduser()
    if p.is_file():
        names = [ln.strip() for ln in _read_text(p).splitlines() if ln.strip() and not ln.startswith("#")]
    else:
        names = [c.strip() for c in value.split(",") if c.strip()]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup or not names:
        raise DataError(f"data.classes={value}: {'class ' + repr(dup[0]) + ' named twice' if dup else 'no class names'}")
    if len(names) > 254:
        raise DataError(f"data.classes={value}: {len(names)} classes; at most 254 fit a label PNG (255 = ignore)")
    return names


class FolderSource:
    """Read-only access to a folder of images with a labels file (same interface as :class:`.voc.VOCSource`)."""

    splits: tuple[str, ...] = ENTRY.splits
    seg_splits: tuple[str, ...] = ENTRY.seg_splits

    def __init__(self, root: str | os.PathLike, labels: str | os.PathLike, classes: str | None = None,
                 masks: str | os.PathLike | None = None, split_lists: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser()
        self.labels_file = Path(labels).expanduser()
        self.masks_dir = Path(masks).expanduser() if masks else None
        self.lists_dir = Path(split_lists).expanduser() if split_lists else None
        self.classes_value = classes
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found (data.root)")
        if self.masks_dir is not None and not self.masks_dir.is_dir():
            raise DataError(f"{self.masks_dir}: mask folder not found (data.masks)")
        entries, json_classes = read_labels_file(self.labels_file)
        given = parse_classes(classes)
        names = given or json_classes or sorted({c for _, _, cs in entries for c in cs})
        if not names:
            raise DataError(f"{self.labels_file}: names no class at all")
        self.classes: tuple[str, ...] = tuple(names)
        index = {c: i for i, c in enumerate(self.classes)}
        self._labels: dict[str, np.ndarray] = {}
        self._paths: dict[str, Path] = {}
        self._order: list[str] = []
        problems: list[tuple[int, str]] = []
        for line, image, cs in entries:
            path = self._find_image(image)
            if path is None:
                problems.append((line, f"image {image!r} not found in {self.root}"))
                continue
            image_id = path.stem
            if not _ID_RE.match(image_id):
                problems.append((line, f"image {image!r}: its id {image_id!r} (the file name without extension) "
                                       "must be letters, digits, '_' and '-'; rename the file"))
                continue
            if image_id in self._labels:
                problems.append((line, f"image {image_id!r} listed twice"))
                continue
            unknown = [c for c in cs if c not in index]
            if unknown:
                problems.append((line, f"unknown class {unknown[0]!r}; the classes are {', '.join(self.classes[:10])}"
                                       f"{' ...' if len(self.classes) > 10 else ''}"))
                continue
            y = np.zeros(len(self.classes), np.float32)
            y[[index[c] for c in cs]] = 1
            self._labels[image_id], self._paths[image_id] = y, path
            self._order.append(image_id)
        _raise_all(self.labels_file, problems)
        if not self._order:
            raise DataError(f"{self.labels_file}: lists no image")

    def _find_image(self, image: str) -> Path | None:
        if not image or ".." in Path(image).parts or Path(image).is_absolute():
            return None  # never a file outside data.root
        p = self.root / image
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            return p
        for ext in IMAGE_EXTS:
            for e in (ext, ext.upper()):
                q = self.root / f"{image}{e}"
                if q.is_file():
                    return q
        return None

    # ---- splits ----
    def list_files(self, split: str) -> list[Path]:
        """The files a split is built from (the labels file, and its split list when given)."""
        files = [self.labels_file]
        name = "train" if split == "train_aug" else split
        if self.lists_dir is not None and (self.lists_dir / f"{name}.txt").is_file():
            files.append(self.lists_dir / f"{name}.txt")
        return files

    def _read_split(self, split: str) -> list[str] | None:
        if self.lists_dir is None:
            return None
        path = self.lists_dir / f"{split}.txt"
        if not path.is_file():
            return None
        ids, problems = [], []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            tok = line.strip()
            if not tok or tok.startswith("#"):
                continue
            image_id = Path(tok).stem if Path(tok).suffix.lower() in IMAGE_EXTS else tok
            if image_id not in self._labels:
                problems.append((n, f"{tok!r} is not an image of the labels file {self.labels_file}"))
                continue
            ids.append(image_id)
        _raise_all(path, problems)
        if not ids:
            raise DataError(f"{path}: split {split!r} is empty")
        return list(dict.fromkeys(ids))

    def ids(self, split: str) -> list[str]:
        """Image ids of ``split``: its split list, else train = every labelled image (train_aug = train), val =
        the images with a mask (else train)."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; allowed: {', '.join(self.splits)}")
        name = "train" if split == "train_aug" else split
        listed = self._read_split(name)
        if listed is not None:
            return listed
        if name == "train":
            return list(self._order)
        with_mask = [i for i in self._order if self.mask_path(i) is not None]
        return with_mask or list(self._order)

    # ---- per-image files ----
    def jpeg_path(self, image_id: str) -> Path:
        """The image file of an id."""
        return self._paths[image_id]

    def jpeg_bytes(self, image_id: str) -> bytes:
        """JPEG bytes: a .jpg as it is; another format decoded and encoded as JPEG (quality 95, deterministic)."""
        p = self._paths[image_id]
        data = p.read_bytes()
        if p.suffix.lower() in (".jpg", ".jpeg") and data.startswith(b"\xff\xd8"):
            return data
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for broken files
            raise DataError(f"{p}: broken image ({type(e).__name__}: {e})") from None
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    def mask_path(self, image_id: str) -> Path | None:
        """``data.masks/<id>.png`` when it exists."""
        if self.masks_dir is None:
            return None
        p = self.masks_dir / f"{image_id}.png"
        return p if p.is_file() else None

    def expected_mask_path(self, image_id: str) -> Path:
        """Where the mask of an image is expected (for errors)."""
        return (self.masks_dir or self.root) / f"{image_id}.png"

    def describe(self) -> dict[str, str]:
        """The manifest's ``source`` entry."""
        return {"root": str(self.root), "labels": str(self.labels_file), "masks": str(self.masks_dir or ""),
                "split_lists": str(self.lists_dir or "")}

    def extra_files(self) -> list[Path]:
        """The labels file and the classes file (when ``data.classes`` names one)."""
        out = [self.labels_file]
        if self.classes_value and Path(self.classes_value).expanduser().is_file():
            out.append(Path(self.classes_value).expanduser())
        return out

    def files(self, image_id: str) -> list[Path]:
        """Every existing source file a sample of ``image_id`` depends on."""
        return [p for p in (self._paths[image_id], self.mask_path(image_id)) if p is not None]

    def mask(self, image_id: str) -> np.ndarray | None:
        """The ground-truth mask uint8 [H, W] (0 bg, 1..K, 255 ignore) or None; checked against the image."""
        from .voc import read_mask_png

        p = self.mask_path(image_id)
        if p is None:
            return None
        m = read_mask_png(p)
        bad = np.setdiff1d(np.unique(m), np.r_[np.arange(len(self.classes) + 1), ENTRY.ignore])
        if bad.size:
            raise DataError(f"{p}: mask values must be 0..{len(self.classes)} (the classes of {self.labels_file}) "
                            f"or {ENTRY.ignore}, found {bad.tolist()[:5]}")
        with Image.open(self._paths[image_id]) as img:
            w, h = img.size
        if m.shape != (h, w):
            raise DataError(f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from the image's {w}x{h}")
        return m

    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels float32[K] from the labels file."""
        return self._labels[image_id].copy()
