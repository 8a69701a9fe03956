"""Tar I/O for shards: writing samples into a tar, the per-shard records of stage outputs (sha256 of the shard, its
input shard, its confusion matrix), and safe reading: explicit decoders, never unpickling, broken samples skipped and
counted (:class:`SkipCounter`), a truncated or corrupt tar, or one whose sha256 differs from the manifest or record
next to it, a :class:`DataError` naming the file."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .. import runs
from ..config import STAGES
from ..errors import DataError
from ..registry import VOC_LABELS

logger = logging.getLogger(__name__)


MANIFEST = "manifest.json"


PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})


_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # no '.', '/', '..', NUL, absolute paths: one plain file-name stem


_EXT_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def label_values(num_labels: int = VOC_LABELS) -> np.ndarray:
    """bool[256]: the values a label PNG of ``num_labels`` labels may hold (0 bg, 1..num_labels-1, 255 ignore)."""
    ok = np.zeros(256, bool)
    ok[:num_labels] = ok[255] = True
    return ok


LABEL_VALUES = label_values()  # VOC's (read-only): background, its classes and 255 (ignore)
LABEL_VALUES.setflags(write=False)


class SkipCounter:
    """Counts samples read and broken samples skipped; its :meth:`handler` is the WebDataset exception handler."""

    def __init__(self) -> None:
        self.seen = 0
        self.skipped = 0

    def handler(self, exn: BaseException) -> bool:
        """Skip-and-count for broken data (warning); a :class:`DataError` (refused content) is re-raised."""
        if isinstance(exn, DataError):
            raise exn
        self.skipped += 1
        logger.warning("skipped broken data (%d so far): %s", self.skipped, _short(exn))
        return True

    def tar_handler(self, exn: BaseException) -> bool:
        """A tar that cannot be read (corrupt header, duplicate members, unreadable file) is an error, never a skip.

        Skipping would silently lose the rest of the tar; the error names the file so it can be rebuilt.
        """
        if isinstance(exn, DataError):
            raise exn
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), None)
        raise DataError(f"{url or 'shard'}: corrupt or unreadable tar ({_short(exn)}); rebuild it "
                        "(stage=shards, or rerun the stage that wrote it)") from None

    def fraction(self) -> float:
        """Skipped / (read + skipped); 0 when nothing was read."""
        total = self.seen + self.skipped
        return self.skipped / total if total else 0.0

    def check(self, max_fraction: float, what: str = "reading shards") -> None:
        """Raise :class:`DataError` when more than ``max_fraction`` of the samples were skipped."""
        check_skip_fraction(self.skipped, self.seen + self.skipped, max_fraction, what)


def check_skip_fraction(skipped: int, total: int, max_fraction: float, what: str) -> None:
    """DataError when more than ``max_fraction`` of ``total`` samples were broken and skipped (the one rule for all)."""
    if total and skipped > max_fraction * total:
        raise DataError(f"{what}: {skipped} of {total} samples were broken and skipped, more than "
                        f"data.max_skip_fraction={max_fraction}; rebuild the shards (stage=shards) or raise the limit")


def _short(exn: BaseException) -> str:
    msg = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {msg[:300]}"


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or key.startswith("__"):
        raise DataError(f"shard key {key!r} refused: keys must be plain names of letters, digits, '_' and '-' "
                        "(no '/', '..', '.', NUL or absolute paths)")
    return key


def _encode(name: str, value: Any) -> bytes:
    if not _EXT_RE.match(name) or name.rsplit(".", 1)[-1].lower() in PICKLE_EXTS:
        raise DataError(f"shard member name {name!r} refused: use plain extensions such as jpg, png, npy, json")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, str):
        return value.encode("utf-8")
    if name.endswith("json"):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"shard member {name!r}: cannot store a {type(value).__name__} (give bytes, str or np.ndarray)")


def tar_bytes(samples: Iterable[dict]) -> tuple[bytes, int]:
    """``samples`` (``__key__`` + name → bytes/str/ndarray) as the bytes of one reproducible tar, and their count."""
    import tarfile

    # the bytes of webdataset's TarWriter(encoder=False, mtime=0) (tests/test_shards.py compares them), written with
    # the standard library: a packing process never imports webdataset and torch (~2 s of CPU each)
    buf, n = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            key = _check_key(sample.get("__key__"))
            out = {k: _encode(k, v) for k, v in sample.items() if not k.startswith("__")}
            for k in sorted(k for k in out if not k.startswith("_")):
                v = out[k].encode("utf-8") if isinstance(out[k], str) else out[k]
                if not isinstance(v, (bytes, bytearray, memoryview)):
                    raise ValueError(f"{key}.{k}: not bytes after encoding ({type(v).__name__})")
                info = tarfile.TarInfo(f"{key}.{k}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(v), 0, 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(v))  # int mtime: reproducible, no pax headers
            n += 1
    return buf.getvalue(), n


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write ``samples`` as one tar that appears only whole (atomic rename); returns the count."""
    data, n = tar_bytes(samples)
    runs.atomic_write(path, data)
    return n


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def record_path(path: str | Path) -> Path:
    """The per-shard record written beside an output shard of a stage: ``<shard>.json`` (samples, sha256, stage)."""
    return Path(f"{path}.json")


def record_problem(path: str | Path) -> str | None:
    """Why an output shard does not match the sha256 of its record (None when it does, or has no such record)."""
    rec = record_path(path)
    if not rec.is_file():
        return None
    try:
        want = runs.read_json(rec).get("sha256")
    except (ValueError, AttributeError):
        return f"its record {rec} is not valid JSON"
    if want is None:
        return None  # a record of an older version: no checksum
    if not Path(path).is_file():
        return "missing"
    return None if runs.sha256_file(Path(path)) == want else f"sha256 differs from its record {rec} (damaged after it was written)"



def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def decode_value(name: str, data: bytes, num_labels: int = VOC_LABELS) -> Any:
    """Explicit decoders by extension: jpg → RGB uint8 [H,W,3]; png → uint8 [H,W] indices; npy; json; else bytes."""
    ext = _ext(name)
    if ext in PICKLE_EXTS:
        raise DataError(f"shard member {name!r} refused: pickle files are never loaded")
    if ext in ("jpg", "jpeg"):
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    if ext == "png":
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("P", "L"):
                raise ValueError(f"{name}: label PNG has mode {img.mode}, expected P or L")
            m = np.array(img, dtype=np.uint8)
        ok = label_values(num_labels)
        if not ok[m].all():
            bad = np.setdiff1d(np.unique(m), np.flatnonzero(ok))
            raise ValueError(f"{name}: label values must be 0..{num_labels - 1} or 255, found {bad.tolist()[:5]}")
        return m
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data)
    if ext in ("txt", "cls"):
        return data.decode("utf-8")
    return data


def refuse_pickles(sample: dict) -> dict:
    """Raise DataError if a sample holds a member with a pickle extension."""
    for k in sample:
        if not k.startswith("__") and _ext(k) in PICKLE_EXTS:
            raise DataError(f"{sample.get('__url__', '?')}: member {sample.get('__key__')}.{k} has a pickle extension; "
                            "refusing to read it (shards never hold pickles)")
    return sample


def check_pixels(sample: dict, key: str, max_pixels: int) -> None:
    """ValueError (a counted skip) when the image ``key`` of a raw sample has more than ``max_pixels`` pixels
    (``data.max_pixels``; 0: no cap), read from its header: a decompression bomb is never decoded."""
    if not max_pixels or key not in sample:
        return
    try:
        with Image.open(io.BytesIO(sample[key])) as img:  # the header only
            w, h = img.size
    except Image.DecompressionBombError as e:  # beyond PIL's own cap (2 × Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"{sample.get('__url__', '?')}: image {sample.get('__key__')} refused undecoded: {e}") from None
    except Exception:  # noqa: BLE001 - a broken header: the decoder reports it
        return
    if w * h > max_pixels:
        raise ValueError(f"{sample.get('__url__', '?')}: image {sample.get('__key__')} of {w}×{h} px is above "
                         f"data.max_pixels={max_pixels}; skipped undecoded")


def decode_sample(sample: dict, keys: Sequence[str], max_pixels: int = 0, num_labels: int = VOC_LABELS) -> dict:
    """Decode only ``keys`` of a raw sample (missing key → ValueError, i.e. a broken sample; ``"seg.png?"`` is
    optional); a JPEG of more than ``max_pixels`` pixels (0: no cap) is a ValueError before decoding."""
    refuse_pickles(sample)
    if not isinstance(sample.get("__key__"), str) or not _KEY_RE.match(sample["__key__"]):
        raise ValueError(f"{sample.get('__url__', '?')}: sample key {sample.get('__key__')!r} is not a plain name "
                         "(letters, digits, '_', '-'); a file named after it could leave its folder")
    out = {"__key__": sample["__key__"]}
    for k in keys:
        optional, k = k.endswith("?"), k.rstrip("?")
        if k not in sample and optional:
            continue
        if k not in sample:
            raise ValueError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} has no {k!r}")
        if _ext(k) in ("jpg", "jpeg"):
            check_pixels(sample, k, max_pixels)
        out[k] = decode_value(k, sample[k], num_labels)
    return out


def selector(keys: Iterable[str]) -> Callable[[str], bool]:
    """A tar member filter reading only ``keys`` (and any pickle member, so that it is seen and refused)."""
    from webdataset.tariterators import base_plus_ext

    want = {k.rstrip("?") for k in keys}

    def select(fname: str) -> bool:
        _, ext = base_plus_ext(fname)
        return ext is not None and (ext.lower() in want or _ext(ext) in PICKLE_EXTS)

    return select


def tar_problem(url: str) -> str | None:
    """What is wrong with a local tar (truncated, or a corrupt header that would end reading early), or None.

    Python's tarfile stops silently at a cut or at the first invalid header after the first member, so the headers
    are walked and everything after the last member must be the end-of-archive zero blocks.
    """
    import tarfile

    try:
        size = os.path.getsize(url)
    except OSError:
        return None  # not a local file (or missing): opening it reports the problem
    if size < 1024 or size % 512:
        return "truncated tar (its size is not a whole number of 512-byte blocks)"
    try:
        with tarfile.open(url, "r:") as tf:
            for _ in tf:
                pass
            end = tf.offset  # where reading stopped: the end-of-archive marker of an intact tar
    except (tarfile.TarError, OSError) as e:
        if "unexpected end of data" in str(e):
            return "truncated tar (the file ends inside a member)"
        return f"corrupt or unreadable tar ({_short(e)})"
    with open(url, "rb") as f:
        f.seek(min(end, size))
        rest = f.read()
    if len(rest) < 1024:
        return "truncated tar (no end-of-archive marker)"
    if any(rest):
        return f"corrupt or unreadable tar (invalid header at byte {end}: reading would stop there)"
    return None


def check_tars() -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage over shard dicts: a truncated or corrupt tar is a DataError naming it (reading it would lose samples)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for d in src:
            problem = tar_problem(d["url"])
            if problem is not None:
                raise DataError(f"{d['url']}: {problem}; rebuild it (stage=shards, or rerun the stage that wrote it)")
            yield d

    return stage


def producing_stage(path: Path) -> str | None:
    """The stage whose output folder holds the shard ``path`` (``runs/<run>/<stage>/``, ``aff/labels/``), or None."""
    parent = Path(path).parent
    if parent.name == "labels" and parent.parent.name == "aff":
        return "aff"
    return parent.name if parent.name in STAGES and parent.name != "shards" else None


def verify_against_manifest(url: str) -> None:
    """Check a shard against what was recorded when it was written: the ``manifest.json`` next to it (input shards)
    or its per-shard record ``<shard>.json`` (a stage's output shards). A mismatch is a DataError whose advice
    repairs it (the producing stage redoes exactly that shard)."""
    path = Path(url)
    mpath = path.parent / MANIFEST
    if "://" in str(url):
        return
    if mpath.is_file():
        try:
            manifest = runs.read_json(mpath)
            want = next((info["sha256"][path.name] for info in manifest["splits"].values()
                         if path.name in info.get("sha256", {})), None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{mpath}: not a valid shard manifest ({e}); run stage=shards again") from None
        if want is not None and runs.sha256_file(path) != want:
            raise DataError(f"{path}: sha256 differs from {mpath} (corrupt or modified shard); run stage=shards again")
        return
    stage = producing_stage(path)
    if stage is not None and not record_path(path).is_file():
        raise DataError(f"{path}: its record {record_path(path).name} is missing (an output shard is trusted only with "
                        f"its record); run stage={stage} again: it redoes exactly the shards without records")
    problem = record_problem(path)
    if problem is not None:
        stage = runs.read_json(record_path(path)).get("stage") or "that wrote it"
        raise DataError(f"{path}: {problem}; run stage={stage} again: it redoes exactly the damaged shards")


def raw_samples(urls: Iterable[str], keys: Sequence[str], counter: SkipCounter) -> Iterator[dict]:
    """Undecoded samples (members ``keys`` only) of tars, in order; a truncated or corrupt tar is a DataError."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), check_tars(),
                                wds.tarfile_to_samples(handler=counter.tar_handler, select_files=selector(keys)))
    return iter(pipeline)


def read_shard(url: str, keys: Sequence[str], counter: SkipCounter | None = None, max_pixels: int = 0,
               num_labels: int = VOC_LABELS) -> Iterator[dict]:
    """Decoded samples of one tar (``__key__`` + ``keys``); broken samples (and images of more than ``max_pixels``
    pixels, 0: no cap) are skipped and counted in ``counter``.

    A tar listed in a ``manifest.json`` next to it must match its sha256; a truncated or corrupt tar is a DataError.
    """
    import webdataset as wds

    counter = counter if counter is not None else SkipCounter()
    if "://" not in str(url) and not str(url).startswith("pipe:") and not os.path.exists(url):
        raise DataError(f"{url}: shard not found")
    verify_against_manifest(str(url))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(url)]),
        check_tars(),
        wds.tarfile_to_samples(handler=counter.tar_handler, select_files=selector(keys)),
        wds.map(lambda s: decode_sample(s, keys, max_pixels, num_labels), handler=counter.handler),
    )
    for sample in pipeline:
        counter.seen += 1
        yield sample
