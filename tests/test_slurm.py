"""The launcher on a real SLURM cluster (start one with ``bash .ci/slurm_up.sh``): afterok chains, requeue on
time-out (USR2) and on preemption (TERM), exact resume. Skipped when no cluster answers."""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slurm_reason
from test_launch import COUNTING, ROOT, SUBMIT, TOY, fake_stages


REASON = slurm_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow,  # chains of real jobs: part of the full suite, not of the quick loop
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(autouse=True)
def usable_node():
    """Fail at once, with SLURM's reason, when no node can run a job (e.g. drained by "SlurmdSpoolDir is full"):
    otherwise every test here would wait for jobs that never start."""
    r = subprocess.run(["sinfo", "-h", "-o", "%T|%E"], capture_output=True, text=True, timeout=60)
    states = [line.split("|", 1) for line in r.stdout.splitlines() if line.strip()]
    if not any(st.rstrip("*~#").split("+")[0] in ("idle", "mixed", "allocated", "completing") for st, _ in states):
        pytest.fail(f"SLURM has no node that can run a job: {r.stdout.strip() or r.stderr.strip()}")


HAVE_TRAINING = all((ROOT / "wsss_dist" / p).exists() for p in ("stages/shards.py", "stages/cls.py", "stages/cam.py")) and \
    any((ROOT / "wsss_dist" / p).exists() for p in ("engine/__init__.py", "engine.py"))
needs_training = pytest.mark.skipif(not HAVE_TRAINING, reason="the shards/cls/cam stages or the engine are not there yet")
SMALL = ["slurm.cpus_per_task=1", "slurm.mem_gb=1", "slurm.time_min=20"]


def submit_slurm(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch/submit.py cluster=slurm (returns at once): the process and the job ids it printed, in chain order."""
    r = subprocess.run([sys.executable, str(SUBMIT), "cluster=slurm", f"launch.logs={cwd}/logs", *SMALL, *args], cwd=cwd,
                       capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    return r, re.findall(r"submitted slurm job (\d+)", r.stdout)


def _sacct_rows(job_id: str) -> list[dict[str, str]]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,Start,End"],
                         capture_output=True, text=True, timeout=120).stdout
    return [dict(zip(("id", "state", "start", "end"), line.split("|"))) for line in out.splitlines() if line.strip()]


def sacct(job_id: str) -> list[dict[str, str]]:
    """The allocations of a job (several when it was requeued), oldest first."""
    own = [r for r in _sacct_rows(job_id) if r["id"] == job_id]
    if own or "_" not in job_id:
        return own
    # an array task that never started (cancelled while pending) has no row of its own: accounting keeps it in the
    # array's pending record, e.g. 84_[2] or 84_[0-2%2], whose state is the task's; `sacct -j 84_2` does not always
    # list that record (it did not for 84_[0-2%2]), `sacct -j 84` does
    array = job_id.split("_")[0]
    return [r for r in _sacct_rows(array) if r["id"].startswith(f"{array}_[")]


def end_state(job_id: str) -> str:
    """The state accounting holds for a job's latest allocation ('?' while it has none)."""
    return (sacct(job_id) or [{"state": "?"}])[-1]["state"]


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def wait_end(job_ids: list[str], timeout: float = 600) -> dict[str, str]:
    """Wait until every job has left the queue; their final states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(squeue_state(j) for j in job_ids):  # out of the queue: wait until accounting has the end state
            states = {j: end_state(j) for j in job_ids}
            if all(s.split()[0] in FINAL for s in states.values()):
                return states
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"jobs {job_ids} not ended after {timeout} s: queue {[squeue_state(j) for j in job_ids]}, "
                         f"accounting {[end_state(j) for j in job_ids]}")


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s)


def assert_afterok_order(job_ids: list[str]) -> None:
    for a, b in zip(job_ids, job_ids[1:]):
        end_a, start_b = ts(sacct(a)[-1]["end"]), ts(sacct(b)[-1]["start"])
        assert start_b >= end_a, f"job {b} started {start_b} before job {a} ended {end_a}"


SLEEPING = """
    import time
    def run(cfg):
        (cfg.run_dir / "{name}").mkdir(parents=True, exist_ok=True)
        time.sleep(2)
        if "{name}" == "cam" and cfg.cam.bg_threshold == 0.99:
            raise ValueError("boom in cam")
        return {{}}
"""


def test_chain_runs_in_afterok_order_and_a_failure_cancels_the_rest(tmp_path):
    env = fake_stages(tmp_path, {n: SLEEPING.format(name=n) for n in ("shards", "cls", "cam", "aff")})
    r, ids = submit_slurm(["stage=[shards,cls,cam]", f"run={tmp_path}/run"], tmp_path, env)
    assert r.returncode == 0 and len(ids) == 3, r.stdout + r.stderr
    states = wait_end(ids, 180)
    assert set(states.values()) == {"COMPLETED"}, states
    assert_afterok_order(ids)
    assert all((tmp_path / "run" / s / "DONE").is_file() for s in ("shards", "cls", "cam"))
    # resubmitting: everything is done, nothing is submitted
    r2, ids2 = submit_slurm(["stage=[shards,cls,cam]", f"run={tmp_path}/run"], tmp_path, env)
    assert r2.returncode == 0 and ids2 == [] and r2.stdout.count("skipped (done)") == 3
    # a failing stage: the dependent job is cancelled (kill-on-invalid-dep), not left pending
    r3, ids3 = submit_slurm(["stage=[cam,aff]", f"run={tmp_path}/run2", "cam.bg_threshold=0.99"], tmp_path, env)
    assert len(ids3) == 2, r3.stdout + r3.stderr
    states = wait_end(ids3, 180)
    assert states[ids3[0]] == "FAILED" and states[ids3[1]].startswith("CANCELLED"), states
    assert "boom in cam" in (tmp_path / "logs" / f"{ids3[0]}_0_log.err").read_text()


def test_timeout_signal_and_preemption_requeue_and_resume(tmp_path):
    """USR2 (submitit's time-out signal) and a real preemption (TERM) both checkpoint, requeue and resume."""
    env = fake_stages(tmp_path, {"eval": COUNTING.replace("while i < 12", "while i < 60")})
    trace = tmp_path / "run" / "eval" / "trace.txt"
    r, ids = submit_slurm(["stage=eval", f"run={tmp_path}/run"], tmp_path, env)
    assert r.returncode == 0 and len(ids) == 1, r.stdout + r.stderr
    job = ids[0]

    def steps() -> list[int]:
        return [int(x.split()[2]) for x in trace.read_text().splitlines() if x.startswith("step")] if trace.exists() else []

    def starts() -> int:
        return trace.read_text().count("start") if trace.exists() else 0

    def stepped_since_start() -> bool:
        return trace.read_text().splitlines()[-1].startswith("step")

    wait_for(lambda: len(steps()) >= 3, 600, "the job to make 3 steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # as at a time-out
    wait_for(lambda: starts() == 2 and stepped_since_start(), 600, "the requeued job to resume")
    # real preemption: a job in the higher-priority partition needs every CPU of the node
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(os.cpu_count() or 2), "-t", "2",
                           "-o", str(tmp_path / "high.out"), "--wrap", "sleep 1"],
                          capture_output=True, text=True, check=True).stdout.strip()
    states = wait_end([job, high], 300)
    assert states[job] == "COMPLETED", states
    text = trace.read_text()
    assert text.count("start") == 3, text  # first run, after USR2, after preemption
    resumed = [int(x.split()[2]) for x in text.splitlines() if x.startswith("start")]
    assert resumed[0] == 0 and 0 < resumed[1] < resumed[2] < 60  # each restart resumed from its checkpoint
    assert steps() == list(range(1, 61))
    log = (tmp_path / "logs" / f"{job}_0_log.err").read_text()
    assert log.count("requeueing through submitit") == 2 and "Requeued job" in log
    assert len(sacct(job)) >= 3  # three allocations of the same job id
    assert (tmp_path / "run" / "eval" / "DONE").is_file()


# ------------------------------------------------------------------ real stages


def _toy(tmp_path: Path) -> list[str]:
    return [f"data.shards_dir={tmp_path}/shards", f"data.toy.root={tmp_path}/toy-src", *TOY, "data.num_workers=0",
            "cls.train.batch_size=4", "cls.train.crop=32", "cls.train.resize_long=[32,48]", "cls.train.log_every=5",
            "cam.scales=[1.0]", "cam.flip=false"]


def _newest_ckpt_step(run: Path) -> int:
    """Step of the newest complete cls checkpoint (``ckpt/step-N/COMPLETE``), 0 if none."""
    steps = [int(p.name.split("-")[1]) for p in (run / "cls" / "ckpt").glob("step-*") if (p / "COMPLETE").is_file()]
    return max(steps, default=0)


# ~3-5 min on 2 CPU cores: pytest -m slurm (runs in CI: issue 5 asks for these with real stages)
@needs_training
def test_real_cls_preempted_twice_equals_uninterrupted(tmp_path):
    """cls with 2 reader workers, checkpointing every 5 steps, stopped by ``scancel --signal=TERM`` (TERM to every
    process of the job step, reader workers included) and then requeued by ``scontrol requeue`` (or, if it already
    finished its steps, preempted by a job of the high partition), ends with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file
    import torch

    common = ["stage=cls", "method=fmix", "cls.train.steps=30", "cls.train.ckpt_every=5", *_toy(tmp_path),
              "data.num_workers=2"]
    env = {"PYTHONPATH": str(ROOT)}  # the stage seeds its initial weights (cls.train.seed)
    # shards first (direct, in this process' machine), and the reference run alongside the SLURM job
    subprocess.run([sys.executable, "-m", "wsss_dist", "stage=shards", f"run={tmp_path}/ref", *common[2:]], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    r, ids = submit_slurm(["run=" + str(tmp_path / "run"), *common], tmp_path, env)
    assert r.returncode == 0 and len(ids) == 1, r.stdout + r.stderr
    job, run = ids[0], tmp_path / "run"
    ref = subprocess.Popen([sys.executable, "-m", "wsss_dist", f"run={tmp_path}/ref", *common], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    log = tmp_path / "logs" / f"{job}_0_log.err"
    wait_for(lambda: _newest_ckpt_step(run) > 0, 600, "a first checkpoint")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for(lambda: log.exists() and log.read_text().count("stage cls (") >= 2, 600, "the requeued job to start")
    first = _newest_ckpt_step(run)
    wait_for(lambda: _newest_ckpt_step(run) > first or (run / "cls" / "DONE").exists(), 300,
             "a checkpoint after the restart")
    if not (run / "cls" / "DONE").exists():
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    states = wait_end([job], 900)
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    assert states[job] == "COMPLETED", (states, log.read_text()[-3000:])
    text = log.read_text()
    assert "received SIGTERM" in text and "Traceback" not in text.split("received SIGTERM")[1].split("stage cls (")[0]
    assert text.count("requeueing through submitit") >= 1 and text.count("stage cls (") >= 2
    a = load_file(str(run / "cls" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "cls" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def submitted(stdout: str) -> tuple[list[str], dict[str, str]]:
    """The plain job ids the launcher printed (in order) and its job arrays: {label stage: array job id}."""
    return re.findall(r"submitted slurm job (\d+)", stdout), dict(re.findall(r"(\S+): submitted slurm job array (\d+)", stdout))


def dependency(job_id: str) -> str:
    """``scontrol show job``'s Dependency= of a (pending) job or array."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return (re.findall(r"Dependency=(\S+)", out) or [""])[0]


FAIL_IN_CLS = SLEEPING.replace('"{name}" == "cam" and', '"{name}" == "cls" and').replace("boom in cam", "boom in cls")


def test_sweep_submits_one_job_array_per_stage_with_elementwise_dependencies(tmp_path):
    """3 points with the same stages: one shards job, a cls array afterok on it, a cam array aftercorr on the cls
    array (task i after task i), at most slurm.array_parallelism tasks at once, the report afterany on the cam array;
    the point whose cls fails loses only its own cam task, and the report still runs and shows it."""
    import json

    env = fake_stages(tmp_path, {n: FAIL_IN_CLS.format(name=n) for n in ("shards", "cls", "cam")})
    r, _ = submit_slurm(["stage=[shards,cls,cam,report]", "cam.bg_threshold=[0.15,0.5,0.99]", f"run={tmp_path}/grid",
                         "slurm.array_parallelism=2"], tmp_path, env)
    (shards, report), arrays = submitted(r.stdout)
    assert r.returncode == 0 and list(arrays) == ["cls", "cam"], r.stdout + r.stderr
    cls, cam = arrays["cls"], arrays["cam"]
    assert dependency(cam) == f"aftercorr:{cls}_*(unfulfilled)" and dependency(report) == f"afterany:{cam}_*(unfulfilled)"
    script = (tmp_path / "logs" / f"{cls}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script and f"#SBATCH --dependency=afterok:{shards}" in script, script
    tasks = [f"{a}_{i}" for a in (cls, cam) for i in range(3)]
    states = wait_end([shards, *tasks, report], 600)
    assert states[f"{cls}_2"] == "FAILED" and states[f"{cam}_2"].startswith("CANCELLED"), states
    assert {states[t] for t in tasks if not t.endswith("_2")} == {"COMPLETED"} == {states[shards], states[report]}, states
    for i in range(2):
        assert_afterok_order([shards, f"{cls}_{i}", f"{cam}_{i}"])
    assert ts(sacct(report)[-1]["start"]) >= max(ts(sacct(t)[-1]["end"]) for t in tasks)
    assert "boom in cls" in (tmp_path / "logs" / f"{cls}_2_0_log.err").read_text()
    res = json.loads((tmp_path / "grid" / "report" / "results.json").read_text())
    status = {p["name"]: p["status"] for p in res["runs"]}
    assert status == {"bg_threshold0.15": "incomplete: no aff", "bg_threshold0.5": "incomplete: no aff",
                      "bg_threshold0.99": "incomplete: no cls"}, status
    sweep = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    assert [p["jobs"] for p in sweep["points"]] == [{"cls": f"{cls}_{i}", "cam": f"{cam}_{i}"} for i in range(3)]


def test_a_task_of_a_job_array_checkpoints_requeues_and_resumes_alone(tmp_path):
    """USR2 to one task of an eval array: that task checkpoints, is requeued (same task id) and resumes; the other
    task runs once."""
    env = fake_stages(tmp_path, {"eval": COUNTING.replace("while i < 12", "while i < 40")})
    r, _ = submit_slurm(["stage=eval", "cam.bg_threshold=[0.1,0.2]", f"run={tmp_path}/grid"], tmp_path, env)
    ids, arrays = submitted(r.stdout)
    assert r.returncode == 0 and ids == [] and list(arrays) == ["eval"], r.stdout + r.stderr
    a = arrays["eval"]
    traces = [tmp_path / "grid" / name / "eval" / "trace.txt" for name in ("bg_threshold0.1", "bg_threshold0.2")]

    def steps(trace: Path) -> list[int]:
        return [int(x.split()[2]) for x in trace.read_text().splitlines() if x.startswith("step")] if trace.exists() else []

    wait_for(lambda: len(steps(traces[1])) >= 3, 600, "task 1 to make 3 steps")
    subprocess.run(["scancel", "--signal=USR2", f"{a}_1"], check=True)
    states = wait_end([f"{a}_0", f"{a}_1"], 600)
    assert set(states.values()) == {"COMPLETED"}, states
    starts = [[int(x.split()[2]) for x in t.read_text().splitlines() if x.startswith("start")] for t in traces]
    assert starts[0] == [0] and len(starts[1]) == 2 and starts[1][1] > 0, starts  # task 1 resumed from its checkpoint
    assert steps(traces[0]) == steps(traces[1]) == list(range(1, 41))
    assert "requeueing through submitit" in (tmp_path / "logs" / f"{a}_1_0_log.err").read_text()
    assert len(sacct(f"{a}_1")) >= 2 and len(sacct(f"{a}_0")) == 1


TEACHER_ONCE = """
    import time
    def run(cfg):
        with open(cfg.run_dir.parent / "teachers.txt", "a") as f:
            f.write(f"{cfg.run_dir.name} {cfg.teacher.train.seed}\\n")
        time.sleep(2)
        return {}
"""
CLS_READS_TEACHER = """
    from wsss_dist import runs
    def run(cfg):
        runs.require_done_at(cfg.teacher_dir, "teacher", "cls")
        runs.atomic_write(cfg.run_dir / "cls" / "teacher.txt", str(cfg.teacher_dir))
        return {}
"""


def test_sweep_trains_one_shared_teacher_per_split_and_seed(tmp_path):
    """4 method=teach points, 2 seeds: one teacher array of 2 tasks (one per seed) after the shards, the points' cls
    array after the shards job and both teacher tasks; each point reads its seed's teacher; resubmitting skips them."""
    env = fake_stages(tmp_path, {"shards": SLEEPING.format(name="shards"), "teacher": TEACHER_ONCE,
                                 "cls": CLS_READS_TEACHER})
    args = ["stage=[shards,teacher,cls,report]", "method=teach", "train.seed=[0,1]", "cam.bg_threshold=[0.1,0.2]",
            f"run={tmp_path}/grid"]
    r, _ = submit_slurm(args, tmp_path, env)
    (shards, report), arrays = submitted(r.stdout)
    assert r.returncode == 0 and list(arrays) == ["teacher", "cls"], r.stdout + r.stderr
    t, c = arrays["teacher"], arrays["cls"]
    assert "teacher-train_aug-s0" in r.stdout and "teacher-train_aug-s1" in r.stdout
    assert dependency(t) == f"afterok:{shards}(unfulfilled)"
    assert dependency(c) == f"afterok:{shards}(unfulfilled),afterok:{t}_0(unfulfilled),afterok:{t}_1(unfulfilled)"
    states = wait_end([shards, f"{t}_0", f"{t}_1", *(f"{c}_{i}" for i in range(4)), report], 600)
    assert set(states.values()) == {"COMPLETED"}, states
    grid = tmp_path / "grid"
    assert sorted((grid / "teachers.txt").read_text().splitlines()) == ["teacher-train_aug-s0 0", "teacher-train_aug-s1 1"]
    for name in ("s0-bg_threshold0.1", "s0-bg_threshold0.2", "s1-bg_threshold0.1", "s1-bg_threshold0.2"):
        seen = (grid / name / "cls" / "teacher.txt").read_text()
        assert seen == str(grid / f"teacher-train_aug-{name[:2]}" / "teacher") and not (grid / name / "teacher").exists()
    r2, _ = submit_slurm(args, tmp_path, env)
    assert r2.returncode == 0 and submitted(r2.stdout) == ([], {}), r2.stdout + r2.stderr
    assert r2.stdout.count(": teacher: skipped (done)") == 2 and "nothing to do" in r2.stdout


@pytest.mark.parametrize("arg, words", [("slurm.partition=nope", ["slurm.partition=nope", "debug"]),
                                        ("slurm.seg.partition=gpuz", ["slurm.partition=gpuz"]),
                                        ("slurm.account=nobody-acct", ["slurm.account=nobody-acct"])])
def test_unknown_partition_or_account_fails_in_one_line_before_any_job(tmp_path, arg, words):
    r, ids = submit_slurm(["stage=[shards,cls]", f"run={tmp_path}/run", arg], tmp_path)
    assert r.returncode == 2 and ids == [] and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_a_chain_whose_later_sbatch_fails_cancels_what_it_queued(tmp_path):
    """Issue 25 #4: sbatch refuses the second job (an unknown flag); the first, already queued, is cancelled and the
    one-line error says so (no job is left pending)."""
    args = ["stage=[shards,cls]", f"run={tmp_path}/run", *_toy(tmp_path), "slurm.cls.extra=[no-such-sbatch-flag=1]",
            "slurm.shards.time_min=5"]
    r, ids = submit_slurm(args, tmp_path)
    assert r.returncode == 2 and len(ids) == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: submitting cls failed") and f"cancelled the 1 job(s) of this chain queued before it ({ids[0]})" in last, last
    deadline = time.time() + 120
    while time.time() < deadline and not any(row["state"].startswith("CANCELLED") for row in sacct(ids[0])):
        time.sleep(2)
    assert any(row["state"].startswith("CANCELLED") for row in sacct(ids[0])), sacct(ids[0])


IRN_TINY = ["refine=irn", "irn.train.steps=4", "irn.train.batch_size=4", "irn.train.crop=48", "irn.radius=5", "irn.logt=4"]


# ~2-3 min on 2 CPU cores: three whole chains queued at once, each a chain of SLURM jobs sharing the node (1 CPU per
# job): a user's own folder dataset (issue 22; AffinityNet), a COCO-2014 layout (issue 22) refined by IRN started from
# the classifier (issue 23: IRN "on CI's SLURM"), and method=clip_es (issue 24: the tiny random CLIP, no cls job) with
# IRN from its own init and eval.crf=true. The folder and COCO chains are also the real shards -> cls -> cam chain of
# issue 5 (its shards, weights and CAM shards); every chain checks the code snapshot its jobs import.
@needs_training
def test_folder_coco_and_clip_es_chains_with_irn_and_crf_run_to_a_val_miou_as_slurm_jobs(tmp_path):
    import importlib.util

    from test_datasets import CHAIN, make_coco_chain, make_folder
    from wsss_dist import runs

    make_folder(tmp_path / "folder")
    layouts = {"folder": ["data=folder", f"data.root={tmp_path / 'folder' / 'images'}",
                          f"data.labels={tmp_path / 'folder' / 'labels.csv'}", f"data.masks={tmp_path / 'folder' / 'masks'}",
                          f"data.split_lists={tmp_path / 'folder' / 'lists'}", "data.classes=red,green,blue"],
               "coco": ["data=coco", f"data.coco_root={tmp_path / 'coco'}", "model.weights=none", "seg.weights=none",
                        "seg.backbone=resnet18", "seg.frozen_bn=false", "model.frozen_bn=false", "aff.stride=4",
                        "slurm.gpus_per_node=0",  # the coco preset's jobs ask for a GPU each; CI has none
                        *IRN_TINY, "irn.backbone=resnet18", "irn.init=cls"],
               "clip_es": [*_toy(tmp_path / "clip_es"), *IRN_TINY, "method=clip_es", "clip.arch=tiny",
                           "clip.weights=random"]}
    if importlib.util.find_spec("pycocotools") is None:  # the COCO layout needs the [coco] extra: the other two chains
        del layouts["coco"]
    else:
        make_coco_chain(tmp_path / "coco")
    if importlib.util.find_spec("open_clip") is None:  # clip_es needs open_clip (the [test] extra has it)
        del layouts["clip_es"]
    crf = importlib.util.find_spec("pydensecrf") is not None  # eval.crf needs the [crf] extra (a C++ compiler)
    if crf and "clip_es" in layouts:
        layouts["clip_es"] += ["eval.crf=true", "eval.crf_workers=1"]
    chains = {}
    for name, words in layouts.items():
        r, ids = submit_slurm([*words, *CHAIN, "stage=all", f"data.shards_dir={tmp_path / name / 'shards'}",
                               "slurm.mem_gb=2", f"run={tmp_path / name / 'run'}"], tmp_path)
        assert r.returncode == 0 and len(ids) == {"folder": 8, "coco": 8, "clip_es": 7}[name], r.stdout + r.stderr
        assert ("cls: submitted" in r.stdout) == (name != "clip_es"), r.stdout
        chains[name] = ids
    states = wait_end([j for ids in chains.values() for j in ids], 2400)
    logs = {j: tmp_path / "logs" / f"{j}_0_log.err" for j in states}
    assert set(states.values()) == {"COMPLETED"}, (states, {j: p.read_text()[-1500:] for j, p in logs.items() if p.exists()})
    for name, ids in chains.items():
        assert_afterok_order(ids)
        run = tmp_path / name / "run"
        assert runs.read_json(run / "aff" / "model.json")["kind"] == ("affinity" if name == "folder" else "irn")
        assert list((tmp_path / name / "shards").glob("*.tar")) and list((run / "cam").glob("*.tar"))
        assert (run / "cls" / "model.safetensors").is_file() == (name != "clip_es")
        ev = runs.read_json(run / "eval" / "DONE")
        ev = ev.get("metrics", ev)
        assert 0 <= ev["miou"] <= 1 and len(ev["iou"]) == {"folder": 4, "coco": 81, "clip_es": 21}[name], ev
        assert (0 <= ev["crf_miou"] <= 1 and ev["crf_image"] == "rgb") if name == "clip_es" and crf else "crf_miou" not in ev, ev
        # issue 25 #4: the jobs import the snapshot of the package taken at submit (<run>/code/...), not the live
        # checkout, so code edited while they queue does not change them
        snaps = list((run / "code").glob("*/wsss_dist/pipeline.py"))
        assert len(snaps) == 1, snaps
        for stage in ("shards", "eval"):
            env = runs.read_json(run / stage / "environment.json")
            assert env["package"] == str(snaps[0].parent), (stage, env["package"])
    assert " red " in (tmp_path / "folder" / "run" / "report" / "report.md").read_text()
    if "clip_es" in chains:
        assert not (tmp_path / "clip_es" / "run" / "cls").exists()
        assert "clip_es+irn" in (tmp_path / "clip_es" / "run" / "report" / "report.md").read_text()
