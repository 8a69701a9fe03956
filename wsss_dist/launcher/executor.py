"""submitit executors per cluster kind, the job environment, cancelling and waiting for SLURM jobs."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import runs
from .plan import Step
from .resources import MAX_REQUEUES


LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # local jobs have no real time limit


PREEMPT_ENV = "export SUBMITIT_PREEMPT_SIGNAL=TERM"  # in the job: submitit binds TERM (preemption) too


def make_executor(cluster: str, folder: Path, step: Step, job_name: str, dependency: Optional[str] = None) -> Any:
    """A submitit executor for ``step`` on ``cluster`` (local | debug | slurm) with its resources."""
    import submitit

    r = step.resources
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_REQUEUES)
    tasks = max(1, r.gpus_per_node)
    params: dict[str, Any] = {"name": job_name, "tasks_per_node": tasks}
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if cluster == "slurm":
        extra: dict[str, Any] = {"kill-on-invalid-dep": "yes"}
        for flag in r.extra:
            k, _, v = flag.lstrip("-").partition("=")
            extra[k] = v if v else True
        params.update(timeout_min=r.time_min, nodes=r.nodes, cpus_per_task=r.cpus_per_task, mem_gb=r.mem_gb,
                      slurm_partition=r.partition, slurm_account=r.account, slurm_qos=r.qos,
                      slurm_constraint=r.constraint, slurm_signal_delay_s=r.signal_delay_s,
                      slurm_additional_parameters=extra, slurm_setup=[PREEMPT_ENV], slurm_dependency=dependency)
    else:
        params.update(timeout_min=LOCAL_TIMEOUT_MIN, nodes=1)
    ex.update_parameters(**params)
    return ex


@contextlib.contextmanager
def _job_env(code: Optional[str] = None) -> Iterator[None]:
    """While submitting: this package importable in the jobs (PYTHONPATH, even without pip install); with ``code``,
    the snapshot of it taken at submit (:func:`snapshot_package`), so queued jobs never run code edited later."""
    root = code or str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    paths = [p for p in (old or "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def controller_ignores_sigint() -> Iterator[None]:
    """While submitting local jobs: SIGINT ignored, so submitit's local controller process inherits the ignore.

    A terminal's Ctrl-C reaches the whole process group; a controller that took it would kill its task one second
    later, before the task's checkpoint is written. Ignoring it there, the task alone acts on Ctrl-C (its
    :class:`StageJob` restores the default handler) and the launcher stops the job with :func:`stop_local`."""
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def stop_local(job: Any, interrupt_tasks: bool, wait_s: float = 600.0) -> None:
    """Stop a local submitit job as Ctrl-C would: with ``interrupt_tasks``, SIGINT to its tasks (the controller's
    children: they checkpoint, exit 130 and are not requeued); then wait up to ``wait_s`` for the controller to end,
    else cancel it."""
    process = getattr(job, "_process", None)
    if process is None or process.poll() is not None:
        return
    if interrupt_tasks:
        for pid in _children(process.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        job.cancel(check=False)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``; elsewhere none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def snapshot_package(parent: Path) -> str:
    """Copy this package (its source, without caches) to ``parent/<time>-<pid>/wsss_dist``, atomically; the folder
    to put on the jobs' PYTHONPATH."""
    pkg = Path(__file__).resolve().parents[1]
    dest = Path(parent) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    with runs.atomic_path(dest) as tmp:
        shutil.copytree(pkg, tmp / "wsss_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return str(dest.resolve())


def _set_aside_stale(job: Any, submitted_at: float) -> None:
    """After a cluster reset job ids restart: move an older job's result/logs of the same id out of the way."""
    for p in (job.paths.result_pickle, job.paths.stdout, job.paths.stderr):
        if p.exists() and p.stat().st_mtime < submitted_at - 1:
            p.rename(p.with_name(p.name + f".stale-{int(p.stat().st_mtime)}"))


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


def _cancel(jobs: list[Any]) -> list[str]:
    """scancel ``jobs`` (errors ignored); their ids."""
    ids = []
    for job in jobs:
        with contextlib.suppress(Exception):
            job.cancel(check=False)
        ids.append(str(job.job_id))
    return ids


def _array_id(job_id: str) -> str:
    """``123_4`` (a task of a job array) → ``123``; a plain job's id as it is."""
    return job_id.split("_")[0]


def _prev_dep(dep: Optional[str]) -> str:
    """``afterok:123`` → ``job 123``; any other dependency as SLURM writes it (``afterany:12:13``)."""
    if not dep:
        return ""
    kind, _, ids = dep.partition(":")
    return f"job {ids}" if kind == "afterok" and ":" not in ids else dep


def wait_slurm(jobs: list[Any], poll_s: float = 5.0, out: Callable[[str], None] = print) -> None:
    """Wait for SLURM jobs to end (state from sacct); RuntimeError naming the first job that did not complete."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
    pending = list(jobs)
    while pending:
        time.sleep(poll_s)
        jobs[0].get_info(mode="force")  # one sacct call refreshes every watched job
        for job in list(pending):
            state = job.state.split()[0]
            if state in final:
                pending.remove(job)
                out(f"job {job.job_id}: {state}")
    bad = [j for j in jobs if not j.state.startswith("COMPLETED")]
    if bad:
        raise RuntimeError(f"job {bad[0].job_id} ended {bad[0].state}; last lines of {bad[0].paths.stderr}:\n{_tail(bad[0].paths.stderr)}")
