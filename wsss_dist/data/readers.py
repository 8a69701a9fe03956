"""Inference reads (the engine's ``map_shards`` / ``split_features``): samples of a list of shards, decoded and
prepared in reader workers that ignore stop signals (the main process owns them) and die with their parent."""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import runs
from ..compat import close_loader
from ..errors import DataError
from ..registry import VOC_LABELS
from .tario import (SkipCounter, read_shard, 
                     selector, verify_against_manifest)
from .transforms import normalize

logger = logging.getLogger(__name__)


def prepare_image(sample: dict) -> dict:
    """The sample with ``image``: its ``jpg`` as a normalised float32 [3, H, W] (runs in a reader worker)."""
    sample["image"] = normalize(sample["jpg"])
    return sample


class ShardSamples(torch.utils.data.IterableDataset):
    """Decoded samples of whole shards for inference: DataLoader worker w of n reads the shards j with j % n == w,
    each in its order, then yields the shard's end marker ``{"__shard__", "__end__": True, "samples", "skipped"}``.

    Every sample carries ``__shard__`` (its shard's name); the members of the same-named shards in the ``paired``
    folders (earlier stages' outputs) are merged in by key; ``prepare(sample) → sample`` runs last, in the worker
    (a module-level function or a ``functools.partial`` of one: it travels to the worker processes).
    """

    def __init__(self, urls: Sequence[str], keys: Sequence[str], paired: Sequence[tuple[str, Sequence[str]]] = (),
                 prepare: Callable[[dict], dict] | None = None, max_pixels: int = 0, min_side: int = 0,
                 num_labels: int = VOC_LABELS) -> None:
        super().__init__()
        self.max_pixels, self.min_side, self.num_labels = max_pixels, min_side, num_labels  # images outside them: counted skips, with a warning
        self.urls = [str(u) for u in urls]
        self.keys = tuple(keys)
        self.paired = [(str(d), tuple(k)) for d, k in paired]
        self.prepare = prepare

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            yield from self.shard(url)

    def shard(self, url: str) -> Iterator[dict]:
        """One shard's samples (paired members merged, prepared), then its end marker."""
        name = Path(url).name
        counter = SkipCounter()
        others = [{s["__key__"]: s for s in read_shard(str(Path(d) / name), k, counter, num_labels=self.num_labels)} for d, k in self.paired]
        skips = [_record_skips(Path(d) / name) for d, _ in self.paired]  # samples the earlier stages skipped
        n = 0
        for sample in read_shard(url, self.keys, counter, self.max_pixels, self.num_labels):
            image = sample.get("jpg")
            if image is not None and min(image.shape[:2]) < self.min_side:
                counter.skipped += 1
                logger.warning("skipped image %s of %s: %d×%d px, smaller than the network's stride %d (%d skipped so "
                               "far)", sample["__key__"], name, image.shape[1], image.shape[0], self.min_side,
                               counter.skipped)
                continue
            if any(sample["__key__"] not in other and skipped for other, skipped in zip(others, skips)):
                counter.skipped += 1  # an image an earlier stage skipped (too small or too large): skipped here too
                logger.warning("skipped image %s of %s: an earlier stage skipped it (%d skipped so far)",
                               sample["__key__"], name, counter.skipped)
                continue
            for other in others:
                if sample["__key__"] not in other:
                    raise DataError(f"{name}: sample {sample['__key__']} missing from the paired shard of an earlier "
                                    "stage; rerun that stage")
                sample.update({k: v for k, v in other[sample["__key__"]].items() if k != "__key__"})
            if self.prepare is not None:
                sample = self.prepare(sample)
            sample["__shard__"] = name
            n += 1
            yield sample
        yield {"__shard__": name, "__end__": True, "samples": n, "skipped": counter.skipped}


READER_IGNORES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")  # the stop signals: the main process owns them


def _stop_signals() -> set[signal.Signals]:
    return {getattr(signal, name) for name in READER_IGNORES if hasattr(signal, name)}


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Start reader workers inside this: the stop signals are held (blocked) in this thread while it forks them, so
    that a signal to the process group landing between a worker's fork and :func:`reader_worker_init` stays pending
    in the worker until it ignores it (torch's worker handler would end the worker, and a graceful stop became a
    "DataLoader worker exited unexpectedly" crash); this process gets a held signal when the block ends. Also makes
    sure no worker outlives an exit of this process (:func:`_end_workers_at_exit`)."""
    atexit.unregister(_end_workers_at_exit)  # once, and after multiprocessing's own exit hook: atexit runs LIFO
    atexit.register(_end_workers_at_exit)
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _end_workers_at_exit() -> None:
    """Kill the daemonic children still running when this process exits — the reader workers (e.g. of a reader left
    open by an exception whose traceback is kept): multiprocessing's own exit hook would send them SIGTERM, which they
    ignore, and then wait for them forever. (The CRF and packing pools' processes are not daemonic.)"""
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers are daemonic
            with contextlib.suppress(Exception):
                child.kill()
                child.join(5)


def reader_worker_init(parent: int, worker: int) -> None:
    """Set up a DataLoader reader worker (training stream and inference readers): it ignores the stop signals (a
    signal to the whole process group, e.g. ``scancel``, SLURM preemption, a container stop or a terminal's Ctrl-C,
    reaches it too; the main process checkpoints and then shuts the workers down) and ends when its parent process
    does (Linux), so a stage killed by SIGKILL never leaves workers blocked on a full queue. The stop signals arrive
    held (:func:`stop_signals_held`): they are released once ignored, and one sent meanwhile is dropped."""
    import ctypes
    import sys

    for sig in _stop_signals():  # after torch's own worker handlers (its SIGTERM one would end the worker)
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _stop_signals())
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _as_is(sample: dict) -> dict:
    """The DataLoader's collate for single samples: none (its default would turn numpy arrays into tensors)."""
    return sample


def shard_samples(urls: Sequence[str], keys: Sequence[str], *, paired: Sequence[tuple[str, Sequence[str]]] = (),
                  prepare: Callable[[dict], dict] | None = None, num_workers: int = 0,
                  pin_memory: bool = False, max_pixels: int = 0, min_side: int = 0,
                  num_labels: int = VOC_LABELS) -> _Samples:
    """The samples and end markers of :class:`ShardSamples` over ``urls``, decoded and prepared in ``num_workers``
    DataLoader worker processes (0: in this process), tensors in pinned memory with ``pin_memory`` (CUDA); images
    with more than ``max_pixels`` pixels (0: no cap) or a side under ``min_side`` are counted skips.

    Shards interleave (one sample from each worker in turn); within a shard the order is the tar's. The workers start
    when this is called; ``close()`` stops them. A worker's DataError is re-raised as its one line.
    """
    workers = min(num_workers, len(urls))
    loader = torch.utils.data.DataLoader(ShardSamples(urls, keys, paired, prepare, max_pixels, min_side, num_labels),
                                         batch_size=None, collate_fn=_as_is,
                                         num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None,
                                         worker_init_fn=functools.partial(reader_worker_init, os.getpid()) if workers else None)
    with stop_signals_held():
        return _Samples(iter(loader))  # the workers start here, before the caller starts any thread


class _Samples:
    """A reader's iterator with one-line worker errors; :meth:`close` stops its workers now."""

    def __init__(self, it: Iterator[dict]) -> None:
        self.it = it
        self.lines = _one_line_errors(it)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self.lines)

    def close(self) -> None:
        """Stop the workers (a no-op once the samples are exhausted)."""
        close_loader(self.it)


def _record_skips(path: Path) -> int:
    """The samples an earlier stage skipped in its output shard ``path`` (its record ``<shard>.json``; 0 without)."""
    from .shards import record_path

    rec = record_path(path)
    skipped = runs.read_json(rec).get("skipped", 0) if rec.is_file() else 0
    return skipped if isinstance(skipped, int) else 0


def _one_line_errors(it: Iterator[dict]) -> Iterator[dict]:
    """Re-raise a worker's DataError with its own message (the DataLoader wraps it in the worker's traceback)."""
    try:
        yield from it
        return
    except DataError as e:
        msg = str(e)
    finally:  # on any error, or this generator closed: stop the workers now, not whenever the traceback is freed
        close_loader(it)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split("DataError: ", 1)[-1]
    raise DataError(msg)
