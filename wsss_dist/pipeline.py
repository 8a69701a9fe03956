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
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

from pathlib import Path

from . import fingerprints, runs
from .config import PRECISION_KEYS, STAGES, Config, data_settings, get, to_yaml
from .errors import Interrupted, RunConfigChanged, UserError
from .locks import StageLock
from .registry import STAGE_SPECS, trainer_section

logger = logging.getLogger("wsss_dist")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3  # checkpointed on a signal; run the same command again to resume
EXIT_SIGINT = 130  # checkpointed on Ctrl-C (128 + SIGINT, what shells expect); rerun to resume
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST,
                                errno.ENOTDIR, errno.EISDIR, errno.EFBIG})
SINGLE_PROCESS = tuple(s.name for s in STAGE_SPECS.values() if not s.data_parallel)  # under several processes: rank 0
ALWAYS_RUN = tuple(s.name for s in STAGE_SPECS.values() if s.always_runs)  # rebuilt on every call
# done, but ``stage=<it>`` alone runs it again: it verifies its output shards and redoes exactly the damaged ones
RUN_WHEN_ASKED = tuple(s.name for s in STAGE_SPECS.values() if s.repairs_when_asked)


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
    """Write ``runs/<run>/config.yaml`` (real YAML): the config of the latest call, which :func:`check_settings` has
    made agree with every stage that finished or began (so a failed first try does not pin its values)."""
    path = cfg.run_dir / "config.yaml"
    text = to_yaml(cfg)
    if not path.is_file() or path.read_bytes() != text.encode():  # (a damaged file is simply rewritten)
        runs.atomic_write(path, text)


def run_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Run one stage unless it is done with the same fingerprint; write DONE (rank 0) with the stage's metrics and
    fingerprint. A DONE made from other inputs (shards rebuilt, an upstream stage redone with other results) or
    named by ``redo=`` is set aside and the stage runs from scratch."""
    action, why = stage_action(cfg, stage)
    if action == "skip":
        logger.info("stage %s: already done (%s), skipping", stage, cfg.run_dir / stage / "DONE")
        return runs.read_done(cfg.run_dir, stage)
    if action == "restart":
        logger.warning("stage %s: %s: running it again from scratch", stage, why)
    fresh = action == "restart"
    if stage in SINGLE_PROCESS and world_size() > 1:  # not data-parallel: rank 0 works, the others wait for it
        from .engine.dist import dist

        d = dist()
        metrics = _run_stage(cfg, stage, fresh) if d.main else {}
        d.long_barrier(60 * max(60, cfg.slurm.time_min))  # as long as the job may live, at least an hour
        return metrics if d.main else runs.read_done(cfg.run_dir, stage)
    if fresh and world_size() > 1:  # rank 0 clears the stage folder before any rank reads it
        from .engine.dist import dist

        if is_main_process():
            runs.clear_stage(cfg.run_dir, stage)
        dist().barrier()
        fresh = False
    metrics = _run_stage(cfg, stage, fresh)
    if world_size() > 1:  # rank 0 writes DONE: no rank starts the next stage (which checks it) before that
        from .engine.dist import dist

        dist().barrier()
    return metrics


def stage_action(cfg: Config, stage: str) -> tuple[str, str]:
    """What ``stage`` does now: ``skip`` (done, same fingerprint), ``run`` (not done, or asked to verify its outputs)
    or ``restart`` (its outputs were made from other inputs, or ``redo=``), with the reason."""
    if stage in cfg.redo_stages():
        return "restart", f"redo={cfg.redo}"
    path = cfg.run_dir / stage
    old = fingerprints.recorded(path) or _started(path)
    if not old:  # not begun, or a DONE of a version without fingerprints
        return ("skip" if runs.is_done(cfg.run_dir, stage) and not redo(cfg, stage) else "run"), ""
    if stage != "shards" and ((cfg.shards_dir / "manifest.json").exists() or old.get("inputs", {}).get("shards")):
        from .data.shards import load_manifest  # a damaged or lost manifest is an error, never a reason to start over

        load_manifest(cfg.shards_dir, verify=False)
    now = fingerprints.fingerprint(cfg, stage)
    if old.get("inputs") != now.inputs:
        what = ", ".join(k for k in sorted(set(old.get("inputs", {})) | set(now.inputs))
                         if old.get("inputs", {}).get(k) != now.inputs.get(k))
        return "restart", f"made from other inputs than now ({what} changed since)"
    if not runs.is_done(cfg.run_dir, stage) or redo(cfg, stage):
        return "run", ""
    return "skip", ""


def check_settings(cfg: Config, stages: list[str] | None = None) -> None:
    """:class:`RunConfigChanged` when a stage that is done (or begun) in the run used other values of the keys that
    shape it: a run is its config (a new ``run=``, or ``redo=STAGE`` to redo it and what follows). Also when the
    shards folder holds shards of other data settings."""
    stages = cfg.stages() if stages is None else stages
    _check_shards_settings(cfg, stages)
    for stage in STAGES:
        if stage in ALWAYS_RUN or stage in cfg.redo_stages():
            continue
        old = fingerprints.recorded(cfg.run_dir / stage) or _started(cfg.run_dir / stage)
        if "settings" not in old:
            continue
        diff = fingerprints.changed_settings(old["settings"], fingerprints.stage_settings(cfg, stage))
        if diff:
            state = "finished" if runs.is_done(cfg.run_dir, stage) else "began"
            raise RunConfigChanged(
                f"run {cfg.run_dir} {state} stage {stage} with other settings ({'; '.join(diff)}); a run is its "
                f"config: choose a new run=NAME for these settings, or add redo={stage} to run {stage} again with "
                "them (the stages after it follow)")


def _check_shards_settings(cfg: Config, stages: list[str]) -> None:
    """The shards a stage reads must have been built from this config's data settings."""
    if stages == ["report"]:
        return
    from .data.shards import settings_conflict

    problem = settings_conflict(cfg.shards_dir / "manifest.json", data_settings(cfg))
    if problem:
        raise RunConfigChanged(problem)


def _started(path: Path) -> dict[str, Any]:
    """The fingerprint a stage recorded when it began (``<stage>/STARTED``), {} when none."""
    try:
        rec = runs.read_json(path / "STARTED")
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children (e.g. DataLoader workers), in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run_stage(cfg: Config, stage: str, fresh: bool = False) -> dict[str, Any]:
    module = importlib.import_module(f"wsss_dist.stages.{stage}")
    owner = is_main_process() and stage != "report"  # one owner per (run, stage): rank 0 holds its LOCK
    with StageLock(cfg.run_dir, stage) if owner else contextlib.nullcontext(), run_log(cfg.run_dir):
        if fresh:
            runs.clear_stage(cfg.run_dir, stage)
        fp = fingerprints.fingerprint(cfg, stage) if stage != "report" else None
        if is_main_process():
            if fp is not None:
                runs.write_json(runs.stage_dir(cfg.run_dir, stage) / "STARTED", fp.record())
            runs.write_json(runs.stage_dir(cfg.run_dir, stage) / "environment.json",
                            environment(STAGE_SPECS[stage].uses_gpu))
        t0, c0 = time.time(), cpu_seconds()
        logger.info("stage %s: starting (run %s; %s)", stage, cfg.run_dir, stage_setup(cfg, stage))
        metrics = module.run(cfg) or {}
        metrics.setdefault("seconds", round(time.time() - t0, 1))
        metrics.setdefault("cpu_seconds", round(cpu_seconds() - c0, 1))  # comparable across loaded machines
        if metrics.pop("partial", False):  # e.g. one round of method=sc: not finished yet
            logger.info("stage %s: part finished in %.1f s", stage, time.time() - t0)
            return metrics
        if is_main_process():
            if fp is not None:
                out = (fingerprints.manifest_digest(cfg.shards_dir) if stage == "shards"
                       else fingerprints.output_digest(fingerprints.stage_path(cfg, stage)))
                metrics["fingerprint"] = fp.record(out)
            log_scores(cfg, stage, metrics)
            runs.mark_done(cfg.run_dir, stage, metrics)
    logger.info("stage %s: done in %.1f s %s", stage, time.time() - t0, summary(metrics))
    return metrics


def log_scores(cfg: Config, stage: str, metrics: dict[str, Any]) -> None:
    """A stage's mIoU (and best-threshold mIoU) and per-class IoU in TensorBoard (``<stage>/tb``, beside the losses)
    and the trackers of ``log_with``."""
    if not isinstance(metrics.get("miou"), float):
        return
    from .data.datasets import dataset_classes
    from .engine.scalars import open_scalars

    with contextlib.closing(open_scalars(cfg.run_dir / stage / "tb", cfg.log_with, f"{cfg.run_dir.name}/{stage}")) as writer:
        writer.add_scalar(f"{stage}/miou", metrics["miou"], 0)
        if isinstance(metrics.get("best_miou"), float):
            writer.add_scalar(f"{stage}/best_miou", metrics["best_miou"], 0)
        for name, iou in zip(("background", *dataset_classes(cfg)), metrics.get("iou") or []):
            if iou is not None:
                writer.add_scalar(f"{stage}/iou/{name}", iou, 0)


@contextlib.contextmanager
def run_log(run_dir: Path) -> Any:
    """While a stage runs, rank 0's log lines also go to ``runs/<run>/run.log`` (appended), whatever the entry point."""
    if not is_main_process():
        yield
        return
    handler = logging.FileHandler(Path(run_dir) / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def environment(gpu: bool = True) -> dict[str, Any]:
    """What a stage ran with: versions, the package's git commit, the command line, host, CPUs and GPUs (``gpu``
    False, a CPU-only stage such as shards or report: ``cuda`` and ``gpus`` are not looked up unless torch is
    already imported, so such a job never imports torch for them)."""
    import platform
    import socket
    import subprocess
    from importlib import metadata

    versions = {}
    for name in ("wsss-dist", "torch", "torchvision", "accelerate", "timm", "numpy", "submitit", "webdataset", "open_clip_torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    src = Path(__file__).resolve().parent
    git = {}
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            git = {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    torch = sys.modules.get("torch")
    if gpu and torch is None:
        import torch
    cuda = torch is not None and torch.cuda.is_available()
    return {"python": platform.python_version(), "versions": versions, "package": str(src),
            "cuda": torch.version.cuda if torch is not None else None, "git": git,
            "argv": sys.argv, "host": socket.gethostname(), "cpus": os.cpu_count(), "world_size": world_size(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "gpus_used": world_size() if cuda and gpu else 0, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def stage_setup(cfg: Config, stage: str) -> str:
    """What a stage runs with, for its first log line: device, world size, precision, backbone and weights."""
    spec = STAGE_SPECS[stage]
    if not spec.uses_gpu:  # a CPU stage (shards, report): no torch to import for the line
        return f"device cpu, world {world_size()}"
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    key = f"{trainer_section(cfg, stage)}.train.mixed_precision" if spec.trains else spec.precision_key  # IRN's under refine=irn
    precision = get(cfg, key) if key else "no"
    net_key, weights_key = spec.network(cfg), spec.pretrained(cfg)
    net = get(cfg, net_key) if net_key else "none"
    net = {"irn.backbone": f"IRN boundaries on {net}", "clip.arch": f"CLIP {net}"}.get(net_key or "", net)
    if weights_key is not None:
        weights = get(cfg, weights_key)
    else:
        weights = "the classifier's backbone" if spec.trains else "this run's trained model"
    return f"device {device}, world {world_size()}, precision {precision}, backbone {net}, weights {weights or 'none'}"


def check_device(cfg: Config) -> None:
    """``device=cpu``: run on the CPU (accelerate's own flag, which every process reads). Otherwise, where torch sees
    no CUDA device, a stage asking for fp16/bf16 autocast or a run of several processes stops in one line instead of
    running on the CPU unasked."""
    if cfg.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return
    autocast = sorted({f"{k}={get(cfg, k)}" for k in PRECISION_KEYS
                       if get(cfg, k) != "no" and k.split(".")[0] in cfg.stages()})
    if not autocast and world_size() <= 1:
        return  # nothing here needs a GPU (and no torch to import for it)
    import torch

    if torch.cuda.is_available():
        return
    if autocast:
        raise UserError(f"{', '.join(autocast)} asks for GPU autocast, but torch {torch.__version__} sees no CUDA "
                        "device; on a GPU node check the driver and CUDA_VISIBLE_DEVICES; to run on the CPU on purpose "
                        "(CPU autocast) add device=cpu")
    if world_size() > 1:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"{world_size()} processes were started for GPUs, but torch {torch.__version__} ({build}) sees no "
                        "CUDA device; on a GPU node check the driver and CUDA_VISIBLE_DEVICES; for a CPU rehearsal add "
                        "device=cpu (or accelerate launch --cpu)")


def check_data(cfg: Config) -> list[str]:
    """Before any work, when this call builds the user's VOC, COCO or folder shards: the folders, lists and images
    are there, a folder's labels file has no malformed line (DataError naming the path and line); the warnings (e.g.
    train_aug without SBD, with the counts)."""
    if cfg.data.name not in ("voc", "coco", "folder") or "shards" not in cfg.stages() or runs.is_done(cfg.run_dir, "shards"):
        return []
    if cfg.data.name != "voc":
        from .data.datasets import open_source

        open_source(cfg)  # checks the folders; a folder's labels file is read and checked line by line
        return []
    from .data.voc import preflight

    return preflight(cfg.data.voc_root, cfg.data.sbd_root, cfg.data.lists_dir)


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run the config's stages in order, skipping finished ones (after the pre-flight checks of names and weights)."""
    from .models.preflight import preflight

    check_device(cfg)
    preflight(cfg)
    check_settings(cfg)
    for warning in check_data(cfg):
        logger.warning("%s", warning)
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
    line = f"{path}: {e.strerror or errno.errorcode.get(e.errno, e.errno)} ({type(e).__name__})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is not None:
        line += f"; {free_space(Path(e.filename))}"
    return line


def free_space(path: Path) -> str:
    """``N MiB free on <mount point>`` for the file system holding ``path`` (its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return "free space unknown"
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{free / 2**20:.1f} MiB free on {mount}"


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
