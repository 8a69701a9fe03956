"""Sweeps: the shared shards (one per data setting) and teachers, each point's chain (SLURM job arrays), one report."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .. import runs
from ..config import STAGES, Config, Point, make_config
from ..pipeline import check_data, check_settings, save_config, stage_action
from ..registry import METHODS, STAGE_SPECS
from .chain import _check_cluster, _finish, submit_chain
from .executor import _array_id, _job_env, _prev_dep, _set_aside_stale, make_executor, snapshot_package
from .jobs import StageJob
from .options import LaunchCfg
from .plan import Step, plan


SHARED_STAGES = tuple(s.name for s in STAGE_SPECS.values() if s.shared_by_sweep)  # run once per data setting


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
    from ..models.preflight import preflight  # timm and the weights files: names and headers before any job

    for c in cfgs:
        preflight(c)
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
            check_settings(pcfg)
            save_config(pcfg)
            plans.append((k, pcfg, plan(pcfg, launch, pwords)))  # every point's jobs checked before any job
    tplans = []
    for t in teachers:
        if any("teacher" in cfgs[i].stages() for i in t.points):
            tcfg = make_config(t.words)
            check_settings(tcfg)
            save_config(tcfg)
            tplans.append((t, tcfg, plan(tcfg, launch, t.words)))
    jobs: list[Any] = []
    after: list[str] = []  # SLURM jobs every point waits for (afterok): the shards jobs
    n = len(points)
    if any(s in stages for s in SHARED_STAGES):
        for name, k in shards_jobs(cfgs).items():  # one per distinct data setting (a sweep over data.* keys)
            swords = words[k] + [f"run={root / name}", "stage=shards"]
            scfg = make_config(swords)
            check_settings(scfg)
            for warning in check_data(scfg):
                out(f"warning: {warning}")
            save_config(scfg)
            steps = [dataclasses.replace(st, done=runs.is_done(scfg.run_dir, st.stage)  # done is done, as in a chain
                                         and stage_action(scfg, st.stage)[0] != "restart")
                     for st in plan(scfg, launch, swords)]
            got = submit_chain(scfg, steps, launch, out, label="[shared] " if name == "shards" else f"[shared {name}] ")
            jobs += got
            after += [got[-1].job_id] if got and slurm else []
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


def shards_jobs(cfgs: list[Config]) -> dict[str, int]:
    """The shared shards runs of a sweep's points: ``shards`` when they all read one shards folder, else one
    ``shards-<name>`` per folder; each with the index of the first point that reads it."""
    dirs = list(dict.fromkeys(str(c.shards_dir) for c in cfgs))
    first = {d: next(i for i, c in enumerate(cfgs) if str(c.shards_dir) == d) for d in dirs}
    if len(dirs) == 1:
        return {"shards": 0}
    return {f"shards-{Path(d).name}": first[d] for d in dirs}


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
    if launch.snapshot is None:  # queued jobs import the code as it is now
        launch.snapshot = snapshot_package(root / "code")
    with _job_env(launch.snapshot), ex.batch():
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


def _names(names: list[str], k: int = 2) -> str:
    """The first ``k`` names, then how many more."""
    return ", ".join(names[:k]) + (f" +{len(names) - k}" if len(names) > k else "")
