"""Submit the pipeline's stages as submitit jobs: ``python launch/submit.py stage=all method=fmix [key=value ...]``.

Each stage (and, for a method that trains in rounds, ``sc``, each classifier round) becomes one job running
:func:`wsss_dist.pipeline.run_stage` in a :class:`StageJob`. Three back-ends (``cluster=``):

- ``local`` (default): submitit's LocalExecutor. It ignores dependencies, so the launcher waits for each job
  before submitting the next; consecutive stages with the same GPU count share one job (a :class:`ChainJob`, one
  process; ``launch.one_process=false``: one job per stage); logs are ``<run>/logs/<job id>_0_log.{out,err}``.
- ``debug``: submitit's DebugExecutor, in this process (for pdb).
- ``slurm``: one sbatch job per stage, chained with ``afterok`` (+ ``kill-on-invalid-dep``); returns at once.

A key given a list makes a sweep (:func:`submit_sweep`): the shards and one teacher per (split, seed) run once; on
SLURM each stage of the points that have the same jobs is one job array (task by task ``aftercorr``, at most
``slurm.array_parallelism`` tasks at once), and one report runs ``afterany`` over all points.

Besides every key of :mod:`wsss_dist.config`, the launcher takes its own keys:

- ``slurm.<stage>.<key>=value``: resources of one stage (``slurm.seg.gpus_per_node=4``, ``slurm.cls.time_min=600``);
  precedence: these > the launcher's per-stage defaults (:data:`STAGE_DEFAULTS`) > ``slurm.<key>``.
- ``launch.logs=DIR``: submitit's folder (default ``<run>/logs``).
- ``launch.wait=true``: with ``cluster=slurm``, block until the chain has finished (exit 1 if a job failed).

Time-out and preemption (see docs/cluster.md): submitit's signal handler (checkpoint + requeue) is bound to
USR2 (time-out) and TERM (preemption). While a trainer runs, the engine's own handlers take over: they finish the
step, write a checkpoint and raise :class:`wsss_dist.errors.Interrupted`; :class:`StageJob` then calls the same
submitit handler, which calls :meth:`StageJob.checkpoint` and requeues the job. The requeued job resumes from the
newest checkpoint (trainers) or from the finished output shards (inference stages).

This module is the launcher's command line, so it reports progress with ``print``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import runs
from .compat import submitit_requeue_handler
from .config import STAGES, Config, Point, SlurmCfg, check_batches, get, make_config, parse_words, sweep_points, typed_value
from .errors import ConfigError, Interrupted, UserError
from .pipeline import EXIT_USER_ERROR, describe_fault, environment_fault, redo, run_stage, save_config, setup_logging, summary
from .registry import METHODS

logger = logging.getLogger(__name__)

LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # local jobs have no real time limit
# Stages that use no accelerator: one CPU task whatever slurm.gpus_per_node says.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "shards": {"gpus_per_node": 0, "nodes": 1},
    "report": {"gpus_per_node": 0, "nodes": 1},
}
# Per-stage resources of a dataset's real runs (one modern GPU per job; docs/cluster.md#gpu-hours), under the user's
# own slurm.<key> and slurm.<stage>.<key>. time_min × (MAX_REQUEUES + 1) must cover a stage at STAGE_RATES.
DATASET_STAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"voc": {
    "shards": {"cpus_per_task": 8, "mem_gb": 16, "time_min": 120},
    "teacher": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "cls": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "cam": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 120},
    "aff": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "pseudo": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 120},
    "seg": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "eval": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 60},
    "report": {"cpus_per_task": 2, "mem_gb": 8, "time_min": 30},
}}
# Images per second and GPU that the submit-time check assumes: about a quarter of bench/flops.py's rates at 40 %
# of an H100's bf16 peak (fp32 and older GPUs are slower): (images of the stage, rate).
STAGE_RATES: dict[str, float] = {"teacher": 400.0, "cls": 40.0, "aff": 40.0, "cam": 9.0, "pseudo": 10.0, "seg": 200.0,
                                 "eval": 200.0}
MAX_REQUEUES = 3  # submitit's max_num_timeout: a job may time out and requeue this often
PREEMPT_ENV = "export SUBMITIT_PREEMPT_SIGNAL=TERM"  # in the job: submitit binds TERM (preemption) too


@dataclass
class LaunchCfg:
    """The launcher's own keys (``launch.*`` and ``slurm.<stage>.*``)."""

    logs: Optional[str] = None  # submitit folder; default <run>/logs
    wait: bool = False  # cluster=slurm: wait for the chain to finish
    poll_s: float = 5.0  # cluster=slurm with wait: seconds between state polls
    one_process: bool = True  # cluster=local: consecutive stages with the same GPU count run in one job (one start)
    stage_slurm: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {slurm key: value}
    typed: list[str] = field(default_factory=list)  # the config keys the user typed (they beat dataset defaults)


@dataclass
class Step:
    """One job of the chain: a stage (or one round of method=sc's classifier) with its resources."""

    stage: str
    overrides: list[str]
    resources: SlurmCfg
    done: bool
    round: Optional[int] = None

    @property
    def name(self) -> str:
        """``cls`` or ``cls.round1``."""
        return self.stage if self.round is None else f"{self.stage}.round{self.round}"


def split_args(argv: list[str]) -> tuple[LaunchCfg, list[str]]:
    """Separate the launcher's keys from the config's ``key=value`` words (kept in order)."""
    launch = LaunchCfg()
    rest: list[str] = []
    names = [f.name for f in dataclasses.fields(LaunchCfg) if f.name != "stage_slurm"]
    slurm_keys = {f.name for f in dataclasses.fields(SlurmCfg)}
    for key, value in parse_words(argv):
        parts = key.split(".")
        if parts[0] == "launch":
            if len(parts) != 2 or parts[1] not in names:
                raise ConfigError(f"unknown launcher key {key!r}; launcher keys: {', '.join('launch.' + n for n in names)}")
            setattr(launch, parts[1], typed_value(key, value, LaunchCfg))
        elif parts[0] == "slurm" and len(parts) == 3:
            stage, name = parts[1], parts[2]
            if stage not in STAGES:
                raise ConfigError(f"{key!r}: per-stage resources are slurm.<stage>.<key> with stage one of {', '.join(STAGES)}")
            if name not in slurm_keys:
                raise ConfigError(f"unknown key {key!r}; slurm.<stage>.<key> takes {', '.join(sorted(slurm_keys))}")
            launch.stage_slurm.setdefault(stage, {})[name] = typed_value(f"slurm.{name}", value)  # checked now, before any work
        else:
            rest.append(f"{key}={value}")
            launch.typed.append(key)
    return launch, rest


def stage_resources(cfg: Config, launch: LaunchCfg, stage: str) -> SlurmCfg:
    """The SLURM resources of ``stage``: ``slurm.*``, the dataset's per-stage defaults (where the user typed no
    ``slurm.<key>``), :data:`STAGE_DEFAULTS`, then ``slurm.<stage>.*``."""
    dataset = {k: v for k, v in DATASET_STAGE_DEFAULTS.get(cfg.data.name, {}).get(stage, {}).items()
               if f"slurm.{k}" not in launch.typed}
    return dataclasses.replace(cfg.slurm, **{**dataset, **STAGE_DEFAULTS.get(stage, {}), **launch.stage_slurm.get(stage, {})})


def stage_hours(cfg: Config, stage: str, gpus: int) -> float | None:
    """Hours ``stage`` needs on ``gpus`` GPUs at :data:`STAGE_RATES` (None for stages without a GPU estimate)."""
    if stage not in STAGE_RATES or gpus < 1:
        return None
    if stage in ("teacher", "cls", "aff", "seg"):
        t = get(cfg, f"{stage}.train")
        images = t.steps * t.batch_size
    else:
        images = {"eval": 1449}.get(stage, 10582) if cfg.data.name == "voc" else 0
    return images / (STAGE_RATES[stage] * gpus) / 3600


def check_time(cfg: Config, stage: str, res: SlurmCfg) -> None:
    """UserError when ``slurm.time_min`` × (requeues + 1) cannot cover the stage at the stated rate (SLURM only)."""
    hours = stage_hours(cfg, stage, res.gpus_per_node * res.nodes)
    budget = res.time_min * (MAX_REQUEUES + 1) / 60
    if cfg.cluster == "slurm" and hours is not None and hours > budget:
        raise UserError(f"stage {stage} needs about {hours:.1f} h on {res.gpus_per_node * res.nodes} GPU(s) at "
                        f"{STAGE_RATES[stage]:g} images/s per GPU, but slurm time_min={res.time_min} × "
                        f"({MAX_REQUEUES} requeues + 1) allows {budget:.1f} h; raise slurm.{stage}.time_min or "
                        f"slurm.{stage}.gpus_per_node")


def plan(cfg: Config, launch: LaunchCfg, words: list[str]) -> list[Step]:
    """The jobs of the chain in order, each marked done when its DONE marker exists; a method with rounds gets one
    cls job per round (the last one also finishes the stage)."""
    steps = []
    for stage in cfg.stages():
        base = [*words, f"stage={stage}"]
        res = stage_resources(cfg, launch, stage)
        check_batches(cfg, max(1, res.gpus_per_node) * res.nodes, [stage])  # the job's processes, before any job
        check_time(cfg, stage, res)
        if cfg.data.name in DATASET_STAGE_DEFAULTS and "data.num_workers" not in launch.typed and cfg.cluster == "slurm":
            base.append(f"data.num_workers={max(0, res.cpus_per_task - 1)}")  # the job's CPUs feed its GPU
        done = runs.is_done(cfg.run_dir, stage) and not (redo(cfg, stage) and stage != "report")
        if stage == "cls" and METHODS[cfg.method].rounds and not done:
            for r in cfg.cls_rounds():
                rdone = (runs.round_dir(cfg.run_dir, r) / "DONE").is_file() and r < cfg.cls.sc_rounds - 1
                steps.append(Step(stage, [*base, f"cls.round={r}"], res, rdone, round=r))
            continue
        steps.append(Step(stage, base, res, done))
    return steps


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
def _job_env() -> Iterator[None]:
    """While submitting: this package importable in the jobs (PYTHONPATH, even without pip install)."""
    root = str(Path(__file__).resolve().parent.parent)
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
    _check_cluster(cfg, launch)
    check_writable(cfg)
    save_config(cfg)
    jobs = submit_chain(cfg, plan(cfg, launch, words), launch, out)
    _finish(cfg, launch, jobs, out)
    return jobs


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
    if cfg.cluster != "slurm":
        return
    if shutil.which("sbatch") is None:
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
    """The last lines: how to follow SLURM jobs (and wait for them with launch.wait=true), or that nothing ran."""
    if cfg.cluster == "slurm" and jobs:
        folder = Path(launch.logs or logs or cfg.run_dir / "logs").resolve()
        out(f"submitted {len(jobs)} job(s); follow with: squeue -u $USER; tail -f {folder}/<job id>_0_log.err; "
            f"cancel with: scancel {' '.join(dict.fromkeys(_array_id(j.job_id) for j in jobs))}")
        if launch.wait:
            wait_slurm(jobs, launch.poll_s, out)
    elif not jobs:
        out("nothing to do: every stage is done")


def submit_chain(cfg: Config, steps: list[Step], launch: LaunchCfg, out: Callable[[str], None], label: str = "",
                 first_dep: Optional[str] = None) -> list[Any]:
    """Submit the ``steps`` of one run: local jobs (:func:`run_local`) and debug jobs one after another
    (RuntimeError when one fails), SLURM jobs
    chained with ``afterok``, the first one with the SLURM dependency ``first_dep`` (e.g. ``afterok:<shards job>``,
    ``afterany:<a>:<b>``). ``label`` prefixes every progress line."""
    cluster = cfg.cluster
    folder = Path(launch.logs or cfg.run_dir / "logs").resolve()
    cwd = os.getcwd()
    if cluster == "local":
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
        with _job_env():
            job = ex.submit(StageJob(step.overrides, step.stage, cwd, step.resources.gpus_per_node))
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
        with _job_env():
            job = ex.submit(ChainJob([(steps[i].overrides, steps[i].stage) for i in group], cwd, str(progress),
                                     first.resources.gpus_per_node))
        jobs.append(job)
        seen, t0 = 0, start(group[0], job)
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
                time.sleep(1.0)  # polling costs the launcher CPU that the job on the same cores needs
            job.result()
        except KeyboardInterrupt:
            job.cancel(check=False)  # SIGINT to submitit's controller, which stops the task
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


SHARED_STAGES = ("shards",)  # what the points of a sweep share: run once, in <sweep>/shards
SWEEP_FILE = "sweep.json"


@dataclass
class SharedTeacher:
    """A teacher that a sweep trains once, in ``<sweep>/<name>/teacher``, for every point with its teacher config."""

    name: str  # teacher-<split>-s<seed> (+ -<hash> when two teacher configs would share the name)
    words: list[str]  # its run's key=value words (run=<sweep>/<name>, stage=teacher)
    points: list[int]  # the indices of the points that use it


def shared_teachers(root: Path, points: list[Point]) -> tuple[list[list[str]], list[SharedTeacher]]:
    """Each point's words, with ``teacher.dir=`` at its shared teacher for the points whose method uses a teacher
    (and that set no ``teacher.dir``), and those teachers: one per distinct (``teacher.*`` with its seed,
    ``cls.split``, ``data.*``)."""
    import hashlib
    import json

    words = [list(p.words) for p in points]
    by_key: dict[str, SharedTeacher] = {}
    for i, w in enumerate(words):
        cfg = make_config(w)
        if METHODS[cfg.method].subcategories != "teacher" or cfg.teacher.dir:
            continue
        key = json.dumps([dataclasses.asdict(cfg.teacher), cfg.cls.split, dataclasses.asdict(cfg.data)], sort_keys=True,
                         default=str)
        by_key.setdefault(key, SharedTeacher(f"teacher-{cfg.cls.split}-s{cfg.teacher.train.seed}", [], [])).points.append(i)
    names = [t.name for t in by_key.values()]
    for key, t in by_key.items():
        if names.count(t.name) > 1:  # e.g. teacher.arch swept: the seed and split alone do not tell them apart
            t.name += "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
        t.words = words[t.points[0]] + [f"run={root / t.name}", "stage=teacher"]
    for t in by_key.values():
        for i in t.points:
            words[i].append(f"teacher.dir={root / t.name / 'teacher'}")
    return words, list(by_key.values())


def submit_sweep(launch: LaunchCfg, root: Path, points: list[Point], out: Callable[[str], None] = print) -> list[Any]:
    """Run or submit every point of a sweep: the shared shards and the shared teachers (one per split and seed) once,
    then each point's chain, then one report over all points in ``root/report``.

    Locally one point after another. On SLURM the points with the same jobs (stage sequence, resources, what is
    done) make one group, submitted as a chain of job arrays (one task per point, ``aftercorr``: each task after its
    own point's previous task), the first array ``afterok`` on the shards job and the group's teachers; a group of
    one point is a plain ``afterok`` chain. The report runs ``afterany`` (a failed point is shown as failed).
    Every point's config is checked before any job."""
    words, teachers = shared_teachers(root, points)
    cfgs = [make_config(w) for w in words]
    first = cfgs[0]
    slurm = first.cluster == "slurm"
    _check_cluster(first, launch)
    stages = [s for s in STAGES if any(s in c.stages() for c in cfgs)]
    record: dict[str, Any] = {"points": [{"name": p.name, "run": str(c.run_dir), "values": dict(p.values),
                                          **({"teacher": str(c.teacher_dir)} if c.teacher.dir else {})}
                                         for p, c in zip(points, cfgs)]}
    runs.write_json(root / SWEEP_FILE, record)
    teacher_of: dict[int, SharedTeacher] = {i: t for t in teachers for i in t.points}
    plans: list[tuple[int, Config, list[Step]]] = []
    for k, (p, cfg) in enumerate(zip(points, cfgs)):
        own = [s for s in cfg.stages() if s not in SHARED_STAGES and s != "report" and not (s == "teacher" and k in teacher_of)]
        if own:
            pwords = words[k] + [f"stage=[{','.join(own)}]"]
            pcfg = make_config(pwords)
            save_config(pcfg)
            plans.append((k, pcfg, plan(pcfg, launch, pwords)))  # every point's jobs checked before any job
    tplans = []
    for t in teachers:
        if any("teacher" in cfgs[i].stages() for i in t.points):
            tcfg = make_config(t.words)
            save_config(tcfg)
            tplans.append((t, tcfg, plan(tcfg, launch, t.words)))
    jobs: list[Any] = []
    after: list[str] = []  # SLURM jobs every point waits for (afterok): the shards job
    n = len(points)
    if any(s in stages for s in SHARED_STAGES):
        swords = words[0] + [f"run={root / 'shards'}", "stage=shards"]
        scfg = make_config(swords)
        save_config(scfg)
        steps = [dataclasses.replace(st, done=runs.is_done(scfg.run_dir, st.stage))  # done is done, as in a chain
                 for st in plan(scfg, launch, swords)]
        got = submit_chain(scfg, steps, launch, out, label="[shared] ")
        jobs += got
        after = [got[-1].job_id] if got and slurm else []
    got, teacher_job, bad = _submit_teachers(launch, root, tplans, after, out)  # teacher name -> its SLURM job
    jobs += got
    failed = [points[i].name for t in bad for i in t.points]
    plans = [pl for pl in plans if points[pl[0]].name not in failed]
    last_jobs: list[str] = []
    if slurm:
        got, last_jobs, ids = _submit_point_arrays(launch, root, points, plans, after, teacher_of, teacher_job, out)
        jobs += got
        for k, point_ids in ids.items():
            record["points"][k]["jobs"] = point_ids
        runs.write_json(root / SWEEP_FILE, record)  # which job (array task) ran which point's stage
    else:
        for k, pcfg, steps in plans:  # one point after another
            head = f"[point {k + 1}/{n}] {points[k].name}: "
            try:
                jobs += submit_chain(pcfg, steps, launch, out, label=head)
            except RuntimeError as e:
                failed.append(points[k].name)
                out(f"{head}FAILED; the other points go on ({str(e).splitlines()[0]})")
    if "report" in stages:
        rwords = words[0] + [f"run={root}", "stage=report", f"report.runs=[{','.join(str(c.run_dir) for c in cfgs)}]"]
        rcfg = make_config(rwords)
        save_config(rcfg)
        waits = last_jobs or [_array_id(j.job_id) for j in jobs]
        dep = f"afterany:{':'.join(dict.fromkeys(waits))}" if slurm and waits else None
        rstep = plan(rcfg, launch, rwords)[0]
        if rstep.done and (jobs or failed or _report_stale(rcfg.run_dir, [str(c.run_dir) for c in cfgs])):
            rstep = dataclasses.replace(rstep, done=False)  # points ran or changed, or it covers other points
        jobs += submit_chain(rcfg, [rstep], launch, out, label="[sweep] ", first_dep=dep)
    _finish(first, launch, jobs, out, logs=root / "logs")  # the arrays' logs; a point alone logs in its run
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} points failed: {', '.join(failed)}; the report in {root / 'report'} "
                           "shows them as failed; rerun the same command to continue them")
    return jobs


def _report_stale(root: Path, point_runs: list[str]) -> bool:
    """Whether the sweep's finished report covers other runs than ``point_runs`` or predates a stage DONE of one."""
    if runs.read_done(root, "report").get("runs") != point_runs:
        return True
    written = (root / "report" / "DONE").stat().st_mtime
    return any(d.stat().st_mtime > written for r in point_runs for d in Path(r).glob("*/DONE"))


def _submit_teachers(launch: LaunchCfg, root: Path, tplans: list[tuple[SharedTeacher, Config, list[Step]]],
                     after: list[str], out: Callable[[str], None]) -> tuple[list[Any], dict[str, str], list[SharedTeacher]]:
    """Run (locally, one after another) or submit (SLURM: one array, ``afterok`` on ``after``) the shared teachers
    that are not done: (jobs, teacher name → SLURM job id, the teachers that failed locally)."""
    jobs: list[Any] = []
    ids: dict[str, str] = {}
    bad: list[SharedTeacher] = []
    items: list[tuple[str, Step]] = []
    for t, tcfg, steps in tplans:
        if tcfg.cluster != "slurm":
            try:
                jobs += submit_chain(tcfg, steps, launch, out, label=f"[shared] {t.name}: ")
            except RuntimeError as e:
                bad.append(t)
                out(f"[shared] {t.name}: FAILED; the points that use it are skipped ({str(e).splitlines()[0]})")
            continue
        if steps[0].done:
            out(f"[shared] {t.name}: teacher: skipped (done)")
        else:
            items.append((t.name, steps[0]))
    if items:
        dep = f"afterok:{':'.join(after)}" if after else None
        got = _submit_array(launch, root, items, dep, "[shared] ", out)
        jobs += got
        ids = {name: job.job_id for (name, _), job in zip(items, got)}
    return jobs, ids, bad


def _submit_point_arrays(launch: LaunchCfg, root: Path, points: list[Point], plans: list[tuple[int, Config, list[Step]]],
                         after: list[str], teacher_of: dict[int, SharedTeacher], teacher_job: dict[str, str],
                         out: Callable[[str], None]) -> tuple[list[Any], list[str], dict[int, dict[str, str]]]:
    """SLURM: each group of points with the same jobs as a chain of job arrays (``aftercorr``), a group of one point
    as a plain chain: (jobs, the last job or array of each group, point index → {step: job id})."""
    groups: dict[tuple, list[tuple[int, Config, list[Step]]]] = {}
    for k, pcfg, steps in plans:  # the same jobs, and waiting for a teacher job or not (other points start earlier)
        waits_teacher = k in teacher_of and teacher_of[k].name in teacher_job
        key = (waits_teacher, *((st.name, st.done, dataclasses.astuple(st.resources)) for st in steps))
        groups.setdefault(key, []).append((k, pcfg, steps))
    jobs: list[Any] = []
    last: list[str] = []
    ids: dict[int, dict[str, str]] = {}
    n = len(points)
    for members in groups.values():
        tasks = [teacher_job[teacher_of[k].name] for k, _, _ in members if k in teacher_of and teacher_of[k].name in teacher_job]
        array = _array_id(tasks[0]) if tasks else ""
        if len(members) > 1 and tasks == [f"{array}_{i}" for i in range(len(members))] == list(teacher_job.values()):
            dep = ",".join([f"afterok:{':'.join(after)}"] * bool(after) + [f"aftercorr:{array}"])  # point i: teacher i
        else:
            waits = list(dict.fromkeys(list(after) + tasks))
            dep = f"afterok:{':'.join(waits)}" if waits else None
        if len(members) == 1:
            k, pcfg, steps = members[0]
            got = submit_chain(pcfg, steps, launch, out, label=f"[point {k + 1}/{n}] {points[k].name}: ", first_dep=dep)
            ids[k] = {st.name: j.job_id for st, j in zip([s for s in steps if not s.done], got)}
            jobs += got
            last += [got[-1].job_id] if got else []
            continue
        prev: Optional[str] = None
        label = f"[{len(members)} points: {_names([points[k].name for k, _, _ in members])}] "
        for i, step in enumerate(members[0][2]):
            if step.done:
                out(f"{label}{step.name}: skipped (done)")
                continue
            items = [(points[k].name, steps[i]) for k, _, steps in members]
            got = _submit_array(launch, root, items, f"aftercorr:{prev}" if prev else dep, label, out)
            for (k, _, _), job in zip(members, got):
                ids.setdefault(k, {})[step.name] = job.job_id
            jobs += got
            prev = _array_id(got[0].job_id)
        last += [prev] if prev else []
    return jobs, last, ids


def _submit_array(launch: LaunchCfg, root: Path, items: list[tuple[str, Step]], dep: Optional[str], label: str,
                  out: Callable[[str], None]) -> list[Any]:
    """One SLURM job array of the same stage for several runs (task i: ``items[i]``, a (name, step)), with the first
    step's resources, at most ``slurm.array_parallelism`` tasks at once (0: all); logs in ``<sweep>/logs``."""
    step = items[0][1]
    folder = Path(launch.logs or root / "logs").resolve()
    ex = make_executor("slurm", folder, step, f"{root.name}-{step.name}", dep)
    ex.update_parameters(slurm_array_parallelism=step.resources.array_parallelism or len(items))
    cwd = os.getcwd()
    t0 = time.time()
    with _job_env(), ex.batch():
        got = [ex.submit(StageJob(st.overrides, st.stage, cwd, st.resources.gpus_per_node)) for _, st in items]
    for job in got:
        _set_aside_stale(job, t0)
    after = f" after {_prev_dep(dep)}" if dep else ""
    if len(got) == 1:  # submitit submits one task as a plain job
        out(f"{label}{items[0][0]}: {step.name}: submitted slurm job {got[0].job_id}{after} "
            f"(logs: {got[0].paths.stdout} / .err)")
        return got
    array, par = _array_id(got[0].job_id), step.resources.array_parallelism
    tasks = ", ".join(f"{j.job_id} {name}" for (name, _), j in list(zip(items, got))[:3]) + (", …" if len(got) > 3 else "")
    out(f"{label}{step.name}: submitted slurm job array {array} ({len(got)} tasks: {tasks}){after}"
        f"{f', at most {par} at once' if 0 < par < len(got) else ''} (logs: {folder}/{array}_<task>_0_log.out / .err)")
    return got


def _array_id(job_id: str) -> str:
    """``123_4`` (a task of a job array) → ``123``; a plain job's id as it is."""
    return job_id.split("_")[0]


def _names(names: list[str], k: int = 2) -> str:
    """The first ``k`` names, then how many more."""
    return ", ".join(names[:k]) + (f" +{len(names) - k}" if len(names) > k else "")


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


def main(argv: Optional[list[str]] = None) -> int:
    """Command line of ``launch/submit.py``; returns the exit code (2: bad keys, 1: a job failed)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.strip())
        return 0
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
    except KeyboardInterrupt:
        print("interrupted: running local jobs are cancelled; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
