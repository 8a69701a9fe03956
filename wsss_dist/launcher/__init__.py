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

The launcher is a command line, so it reports progress with ``print``. One file, one job: ``options`` (the
launcher's keys), ``resources`` (per-stage SLURM resources, the time check), ``plan`` (the chain's steps), ``jobs``
(what runs on the node), ``executor`` (submitit executors, cancelling, waiting), ``chain`` (one run's chain:
local, SLURM, dry run), ``sweep`` (sweeps), ``main`` (the command line).
"""
from .chain import local_groups, results_line, submit_chain
from .executor import PREEMPT_ENV, make_executor
from .jobs import ChainJob, StageJob, check_cuda
from .main import main, submit
from .options import LaunchCfg, split_args
from .plan import Step, plan
from .resources import STAGE_DEFAULTS, check_time, stage_hours, stage_resources
from .sweep import SWEEP_FILE, shards_jobs, shared_teachers, submit_sweep

__all__ = ["ChainJob", "LaunchCfg", "PREEMPT_ENV", "STAGE_DEFAULTS", "SWEEP_FILE", "StageJob", "Step", "check_cuda",
           "check_time", "local_groups", "main", "make_executor", "plan", "results_line", "shards_jobs",
           "shared_teachers", "split_args", "stage_hours", "stage_resources", "submit", "submit_chain", "submit_sweep"]
