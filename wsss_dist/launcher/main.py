"""The launcher's command line: ``python launch/submit.py stage=all method=fmix [key=value ...]``."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import make_config, sweep_points
from ..errors import LauncherTerminated, UserError
from ..pipeline import EXIT_INTERRUPTED, EXIT_SIGINT, EXIT_USER_ERROR, check_data, check_device, check_settings, describe_fault, environment_fault, save_config
from .chain import _check_cluster, _finish, check_writable, submit_chain
from .options import split_args
from .plan import plan
from .sweep import submit_sweep


def submit(argv: list[str], out: Callable[[str], None] = print) -> list[Any]:
    """Plan and submit the chain (or, when a key is given a list, the sweep); local/debug jobs run one after another.
    Returns the submitted submitit jobs.

    Raises :class:`UserError` for bad keys and :class:`RuntimeError` (with the log tail) when a local job fails.
    """
    launch, words = split_args(argv)
    root, points = sweep_points(words)
    if points:
        return submit_sweep(launch, Path(root), points, out)
    cfg = make_config(words)
    from ..models.preflight import preflight  # timm and the weights files: names and headers before any job

    preflight(cfg)
    _check_cluster(cfg, launch)
    check_writable(cfg)
    check_settings(cfg)
    if cfg.cluster != "slurm":  # jobs here: the same device rule as python -m wsss_dist (SLURM jobs: check_cuda)
        check_device(cfg)
    for warning in check_data(cfg):
        out(f"warning: {warning}")
    if not launch.dry_run:
        save_config(cfg)
    jobs = submit_chain(cfg, plan(cfg, launch, words), launch, out)
    _finish(cfg, launch, jobs, out)
    return jobs


def main(argv: Optional[list[str]] = None) -> int:
    """Command line of ``launch/submit.py``; returns the exit code (2: bad keys, 1: a job failed)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(sys.modules[__package__].__doc__.strip())  # the launcher package's docstring
        return 0
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    def terminate(signum: int, frame: Any) -> None:  # SIGTERM (kill, a container stop): the Ctrl-C path
        raise LauncherTerminated

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, terminate)
    try:
        submit(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (RuntimeError, OSError) as e:  # a local job that failed, or this process's environment
        fault = environment_fault(e)
        if fault is None and isinstance(e, OSError):
            raise
        print(f"error: {e if fault is None else describe_fault(fault)}", file=sys.stderr)
        return 1 if fault is None else EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        by = "SIGTERM" if isinstance(e, LauncherTerminated) else "SIGINT"
        print(f"interrupted: stopped by {by}; running local jobs are cancelled (a training stage checkpoints first); "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_SIGINT if by == "SIGINT" else EXIT_INTERRUPTED
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return 0
