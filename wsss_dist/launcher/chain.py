"""One run's chain: submitted to SLURM (``afterok``), run as local jobs one after another, or shown (dry run);
the checks before any job and the last lines the launcher prints."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .. import runs
from ..compat import sbatch_text
from ..config import Config
from ..errors import LauncherTerminated, UserError
from ..pipeline import one_line, summary
from .executor import (_array_id, _cancel, _job_env, _prev_dep, _set_aside_stale, _tail, controller_ignores_sigint,
                       make_executor, snapshot_package, stop_local, wait_slurm)
from .jobs import ChainJob, StageJob
from .options import LaunchCfg
from .plan import Step


def check_writable(cfg: Config) -> None:
    """Before any job: the run directory and, when stage shards runs, the shards directory can be written (the
    nearest existing folder of each); an environment fault in one line otherwise."""
    paths = [cfg.run_dir] + ([cfg.shards_dir] if "shards" in cfg.stages() else [])
    for path in paths:
        here = Path(path).resolve()
        while not here.exists() and here != here.parent:
            here = here.parent
        if here.exists() and not here.is_dir():
            raise UserError(f"{path}: {here} is a file, not a directory")
        if not os.access(here, os.W_OK | os.X_OK):
            raise UserError(f"{path}: {here} is not writable (permissions or a read-only file system)")


def _check_cluster(cfg: Config, launch: LaunchCfg | None = None) -> None:
    """Before any job: sbatch exists, and every partition and account asked for is one SLURM knows (where sinfo and
    sacctmgr answer)."""
    if cfg.cluster == "local" and launch is not None and "cluster" not in launch.typed and cfg.data.name != "toy" \
            and shutil.which("sbatch") is not None:
        raise UserError("this machine has SLURM (sbatch is on PATH), perhaps a login node: say cluster=slurm to submit "
                        "the stages as jobs, or cluster=local to run them here")
    if cfg.cluster != "slurm":
        return
    if shutil.which("sbatch") is None:
        if launch is not None and launch.dry_run:
            return  # a dry run may be prepared where SLURM is not (e.g. on a laptop)
        raise UserError("cluster=slurm: sbatch is not on PATH (use cluster=local on a machine without SLURM)")
    per_stage = (launch.stage_slurm if launch else {}).values()
    for key, cmd in (("partition", ["sinfo", "-h", "-o", "%P"]),
                     ("account", ["sacctmgr", "-n", "-P", "show", "assoc", f"user={os.environ.get('USER', '')}", "format=account"])):
        wanted = {v for v in [getattr(cfg.slurm, key)] + [d.get(key) for d in per_stage] if v}
        if not wanted or shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        known = {line.strip().rstrip("*") for line in r.stdout.splitlines() if line.strip()}
        if r.returncode != 0 or not known:
            continue  # e.g. no accounting database: nothing to check against
        for name in sorted(wanted - known):
            raise UserError(f"slurm.{key}={name}: SLURM knows no such {key} (known: {', '.join(sorted(known))})")


def _finish(cfg: Config, launch: LaunchCfg, jobs: list[Any], out: Callable[[str], None], logs: Optional[Path] = None) -> None:
    """The last lines: how to follow SLURM jobs (and wait for them with launch.wait=true), or that nothing ran;
    the headline figures and the report."""
    if launch.dry_run:
        return
    if cfg.cluster == "slurm" and jobs:
        folder = Path(launch.logs or logs or cfg.run_dir / "logs").resolve()
        out(f"submitted {len(jobs)} job(s); follow with: squeue -u $USER; tail -f {folder}/<job id>_0_log.err; "
            f"cancel with: scancel {' '.join(dict.fromkeys(_array_id(j.job_id) for j in jobs))}")
        if launch.wait:
            wait_slurm(jobs, launch.poll_s, out)
            out(results_line(logs.parent if logs else cfg.run_dir))
    else:
        if not jobs:
            out("nothing to do: every stage is done")
        out(results_line(logs.parent if logs else cfg.run_dir))


def results_line(run_dir: Path) -> str:
    """The launcher's last line: the headline mIoUs of a run (CAM, after refinement, val) and where its report is."""
    figures = []
    for stage, name in (("cam", "CAM"), ("pseudo", "pseudo"), ("eval", "val")):
        try:
            figures.append(f"{name} {100 * runs.read_done(run_dir, stage)['miou']:.1f}")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    report = Path(run_dir) / "report" / "report.md"
    where = f"report: {report}" if report.is_file() else f"run: {run_dir}"
    return f"results: {', '.join(figures)} % mIoU; {where}" if figures else where


def check_local_gpus(cfg: Config, steps: list[Step]) -> None:
    """UserError before any local job when a stage to run asks for more GPUs per node than this machine has (the
    job would refuse to start on the CPU, after the stages before it had run)."""
    todo = [s for s in steps if not s.done and s.resources.gpus_per_node > 0]
    if not todo:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    step = max(todo, key=lambda s: s.resources.gpus_per_node)
    if step.resources.gpus_per_node > have:
        raise UserError(f"stage {step.name} asks for {step.resources.gpus_per_node} GPU(s) per node (slurm.gpus_per_node "
                        f"or data={cfg.data.name}'s defaults) but this machine has {have}: run it where the GPUs are, or "
                        "add slurm.gpus_per_node=0 to run the stages here on the CPU")


def submit_chain(cfg: Config, steps: list[Step], launch: LaunchCfg, out: Callable[[str], None], label: str = "",
                 first_dep: Optional[str] = None) -> list[Any]:
    """Submit the ``steps`` of one run: local jobs (:func:`run_local`) and debug jobs one after another
    (RuntimeError when one fails), SLURM jobs
    chained with ``afterok``, the first one with the SLURM dependency ``first_dep`` (e.g. ``afterok:<shards job>``,
    ``afterany:<a>:<b>``). ``label`` prefixes every progress line."""
    cluster = cfg.cluster
    folder = Path(launch.logs or cfg.run_dir / "logs").resolve()
    cwd = os.getcwd()
    if launch.dry_run:
        return dry_run(cfg, steps, folder, out, label, first_dep)
    if cluster == "local":
        check_local_gpus(cfg, steps)
        return run_local(cfg, steps, folder, cwd, out, label, launch.one_process)
    jobs: list[Any] = []
    prev: Optional[str] = None
    for step, head in zip(steps, _heads(steps, label)):
        if step.done:
            out(f"{head}: skipped (done)")
            continue
        dep = (f"afterok:{prev}" if prev else first_dep) if cluster == "slurm" else None
        ex = make_executor(cluster, folder, step, f"{cfg.run_dir.name}-{step.name}", dep)
        t0 = time.time()
        if cluster == "slurm" and launch.snapshot is None:  # queued jobs import the code as it is now
            launch.snapshot = snapshot_package(cfg.run_dir / "code")
        try:
            with _job_env(launch.snapshot if cluster == "slurm" else None):
                job = ex.submit(StageJob(step.overrides, step.stage, cwd, step.resources.gpus_per_node))
        except Exception as e:
            if cluster != "slurm" or not jobs:
                raise
            cancelled = _cancel(jobs)
            raise UserError(f"submitting {step.name} failed ({one_line(e)[:300]}); cancelled the "
                            f"{len(cancelled)} job(s) of this chain queued before it ({' '.join(cancelled)}): fix the "
                            "cause and run the same command again") from None
        jobs.append(job)
        if cluster == "slurm":
            _set_aside_stale(job, t0)
            prev = job.job_id
            out(f"{head}: submitted slurm job {job.job_id}{' after ' + _prev_dep(dep) if dep else ''} "
                f"(logs: {job.paths.stdout} / .err)")
            continue
        try:
            metrics = job.result()
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError
            raise RuntimeError(f"{step.name} failed (job {job.job_id}); last lines of {job.paths.stderr}:\n{e}") from None
        out(f"{head}: done in {time.time() - t0:.0f} s {summary(metrics)}")
    return jobs


def dry_run(cfg: Config, steps: list[Step], folder: Path, out: Callable[[str], None], label: str = "",
            first_dep: Optional[str] = None) -> list[Any]:
    """``launch.dry_run=true``: print every job the chain would start (SLURM: its sbatch script's directives and
    dependency) and start none."""
    prev: Optional[str] = None
    for step, head in zip(steps, _heads(steps, label)):
        if step.done:
            out(f"{head}: skipped (done)")
            continue
        if cfg.cluster != "slurm":
            out(f"{head}: would run as a {cfg.cluster} job: {' '.join(step.overrides)}")
            continue
        dep = f"afterok:<job of {prev}>" if prev else first_dep
        text = sbatch_text(lambda: make_executor("slurm", folder, step, f"{cfg.run_dir.name}-{step.name}", dep))
        out(f"{head}: would submit: " + " ".join(x[len("#SBATCH "):] for x in text.splitlines() if x.startswith("#SBATCH")))
        prev = step.name
    out("dry run: nothing submitted")
    return []


def _heads(steps: list[Step], label: str = "") -> list[str]:
    """Each step's progress-line prefix: ``[i/n] name``, or ``<label>name``."""
    return [f"{label}{s.name}" if label else f"[{i}/{len(steps)}] {s.name}" for i, s in enumerate(steps, 1)]


def local_groups(steps: list[Step], one_process: bool = True) -> list[list[int]]:
    """The indices of the steps to run, grouped into local jobs: consecutive steps (done ones aside) that ask for the
    same number of GPUs share one job (``one_process=False``: a job each)."""
    groups: list[list[int]] = []
    for i, step in enumerate(steps):
        if step.done:
            continue
        if one_process and groups and steps[groups[-1][-1]].resources.gpus_per_node == step.resources.gpus_per_node:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


PROGRESS_EVERY_S = 10.0  # a local stage's progress reaches the launcher's stdout at most this often
_STEP_LINE = re.compile(r": (\S+: step \d+/\d+ .*)$")  # the engine's periodic log line
_BAR = re.compile(r"^\s*([\w/.-]+):\s+(\d+)%\|.*?\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")  # a tqdm bar


def latest_progress(stderr: Path) -> str:
    """The newest progress of a job from the end of its stderr: the engine's step line or an inference bar
    (``cam: 120/1464 images, 8 %, eta 3:10``); "" when there is none yet."""
    try:
        with open(stderr, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for piece in reversed(re.split(r"[\r\n]+", tail)):
        m = _STEP_LINE.search(piece)
        if m:
            return m.group(1).strip()
        m = _BAR.match(piece)
        if m:
            name, pct, n, total, _, eta = m.groups()
            return f"{name}: {n}/{total} ({pct} %), eta {eta}"
    return ""


def run_local(cfg: Config, steps: list[Step], folder: Path, cwd: str, out: Callable[[str], None],
              label: str = "", one_process: bool = True) -> list[Any]:
    """Run the ``steps`` as local jobs, one :class:`ChainJob` per group of :func:`local_groups`, one after another,
    printing a line as each step starts and ends (RuntimeError with the log tail when one fails)."""
    heads = _heads(steps, label)
    jobs: list[Any] = []
    shown = 0  # the steps before this one have had their last line

    def start(i: int, job: Any) -> float:
        nonlocal shown
        for j in range(shown, i):
            out(f"{heads[j]}: skipped (done)")
        shown = i + 1
        out(f"{heads[i]}: running as local job {job.job_id} (logs: {job.paths.stdout} / .err)")
        return time.time()

    for group in local_groups(steps, one_process):
        first, last = steps[group[0]], steps[group[-1]]
        name = f"{cfg.run_dir.name}-{first.name}" + (f"-{last.name}" if len(group) > 1 else "")
        ex = make_executor("local", folder, first, name)
        progress = folder / f"{name}-{time.time_ns()}.progress.json"
        with _job_env(), controller_ignores_sigint():
            job = ex.submit(ChainJob([(steps[i].overrides, steps[i].stage) for i in group], cwd, str(progress),
                                     first.resources.gpus_per_node))
        jobs.append(job)
        seen, t0 = 0, start(group[0], job)
        shown_at, last_line = time.time(), ""
        try:
            while True:
                finished = job.done()
                results = runs.read_json(progress) if progress.is_file() else []
                for metrics in results[seen:]:
                    out(f"{heads[group[seen]]}: done in {time.time() - t0:.0f} s {summary(metrics)}")
                    seen += 1
                    if seen < len(group):
                        t0 = start(group[seen], job)
                if finished:
                    break
                if time.time() - shown_at >= PROGRESS_EVERY_S:  # the running stage's newest progress, now and then
                    line = latest_progress(Path(job.paths.stderr))
                    if line and line != last_line:
                        out(f"{heads[group[min(seen, len(group) - 1)]]}: {line}")
                        last_line = line
                    shown_at = time.time()
                time.sleep(1.0)  # polling costs the launcher CPU that the job on the same cores needs
            job.result()
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (launcher/main.py): the job checkpoints, then we end
            out(f"{heads[group[min(seen, len(group) - 1)]]}: stopping local job {job.job_id} (it checkpoints first)")
            # a terminal's Ctrl-C reached the job's task already (one process group); a SIGTERM to us alone did not
            stop_local(job, interrupt_tasks=isinstance(e, LauncherTerminated))
            raise
        except Exception:  # submitit's FailedJobError / UncompletedJobError
            failed = steps[group[min(seen, len(group) - 1)]]
            raise RuntimeError(f"{failed.name} failed (job {job.job_id}); last lines of {job.paths.stderr}:\n"
                               f"{_tail(job.paths.stderr)}") from None
        finally:
            progress.unlink(missing_ok=True)
    for head in heads[shown:]:
        out(f"{head}: skipped (done)")
    return jobs
