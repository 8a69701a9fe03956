"""The callables submitit pickles to the nodes: one stage (:class:`StageJob`) or consecutive local stages in one
process (:class:`ChainJob`); both checkpoint (requeue) on a time-out or preemption."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from .. import runs
from ..compat import submitit_requeue_handler
from ..config import make_config
from ..errors import Interrupted, UserError
from ..pipeline import run_stage, setup_logging

logger = logging.getLogger(__name__)


class StageJob:
    """The submitit job callable: run one stage from its ``key=value`` overrides; checkpointable."""

    def __init__(self, overrides: list[str], stage: str, cwd: str, gpus: int = 0) -> None:
        self.overrides = list(overrides)
        self.stage = stage
        self.cwd = cwd
        self.gpus = gpus  # GPUs per node the job asked for: finding no CUDA is an error, never a silent CPU run

    def __call__(self) -> dict[str, Any]:
        """Set up the distributed env and logging, bind the requeue handler, run the stage."""
        import submitit

        os.chdir(self.cwd)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored only in the local controller
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one task per GPU: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for Accelerate
            submitit.helpers.TorchDistributedEnvironment().export()
        cfg = make_config(self.overrides)
        setup_logging(cfg.log_level)
        if self.gpus:
            check_cuda(self.gpus)
        requeue = submitit_requeue_handler(env)
        if requeue is not None:  # time-out (USR2) and preemption (TERM) both checkpoint and requeue
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                signal.signal(sig, requeue)
        logger.info("job %s: stage %s (%s)", env.job_id, self.stage, " ".join(self.overrides))
        try:
            return run_stage(cfg, self.stage)
        except Interrupted as e:
            signum = _signum(e)
            if requeue is None or signum == signal.SIGINT:  # debug executor, or Ctrl-C: the user stops it, no requeue
                raise
            logger.warning("job %s: stage %s checkpointed on %s; requeueing through submitit", env.job_id, self.stage,
                           signal.Signals(signum).name)
            for sig in (signal.SIGUSR2, signal.SIGTERM):  # the requeue itself sends TERM
                signal.signal(sig, signal.SIG_IGN)
            requeue(signum, None)  # rank 0: checkpoint() + requeue + exit; other ranks return
            sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the same stage; it resumes from its newest checkpoint or its finished shards."""
        import submitit

        logger.info("stage %s: requeued; it resumes from its newest checkpoint / finished shards", self.stage)
        return submitit.helpers.DelayedSubmission(type(self)(self.overrides, self.stage, self.cwd, self.gpus))


class ChainJob:
    """The local job callable of several consecutive steps: each runs as its :class:`StageJob` would, one after
    another in one process (one interpreter start and one set of imports for all of them). After each step rank 0
    rewrites ``progress`` (atomically) with the metrics so far, from which the launcher prints its progress lines."""

    def __init__(self, steps: list[tuple[list[str], str]], cwd: str, progress: str, gpus: int = 0,
                 finished: list[dict[str, Any]] | None = None) -> None:
        self.steps = [(list(o), s) for o, s in steps]  # (overrides, stage) of each step, in order
        self.cwd = cwd
        self.progress = progress
        self.gpus = gpus
        self.finished: list[dict[str, Any]] = list(finished or [])  # the metrics of the steps done so far

    def __call__(self) -> list[dict[str, Any]]:
        """Run the steps in order; the metrics of each."""
        import submitit

        rank0 = submitit.JobEnvironment().global_rank == 0
        for overrides, stage in self.steps[len(self.finished):]:
            self.finished.append(StageJob(overrides, stage, self.cwd, self.gpus)())
            if rank0:
                runs.write_json(self.progress, self.finished)
        return self.finished

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the steps not finished yet; the interrupted one resumes from its checkpoint or finished shards."""
        import submitit

        logger.info("stages %s: requeued; they resume from the newest checkpoint / finished shards",
                    ", ".join(stage for _, stage in self.steps[len(self.finished):]))
        return submitit.helpers.DelayedSubmission(type(self)(self.steps, self.cwd, self.progress, self.gpus,
                                                             self.finished))


def check_cuda(gpus: int) -> None:
    """UserError (one line) when a job that asked for ``gpus`` GPUs per node finds no usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"this job asked for {gpus} GPU(s) per node but torch finds no usable CUDA device "
                        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): an old driver or no GPU on the node; "
                        "refusing to train on the CPU")


def _signum(e: Interrupted) -> int:
    return int(getattr(e, "signum", None) or signal.SIGUSR2)
