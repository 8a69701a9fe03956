"""Pascal VOC 2012 and SBD readers: class names, palette, split lists, image-level labels, masks."""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..registry import DATASETS

logger = logging.getLogger(__name__)

VOC = DATASETS["voc"]  # the registry entry: classes, ignore value, splits
CLASSES: tuple[str, ...] = VOC.classes
CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}  # index into the labels (no bg)
NUM_CLASSES = VOC.num_classes
IGNORE = VOC.ignore
_LIST_RE = re.compile(r"^(?:/?JPEGImages/)?([A-Za-z0-9_-]+)(?:\.jpg)?$")  # <id>, <id>.jpg or psa's /JPEGImages/<id>.jpg


def _voc_palette() -> np.ndarray:
    """The VOC colour map: bit i of the label spread over the high bits of R, G, B (256×3 uint8)."""
    pal = np.zeros((256, 3), np.uint8)
    for label in range(256):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        pal[label] = (r, g, b)
    return pal


PALETTE: np.ndarray = _voc_palette()
PALETTE.setflags(write=False)


def write_mask_png(path: str | os.PathLike | None, mask: np.ndarray) -> bytes:
    """Encode a uint8 label map as a VOC palette PNG; write it to ``path`` (atomically) when given; return the bytes."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    img = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    img.putpalette(PALETTE.tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        from ..runs import atomic_write

        atomic_write(path, data)
    return data


def read_mask_png(path_or_bytes: str | os.PathLike | bytes) -> np.ndarray:
    """A label PNG (palette or greyscale) as uint8 [H, W] of class indices (never RGB); a broken file is a DataError."""
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray))
    src = io.BytesIO(path_or_bytes) if is_bytes else path_or_bytes
    name = "<bytes>" if is_bytes else str(path_or_bytes)
    try:
        with Image.open(src) as img:
            if img.mode not in ("P", "L"):
                raise DataError(f"{name}: a label PNG must be palette (P) or greyscale (L), got mode {img.mode}")
            img.load()  # a truncated file fails here ("Truncated File Read")
            return np.array(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"{name}: broken mask PNG ({type(e).__name__}: {e}); replace the file or remove its id "
                        "from the split list") from None


def _read_list(path: Path) -> list[str]:
    """Ids of a list file: bare ids (VOC, irn) or psa lines ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {e.start}); save the list as UTF-8 or ASCII "
                        "text") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        tok = line.split()
        if not tok:
            continue
        m = _LIST_RE.match(tok[0])
        image_id = m.group(1) if m else ""
        if not image_id:
            raise DataError(f"{path}: line {n}: {tok[0]!r} is not an image id (letters, digits, '_', '-'; "
                            "or a psa line /JPEGImages/<id>.jpg ...)")
        ids.append(image_id)
    return ids


def preflight(voc_root: str | os.PathLike, sbd_root: str | os.PathLike | None = None,
              lists_dir: str | os.PathLike | None = None, sample: int = 20) -> list[str]:
    """Before any job: the VOC (and SBD) folders exist, every split list is there and not empty, and the first
    ``sample`` ids of each split have their JPEG (DataError naming the path otherwise). Returns warnings: train_aug
    without SBD (and without a train_aug list) is VOC train only, with the counts."""
    source = VOCSource(voc_root, sbd_root, lists_dir)
    if not (source.voc_root / "JPEGImages").is_dir():
        raise DataError(f"{source.voc_root}: no JPEGImages folder (data.voc_root must be .../VOCdevkit/VOC2012)")
    counts = {}
    for split in ("train", "val", "train_aug"):
        ids = source.ids(split)
        counts[split] = len(ids)
        for image_id in ids[:sample]:
            source.jpeg_path(image_id)  # DataError naming the image when it is missing
    warnings = []
    if source.sbd_root is None and source.lists_dir is None:
        warnings.append(f"data.sbd_root is not set: train_aug is VOC train only ({counts['train_aug']:,} images, not "
                        "10,582 with SBD); set data.sbd_root=.../benchmark_RELEASE for the papers' training set")
    return warnings


class VOCSource:
    """Read-only access to a VOC2012 folder (+ optional SBD ``benchmark_RELEASE`` and psa/irn list folder)."""

    classes: tuple[str, ...] = CLASSES
    splits: tuple[str, ...] = VOC.splits
    seg_splits: tuple[str, ...] = VOC.seg_splits

    def __init__(self, voc_root: str | os.PathLike, sbd_root: str | os.PathLike | None = None,
                 lists_dir: str | os.PathLike | None = None) -> None:
        self.voc_root = Path(voc_root)
        self.sbd_root = Path(sbd_root) if sbd_root else None
        self.lists_dir = Path(lists_dir) if lists_dir else None
        self._cls_labels: dict[str, np.ndarray] | None = None
        if not self.voc_root.is_dir():
            raise DataError(f"{self.voc_root}: VOC folder not found (data.voc_root must hold JPEGImages)")
        if self.sbd_root is not None and not (self.sbd_root / "dataset").is_dir():
            raise DataError(f"{self.sbd_root}: SBD folder must hold dataset/ (benchmark_RELEASE)")

    # ---- splits ----
    def list_files(self, split: str) -> list[Path]:
        """The list files a split is built from."""
        seg = self.voc_root / "ImageSets" / "Segmentation"
        if split in ("train", "val"):
            return [seg / f"{split}.txt"]
        if split == "train_aug":
            if self.lists_dir is not None:
                return [self.lists_dir / "train_aug.txt"]
            files = [seg / "train.txt", seg / "val.txt"]
            if self.sbd_root is not None:
                files += [self.sbd_root / "dataset" / "train.txt", self.sbd_root / "dataset" / "val.txt"]
            return files
        raise DataError(f"unknown split {split!r}; allowed: train, val, train_aug")

    def ids(self, split: str) -> list[str]:
        """Image ids of ``split`` (train, val: VOC seg lists; train_aug: VOC train ∪ SBD train/val − VOC val)."""
        files = self.list_files(split)
        if split in ("train", "val") or self.lists_dir is not None:
            ids = list(dict.fromkeys(_read_list(files[0])))
        else:
            train, val = _read_list(files[0]), set(_read_list(files[1]))
            sbd = [i for f in files[2:] for i in _read_list(f)]
            ids = sorted(set(train).union(sbd) - val)
        if not ids:
            raise DataError(f"{', '.join(map(str, files))}: split {split!r} is empty")
        return ids

    # ---- per-image files ----
    def jpeg_path(self, image_id: str) -> Path:
        """The JPEG of an id (VOC JPEGImages, else SBD dataset/img)."""
        p = self.voc_root / "JPEGImages" / f"{image_id}.jpg"
        if not p.is_file() and self.sbd_root is not None:
            q = self.sbd_root / "dataset" / "img" / f"{image_id}.jpg"
            if q.is_file():
                return q
        if not p.is_file():
            raise DataError(f"{p}: image not found (listed in a split list)")
        return p

    def jpeg_bytes(self, image_id: str) -> bytes:
        """The original JPEG bytes (never re-encoded)."""
        return self.jpeg_path(image_id).read_bytes()

    def mask_path(self, image_id: str) -> Path | None:
        """VOC SegmentationClass PNG, else SBD cls .mat, else None."""
        p = self.voc_root / "SegmentationClass" / f"{image_id}.png"
        if p.is_file():
            return p
        if self.sbd_root is not None:
            q = self.sbd_root / "dataset" / "cls" / f"{image_id}.mat"
            if q.is_file():
                return q
        return None

    def expected_mask_path(self, image_id: str) -> Path:
        """Where the mask of an image of a segmentation list is expected (for errors)."""
        return self.voc_root / "SegmentationClass" / f"{image_id}.png"

    def describe(self) -> dict[str, str]:
        """The manifest's ``source`` entry: the folders read."""
        return {"voc_root": str(self.voc_root), "sbd_root": str(self.sbd_root or ""),
                "lists_dir": str(self.lists_dir or "")}

    def extra_files(self) -> list[Path]:
        """Files besides the lists and per-image files that the shards depend on (cls_labels.npy)."""
        return [self.lists_dir / "cls_labels.npy"] if self.lists_dir is not None else []

    def xml_path(self, image_id: str) -> Path:
        """The VOC annotation XML path (it may not exist)."""
        return self.voc_root / "Annotations" / f"{image_id}.xml"

    def files(self, image_id: str) -> list[Path]:
        """Every existing source file a sample of ``image_id`` depends on (for change detection)."""
        out = [self.jpeg_path(image_id), self.xml_path(image_id), self.mask_path(image_id)]
        return [p for p in out if p is not None and p.is_file()]

    def mask(self, image_id: str) -> np.ndarray | None:
        """Ground-truth mask uint8 [H, W] (0 bg, 1..NUM_CLASSES classes, 255 void) or None; validated against the image."""
        p = self.mask_path(image_id)
        if p is None:
            return None
        if p.suffix == ".png":
            m = read_mask_png(p)
        else:
            m = _read_sbd_mat(p)
        bad = np.setdiff1d(np.unique(m), np.r_[np.arange(NUM_CLASSES + 1), IGNORE])
        if bad.size:
            raise DataError(f"{p}: mask values must be 0..{NUM_CLASSES} or {IGNORE}, found {bad.tolist()[:5]}")
        with Image.open(self.jpeg_path(image_id)) as img:
            w, h = img.size
        if m.shape != (h, w):
            raise DataError(f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from the image's {w}x{h}")
        return m

    # ---- labels ----
    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels float32[NUM_CLASSES]: VOC XML object names, else the list folder's cls_labels.npy, else the mask."""
        xml = self.xml_path(image_id)
        if xml.is_file():
            return _xml_labels(xml)
        if self.lists_dir is not None:
            table = self.cls_labels()
            if image_id in table:
                return table[image_id]
        m = self.mask(image_id)
        if m is None:
            raise DataError(f"{xml}: no annotation XML, no cls_labels.npy entry and no mask for image {image_id}")
        return mask_labels(m)

    def cls_labels(self) -> dict[str, np.ndarray]:
        """``lists_dir/cls_labels.npy`` as {id: float32[NUM_CLASSES]} (psa str keys or irn int keys)."""
        if self._cls_labels is None:
            if self.lists_dir is None:
                raise DataError("cls_labels.npy needs data.lists_dir")
            self._cls_labels = load_cls_labels(self.lists_dir / "cls_labels.npy")
        return self._cls_labels


def load_cls_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A psa/irn ``cls_labels.npy`` dict as {VOC id string: float32[NUM_CLASSES]}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cls_labels.npy not found")
    # The file is a pickled Python dict inside a .npy. It is unpickled by _LabelsUnpickler, which can only rebuild
    # numpy arrays, dtypes and scalars (and builtin containers): a crafted file cannot run code.
    try:
        table: Any = _load_object_npy(path)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not what we expect
        raise DataError(f"{path}: cannot read as a dict of image-level labels ({type(e).__name__}: {e})") from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a dict id -> float32[{NUM_CLASSES}], got {type(table).__name__}")
    out = {}
    for k, v in table.items():
        key = k if isinstance(k, str) else _decode_int_id(int(k))
        vec = np.asarray(v, dtype=np.float32).reshape(-1)
        if vec.shape != (NUM_CLASSES,):
            raise DataError(f"{path}: labels of {key} have shape {vec.shape}, expected ({NUM_CLASSES},)")
        out[key] = vec
    return out


class _LabelsUnpickler(pickle.Unpickler):
    """Unpickles only what a psa/irn ``cls_labels.npy`` holds: numpy arrays, dtypes and scalars in builtin containers."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allowed globals; anything else is refused (never imported or called)."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.") and module.endswith("multiarray"):
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray  # type: ignore[no-redef]
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _load_object_npy(path: Path) -> Any:
    """A .npy file's content; object arrays are unpickled with :class:`_LabelsUnpickler` (a 0-d one gives its item)."""
    from numpy.lib import format as npy_format

    with open(path, "rb") as f:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        obj = _LabelsUnpickler(f).load()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj.item()
    return obj


def _decode_int_id(n: int) -> str:
    """irn's int ids (2007000032) back to VOC ids (2007_000032)."""
    s = str(n)
    return f"{s[:4]}_{s[4:]}"


def _xml_labels(path: Path) -> np.ndarray:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: not a valid annotation XML ({e})") from None
    y = np.zeros(NUM_CLASSES, np.float32)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASS_TO_INDEX:
            raise DataError(f"{path}: unknown object name {name!r}; expected one of the {NUM_CLASSES} VOC classes")
        y[CLASS_TO_INDEX[name]] = 1
    return y


def mask_labels(mask: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Image-level labels float32[num_classes] (default VOC's) from the classes present in a mask."""
    y = np.zeros(num_classes, np.float32)
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    y[present.astype(int) - 1] = 1
    return y


def _read_sbd_mat(path: Path) -> np.ndarray:
    """SBD ``cls/<id>.mat``: MATLAB struct GTcls with field Segmentation (uint8 class indices)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        seg = mat["GTcls"].Segmentation
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: expected an SBD .mat with struct GTcls.Segmentation ({e})") from None
    seg = np.asarray(seg)
    ok = seg.ndim == 2 and seg.dtype.kind in "iuf" and bool(np.all(seg == np.round(seg)))
    if not ok or seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
        raise DataError(f"{path}: GTcls.Segmentation must be a 2-D integer map of class indices, got {seg.dtype} {seg.shape}")
    return seg.astype(np.uint8)
