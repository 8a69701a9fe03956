"""One small adapter per private API of a dependency that the package relies on; tests/test_compat.py fails loudly
when a new release of the dependency changes one of them.

- accelerate: ``AcceleratorState._shared_state`` / ``_reset_state`` (a second Accelerator with another precision
  in the same process);
- submitit: ``JobEnvironment._usr_sig`` and ``SignalHandler`` (the job's own checkpoint-and-requeue handler);
- submitit: ``SlurmExecutor._make_submission_file_text`` (the sbatch script of a job, for ``launch.dry_run``);
- torch: the DataLoader iterator's ``_shutdown_workers`` (stop the workers now, not when the iterator is freed).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Optional


def reset_accelerate_precision(mixed_precision: str) -> None:
    """Drop accelerate's shared Accelerator state when it holds another precision; keep the process group."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def submitit_requeue_handler(env: Any) -> Optional[Callable[..., Any]]:
    """submitit's own checkpoint-and-requeue signal handler of this job, or None (debug executor: none bound)."""
    from submitit.core.job_environment import SignalHandler

    handler = signal.getsignal(env._usr_sig())
    return handler if isinstance(getattr(handler, "__self__", None), SignalHandler) else None


def close_loader(it: Any) -> None:
    """Stop a stream or DataLoader iterator and its worker processes now (errors ignored)."""
    close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def sbatch_text(executor: Any) -> str:
    """The sbatch script a submitit SLURM executor would submit (nothing is submitted)."""
    inner = getattr(executor, "_executor", executor)
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")
