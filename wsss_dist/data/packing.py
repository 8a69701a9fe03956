"""Packing shards: one sample's validated record, whole shards written by one process or a pool of spawned processes,
and the progress journal that lets an interrupted full build keep what it packed (the manifest: :mod:`.shards`)."""
from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .. import runs
from ..errors import DataError
from .tario import sha256_bytes, tar_bytes
from .voc import VOCSource, write_mask_png

SHARD_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tar$")  # a shard file name: no '/', never '..' or hidden


def check_jpeg(data: bytes, where: str | os.PathLike) -> None:
    """DataError naming ``where`` unless ``data`` is a JPEG that decodes completely (not truncated, not other bytes)."""
    if not data.startswith(b"\xff\xd8"):
        raise DataError(f"{where}: not a JPEG file (expected JPEG bytes starting with FF D8, got {data[:8]!r})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise ValueError(f"decoded as {img.format}")
            img.load()  # a truncated file fails here ("image file is truncated")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"{where}: broken JPEG ({type(e).__name__}: {e}); replace the file or remove its id "
                        "from the split list") from None


def _sample(source: VOCSource, image_id: str, need_mask: bool = False) -> dict:
    jpg = source.jpeg_bytes(image_id)
    check_jpeg(jpg, source.jpeg_path(image_id))
    sample = {"__key__": image_id, "jpg": jpg, "cls.npy": source.labels(image_id).astype(np.float32)}
    mask = source.mask(image_id)
    if mask is not None:
        sample["seg.png"] = write_mask_png(None, mask)
    elif need_mask:
        raise DataError(f"{source.expected_mask_path(image_id)}: mask not found "
                        f"(image {image_id} is in a segmentation list, whose images all need ground truth)")
    return sample


PROGRESS = ".pack-progress.json"  # the shards an unfinished full build packed (removed once the manifest is written)


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def shard_index(name: str) -> int:
    """The index in a shard's file name."""
    return int(name.rsplit("-", 1)[1].split(".")[0])


def _pack_one(source: Any, split: str, index: int, chunk: Sequence[str], out_dir: Path, n_classes: int) -> dict:
    """Pack one shard (validated samples: broken files are a DataError), written whole; its record for the manifest."""
    samples = [_sample(source, image_id, need_mask=split in source.seg_splits) for image_id in chunk]
    data, count = tar_bytes(samples)
    runs.atomic_write(out_dir / shard_name(split, index), data)
    hist = np.zeros(n_classes, np.int64)
    for s in samples:
        hist += s["cls.npy"] > 0.5
    return {"count": count, "class_hist": hist.tolist(), "with_mask": sum("seg.png" in s for s in samples),
            "sha256": sha256_bytes(data), "bytes": len(data)}


def _pack_task(source: Any, split: str, index: int, chunk: Sequence[str], out_dir: Path,
               n_classes: int) -> tuple[dict | None, str | None]:
    """In a packing process: (record, None), or (None, the one-line reason) for a data problem; an OSError (a full
    disk, a file that cannot be read) reaches the stage as itself, whose one line names the file and, for a full disk,
    the free space (``pipeline.describe_fault``)."""
    try:
        return _pack_one(source, split, index, chunk, out_dir, n_classes), None
    except DataError as e:
        return None, str(e)


def _worker_init(parent: int) -> None:
    """A packing process: Ctrl-C is the parent's to handle (it stops us); end when the parent is gone."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # orphaned (the parent was killed): nothing to finish, a shard is only ever written whole

    threading.Thread(target=watch, daemon=True).start()


def _for_shard(source: Any, chunk: Sequence[str]) -> Any:
    """What a packing process needs of ``source`` for ``chunk`` (COCO: only those images' annotations)."""
    restricted = getattr(source, "restricted", None)
    return restricted(chunk) if callable(restricted) else source


def open_journal(out_dir: Path, key: dict) -> dict:
    """The progress record of a full build: the shards an interrupted build of the same inputs packed and whose tars
    still match (kept), or a fresh one."""
    path = out_dir / PROGRESS
    journal = {**key, "shards": {}}
    try:
        old = runs.read_json(path) if path.is_file() else None
    except (ValueError, OSError):
        old = None
    if isinstance(old, dict) and all(old.get(k) == v for k, v in key.items()) and isinstance(old.get("shards"), dict):
        for name, rec in old["shards"].items():
            tar = out_dir / str(name)
            try:
                if (SHARD_RE.match(str(name)) and tar.is_file() and tar.stat().st_size == rec["bytes"]
                        and runs.sha256_file(tar) == rec["sha256"]):
                    journal["shards"][name] = rec
            except (OSError, KeyError, TypeError):
                continue
    for tmp in out_dir.glob(".*.tar.tmp-*"):  # left by a killed packer: never a shard, never read
        tmp.unlink(missing_ok=True)
    return journal


def _stop_pool(pool: Any, out_dir: Path) -> None:
    """Cancel the shards not started and end the packing processes now; the temporary file of a shard they were
    writing is removed (a shard appears only whole, by an atomic rename)."""
    procs = dict(getattr(pool, "_processes", None) or {})  # no public API ends running workers (shutdown clears it)
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs.values():
        proc.terminate()
    for pid, proc in procs.items():
        proc.join(timeout=10)
        for tmp in out_dir.glob(f".*.tar.tmp-{pid}-*"):
            tmp.unlink(missing_ok=True)


def pack_shards(source: Any, out_dir: Path, jobs: Sequence[tuple[str, int, Sequence[str]]], workers: int, bar: Any,
                 journal: dict | None = None) -> dict[str, dict]:
    """Pack ``jobs`` ((split, index, ids) each) into whole shards, ``workers`` processes at once; their records.

    Several workers: a pool of 'spawn' processes (a fresh interpreter each, never a fork of a parent that may hold
    torch's threads or CUDA; 'forkserver' would be as safe but is not on every platform, and a spawned packer starts
    in ~0.7 s and imports no torch, against minutes of packing), each writing whole shards; the parent alone records them (``journal``, written at most
    every 2 s and when stopped, lets a rerun keep them). A failed shard is one DataError naming the shard; Ctrl-C or
    SIGTERM ends the processes (no shard is half written: each appears by an atomic rename).
    """
    import signal
    import threading

    n_classes = len(source.classes)
    packed: dict[str, dict] = {}
    last = [time.monotonic()]

    def done(split: str, index: int, rec: dict) -> None:
        name = shard_name(split, index)
        packed[name] = rec
        bar.update(rec["count"])
        if journal is not None:
            journal["shards"][name] = rec
            if time.monotonic() - last[0] > 2.0:
                runs.write_json(out_dir / PROGRESS, journal)
                last[0] = time.monotonic()

    def fail(split: str, index: int, why: str) -> DataError:
        return DataError(f"{out_dir / shard_name(split, index)}: not packed: {why}; fix it and run stage=shards "
                         "again (the shards already packed are kept)")

    try:
        if workers <= 1 or len(jobs) <= 1:
            for split, index, chunk in jobs:
                rec, why = _pack_task(source, split, index, chunk, out_dir, n_classes)
                if why is not None:
                    raise fail(split, index, why)
                done(split, index, rec)
            return packed
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        def on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, on_term) if main else None
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            # at most 2 shards queued per process: a COCO shard's annotations travel with it, not the whole index
            queue, running = list(jobs), {}
            while queue or running:
                while queue and len(running) < 2 * min(workers, len(jobs)):
                    split, index, chunk = queue.pop(0)
                    fut = pool.submit(_pack_task, _for_shard(source, chunk), split, index, list(chunk), out_dir,
                                      n_classes)
                    running[fut] = (split, index)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: running[f]):
                    split, index = running.pop(fut)
                    try:
                        rec, why = fut.result()
                    except BrokenProcessPool as e:
                        raise fail(split, index, f"its packing process died ({e or 'killed'})") from None
                    except OSError:
                        raise  # the environment's fault, named by the stage (the file, the free space)
                    except Exception as e:  # noqa: BLE001 - a bug in a worker: named, its traceback chained
                        raise fail(split, index, f"{type(e).__name__}: {e}") from e
                    if why is not None:
                        raise fail(split, index, why)
                    done(split, index, rec)
        except BaseException:
            _stop_pool(pool, out_dir)
            raise
        else:
            pool.shutdown(wait=True)
        finally:
            if main:
                signal.signal(signal.SIGTERM, old_term)
        return packed
    finally:
        if journal is not None and packed:
            runs.write_json(out_dir / PROGRESS, journal)
