"""The one inference engine: shard-parallel maps with resume (:func:`map_shards`), and per-image features of a split.

Shards are the unit of distributed inference and of resume: rank r of w takes shards i with i % w == r; an output
shard (with its per-shard records) appears only whole, by rename, so a rerun does only the shards that are missing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.shards import (SkipCounter, check_skip_fraction, load_manifest, read_shard, record_path, record_problem,
                           sha256_bytes, split_urls, tar_bytes)
from ..data.stream import image_tensor
from ..errors import DataError
from .dist import dist

logger = logging.getLogger(__name__)

Process = Callable[[dict], "tuple[dict | None, Any]"]  # sample → (output record or None, prediction)
Evaluate = Callable[[dict, Any], "np.ndarray | None"]  # (sample, prediction) → confusion matrix or None


def map_shards(cfg: Config, split: str, out_dir: Path, keys: tuple[str, ...], process: Process,
               evaluate: Evaluate | None = None, paired: Iterable[tuple[Path, tuple[str, ...]]] = (),
               desc: str = "", stage: str = "") -> dict:
    """Map ``process`` over every sample of ``split``, one output shard per input shard, across ranks.

    ``process(sample)`` returns ``(record, prediction)``: the record (``__key__`` + members, or None) goes into the
    output shard, the prediction to ``evaluate(sample, prediction)``, whose confusion matrices are summed per shard.
    ``paired`` adds the members of same-named shards of earlier stages (merged by key). Each output shard's record
    ``<shard>.json`` holds its sample counts, its sha256 and ``stage`` (the name to rerun to repair it); readers
    check the sha256. Shards already written and matching their record are skipped; a damaged one is redone. Returns ``{"samples", "skipped", "cm"}`` summed over all shards (after a barrier, on every rank); more
    broken samples than ``data.max_skip_fraction`` is a DataError.
    """
    from tqdm import tqdm

    d = dist()
    manifest = load_manifest(cfg.shards_dir, verify=False)
    urls = split_urls(cfg.shards_dir, split, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = [u for i, u in enumerate(urls) if i % d.world == d.rank]
    if d.main:
        runs.remove_stale_tmp(out_dir)  # temp files of a killed writer (no rank writes yet)
    d.barrier()
    todo = [u for u in mine if not _shard_done(out_dir, Path(u).name, evaluate is not None)]
    if len(todo) < len(mine):
        logger.info("%s: %d of %d shards of this rank already done, resuming", desc, len(mine) - len(todo), len(mine))
    with tqdm(total=sum(_count(manifest, split, u) for u in todo), desc=desc, disable=not d.main, unit="img") as bar:
        for url in todo:
            _map_shard(url, out_dir, keys, process, evaluate, paired, bar, stage or desc)
    d.barrier()
    result = _gather(out_dir, urls)
    check_skip_fraction(result["skipped"], result["samples"] + result["skipped"], cfg.data.max_skip_fraction, desc)
    return result


def _map_shard(url: str, out_dir: Path, keys: tuple[str, ...], process: Process, evaluate: Evaluate | None,
               paired: Iterable[tuple[Path, tuple[str, ...]]], bar: Any, stage: str) -> None:
    """One input shard of :func:`map_shards`: its output shard, written after its records."""
    name = Path(url).name
    counter = SkipCounter()
    others = [{s["__key__"]: s for s in read_shard(str(pdir / name), pk, counter)} for pdir, pk in paired]
    outputs, cms, n = [], [], 0
    for sample in read_shard(url, keys, counter):
        for other in others:
            if sample["__key__"] not in other:
                raise DataError(f"{name}: sample {sample['__key__']} missing from the paired shard of an earlier stage; rerun that stage")
            sample.update({k: v for k, v in other[sample["__key__"]].items() if k != "__key__"})
        record, prediction = process(sample)
        if record is not None:
            outputs.append(record)
        if evaluate is not None:
            cm = evaluate(sample, prediction)
            if cm is not None:
                cms.append(cm)
        n += 1
        bar.update(1)
    # the per-shard records first, the shard itself last: a shard on disk is a finished shard
    if evaluate is not None:
        runs.write_npy(out_dir / f"{name}.cm.npy", np.sum(cms, axis=0) if cms else np.zeros((0,), np.int64))
    data, records = tar_bytes(outputs)
    runs.write_json(record_path(out_dir / name), {"samples": n, "skipped": counter.skipped, "records": records,
                                                  "sha256": sha256_bytes(data), "stage": stage})
    runs.atomic_write(out_dir / name, data)


def _shard_done(out_dir: Path, name: str, with_cm: bool) -> bool:
    """An output shard is finished when it and its records exist (they are written before it) and it matches the
    sha256 of its record (a damaged shard is redone)."""
    if not all((out_dir / f).exists() for f in (name, f"{name}.json") + ((f"{name}.cm.npy",) if with_cm else ())):
        return False
    problem = record_problem(out_dir / name)
    if problem is not None:
        logger.warning("%s: %s; redoing it", out_dir / name, problem)
    return problem is None


def _count(manifest: dict, split: str, url: str) -> int:
    info = manifest["splits"][split]
    try:
        return int(info["counts"][info["shards"].index(Path(url).name)])
    except (KeyError, ValueError, IndexError):
        return 0


def _gather(out_dir: Path, urls: list[str]) -> dict:
    """Sum per-shard sample counts, skips and confusion matrices written by every rank."""
    samples = skipped = 0
    cm = None
    for u in urls:
        name = Path(u).name
        info = runs.read_json(out_dir / f"{name}.json")
        samples += info["samples"]
        skipped += info["skipped"]
        p = out_dir / f"{name}.cm.npy"
        if p.exists():
            m = np.load(p, allow_pickle=False)
            if m.size:
                cm = m if cm is None else cm + m
    return {"samples": samples, "skipped": skipped, "cm": cm}


@torch.no_grad()
def split_features(cfg: Config, split: str, features: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, np.ndarray]:
    """``features(image [1, 3, H, W]) → [1, D]`` of every image of ``split``, in shard order, on this process's
    device: ``{"keys", "features" [N, D], "labels" [N, 20]}``."""
    device = dist().device
    keys, feats, labels = [], [], []
    for url in split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir, verify=False)):
        for s in read_shard(url, ("jpg", "cls.npy")):
            keys.append(s["__key__"])
            feats.append(features(image_tensor(s, device))[0].float().cpu().numpy())
            labels.append(s["cls.npy"])
    return {"keys": np.array(keys), "features": np.stack(feats), "labels": np.stack(labels).astype(np.float32)}
