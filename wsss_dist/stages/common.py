"""What several stages share: the process group, shard-parallel inference with resume, model (re)building."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.shards import SkipCounter, load_manifest, split_ids, split_urls, write_shard
from ..data.stream import infer_samples
from ..errors import DataError
from ..metrics import confusion_matrix, miou

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    """This process's place in the job (works without torch.distributed: world 1)."""

    rank: int
    world: int
    device: torch.device
    state: object

    def barrier(self) -> None:
        """Wait for every process."""
        self.state.wait_for_everyone()

    @property
    def main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def dist() -> Dist:
    """The Accelerate process state (initialises torch.distributed under accelerate/torchrun/SLURM)."""
    from accelerate import PartialState

    s = PartialState()
    return Dist(s.process_index, s.num_processes, s.device, s)


def autocast(device: torch.device, precision: str):
    """An autocast context for ``precision`` (no|fp16|bf16) on ``device``'s type."""
    if precision == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def shard_map(
    cfg: Config,
    split: str,
    out_dir: Path,
    keys: tuple[str, ...],
    process: Callable[[dict], dict | None],
    evaluate: Callable[[dict, dict], np.ndarray] | None = None,
    paired: Iterable[tuple[Path, tuple[str, ...]]] = (),
    desc: str = "",
) -> dict:
    """Map ``process`` over every sample of ``split``, one output shard per input shard, across ranks.

    Rank r takes shards i with i % world == r. An output shard (and its per-shard confusion matrices when
    ``evaluate`` is given) appears only whole, by rename, after its records; shards already written are skipped,
    so a rerun does only the rest. ``paired`` adds the samples of same-named shards of earlier stages (merged by key).
    Returns ``{"samples", "skipped", "cm"}`` summed over all shards (after a barrier, on every rank).
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
            _map_shard(url, out_dir, keys, process, evaluate, paired, bar)
    d.barrier()
    return _gather(out_dir, urls)


def _map_shard(url: str, out_dir: Path, keys: tuple[str, ...], process: Callable[[dict], dict | None],
               evaluate: Callable[[dict, dict], np.ndarray] | None, paired: Iterable[tuple[Path, tuple[str, ...]]],
               bar) -> None:
    """One input shard of :func:`shard_map`: its output shard, written after its records."""
    name = Path(url).name
    counter = SkipCounter()
    others = [{s["__key__"]: s for s in infer_samples(str(pdir / name), keys=pk, counter=counter)} for pdir, pk in paired]
    outputs, cms, n = [], [], 0
    for sample in infer_samples(url, keys=keys, counter=counter):
        for other in others:
            if sample["__key__"] not in other:
                raise DataError(f"{name}: sample {sample['__key__']} missing from the paired shard of an earlier stage; rerun that stage")
            sample.update({k: v for k, v in other[sample["__key__"]].items() if k != "__key__"})
        out = process(sample)
        if out is not None:
            outputs.append(out)
        if evaluate is not None:
            cm = evaluate(sample, out or {})
            if cm is not None:
                cms.append(cm)
        n += 1
        bar.update(1)
    # the per-shard records first, the shard itself last: a shard on disk is a finished shard
    if evaluate is not None:
        total = np.sum(cms, axis=0) if cms else np.zeros((0,), np.int64)
        with runs.atomic_path(out_dir / f"{name}.cm.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, total, allow_pickle=False)
    runs.write_json(out_dir / f"{name}.json", {"samples": n, "skipped": counter.skipped})
    write_shard(out_dir / name, outputs)


def _shard_done(out_dir: Path, name: str, with_cm: bool) -> bool:
    """An output shard is finished when it and its records exist (they are written before it)."""
    return all((out_dir / f).exists() for f in (name, f"{name}.json") + ((f"{name}.cm.npy",) if with_cm else ()))


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


def check_skips(result: dict, cfg: Config, what: str) -> None:
    """Fail the stage when more than ``data.max_skip_fraction`` of the samples were broken."""
    total = result["samples"] + result["skipped"]
    if total and result["skipped"] / total > cfg.data.max_skip_fraction:
        raise DataError(
            f"{what}: {result['skipped']} of {total} samples were broken and skipped, more than "
            f"data.max_skip_fraction={cfg.data.max_skip_fraction}; check the shards (stage=shards) or raise the limit"
        )


def eval_ids(cfg: Config, split: str) -> set[str]:
    """Ids whose ground truth scores a stage (e.g. VOC train for CAM and pseudo-label mIoU)."""
    return set(split_ids(load_manifest(cfg.shards_dir, verify=False), split))


def miou_metrics(cm: np.ndarray | None) -> dict:
    """``{"miou", "iou"}`` from a 21×21 confusion matrix (empty when there was no ground truth)."""
    if cm is None:
        return {"miou": None, "iou": None}
    m, iou = miou(cm)
    return {"miou": float(m), "iou": [None if np.isnan(x) else float(x) for x in iou], "confusion": np.asarray(cm).tolist()}


def gt_confusion(pred: np.ndarray, sample: dict) -> np.ndarray | None:
    """Confusion matrix of a label map against the sample's ``seg.png`` (None without ground truth)."""
    gt = sample.get("seg.png")
    if gt is None:
        return None
    return np.asarray(confusion_matrix(pred, gt))


def image_tensor(sample: dict, device: torch.device) -> torch.Tensor:
    """The sample's normalised image as [1, 3, H, W] on ``device``."""
    from ..data.stream import normalize

    return normalize(sample["jpg"]).unsqueeze(0).to(device)


def iter_chunks(it: Iterable, n: int) -> Iterator[list]:
    """Lists of up to ``n`` items."""
    chunk: list = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def loader_factory(cfg: Config, train, split: str, **extra):
    """The engine's ``make_loader(rank, world, start_batch)`` over ``split``'s shards with ``train``'s augmentation."""
    from ..data.stream import train_loader

    urls = split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir))

    def make_loader(rank: int, world: int, start_batch: int):
        return train_loader(urls, batch_size=train.batch_size, crop=train.crop, resize_long=train.resize_long,
                            seed=train.seed, rank=rank, world=world, num_workers=cfg.data.num_workers,
                            start_batch=start_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                            max_skip_fraction=cfg.data.max_skip_fraction, **extra)

    return make_loader
