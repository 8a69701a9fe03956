"""WebDataset tar shards: packing VOC/SBD into shards and the manifest (tar I/O and safe reading: :mod:`.tario`,
re-exported here).

Per sample: ``__key__`` = image id, ``jpg`` = original JPEG bytes, ``cls.npy`` = float32[K] labels (K: the dataset's
classes, recorded in the manifest's ``classes``), ``seg.png`` =
ground-truth mask (palette PNG) where one exists. Shards are ``{split}-{index:06d}.tar``; each appears only whole
(written under a temporary name, then renamed). ``manifest.json`` lists, per split, the shards, sample counts, class
histogram, ids and sha256 of each tar, plus a fingerprint of the inputs: with unchanged inputs a rebuild verifies
every tar against the manifest and rewrites only those missing or different (:func:`update_shards`).
Readers decode only the keys asked for with explicit decoders, never unpickle, and skip broken samples with a
counted warning (:class:`SkipCounter`); a truncated or corrupt tar, a tar whose sha256 differs from the manifest next
to it, or a pickle member is a :class:`DataError` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import runs
from ..errors import DataError
from ..registry import VOC_CLASSES
from .voc import VOCSource
from .packing import PROGRESS, SHARD_RE, open_journal, pack_shards, shard_index, shard_name  # noqa: F401 - PROGRESS: the shard API
from .tario import (  # noqa: F401 - the shard API in one place (tar I/O and reading live in tario)
    MANIFEST, PICKLE_EXTS, SkipCounter, check_skip_fraction, tar_bytes, write_shard, sha256_bytes, record_path,
    record_problem, decode_value, refuse_pickles, check_pixels, decode_sample, selector, tar_problem, check_tars,
    producing_stage, verify_against_manifest, raw_samples, read_shard, _short, LABEL_VALUES)

logger = logging.getLogger(__name__)


FORMAT_VERSION = 1


SEG_SPLITS = ("train", "val")  # VOC segmentation lists: every image has a ground-truth mask (a source's seg_splits)


def manifest_classes(manifest: dict) -> tuple[str, ...]:
    """The foreground class names the shards were packed with (a manifest without ``classes``: VOC's)."""
    classes = manifest.get("classes") if isinstance(manifest, dict) else None
    return tuple(classes) if isinstance(classes, list) and classes else VOC_CLASSES




def _fingerprint(source: VOCSource, ids: dict[str, list[str]], shard_size: int) -> str:
    """A hash of what the shards depend on: split ids, list files and each image's source files (size, mtime)."""
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "shard_size": shard_size, "ids": ids}).encode())
    files = [f for split in ids for f in source.list_files(split)]
    files += source.extra_files()
    for image_id in sorted({i for v in ids.values() for i in v}):
        files += source.files(image_id)
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


@dataclasses.dataclass
class ShardsReport:
    """What :func:`update_shards` did: the manifest now on disk, shards verified against it and shards (re)written."""

    manifest: dict
    verified: int = 0  # listed tars checked on disk: present, size and sha256 as in the manifest
    rebuilt: list[str] = dataclasses.field(default_factory=list)  # tar names written by this call
    verify_seconds: float = 0.0
    full: bool = False  # True when every shard was (re)built: no usable manifest, or the inputs changed


def build_shards(source: VOCSource, out_dir: Path, splits: Sequence[str] = ("train", "val", "train_aug"),
                 shard_size: int = 200, progress: bool = True, workers: int = 1) -> dict:
    """Pack ``splits`` of ``source`` into ``out_dir``, repairing what differs (:func:`update_shards`); the manifest."""
    return update_shards(source, out_dir, splits, shard_size, progress, workers=workers).manifest


def update_shards(source: VOCSource, out_dir: Path, splits: Sequence[str] = ("train", "val", "train_aug"),
                  shard_size: int = 200, progress: bool = True, settings: dict | None = None,
                  workers: int = 1) -> ShardsReport:
    """Make ``out_dir`` hold the shards of ``source`` and their ``manifest.json``, writing only what is needed.

    ``settings`` (the data settings that made them) are recorded in the manifest; a folder whose manifest records
    other settings belongs to another run's data and is refused (DataError), never rebuilt under it.

    Inputs changed (fingerprint), or no usable manifest (absent, not JSON, fields missing: a warning): every shard is
    rebuilt. Otherwise every listed tar is verified (exists, size and sha256 as in the manifest) and exactly the tars
    that are missing or differ are rebuilt from the sources, the others left untouched; then the manifest is rewritten.
    A manifest entry whose sha256 was altered while its tar is intact counts as "differs": the tar is rebuilt from the
    sources and its true sha256 recorded (the sources, not the manifest or the tar, are what both must agree with).
    A full build packs ``workers`` shards at once (threads: JPEG checks, mask rendering and PNG encoding release the
    GIL); every shard's bytes are the same whatever ``workers``.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {split: source.ids(split) for split in splits}
    fp = _fingerprint(source, ids, shard_size)
    mpath = out_dir / MANIFEST
    _check_settings(mpath, settings)
    old = _usable_manifest(mpath, fp, ids, shard_size)
    if old is None:
        mpath.unlink(missing_ok=True)  # no manifest may vouch for shards while they are rewritten
        manifest: dict[str, Any] = {"version": FORMAT_VERSION, "fingerprint": fp, "shard_size": shard_size,
                                    **({"data": settings} if settings is not None else {}),
                                    "source": source.describe(), "classes": list(source.classes),
                                    "splits": {}}
        journal = open_journal(out_dir, {"fingerprint": fp, "shard_size": shard_size, "data": settings})
        jobs = [(split, i, ids[split][i * shard_size:(i + 1) * shard_size])
                for split in splits for i in range(-(-len(ids[split]) // shard_size))]
        todo = [j for j in jobs if shard_name(j[0], j[1]) not in journal["shards"]]
        if len(todo) < len(jobs):
            logger.info("%s: %d shards already packed by an interrupted build (verified); packing the other %d",
                        out_dir, len(jobs) - len(todo), len(todo))
        with tqdm(total=sum(len(j[2]) for j in todo), desc="shards", unit="img", disable=not progress) as bar:
            packed = pack_shards(source, out_dir, todo, workers, bar, journal)
        for split in splits:
            _record_split(out_dir, split, ids[split], shard_size, len(source.classes), journal["shards"], manifest)
        runs.write_json(mpath, manifest)
        (out_dir / PROGRESS).unlink(missing_ok=True)
        names = [n for info in manifest["splits"].values() for n in info["shards"]]
        return ShardsReport(manifest, rebuilt=[n for n in names if n in packed], full=True)

    t0 = time.perf_counter()
    bad = _verify_tars(out_dir, old)
    seconds = time.perf_counter() - t0
    listed = sum(len(info["shards"]) for info in old["splits"].values())
    logger.info("verified %d shards in %s against %s in %.2f s: %d missing or different", listed, out_dir, MANIFEST,
                seconds, len(bad))
    report = ShardsReport(old, verified=listed, verify_seconds=round(seconds, 3))
    if settings is not None and old.get("data") != settings:  # a manifest of an older version: record them
        old["data"] = settings
        runs.write_json(mpath, old)
    if not bad:
        logger.info("shards in %s are up to date (same inputs), nothing to do", out_dir)
        return report
    todo = [(split, shard_index(name), _shard_ids(old["splits"][split], name)) for split, name in bad]
    with tqdm(total=sum(len(c) for _, _, c in todo), desc="repair", unit="img", disable=not progress) as bar:
        packed = pack_shards(source, out_dir, todo, workers, bar)
    for split, index, chunk in todo:
        name, info = shard_name(split, index), old["splits"][split]
        info["sha256"][name], info["bytes"][name] = packed[name]["sha256"], packed[name]["bytes"]
        report.rebuilt.append(name)
        logger.info("rebuilt %s (%d samples)", out_dir / name, len(chunk))
    runs.write_json(mpath, old)
    return report


def _check_settings(mpath: Path, settings: dict | None) -> None:
    """DataError when the manifest in ``mpath`` records other data settings than ``settings`` (another run's data)."""
    problem = settings_conflict(mpath, settings)
    if problem:
        raise DataError(problem)


def settings_conflict(mpath: Path, settings: dict | None) -> str | None:
    """What is wrong when the manifest ``mpath`` records other data settings than ``settings``, else None (also when
    there is no manifest yet or it cannot be read: building or repairing the shards deals with those)."""
    if settings is None or not mpath.is_file():
        return None
    try:
        old = runs.read_json(mpath).get("data")
    except (ValueError, OSError, AttributeError):
        return None
    if not isinstance(old, dict) or old == settings:
        return None
    diff = ", ".join(f"{k}={old.get(k)} there, {settings.get(k)} here" for k in sorted(set(old) | set(settings))
                     if old.get(k) != settings.get(k))
    return (f"{mpath.parent}: holds the shards of other data settings ({diff}); leave data.shards_dir unset (each "
            "data setting gets its own folder) or name another folder")


def _usable_manifest(mpath: Path, fp: str, ids: dict[str, list[str]], shard_size: int) -> dict | None:
    """The manifest in ``mpath`` when it describes shards of the current inputs (to verify and repair), else None."""
    if not mpath.is_file():
        return None
    try:
        old = runs.read_json(mpath)
    except (ValueError, OSError) as e:
        logger.warning("%s; treating the shard manifest as absent: rebuilding every shard", e)
        return None
    if isinstance(old, dict) and isinstance(old.get("fingerprint"), str) and old["fingerprint"] != fp:
        logger.info("inputs changed since %s was written: rebuilding the shards", mpath)
        return None
    problem = _manifest_problem(old, ids, shard_size)
    if problem is not None:
        logger.warning("%s: %s; treating it as absent: rebuilding every shard", mpath, problem)
        return None
    return old


_MANIFEST_FIELDS = ("version", "fingerprint", "shard_size", "splits")


_SPLIT_FIELDS = ("shards", "counts", "total", "ids", "class_hist", "with_mask", "sha256", "bytes")


def _manifest_problem(m: Any, ids: dict[str, list[str]], shard_size: int) -> str | None:
    """What makes ``m`` unfit as the manifest of the shards of ``ids`` (fields missing, other layout), or None."""
    if not isinstance(m, dict):
        return f"not a shard manifest (a JSON {type(m).__name__}, expected an object)"
    missing = [k for k in _MANIFEST_FIELDS if k not in m]
    if missing:
        return f"not a valid shard manifest (no {', '.join(missing)})"
    if not isinstance(m["splits"], dict) or set(m["splits"]) != set(ids):
        return f"lists splits {sorted(m['splits']) if isinstance(m['splits'], dict) else '?'}, expected {sorted(ids)}"
    for split, split_ids_ in ids.items():
        info = m["splits"][split]
        missing = [k for k in _SPLIT_FIELDS if k not in info] if isinstance(info, dict) else list(_SPLIT_FIELDS)
        if missing:
            return f"split {split!r} has no {', '.join(missing)}"
        starts = range(0, len(split_ids_), shard_size)
        names = [f"{split}-{i:06d}.tar" for i in range(len(starts))]
        if (info["ids"] != split_ids_ or info["shards"] != names
                or info["counts"] != [len(split_ids_[s:s + shard_size]) for s in starts]):
            return f"split {split!r}: its shards, counts or ids do not fit the inputs"
        sha, size = info["sha256"], info["bytes"]
        if not isinstance(sha, dict) or not isinstance(size, dict) or not all(
                isinstance(sha.get(n), str) and isinstance(size.get(n), int) for n in names):
            return f"split {split!r}: sha256 or bytes missing for some shard"
    return None


def _verify_tars(out_dir: Path, manifest: dict) -> list[tuple[str, str]]:
    """(split, name) of every listed tar that is missing or whose size or sha256 differs from the manifest (warned)."""
    bad = []
    for split, info in manifest["splits"].items():
        for name in info["shards"]:
            path = out_dir / name
            try:
                if not path.is_file():
                    problem = "missing"
                elif path.stat().st_size != info["bytes"][name]:
                    problem = f"size {path.stat().st_size} differs from {info['bytes'][name]} in {MANIFEST}"
                elif runs.sha256_file(path) != info["sha256"][name]:
                    problem = f"sha256 differs from {MANIFEST}"
                else:
                    continue
            except OSError as e:
                problem = f"unreadable ({_short(e)})"
            logger.warning("%s: %s; rebuilding it", path, problem)
            bad.append((split, name))
    return bad


def _shard_ids(info: dict, name: str) -> list[str]:
    """The image ids packed in shard ``name`` of a split's manifest entry (in order)."""
    i = info["shards"].index(name)
    start = sum(info["counts"][:i])
    return info["ids"][start:start + info["counts"][i]]


def _record_split(out_dir: Path, split: str, split_ids_: list[str], shard_size: int, n_classes: int,
                  records: dict[str, dict], manifest: dict) -> None:
    """Record one split's packed shards (``records``, by name) in ``manifest``; remove the split's stale tars."""
    names = [shard_name(split, i) for i in range(-(-len(split_ids_) // shard_size))]
    hist = np.zeros(n_classes, np.int64)
    for n in names:
        hist += np.asarray(records[n]["class_hist"], np.int64)
    counts = [records[n]["count"] for n in names]
    with_mask = sum(records[n]["with_mask"] for n in names)
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    manifest["splits"][split] = {"shards": names, "counts": counts, "total": sum(counts), "ids": split_ids_,
                                 "class_hist": hist.tolist(), "with_mask": with_mask,
                                 "sha256": {n: records[n]["sha256"] for n in names},
                                 "bytes": {n: records[n]["bytes"] for n in names}}
    logger.info("split %s: %d samples in %d shards (%d with masks)", split, sum(counts), len(names), with_mask)


def load_manifest(shards_dir: str | Path, verify: bool = True) -> dict:
    """The shards' manifest; with ``verify`` every listed tar must exist and match its sha256 (else DataError)."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no shard manifest; run stage=shards first")
    try:
        manifest = runs.read_json(path)
        splits = manifest["splits"]
        for info in splits.values():  # the fields every reader uses, of the types they use them as
            if not (isinstance(info["shards"], list) and isinstance(info["sha256"], dict)
                    and isinstance(info["counts"], list) and isinstance(info["ids"], list)):
                raise TypeError("a split's shards, counts or ids is not a list, or its sha256 not a mapping")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e}); run stage=shards again") from None
    try:
        bad = [n for info in splits.values() for n in info["shards"] if not isinstance(n, str) or not SHARD_RE.match(n)
               or ".." in n]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e}); run stage=shards again") from None
    if bad:
        raise DataError(f"{path}: shard name {bad[0]!r} refused (a manifest lists plain .tar file names in its own folder)")
    if verify:
        for info in splits.values():
            for name in info["shards"]:
                tar = Path(shards_dir) / name
                if not tar.is_file():
                    raise DataError(f"{tar}: shard listed in {path} is missing; run stage=shards again")
                if runs.sha256_file(tar) != info["sha256"][name]:
                    raise DataError(f"{tar}: sha256 differs from {path} (corrupt or modified shard); run stage=shards again")
    return manifest


def split_urls(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    """Paths of a split's shards, in order."""
    manifest = manifest if manifest is not None else load_manifest(shards_dir, verify=False)
    if split not in manifest["splits"]:
        raise DataError(f"{Path(shards_dir) / MANIFEST}: no split {split!r}; available: {', '.join(manifest['splits'])}")
    return [str(Path(shards_dir) / name) for name in manifest["splits"][split]["shards"]]


def split_ids(manifest: dict, split: str) -> list[str]:
    """Image ids of a split, in shard order."""
    if split not in manifest["splits"]:
        raise DataError(f"shard manifest: no split {split!r}; available: {', '.join(manifest['splits'])}")
    return list(manifest["splits"][split]["ids"])
