"""The launcher on a real SLURM cluster (start one with ``bash .ci/slurm_up.sh``): afterok chains, requeue on
time-out (USR2) and on preemption (TERM), exact resume. Skipped when no cluster answers."""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch import COUNTING, ROOT, SUBMIT, TOY, fake_stages


def _cluster_reason() -> str | None:
    if not (shutil.which("sinfo") and shutil.which("srun") and shutil.which("sbatch")):
        return "no SLURM client (sinfo/srun/sbatch) on PATH; start one with: bash .ci/slurm_up.sh"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if r.returncode != 0 or "UP" not in r.stdout:
        return f"no SLURM controller answers (scontrol ping: {r.stdout.strip() or r.stderr.strip()}); start one with: bash .ci/slurm_up.sh"
    return None


REASON = _cluster_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
HAVE_TRAINING = all((ROOT / "wsss_dist" / p).exists() for p in ("stages/shards.py", "stages/cls.py", "stages/cam.py")) and \
    any((ROOT / "wsss_dist" / p).exists() for p in ("engine/__init__.py", "engine.py"))
needs_training = pytest.mark.skipif(not HAVE_TRAINING, reason="the shards/cls/cam stages or the engine are not there yet")
SMALL = ["slurm.cpus_per_task=1", "slurm.mem_gb=1", "slurm.time_min=20"]


def submit_slurm(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch/submit.py cluster=slurm (returns at once): the process and the job ids it printed, in chain order."""
    r = subprocess.run([sys.executable, str(SUBMIT), "cluster=slurm", f"launch.logs={cwd}/logs", *SMALL, *args], cwd=cwd,
                       capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    return r, re.findall(r"submitted slurm job (\d+)", r.stdout)


def sacct(job_id: str) -> list[dict[str, str]]:
    """The allocations of a job (several when it was requeued), oldest first."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,Start,End"],
                         capture_output=True, text=True, timeout=120).stdout
    rows = [dict(zip(("id", "state", "start", "end"), line.split("|"))) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["id"] == job_id]


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def wait_end(job_ids: list[str], timeout: float = 600) -> dict[str, str]:
    """Wait until every job has left the queue; their final states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(squeue_state(j) for j in job_ids):  # out of the queue: wait until accounting has the end state
            states = {j: (sacct(j) or [{"state": "?"}])[-1]["state"] for j in job_ids}
            if all(s.split()[0] in FINAL for s in states.values()):
                return states
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s: {[squeue_state(j) for j in job_ids]}")


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


# ~2 min on 2 CPU cores: pytest -m slurm (runs in CI: issue 5 asks for these with real stages)
@needs_training
def test_real_chain_shards_cls_cam(tmp_path):
    args = ["stage=[shards,cls,cam]", "method=fmix", f"run={tmp_path}/run", "cls.train.steps=20", *_toy(tmp_path)]
    r, ids = submit_slurm(args, tmp_path)
    assert r.returncode == 0 and len(ids) == 3, r.stdout + r.stderr
    states = wait_end(ids, 900)
    logs = {j: (tmp_path / "logs" / f"{j}_0_log.err") for j in ids}
    assert set(states.values()) == {"COMPLETED"}, (states, {j: p.read_text()[-2000:] for j, p in logs.items() if p.exists()})
    assert_afterok_order(ids)
    run = tmp_path / "run"
    assert all((run / s / "DONE").is_file() for s in ("shards", "cls", "cam"))
    assert (run / "cls" / "model.safetensors").is_file() and list((run / "cam").glob("*.tar"))
    assert list((tmp_path / "shards").glob("*.tar"))


def _newest_ckpt_step(run: Path) -> int:
    """Step of the newest complete cls checkpoint (``ckpt/step-N/COMPLETE``), 0 if none."""
    steps = [int(p.name.split("-")[1]) for p in (run / "cls" / "ckpt").glob("step-*") if (p / "COMPLETE").is_file()]
    return max(steps, default=0)


# ~3-5 min on 2 CPU cores: pytest -m slurm (runs in CI: issue 5 asks for these with real stages)
@needs_training
def test_real_cls_preempted_twice_equals_uninterrupted(tmp_path):
    """cls checkpointing every 5 steps, interrupted by USR2 and then by a real preemption, ends with exactly the
    weights of an uninterrupted run."""
    from safetensors.torch import load_file
    import torch

    common = ["stage=cls", "method=fmix", "cls.train.steps=30", "cls.train.ckpt_every=5", *_toy(tmp_path)]
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
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: log.exists() and log.read_text().count("stage cls (") >= 2, 600, "the requeued job to start")
    first = _newest_ckpt_step(run)
    wait_for(lambda: _newest_ckpt_step(run) > first or (run / "cls" / "DONE").exists(), 300,
             "a checkpoint after the restart")
    if not (run / "cls" / "DONE").exists():
        subprocess.run(["sbatch", "-p", "high", "-c", str(os.cpu_count() or 2), "-t", "2", "-o", str(tmp_path / "high.out"),
                        "--wrap", "sleep 1"], check=True, capture_output=True)
    states = wait_end([job], 900)
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    assert states[job] == "COMPLETED", (states, log.read_text()[-3000:])
    text = log.read_text()
    assert text.count("requeueing through submitit") >= 1 and text.count("stage cls (") >= 2
    a = load_file(str(run / "cls" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "cls" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_sweep_chains_each_point_after_the_shared_shards_and_reports_a_failed_point(tmp_path):
    """A 2-point sweep on SLURM: one shards job, each point's chain after it (afterok), one report after every
    point (afterany): the point made to fail is cancelled there, yet the report runs and shows it as not finished."""
    import json

    env = fake_stages(tmp_path, {n: SLEEPING.format(name=n) for n in ("shards", "cls", "cam")})
    r, ids = submit_slurm(["stage=[shards,cls,cam,report]", "cam.bg_threshold=[0.15,0.99]", f"run={tmp_path}/grid"],
                          tmp_path, env)
    assert r.returncode == 0 and len(ids) == 1 + 2 + 2 + 1, r.stdout + r.stderr
    shards, cls1, cam1, cls2, cam2, report = ids
    assert "[point 2/2] bg_threshold0.99: cam: submitted" in r.stdout and "afterany" in r.stdout
    states = wait_end(ids, 600)
    assert states[cam2].startswith("FAILED") and states[report].startswith("COMPLETED"), states
    assert_afterok_order([shards, cls1, cam1])
    assert_afterok_order([shards, cls2, cam2])
    assert ts(sacct(report)[-1]["start"]) >= max(ts(sacct(j)[-1]["end"]) for j in (cam1, cam2))
    res = json.loads((tmp_path / "grid" / "report" / "results.json").read_text())
    status = {p["name"]: p["status"] for p in res["runs"]}
    assert status == {"bg_threshold0.15": "incomplete: no aff", "bg_threshold0.99": "incomplete: no cam"}, status


@pytest.mark.parametrize("arg, words", [("slurm.partition=nope", ["slurm.partition=nope", "debug"]),
                                        ("slurm.seg.partition=gpuz", ["slurm.partition=gpuz"]),
                                        ("slurm.account=nobody-acct", ["slurm.account=nobody-acct"])])
def test_unknown_partition_or_account_fails_in_one_line_before_any_job(tmp_path, arg, words):
    r, ids = submit_slurm(["stage=[shards,cls]", f"run={tmp_path}/run", arg], tmp_path)
    assert r.returncode == 2 and ids == [] and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert all(w in r.stderr for w in words), r.stderr
