"""The one inference engine: shard-parallel maps with resume (:func:`map_shards`), and per-image features of a split.

Shards are the unit of distributed inference and of resume: rank r of w takes shards i with i % w == r; an output
shard (with its per-shard records) appears only whole, by rename, so a rerun does only the shards that are missing.
Within a rank the model never waits for data: ``data.num_workers`` DataLoader workers decode and prepare the inputs
(worker k of n takes the rank's shards j with j % n == k), and one writer thread encodes the records, evaluates
the predictions and writes the finished shards while the next forward runs.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..errors import DataError
from ..data.shards import (check_skip_fraction, load_manifest, manifest_classes, record_path, record_problem, sha256_bytes, split_urls,
                           tar_bytes)
from ..data.stream import image_tensor, prepare_image, shard_samples
from ..errors import Interrupted
from .dist import dist
from .loop import StopAgreement, StopSignals

logger = logging.getLogger(__name__)

# sample → (output record or None, or a zero-argument function returning it: called in the writer thread, prediction)
Process = Callable[[dict], "tuple[dict | Callable[[], dict | None] | None, Any]"]
Evaluate = Callable[[dict, Any], "np.ndarray | None"]  # (sample, prediction) → confusion matrix or None
Prepare = Callable[[dict], dict]  # sample → sample, in a reader worker (module-level function or a partial of one)
WRITE_QUEUE = 8  # samples waiting for the writer thread at most (their predictions stay in memory until written)


def map_shards(cfg: Config, split: str, out_dir: Path, keys: tuple[str, ...], process: Process,
               evaluate: Evaluate | None = None, paired: Iterable[tuple[Path, tuple[str, ...]]] = (),
               desc: str = "", stage: str = "", prepare: Prepare | None = None, batch: int | None = None) -> dict:
    """Map ``process`` over every sample of ``split``, one output shard per input shard, across ranks.

    A stop signal (TERM, INT, USR1, USR2; the reader workers ignore them) stops the reading: the shards read to their
    end are still written, the one being read is dropped (the rerun redoes it), and every rank raises Interrupted.

    ``process(sample)`` returns ``(record, prediction)``: the record (``__key__`` + members, None, or a function
    making it, called off the critical path) goes into the output shard, the prediction to ``evaluate(sample,
    prediction)``, whose confusion matrices are summed per shard; both run in the writer thread, so a prediction
    must not change after ``process`` returned it. ``paired`` adds the members of same-named shards of earlier
    stages (merged by key). ``prepare(sample)`` runs in the ``data.num_workers`` reader workers before ``process``
    (e.g. :func:`wsss_dist.data.stream.prepare_image`, whose ``image`` :func:`image_tensor` moves to the device).
    With ``batch=n``, ``process`` takes a list of up to n consecutive samples of one shard whose images have the
    same size and returns a list of ``(record, prediction)``.
    Each output shard's record ``<shard>.json`` holds its sample counts, its sha256, the sha256 of the input shard
    it was made from, that of its confusion matrix ``<shard>.cm.npy`` and ``stage`` (the name to rerun to repair
    it); readers check the sha256s. Shards already written and matching their record (and made from the input shard
    as it is now) are skipped; a damaged or stale one is redone. Returns ``{"samples", "skipped", "cm"}`` summed over all shards (after a barrier, on
    every rank); more broken samples than ``data.max_skip_fraction`` is a DataError.
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
    made_from = manifest["splits"][split].get("sha256", {})  # output shard name = input shard name
    todo = [u for u in mine if not _shard_done(out_dir, Path(u).name, evaluate is not None, made_from.get(Path(u).name))]
    if len(todo) < len(mine):
        logger.info("%s: %d of %d shards of this rank already done, resuming", desc, len(mine) - len(todo), len(mine))
    stop, written = StopSignals("finishing the shards already read, dropping the one being read, then stopping"), 0
    if todo:
        samples = shard_samples(todo, keys, paired=[(str(pdir), pk) for pdir, pk in paired], prepare=prepare,
                                num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda",
                                max_pixels=cfg.data.max_pixels, min_side=cfg.model.output_stride,
                                num_labels=len(manifest_classes(manifest)) + 1)
        with contextlib.closing(samples), stop, \
                tqdm(total=sum(_count(manifest, split, u) for u in todo), desc=desc, disable=not d.main, unit="img") as bar:
            writer = _ShardWriter(out_dir, evaluate, stage or desc, made_from)
            pending: dict[str, list[dict]] = {}  # with batch: per shard, the samples waiting for their forward

            def run(group: list[dict]) -> None:
                outs = process(group) if batch is not None else [process(group[0])]
                for sample, (record, prediction) in zip(group, outs):
                    kept = {k: v for k, v in sample.items() if k != "image"} if evaluate is not None else None
                    writer.put(("sample", sample["__shard__"], record, kept, prediction))
                bar.update(len(group))

            try:
                for sample in samples:
                    if stop.signum:  # a stop signal: no new sample; the shards whose end was read are written
                        break
                    name = sample["__shard__"]
                    group = pending.get(name, [])
                    if group and (sample.get("__end__") or _size(sample) != _size(group[0])):
                        run(pending.pop(name))
                    if sample.get("__end__"):
                        writer.put(("end", name, sample["samples"], sample["skipped"]))
                    elif batch is None:
                        run([sample])
                    else:
                        pending.setdefault(name, []).append(sample)
                        if len(pending[name]) >= batch:
                            run(pending.pop(name))
            except BaseException:
                writer.close(check=False)  # the shards already whole are still written; this error is the one raised
                raise
            writer.close()
            written = writer.written
    agree = StopAgreement(d.world)  # the ranks agree on a stop (a signal may reach only some); also the barrier
    signum = agree(stop.signum) or agree.wait()
    if signum:
        raise Interrupted(signum, f"{desc or stage}: stopped by {signal.Signals(signum).name} with "
                                  f"{len(mine) - len(todo) + written} of {len(mine)} shards of this rank written in "
                                  f"{out_dir} (a shard being read when the signal came is redone)")
    result = _gather(out_dir, urls)
    check_skip_fraction(result["skipped"], result["samples"] + result["skipped"], cfg.data.max_skip_fraction, desc)
    return result


class _ShardWriter:
    """One background thread that encodes records, evaluates predictions and writes each output shard when its end
    marker arrives (per-shard records first, the shard itself last). Its error is raised in the caller's thread, by
    the next :meth:`put` or by :meth:`close`."""

    def __init__(self, out_dir: Path, evaluate: Evaluate | None, stage: str, made_from: dict[str, str]) -> None:
        self.out_dir, self.evaluate, self.stage, self.made_from = out_dir, evaluate, stage, made_from
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.written = 0  # output shards written
        self.thread = threading.Thread(target=self._run, name="map_shards-writer", daemon=True)
        self.thread.start()

    def put(self, item: tuple) -> None:
        """Queue one item (waits while the queue is full); raises the writer's error if it failed."""
        self._check()
        self.queue.put(item)  # a failed writer keeps draining its queue, so this never blocks for good

    def close(self, check: bool = True) -> None:
        """Wait until everything queued is written; with ``check``, raise the writer's error if it failed."""
        self.queue.put(None)
        self.thread.join()
        if check:
            self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        shards: dict[str, tuple[list, list]] = {}  # name → (records, confusion matrices) of a shard being read
        with torch.inference_mode():
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    continue  # drain: the caller sees the error at its next put
                try:
                    if item[0] == "sample":
                        self._sample(shards.setdefault(item[1], ([], [])), *item[2:])
                    else:
                        self._write(item[1], *shards.pop(item[1], ([], [])), *item[2:])
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e

    def _sample(self, shard: tuple[list, list], record: Any, sample: dict | None, prediction: Any) -> None:
        outputs, cms = shard
        if callable(record):
            record = record()
        if record is not None:
            outputs.append(record)
        if self.evaluate is not None:
            cm = self.evaluate(sample, prediction)
            if cm is not None:
                cms.append(cm)

    def _write(self, name: str, outputs: list, cms: list, samples: int, skipped: int) -> None:
        """An output shard: the per-shard records first, the shard itself last (a shard on disk is a finished one)."""
        extra = {}
        if self.evaluate is not None:
            cm_path = runs.write_npy(self.out_dir / f"{name}.cm.npy", np.sum(cms, axis=0) if cms else np.zeros((0,), np.int64))
            extra["cm_sha256"] = sha256_bytes(cm_path.read_bytes())
        data, records = tar_bytes(outputs)
        runs.write_json(record_path(self.out_dir / name), {"samples": samples, "skipped": skipped, "records": records,
                                                           "sha256": sha256_bytes(data), "stage": self.stage,
                                                           "input_sha256": self.made_from.get(name), **extra})
        runs.atomic_write(self.out_dir / name, data)
        self.written += 1


def _size(sample: dict) -> tuple[int, ...]:
    """The image size of a sample (the batching key of :func:`map_shards`)."""
    image = sample.get("image", sample.get("jpg"))
    return tuple(image.shape) if image is not None else ()


def _shard_done(out_dir: Path, name: str, with_cm: bool, input_sha256: str | None = None) -> bool:
    """An output shard is finished when it and its records exist (they are written before it), it and its confusion
    matrix match the sha256s of its record, and it was made from the input shard as it is now (else it is redone)."""
    if not all((out_dir / f).exists() for f in (name, f"{name}.json") + ((f"{name}.cm.npy",) if with_cm else ())):
        return False
    problem = record_problem(out_dir / name) or (_cm_problem(out_dir, name) if with_cm else None)
    if problem is None and input_sha256 is not None:
        made_from = runs.read_json(record_path(out_dir / name)).get("input_sha256")
        if made_from != input_sha256:
            problem = "made from another version of its input shard (the shards were rebuilt since)"
    if problem is not None:
        logger.warning("%s: %s; redoing it", out_dir / name, problem)
    return problem is None


def _cm_problem(out_dir: Path, name: str) -> str | None:
    """Why ``<shard>.cm.npy`` does not match the sha256 in the shard's record (None when it does)."""
    want = runs.read_json(record_path(out_dir / name)).get("cm_sha256")
    path = out_dir / f"{name}.cm.npy"
    if want is None:
        return f"its record {record_path(out_dir / name)} has no checksum of {path.name} (written by an older version)"
    return None if path.is_file() and sha256_bytes(path.read_bytes()) == want else \
        f"{path.name} differs from the sha256 in its record (changed after it was written)"


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
        try:
            info = runs.read_json(out_dir / f"{name}.json")
        except FileNotFoundError:
            raise DataError(f"{out_dir / name}: its record {name}.json is missing; run stage={out_dir.name} again: it "
                            "redoes exactly the shards without records") from None
        samples += info["samples"]
        skipped += info["skipped"]
        p = out_dir / f"{name}.cm.npy"
        if p.exists():
            problem = _cm_problem(out_dir, name)
            if problem is not None:
                raise DataError(f"{p}: {problem}; run stage={info.get('stage') or out_dir.name} again: it redoes "
                                "exactly the damaged shards")
            m = np.load(p, allow_pickle=False)
            if m.size:
                cm = m if cm is None else cm + m
    return {"samples": samples, "skipped": skipped, "cm": cm}


@torch.no_grad()
def split_features(cfg: Config, split: str, features: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, np.ndarray]:
    """``features(image [1, 3, H, W]) → [1, D]`` of every image of ``split``, in shard order, on this process's
    device (images decoded in ``data.num_workers`` reader workers): ``{"keys", "features" [N, D], "labels" [N, K]}``."""
    device = dist().device
    urls = split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir, verify=False))
    rows: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {Path(u).name: [] for u in urls}
    samples = shard_samples(urls, ("jpg", "cls.npy"), prepare=prepare_image, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda", max_pixels=cfg.data.max_pixels)
    with contextlib.closing(samples), StopSignals("stopping now (the features are computed again on rerun)") as stop:
        for s in samples:
            if stop.signum:
                raise Interrupted(stop.signum, f"features of {split}: stopped by {signal.Signals(stop.signum).name} "
                                               "(nothing to keep: the rerun computes them again)")
            if not s.get("__end__"):
                f = features(image_tensor(s, device))[0].float().cpu().numpy()
                rows[s["__shard__"]].append((s["__key__"], f, s["cls.npy"]))
    ordered = [r for u in urls for r in rows[Path(u).name]]  # workers interleave shards: back to shard order
    return {"keys": np.array([r[0] for r in ordered]), "features": np.stack([r[1] for r in ordered]),
            "labels": np.stack([r[2] for r in ordered]).astype(np.float32)}
