"""Checkpoints: accelerate state, atomic, with a completion marker (trained weights: :mod:`wsss_dist.models.weights`)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .. import runs

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written into a checkpoint dir after everything else; a dir without it is never loaded
PREFIX = "step-"
TRAIN_STATE = "train_state.json"  # the loop's own state (step, loss, skipped): JSON, never a pickle
LEGACY_STATE = "custom_checkpoint_0.pkl"
RNG_PICKLES = "random_states_*.pkl"  # accelerate's pickled RNG states: removed from every checkpoint we write  # older checkpoints: accelerate's pickle of the same dict


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/ckpt`` (those holding the COMPLETE marker), oldest first."""
    ckpt = Path(out_dir) / "ckpt"
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.glob(PREFIX + "*") if p.is_dir() and (p / COMPLETE).is_file())


def newest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/ckpt``, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def checkpoint_step(path: str | Path) -> int:
    """The step number in a checkpoint dir name ``step-00000042``."""
    return int(Path(path).name[len(PREFIX):])


def remove_partial(out_dir: str | Path) -> None:
    """Delete temporary dirs left by a checkpoint write that was killed (call on the main process, before training)."""
    ckpt = Path(out_dir) / "ckpt"
    for p in ckpt.glob(".tmp-*") if ckpt.is_dir() else []:
        logger.info("removing the unfinished checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    runs.remove_stale_tmp(ckpt)  # an old checkpoint moved aside by a replace that was killed


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(accelerator, out_dir: str | Path, step: int, keep: int = 2, state: dict | None = None) -> Path:
    """``accelerator.save_state`` (+ ``state`` as JSON) into ``out_dir/ckpt/step-N`` atomically; keep the newest ``keep``.

    Collective. Every rank writes into ``.tmp-step-N``; after a barrier rank 0 writes ``train_state.json``, fsyncs,
    writes COMPLETE and renames the dir. A process killed at any point leaves the previous checkpoints loadable.
    """
    ckpt = Path(out_dir) / "ckpt"
    final, tmp = ckpt / f"{PREFIX}{step:08d}", ckpt / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint (it has no COMPLETE marker anyway)
        raise _disk_full(e, tmp) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for rng in tmp.glob(RNG_PICKLES):  # every step reseeds from (seed, step, rank): the loop never needs them
            rng.unlink()
        runs.write_json(tmp / TRAIN_STATE, state if state is not None else {"step": step})
        _fsync_tree(tmp)
        runs.write_json(tmp / COMPLETE, {"step": step, "time": time.time(), "world": accelerator.num_processes})
        runs.replace(tmp, final)  # an incomplete dir of the same step is moved aside, never deleted before the rename
        for stale in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _disk_full(e: Exception, path: Path) -> Exception:
    """The error to raise for a failed checkpoint write: an ENOSPC OSError naming ``path`` when the disk is full
    (torch's zip writer reports that as ``unexpected pos``, without the cause), else ``e`` itself."""
    if isinstance(e, OSError):
        return e
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    if "unexpected pos" in str(e) or 0 <= free < (16 << 20):
        return OSError(errno.ENOSPC, "No space left on device while writing a checkpoint", str(path))  # the free
        # space is named by the one-line report (pipeline.describe_fault)
    return e


def read_train_state(ckpt: str | Path) -> dict:
    """The loop state saved with a checkpoint: ``train_state.json``, or an older checkpoint's pickle read weights_only.

    Nothing in a checkpoint is unpickled with arbitrary globals (accelerate loads its own files weights_only too).
    """
    ckpt = Path(ckpt)
    if (ckpt / TRAIN_STATE).is_file():
        state = runs.read_json(ckpt / TRAIN_STATE)
    elif (ckpt / LEGACY_STATE).is_file():
        state = torch.load(ckpt / LEGACY_STATE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{ckpt}: no {TRAIN_STATE}")
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{ckpt}: {TRAIN_STATE} holds no step")
    return state
