"""The pipeline runner, shared by the command line and the launcher's jobs: logging, the saved config, one stage
(skipped when done, ``DONE`` written on rank 0), the stages of a config in order, and one-line user errors.
"""
from __future__ import annotations

import errno
import contextlib
import importlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, Callable

from . import runs
from .config import Config, load_yaml, to_dict, to_yaml
from .errors import Interrupted, UserError
from .locks import StageLock

logger = logging.getLogger("wsss_dist")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3  # checkpointed on a signal; run the same command again to resume
EXIT_SIGINT = 130  # checkpointed on Ctrl-C (128 + SIGINT, what shells expect); rerun to resume
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST,
                                errno.ENOTDIR, errno.EISDIR, errno.EFBIG})
VOLATILE_KEYS = ("stage", "cluster", "log_level", "slurm", "report")  # may differ between calls on one run
SINGLE_PROCESS = ("shards", "report")  # stages that are not data-parallel: under several processes only rank 0 runs
ALWAYS_RUN = ("report",)  # rebuilt on every call
# done, but ``stage=<it>`` alone runs it again: it verifies its output shards and redoes exactly the damaged ones
RUN_WHEN_ASKED = ("shards", "cam", "aff", "pseudo", "eval")


def redo(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` runs although its DONE marker exists (report always; shards and the stages that write
    output shards when ``stage=`` names only them)."""
    return stage in ALWAYS_RUN or (stage in RUN_WHEN_ASKED and cfg.stages() == [stage])


def world_size() -> int:
    """The number of processes of the job (from the env:// variables Accelerate, torchrun and our SLURM glue set)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of the job (from the env:// variables Accelerate, torchrun and our SLURM glue set)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with rank and time; only rank 0 logs INFO."""
    rank = int(os.environ.get("RANK", "0"))
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s" if "WORLD_SIZE" in os.environ else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else "WARNING", format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("accelerate").setLevel("WARNING")  # its per-file checkpoint lines drown ours


def save_config(cfg: Config) -> None:
    """Write ``runs/<run>/config.yaml`` once (real YAML); warn when a later call changes run-level keys."""
    path = cfg.run_dir / "config.yaml"
    new = to_dict(cfg)
    if path.exists():
        from omegaconf import OmegaConf

        old = OmegaConf.to_container(load_yaml(path))
        changed = [k for k in new if k not in VOLATILE_KEYS and old.get(k) != new[k]]
        if changed:
            logger.warning("config differs from the run's saved %s in: %s (the saved file is kept)", path, ", ".join(changed))
        return
    runs.atomic_write(path, to_yaml(cfg))


def run_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Run one stage unless its DONE marker exists; write DONE (rank 0) with the stage's metrics."""
    if runs.is_done(cfg.run_dir, stage) and not redo(cfg, stage):
        logger.info("stage %s: already done (%s), skipping", stage, cfg.run_dir / stage / "DONE")
        return runs.read_done(cfg.run_dir, stage)
    if stage in SINGLE_PROCESS and world_size() > 1:  # not data-parallel: rank 0 works, the others wait for it
        from .engine.dist import dist

        d = dist()
        metrics = _run_stage(cfg, stage) if d.main else {}
        d.barrier()
        return metrics if d.main else runs.read_done(cfg.run_dir, stage)
    metrics = _run_stage(cfg, stage)
    if world_size() > 1:  # rank 0 writes DONE: no rank starts the next stage (which checks it) before that
        from .engine.dist import dist

        dist().barrier()
    return metrics


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children (e.g. DataLoader workers), in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run_stage(cfg: Config, stage: str) -> dict[str, Any]:
    module = importlib.import_module(f"wsss_dist.stages.{stage}")
    owner = is_main_process() and stage != "report"  # one owner per (run, stage): rank 0 holds its LOCK
    with StageLock(cfg.run_dir, stage) if owner else contextlib.nullcontext():
        t0, c0 = time.time(), cpu_seconds()
        logger.info("stage %s: starting (run %s; %s)", stage, cfg.run_dir, stage_setup(cfg, stage))
        metrics = module.run(cfg) or {}
        metrics.setdefault("seconds", round(time.time() - t0, 1))
        metrics.setdefault("cpu_seconds", round(cpu_seconds() - c0, 1))  # comparable across loaded machines
        if metrics.pop("partial", False):  # e.g. one round of method=sc: not finished yet
            logger.info("stage %s: part finished in %.1f s", stage, time.time() - t0)
            return metrics
        if is_main_process():
            runs.mark_done(cfg.run_dir, stage, metrics)
    logger.info("stage %s: done in %.1f s %s", stage, time.time() - t0, summary(metrics))
    return metrics


def stage_setup(cfg: Config, stage: str) -> str:
    """What a stage runs with, for its first log line: device, world size, precision, backbone and weights."""
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    precision = {"teacher": cfg.teacher.train.mixed_precision, "cls": cfg.cls.train.mixed_precision,
                 "cam": cfg.cam.mixed_precision, "aff": cfg.aff.train.mixed_precision,
                 "seg": cfg.seg.train.mixed_precision}.get(stage, "no")
    if stage == "teacher":
        net, weights = cfg.teacher.arch, cfg.teacher.weights
    elif stage in ("seg", "eval"):
        net, weights = cfg.seg.backbone, cfg.seg.weights if cfg.seg.init == "imagenet" else "the classifier's backbone"
    else:
        net = cfg.model.backbone
        weights = "the classifier's backbone" if stage == "aff" and cfg.aff.init == "cls" else cfg.model.weights
    if stage in ("cam", "pseudo", "eval"):
        weights = "this run's trained model"
    if stage in ("shards", "report"):
        return f"device {device}, world {world_size()}"
    return f"device {device}, world {world_size()}, precision {precision}, backbone {net}, weights {weights or 'none'}"


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run the config's stages in order, skipping finished ones."""
    if is_main_process():
        save_config(cfg)
    return {stage: run_stage(cfg, stage) for stage in cfg.stages()}


def summary(metrics: Any) -> str:
    """The headline figures of a stage's metrics on one line (``miou=0.5400 loss=0.2546 ...``)."""
    if not isinstance(metrics, dict):
        return ""
    keys = [k for k in ("miou", "best_miou", "best_threshold", "loss", "samples", "skipped") if k in metrics]
    return " ".join(f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)


def describe_fault(e: OSError) -> str:
    """``<path>: <cause>`` of an environment fault, on one line (nothing half-written is ever used: see runs.py)."""
    path = e.filename if e.filename is not None else "(unknown path)"
    return f"{path}: {e.strerror or errno.errorcode.get(e.errno, e.errno)} ({type(e).__name__})"


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the command line's contract for user errors)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def environment_fault(e: BaseException) -> OSError | None:
    """The OSError of the environment (permissions, full disk, read-only or wrong kind of path) behind ``e``, if any:
    ``e`` itself or an exception it was raised from or during (e.g. the ``write to closed file`` after ENOSPC)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


STOP_NOW = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # outside the engine's loops (which checkpoint first): stop at once


def _stop_now(signum: int, frame: Any) -> None:
    """A stop signal outside the engine's loops: stop at once (every artifact is written atomically, so all that
    is finished stays; the engine's loops install their own handlers, which checkpoint first)."""
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} (everything finished so far is kept)")


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; a user error, an environment fault or an interruption (a stop signal, Ctrl-C) prints one line on
    stderr and exits (2, 2, 3 or 130), no traceback."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_NOW:
            if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) == signal.SIG_DFL:
                old[getattr(signal, name)] = signal.signal(getattr(signal, name), _stop_now)
    try:
        return fn()
    except UserError as e:
        code, message = EXIT_USER_ERROR, f"error: {one_line(e)}"
    except Interrupted as e:
        code = EXIT_SIGINT if e.signum == signal.SIGINT else EXIT_INTERRUPTED
        message = f"interrupted: {one_line(e)}; run the same command again to resume"
    except KeyboardInterrupt:  # Ctrl-C outside the engine's loops, or twice: what is finished is kept
        code, message = EXIT_SIGINT, ("interrupted: stopped by SIGINT (everything finished so far is kept); run the "
                                      "same command again to resume")
    except Exception as e:
        fault = environment_fault(e)
        if fault is None:
            raise
        code, message = EXIT_USER_ERROR, f"error: {describe_fault(fault)}"
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    sys.stderr.flush()
    print(message, file=sys.stderr)
    sys.exit(code)
