"""The deterministic, resumable training stream (WebDataset pipeline stages, the DataLoader, the loader a stage calls).

Training order is a pure function of (seed, rank, world, num_workers): per epoch e the shard list is shuffled with a
seed from (seed, e), split across ranks (shard i → rank i % world) and then across DataLoader workers, and each
worker's samples pass a shuffle buffer seeded by (seed, e, rank, worker). Augmentation parameters come from a numpy
Generator seeded by (seed, e, sample key), never from global RNG. Batch j of a rank comes from worker j % workers, so
``start_batch=n`` tells each worker how many of its own batches to drop; whole epochs are skipped from tar headers
alone and the rest before decoding. A resumed stream therefore equals the uninterrupted one (exactly so while no
sample in the skipped part was broken: broken samples are dropped after decoding).
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..registry import VOC_LABELS
from .tario import (SkipCounter, check_pixels, check_skip_fraction, check_tars, decode_sample, decode_value, refuse_pickles, 
                     selector, verify_against_manifest)
from .readers import (_one_line_errors, _record_skips, prepare_image, reader_worker_init, shard_samples,  # noqa: F401
                      stop_signals_held)
from .transforms import (AUG_COLUMNS, IMAGENET_MEAN, IMAGENET_STD, _seed, denormalize, aug_record, augment, augment_mask,  # noqa: F401
                         augment_on_device, draw_augment, normalize, renormalize)

logger = logging.getLogger(__name__)


def count_samples(url: str, keys: Sequence[str] = ("jpg", "cls.npy")) -> int | None:
    """Samples with any of ``keys`` in a tar, from its headers only (no data read); None if the tar is unreadable."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    try:
        with tarfile.open(url, "r:") as tf:
            for member in tf:
                key, ext = base_plus_ext(member.name)
                if member.isreg() and key is not None and ext in keys and key != last:
                    n, last = n + 1, key
    except (OSError, tarfile.TarError):
        return None
    return n


def shard_shuffle(seed: int, epoch: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: shuffle the shard list with a seed from (seed, epoch); every rank sees the same order."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        items = list(src)
        random.Random(_seed(seed, epoch, "shards")).shuffle(items)
        yield from items

    return stage


def split_by_node(rank: int, world: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: item i → rank i % world (explicit rank/world, unlike webdataset's torch.distributed lookup). The
    training stream splits *samples* this way, after the (rank-independent) shuffles: the global batch of a step is
    the same whatever the number of processes."""
    return lambda src: itertools.islice(src, rank, None, world)


def split_by_worker(worker: int, workers: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: a rank's shard i → DataLoader worker i % workers."""
    return lambda src: itertools.islice(src, worker, None, workers)


def merge_masks(mask_dir: Path, mask_key: str, counter: SkipCounter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: attach ``__mask__`` bytes from the same-named tar in ``mask_dir`` (same keys), failing on a mismatch."""
    from .shards import raw_samples

    def load(url: str) -> dict[str, bytes]:
        path = Path(mask_dir) / Path(url).name
        if not path.is_file():
            raise DataError(f"{path}: no mask shard for {url}; run the stage that writes {mask_dir} first")
        verify_against_manifest(str(path))  # a stage's output shard: against the sha256 of its record
        out = {}
        for s in raw_samples([str(path)], (mask_key,), counter):
            refuse_pickles(s)
            if mask_key in s:
                out[s["__key__"]] = s[mask_key]
        return out, _record_skips(path)

    def finish(url: str | None, masks: dict, skipped_before: int) -> None:
        if url is not None and masks and counter.skipped == skipped_before:
            raise DataError(f"{Path(mask_dir) / Path(url).name}: keys {sorted(masks)[:3]} are not in {url}; "
                            "the mask shards do not belong to these image shards (rerun the stage that wrote them)")

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        url, masks, skipped_before, skips = None, {}, 0, 0
        for sample in src:
            if sample["__url__"] != url:
                finish(url, masks, skipped_before)
                url, skipped_before = sample["__url__"], counter.skipped
                masks, skips = load(url)
            sample["__mask__"] = masks.pop(sample["__key__"], None)
            sample["__mask_skips__"] = skips  # the mask stage skipped images of this shard: a missing mask is one
            yield sample
        finish(url, masks, skipped_before)

    return stage


class TrainStream(torch.utils.data.IterableDataset):
    """The infinite training stream of one rank; iterated by a DataLoader worker (or in-process) it yields batches."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, crop: int, resize_long: tuple[int, int] | None,
                 seed: int, rank: int, world: int, start_batch: int, mask_dir: str | Path | None, mask_key: str,
                 jitter: bool, scale_range: tuple[float, float] | None, shuffle_buffer: int,
                 max_skip_fraction: float = 0.01, on_device: bool = False, max_pixels: int = 0,
                 num_labels: int = VOC_LABELS) -> None:
        super().__init__()
        self.on_device, self.max_pixels, self.num_labels = on_device, max_pixels, num_labels
        self.max_skip_fraction = max_skip_fraction
        self.urls, self.batch_size, self.crop = [str(u) for u in urls], batch_size, crop
        self.resize_long, self.scale_range, self.jitter = resize_long, scale_range, jitter
        self.seed, self.rank, self.world, self.start_batch = seed, rank, world, start_batch
        self.mask_dir, self.mask_key, self.shuffle_buffer = mask_dir, mask_key, shuffle_buffer

    def worker_urls(self, epoch: int, worker: int, workers: int) -> list[str]:
        """The shards this rank's ``worker`` reads in ``epoch`` (shard shuffle, then node and worker splits)."""
        import webdataset as wds

        shards = wds.DataPipeline(wds.SimpleShardList(self.urls), shard_shuffle(self.seed, epoch),
                                  split_by_worker(worker, workers))
        return [d["url"] for d in shards]

    def prepare(self, sample: dict, epoch: int) -> dict:
        """Decode (only jpg, labels and the merged mask) and augment one sample; with ``on_device`` the JPEG stays
        encoded (its size read from its header) and the sample carries its augmentation record instead."""
        keys = ("cls.npy",) if self.on_device else ("jpg", "cls.npy")
        check_pixels(sample, "jpg", self.max_pixels)  # before any decoding (a decompression bomb: a counted skip)
        d = decode_sample(sample, keys)
        if self.on_device:
            if "jpg" not in sample:
                raise ValueError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} has no 'jpg'")
            with Image.open(io.BytesIO(sample["jpg"])) as im:  # the header only
                W, H = im.size
                fmt = im.format
            end = sample["jpg"].rfind(b"\xff\xd9")  # a truncated file has no end-of-image marker
            if fmt != "JPEG" or end < 0 or end < len(sample["jpg"]) - 4096:
                raise ValueError(f"{sample.get('__url__', '?')}: 'jpg' of {sample['__key__']} is not a whole JPEG")
        else:
            H, W = d["jpg"].shape[:2]
        mask = None
        if self.mask_dir is not None:
            raw = sample.get("__mask__")
            if raw is None and sample.get("__mask_skips__"):  # an image the mask stage skipped (counted there)
                raise ValueError(f"{sample['__url__']}: image {sample['__key__']} has no mask: the stage that wrote "
                                 f"{self.mask_dir} skipped it")
            if raw is None:
                raise DataError(f"{Path(self.mask_dir) / Path(sample['__url__']).name}: no {self.mask_key!r} for key "
                                f"{sample['__key__']} of {sample['__url__']}; rerun the stage that wrote {self.mask_dir}")
            mask = decode_value(self.mask_key, raw, self.num_labels)
            if mask.shape != (H, W):
                raise ValueError(f"{sample['__url__']}: mask of {sample['__key__']} is {mask.shape}, image {(H, W)}")
        rng = np.random.default_rng(_seed(self.seed, epoch, sample["__key__"]))
        labels = torch.from_numpy(np.asarray(d["cls.npy"], dtype=np.float32).reshape(-1))
        if self.on_device:
            p = draw_augment(rng, H, W, self.crop, self.resize_long, self.scale_range)
            return {"__key__": sample["__key__"], "jpeg": torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8),
                    "aug": aug_record(p, self.jitter), "labels": labels,
                    "mask": augment_mask(mask, p) if mask is not None else None}
        image, m = augment(d["jpg"], mask, rng, self.crop, self.resize_long, self.scale_range, self.jitter)
        return {"__key__": sample["__key__"], "image": image, "labels": labels, "mask": m}

    def samples(self, worker: int, workers: int, skip: int, counter: SkipCounter) -> Iterator[dict]:
        """Augmented samples of this worker, epoch after epoch, after dropping the first ``skip`` (before decoding)."""
        import webdataset as wds

        sizes: dict[str, int | None] = {}
        left = [skip]

        def drop(src: Iterable[dict]) -> Iterator[dict]:
            for s in src:
                if left[0] > 0:
                    left[0] -= 1
                    continue
                yield s

        for epoch in itertools.count():
            urls = self.worker_urls(epoch, worker, workers)
            counts = [sizes[u] if u in sizes else sizes.setdefault(u, count_samples(u)) for u in urls]
            total = None if None in counts else sum(counts)  # this worker's samples per epoch, from the tar headers
            if total is not None:
                total = len(range(self.rank, total, self.world))  # this rank's share: every world-th sample
            if left[0] > 0 and total is not None and left[0] >= total:  # a whole epoch skipped: nothing read or decoded
                left[0] -= total
                continue
            skipping = left[0] > 0
            stages = [wds.SimpleShardList(urls), check_tars(),
                      wds.tarfile_to_samples(handler=counter.tar_handler, select_files=selector(("jpg", "cls.npy")))]
            if self.mask_dir is not None:
                stages.append(merge_masks(Path(self.mask_dir), self.mask_key, counter))
            buf = self.shuffle_buffer
            if buf > 1:
                stages.append(wds.shuffle(buf, initial=min(100, buf), rng=random.Random(
                    _seed(self.seed, epoch, 0, worker, "buffer"))))  # the same order on every rank
            stages += [split_by_node(self.rank, self.world), drop,
                       wds.map(lambda s, e=epoch: self.prepare(s, e), handler=counter.handler)]
            n, skipped_before = 0, counter.skipped
            for sample in wds.DataPipeline(*stages):
                counter.seen += 1
                n += 1
                if total:  # during the epoch, against the epoch's size from the tar headers
                    check_skip_fraction(counter.skipped - skipped_before, total, self.max_skip_fraction, self._what(urls))
                yield sample
            if not skipping:  # at its end, against what was read (the only count when the headers were unreadable)
                check_skip_fraction(counter.skipped - skipped_before, n + counter.skipped - skipped_before,
                                    self.max_skip_fraction, self._what(urls))
            if n == 0 and not skipping:
                raise DataError(f"no readable samples in {', '.join(urls)} (epoch {epoch}); rebuild the shards")

    @staticmethod
    def _what(urls: list[str]) -> str:
        return f"{', '.join(Path(u).name for u in urls[:4])}{', ...' if len(urls) > 4 else ''}"

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader restarts its round robin at worker 0: on resume, worker w plays the role of the worker
        # that produced batch start_batch + w of the uninterrupted stream
        worker = (worker + self.start_batch) % workers
        counter = SkipCounter()
        skip_batches = len(range(worker, self.start_batch, workers))  # batches j < start_batch with j % workers == worker
        batch: list[dict] = []
        for s in self.samples(worker, workers, skip_batches * self.batch_size, counter):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield collate(batch, counter.skipped)
                batch = []


def collate(samples: list[dict], skipped: int) -> dict:
    """Stack augmented samples into a batch dict (still encoded: ``jpeg`` list + ``aug`` rows, for
    :func:`augment_on_device`)."""
    out = {"key": [s["__key__"] for s in samples], "labels": torch.stack([s["labels"] for s in samples]),
           "skipped": skipped}
    if "jpeg" in samples[0]:
        out["jpeg"], out["aug"] = [s["jpeg"] for s in samples], torch.stack([s["aug"] for s in samples])
    else:
        out["image"] = torch.stack([s["image"] for s in samples])
    if samples[0]["mask"] is not None:
        out["mask"] = torch.stack([s["mask"] for s in samples])
    return out


def train_loader(urls: Sequence[str], *, batch_size: int, crop: int, resize_long: tuple[int, int] | None = (256, 512),
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 0, start_batch: int = 0,
                 mask_dir: str | Path | None = None, mask_key: str = "png", jitter: bool = True,
                 scale_range: tuple[float, float] | None = None, shuffle_buffer: int = 500,
                 max_skip_fraction: float = 0.01, on_device: bool = False, max_pixels: int = 0,
                 num_labels: int = VOC_LABELS) -> Iterator[dict]:
    """Infinite deterministic batches of ``batch_size`` for rank ``rank`` of ``world``: {key, image, labels, [mask],
    skipped}. Every rank reads the same shuffled sample sequence and keeps every ``world``-th sample (decoding only
    those), so the union of the ranks' batch j is the batch j of one process with ``world × batch_size``.

    The ground-truth ``seg`` member is never read. ``mask`` (int64, 255 = ignore) comes from the same-named tars in
    ``mask_dir`` (member ``mask_key``). ``start_batch=n`` resumes after the first n batches of this rank. Broken
    samples are skipped and counted (``skipped``); a worker whose epoch skips more than ``max_skip_fraction`` of its
    samples raises DataError. ``on_device``: images stay encoded (``jpeg``, ``aug`` instead of ``image``) for the
    engine to finish with :func:`augment_on_device` on its device (``data.augment_on=device``).
    """
    urls = [str(u) for u in urls]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing); run stage=shards again")
    workers = min(num_workers, len(urls))
    if workers < num_workers:
        logger.info("train stream: %d shards, using %d DataLoader workers instead of %d", len(urls), workers, num_workers)
    ds = TrainStream(urls, batch_size=batch_size, crop=crop, resize_long=tuple(resize_long) if resize_long else None,
                     seed=seed, rank=rank, world=world, start_batch=start_batch, mask_dir=mask_dir, mask_key=mask_key,
                     jitter=jitter, scale_range=tuple(scale_range) if scale_range else None, shuffle_buffer=shuffle_buffer,
                     max_skip_fraction=max_skip_fraction, on_device=on_device, max_pixels=max_pixels,
                     num_labels=num_labels)
    if workers == 0:
        return iter(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                         worker_init_fn=functools.partial(reader_worker_init, os.getpid()))
    with stop_signals_held():  # the workers start here
        return _one_line_errors(iter(loader))


def image_tensor(sample: dict, device: torch.device) -> torch.Tensor:
    """The sample's normalised image as [1, 3, H, W] on ``device``: its ``image`` made by :func:`prepare_image` in a
    reader worker (copied without blocking: pinned memory on CUDA), else from its ``jpg``."""
    x = sample["image"] if "image" in sample else normalize(sample["jpg"])
    return x.unsqueeze(0).to(device, non_blocking=True)


def micro_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Images per process and micro-batch: the global ``batch_size`` over ``world`` processes × ``grad_accum``
    accumulation steps (ConfigError when it does not divide: the recipe never changes with the number of GPUs)."""
    from ..errors import ConfigError

    if batch_size % (world * grad_accum):
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must divide over {world} process(es) × "
                          f"grad_accum={grad_accum}; choose a multiple of {world * grad_accum}")
    return batch_size // (world * grad_accum)


def stream_on_device(augment_on: str) -> bool:
    """Whether the training stream leaves decoding and augmentation to the device (``data.augment_on``; ``auto``:
    where CUDA is, which is where Accelerate trains)."""
    return augment_on == "device" or (augment_on == "auto" and torch.cuda.is_available())


def train_loader_for(cfg: Any, train: Any, split: str, **extra: Any) -> Callable[[int, int, int], Iterator[dict]]:
    """The engine's ``make_loader(rank, world, start_batch)`` over ``split``'s shards with ``train``'s augmentation
    (``cfg``: the run's Config, ``train``: one trainer's TrainCfg; ``extra``: mask_dir, scale_range, ...)."""
    from .shards import load_manifest, manifest_classes, split_urls

    manifest = load_manifest(cfg.shards_dir)
    urls = split_urls(cfg.shards_dir, split, manifest)
    extra.setdefault("num_labels", len(manifest_classes(manifest)) + 1)

    def make_loader(rank: int, world: int, start_batch: int) -> Iterator[dict]:
        return train_loader(urls, batch_size=micro_batch(train.batch_size, world, train.grad_accum),
                            crop=train.crop, resize_long=train.resize_long,
                            seed=train.seed, rank=rank, world=world, num_workers=cfg.data.num_workers,
                            start_batch=start_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                            max_skip_fraction=cfg.data.max_skip_fraction,
                            on_device=stream_on_device(cfg.data.augment_on), max_pixels=cfg.data.max_pixels,
                            **extra)

    return make_loader
