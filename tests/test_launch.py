"""The launcher (launch/submit.py, wsss_dist.launcher), CI wiring and set-up; no SLURM needed."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wsss_dist import launcher, runs
from wsss_dist.config import make_config
from wsss_dist.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launch" / "submit.py"
TOY = ["data.toy.n_train=20", "data.toy.n_val=8", "data.toy.n_sbd=20", "data.toy.size=48", "data.shard_size=8"]


def readme_commands() -> list[str]:
    """The shell commands at the top of README.md (its first code block)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S)
    assert block and text.index("```") < 200, "README.md must open with the set-up commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def submit(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launch/submit.py in a subprocess."""
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def fake_stages(tmp_path: Path, code: dict[str, str]) -> dict[str, str]:
    """Env that puts modules ``code`` (stage name → source) in front of wsss_dist.stages in every job."""
    site, stages = tmp_path / "site", tmp_path / "fake_stages"
    site.mkdir()
    stages.mkdir()
    (site / "sitecustomize.py").write_text(f"import wsss_dist.stages\nwsss_dist.stages.__path__.insert(0, {str(stages)!r})\n")
    for name, src in code.items():
        (stages / f"{name}.py").write_text(textwrap.dedent(src))
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}


# ------------------------------------------------------------------ README / CI / set-up


def test_readme_opens_with_the_two_commands():
    cmds = readme_commands()
    assert cmds[:2] == ["bash launch/setup.sh && .venv/bin/python launch/submit.py stage=all method=fmix",
                        "bash launch/setup.sh --test && .venv/bin/python -m pytest"]


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    assert test_cmd in lines, f".ci/run must run the README's test command verbatim: {test_cmd}"
    assert "set -euo pipefail" in ci and ".ci/slurm_up.sh" in ci
    assert lines.index(test_cmd) > next(i for i, line in enumerate(lines) if "slurm_up.sh" in line)


def test_shell_scripts_parse():
    for script in ("launch/setup.sh", ".ci/run", ".ci/slurm_up.sh", ".ci/slurm_down.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


# ------------------------------------------------------------------ keys, plan, resources


def test_unknown_key_exits_2_with_one_line(tmp_path):
    r = submit(["stage=shards", "no_such.key=1", f"run={tmp_path}/run"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such.key" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("arg, word", [("slurm.seg.gpus=2", "slurm.seg.gpus"), ("slurm.nostage.nodes=2", "nostage"),
                                       ("slurm.cls.nodes=two", "slurm.nodes"), ("launch.nope=1", "launch.nope")])
def test_bad_launcher_keys(arg, word):
    with pytest.raises(ConfigError, match=re.escape(word)):
        launcher.split_args(["stage=cls", arg])


def test_stage_resources_precedence():
    launch, rest = launcher.split_args(["stage=all", "slurm.gpus_per_node=4", "slurm.seg.gpus_per_node=8",
                                        "slurm.seg.time_min=600", "slurm.shards.cpus_per_task=16", "launch.logs=/x"])
    assert launch.logs == "/x" and "launch.logs" not in rest and "slurm.seg.gpus_per_node" not in rest
    cfg = make_config(rest)
    seg, cls, shards = (launcher.stage_resources(cfg, launch, s) for s in ("seg", "cls", "shards"))
    assert (seg.gpus_per_node, seg.time_min) == (8, 600)  # per-stage key wins
    assert (cls.gpus_per_node, cls.time_min) == (4, cfg.slurm.time_min)  # global slurm.* key
    assert (shards.gpus_per_node, shards.cpus_per_task) == (0, 16)  # CPU-only stage default, then its own key


def test_plan_skips_done_stages_and_splits_sc_rounds(tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / "shards" / "DONE").write_text("{}")
    (run / "cls" / "round0").mkdir(parents=True)
    (run / "cls" / "round0" / "DONE").write_text("{}")
    launch, rest = launcher.split_args(["stage=[shards,cls,cam]", "method=sc", "cls.sc_rounds=3", f"run={run}"])
    steps = launcher.plan(make_config(rest), launch, rest)
    assert [(s.name, s.done) for s in steps] == [("shards", True), ("cls.round0", True), ("cls.round1", False),
                                                  ("cls.round2", False), ("cam", False)]
    assert "cls.round=2" in steps[3].overrides and "stage=cls" in steps[3].overrides
    launch, rest = launcher.split_args(["stage=all", "method=teach"])
    assert "teacher" in [s.stage for s in launcher.plan(make_config(rest), launch, rest)]


def test_slurm_executor_parameters(tmp_path):
    pytest.importorskip("submitit")
    launch, rest = launcher.split_args(["stage=cls", "slurm.partition=gpu", "slurm.account=proj", "slurm.nodes=2",
                                        "slurm.gpus_per_node=4", "slurm.cls.time_min=90", "slurm.extra=[exclusive,comment=x]"])
    step = launcher.plan(make_config(rest), launch, rest)[0]
    ex = launcher.make_executor("slurm", tmp_path, step, "r-cls", dependency="afterok:41")
    p = ex._executor.parameters
    assert (p["partition"], p["account"], p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"]) == \
        ("gpu", "proj", 2, 4, 4, 90)
    assert p["dependency"] == "afterok:41"
    assert p["additional_parameters"] == {"kill-on-invalid-dep": "yes", "exclusive": True, "comment": "x"}
    assert launcher.PREEMPT_ENV in p["setup"]


def test_stage_job_checkpoint_resubmits_the_same_stage():
    job = launcher.StageJob(["stage=cls", "method=fmix"], "cls", "/some/dir")
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, launcher.StageJob) and again is not job
    assert (again.overrides, again.stage, again.cwd) == (job.overrides, job.stage, job.cwd)


# ------------------------------------------------------------------ local chains (subprocess)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "wsss_dist" / "stages" / "shards.py").exists(), reason="the shards stage is not there yet")
def test_local_chain_builds_shards_then_skips(tmp_path):
    args = ["stage=shards", f"run={tmp_path}/run", f"data.shards_dir={tmp_path}/shards",
            f"data.toy.root={tmp_path}/toy-src", *TOY]
    r = submit(args, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/1] shards: running as local job" in r.stdout and "shards: done" in r.stdout
    assert sorted((tmp_path / "shards").glob("train_aug-*.tar")) and (tmp_path / "shards" / "manifest.json").is_file()
    assert (tmp_path / "run" / "shards" / "DONE").is_file()
    assert list((tmp_path / "run" / "logs").glob("*_0_log.err"))
    tars = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}
    again = submit(args, tmp_path)  # stage=shards verifies what is on disk (and would repair it)
    assert again.returncode == 0 and "shards: done" in again.stdout, again.stdout + again.stderr
    assert runs.read_done(tmp_path / "run", "shards")["rebuilt"] == 0
    assert tars == {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}  # nothing rewritten
    assert "differs" not in again.stderr  # the saved config.yaml reads back equal



FAILING = """
    def run(cfg):
        raise ValueError("boom: the fake stage failed")
"""

# A trainer stand-in: counts steps (checkpoint after each), and on USR2/TERM checkpoints and raises the engine's
# Interrupted, as wsss_dist.engine does.
COUNTING = """
    import json, os, signal, time

    from wsss_dist.errors import Interrupted

    def run(cfg):
        out = cfg.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / "ckpt.json"
        i = json.loads(ckpt.read_text())["i"] if ckpt.exists() else 0
        got = []
        old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGUSR2, signal.SIGTERM)}
        try:
            with open(out / "trace.txt", "a") as trace:
                trace.write(f"start {os.getpid()} {i}\\n")
                trace.flush()
                while i < 12:
                    time.sleep(0.25)
                    i += 1
                    ckpt.write_text(json.dumps({"i": i}))
                    trace.write(f"step {os.getpid()} {i}\\n")
                    trace.flush()
                    if got:
                        raise Interrupted(got[0])
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return {"steps": i}
"""


# A stage stand-in that records the process it ran in.
PID = """
    import os

    def run(cfg):
        out = cfg.run_dir / "pids"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.stage}-{os.getpid()}").touch()
        return {"pid": os.getpid()}
"""


def test_local_groups_follow_gpus_and_skip_done_steps():
    from wsss_dist.config import SlurmCfg

    def step(gpus, done=False):
        return launcher.Step("x", [], SlurmCfg(gpus_per_node=gpus), done)

    steps = [step(0), step(1), step(1, done=True), step(1), step(0), step(0, done=True)]
    assert launcher.local_groups(steps) == [[0], [1, 3], [4]]
    assert launcher.local_groups([step(0, True), step(0, True)]) == []
    assert launcher.local_groups(steps, one_process=False) == [[0], [1], [3], [4]]


@pytest.mark.slow
def test_consecutive_local_stages_share_one_job_and_process(tmp_path):
    env = fake_stages(tmp_path, {"seg": PID, "eval": PID})
    r = submit(["stage=[seg,eval]", f"run={tmp_path}/run"], tmp_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    pids = {p.name.split("-")[0]: p.name.split("-")[1] for p in (tmp_path / "run" / "pids").iterdir()}
    assert set(pids) == {"seg", "eval"} and pids["seg"] == pids["eval"]  # one interpreter for both stages
    lines = r.stdout.splitlines()
    running = [line for line in lines if "running as local job" in line]
    assert [line.split(":")[0] for line in running] == ["[1/2] seg", "[2/2] eval"]
    assert len({line.split("local job ")[1].split()[0] for line in running}) == 1  # one job id
    assert lines.index(running[1]) > min(i for i, line in enumerate(lines) if line.startswith("[1/2] seg: done"))
    assert not list((tmp_path / "run" / "logs").glob("*progress*"))  # the progress file is cleaned up
    (tmp_path / "run" / "eval" / "DONE").unlink()
    again = submit(["stage=[seg,eval]", f"run={tmp_path}/run"], tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/2] seg: skipped (done)" in again.stdout and "[2/2] eval: done" in again.stdout


@pytest.mark.slow
def test_one_process_false_runs_one_job_per_stage(tmp_path):
    env = fake_stages(tmp_path, {"seg": PID, "eval": PID})
    r = submit(["stage=[seg,eval]", f"run={tmp_path}/run", "launch.one_process=false"], tmp_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    pids = {p.name.split("-")[0]: p.name.split("-")[1] for p in (tmp_path / "run" / "pids").iterdir()}
    assert set(pids) == {"seg", "eval"} and pids["seg"] != pids["eval"]


@pytest.mark.slow
def test_a_failure_in_a_shared_job_names_its_stage(tmp_path):
    env = fake_stages(tmp_path, {"seg": PID, "eval": FAILING})
    r = submit(["stage=[seg,eval]", f"run={tmp_path}/run"], tmp_path, env)
    assert r.returncode == 1
    assert "[1/2] seg: done" in r.stdout and "eval failed" in r.stderr and "boom" in r.stderr
    assert (tmp_path / "run" / "seg" / "DONE").is_file() and not (tmp_path / "run" / "eval" / "DONE").exists()


@pytest.mark.slow
def test_local_job_failure_prints_its_stderr_tail(tmp_path):
    env = fake_stages(tmp_path, {"eval": FAILING})
    r = submit(["stage=eval", f"run={tmp_path}/run"], tmp_path, env)
    assert r.returncode == 1
    assert "eval failed" in r.stderr and "boom: the fake stage failed" in r.stderr
    assert not (tmp_path / "run" / "eval" / "DONE").exists()


@pytest.mark.slow
def test_local_interrupt_checkpoints_requeues_and_resumes(tmp_path):
    env = fake_stages(tmp_path, {"eval": COUNTING})
    trace = tmp_path / "run" / "eval" / "trace.txt"
    p = subprocess.Popen([sys.executable, str(SUBMIT), "stage=eval", f"run={tmp_path}/run"], cwd=tmp_path,
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # a safety net: the wait ends on the event (a first step), not on time
        while time.time() < deadline and p.poll() is None and not (trace.exists() and "step" in trace.read_text()):
            time.sleep(0.1)
        first = trace.read_text().split()
        os.kill(int(first[1]), signal.SIGUSR2)  # what submitit's controller sends at a time-out
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 0, out + err
    starts = [line.split() for line in trace.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0][1] != starts[1][1]  # a second process ...
    assert int(starts[1][2]) > 0  # ... resumed from the checkpoint
    steps = [int(line.split()[2]) for line in trace.read_text().splitlines() if line.startswith("step")]
    assert steps == list(range(1, 13))  # no step lost or repeated
    log = next((tmp_path / "run" / "logs").glob("*_0_log.err")).read_text()
    assert "requeueing through submitit" in log and "Requeued job" in log
    assert (tmp_path / "run" / "eval" / "DONE").is_file()


@pytest.mark.slow
def test_a_requeued_shared_job_resumes_at_the_interrupted_stage(tmp_path):
    """USR2 (a time-out) during the second stage of a shared local job: the requeued job runs only that stage on."""
    env = fake_stages(tmp_path, {"seg": PID, "eval": COUNTING})
    trace = tmp_path / "run" / "eval" / "trace.txt"
    p = subprocess.Popen([sys.executable, str(SUBMIT), "stage=[seg,eval]", f"run={tmp_path}/run"], cwd=tmp_path,
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None and not (trace.exists() and "step" in trace.read_text()):
            time.sleep(0.1)
        os.kill(int(trace.read_text().split()[1]), signal.SIGUSR2)
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 0, out + err
    assert len(list((tmp_path / "run" / "pids").iterdir())) == 1  # seg ran once, before the requeue
    starts = [line.split() for line in trace.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 2 and int(starts[1][2]) > 0
    assert [int(line.split()[2]) for line in trace.read_text().splitlines() if line.startswith("step")] == list(range(1, 13))
    assert "[1/2] seg: done" in out and "[2/2] eval: done" in out, out
    assert (tmp_path / "run" / "eval" / "DONE").is_file()


@pytest.mark.slow
def test_chain_killed_mid_stage_reruns_only_the_rest(tmp_path):
    """kill -9 of the whole local chain (launcher and job) once a CAM shard is written; the rerun keeps every
    finished stage and shard, completes the chain, and a third run does nothing."""
    from conftest import SHORT  # 4 CAM shards: the kill lands after the first one, in the middle of the stage

    run = tmp_path / "run"
    args = ["stage=all", "method=cam", f"run={run}", f"data.shards_dir={tmp_path}/shards",
            f"data.toy.root={tmp_path}/toy-src", *SHORT]
    p = subprocess.Popen([sys.executable, str(SUBMIT), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list((run / "cam").glob("*.tar")) and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, "the chain ended before it could be killed"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert not (run / "cam" / "DONE").exists()
    kept = {f: f.stat().st_mtime_ns for f in [run / "shards" / "DONE", run / "cls" / "DONE", run / "cls" / "model.safetensors",
                                               *(run / "cam").glob("*.tar")]}
    r = submit(args, tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shards: skipped (done)" in r.stdout and "cls: skipped (done)" in r.stdout
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # finished work was not redone
    for stage in ("cam", "aff", "pseudo", "seg", "eval", "report"):
        assert (run / stage / "DONE").is_file()
    again = submit(args, tmp_path)
    assert again.returncode == 0 and "running" not in again.stdout, again.stdout + again.stderr


def test_a_job_that_asked_for_gpus_and_finds_no_cuda_fails_in_one_line(monkeypatch):
    import torch

    from wsss_dist.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"asked for 2 GPU\(s\) per node but torch finds no usable CUDA device"):
        launcher.check_cuda(2)
    job = launcher.StageJob(["stage=cls"], "cls", "/x", gpus=2)
    assert job.checkpoint().function.gpus == 2  # a requeued job keeps asking


VOC = ["data=voc", "data.voc_root=/nowhere/VOC2012", "model.weights=none", "seg.weights=none", "teacher.weights=none",
       "cluster=slurm"]


def test_voc_stage_resources_and_the_time_check(tmp_path):
    """data=voc: per-stage SLURM defaults sized for the real run (under the user's own slurm keys), data.num_workers
    from the job's CPUs, and a stage that cannot finish within time_min × (requeues + 1) fails before any job."""
    launch, rest = launcher.split_args(["stage=all", f"run={tmp_path}/r", *VOC])
    steps = {s.name: s for s in launcher.plan(make_config(rest), launch, rest)}
    cls, shards = steps["cls"].resources, steps["shards"].resources
    assert (cls.gpus_per_node, cls.cpus_per_task, cls.time_min) == (1, 8, 240) and shards.gpus_per_node == 0
    assert "data.num_workers=7" in steps["cls"].overrides
    hours = launcher.stage_hours(make_config(rest), "cls", 1)
    assert 0.5 < hours < 3  # 9,915 steps × 16 images at 40 images/s
    launch, rest = launcher.split_args(["stage=all", f"run={tmp_path}/r", *VOC, "slurm.gpus_per_node=1", "slurm.time_min=10"])
    with pytest.raises(UserError, match=r"stage cls needs about .* h on 1 GPU\(s\) .* allows 0\.7 h; raise slurm\.cls\.time_min"):
        launcher.plan(make_config(rest), launch, rest)
    launch, rest = launcher.split_args(["stage=all", f"run={tmp_path}/r", *VOC, "slurm.time_min=10", "slurm.cls.time_min=600",
                                        "slurm.aff.time_min=600", "slurm.teacher.time_min=600", "slurm.cam.time_min=600",
                                        "slurm.pseudo.time_min=600", "slurm.seg.time_min=600"])
    assert launcher.plan(make_config(rest), launch, rest)[1].resources.time_min == 600


@pytest.mark.slow
def test_the_last_line_names_the_headline_figures_and_the_report(tmp_path):
    """Issue 25 #5: the launcher ends with the run's CAM / pseudo / val mIoU in % and where its report is."""
    run = tmp_path / "run"
    for stage, miou in (("cam", 0.4474), ("pseudo", 0.4891), ("eval", 0.4333)):
        runs.mark_done(run, stage, {"miou": miou})
    assert launcher.results_line(run) == f"results: CAM 44.7, pseudo 48.9, val 43.3 % mIoU; run: {run}"
    runs.atomic_write(run / "report" / "report.md", "# report\n")
    assert launcher.results_line(run).endswith(f"; report: {run / 'report' / 'report.md'}")
    r = submit(["stage=report", f"run={run}", f"data.shards_dir={tmp_path}/shards"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("results: CAM 44.7, pseudo 48.9, val 43.3"), \
        r.stdout + r.stderr


def test_dry_run_prints_every_job_with_its_sbatch_directives_and_submits_nothing(tmp_path):
    """Issue 25 #4: ``launch.dry_run=true`` shows each job's sbatch directives and dependency; nothing is written
    or submitted (also where SLURM is not installed)."""
    args = ["cluster=slurm", "launch.dry_run=true", "stage=[shards,cls,cam]", f"run={tmp_path}/run",
            f"data.shards_dir={tmp_path}/shards", "slurm.partition=debug", "slurm.cls.gpus_per_node=2", *TOY]
    r = submit(args, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["[1/3] shards", "[2/3] cls", "[3/3] cam"], r.stdout
    assert "--partition=debug" in lines[0] and "--dependency" not in lines[0]
    assert "--gpus-per-node=2" in lines[1] and "--dependency='afterok:<job of shards>'" in lines[1]
    assert "--dependency='afterok:<job of cls>'" in lines[2] and lines[-1] == "dry run: nothing submitted"
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_a_local_stages_progress_is_read_from_its_log(tmp_path):
    """Issue 25 #5: the launcher shows the running stage's newest progress (the engine's step line with its ETA, or
    an inference bar) from the job's stderr, not the whole log."""
    from wsss_dist.launcher.chain import latest_progress

    err = tmp_path / "job.err"
    assert latest_progress(err) == ""
    err.write_text("12:02:04 INFO wsss_dist.engine.loop: cls/fmix: step 80/300 loss 0.2913 lr 0.00152 3.1 img/s "
                   "eta 1:28 ent 0.26\n")
    assert latest_progress(err) == "cls/fmix: step 80/300 loss 0.2913 lr 0.00152 3.1 img/s eta 1:28 ent 0.26"
    err.write_text("cam:   6%|▌         | 1/18 [00:00<00:02,  7.09img/s]\rcam:  17%|█▋        | 3/18 [00:01<00:05, 12.4img/s]\r")
    assert latest_progress(err) == "cam: 3/18 (17 %), eta 00:05"


def _doc_commands(page: Path) -> list[str]:
    """The ``python launch/submit.py`` commands of a page's bash blocks (continuation lines joined)."""
    import re

    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("python launch/submit.py") and "cluster=slurm" in line:
                out.append(line)
    return out


@pytest.mark.slow
def test_the_cluster_guides_examples_plan_without_error(tmp_path):
    """Issue 25 #2: every SLURM example of docs/cluster.md plans (batches divide over its GPUs, time limits cover the
    stages) as written and with the voc preset, shown with launch.dry_run=true (no SLURM needed: sbatch is hidden).
    The VOC paths live under a scratch /shared; weights files are 'none' (their checks have tests of their own)."""
    import os
    import shlex

    cmds = _doc_commands(ROOT / "docs" / "cluster.md")
    assert len(cmds) >= 3
    voc, sbd = tmp_path / "shared" / "VOCdevkit" / "VOC2012", tmp_path / "shared" / "benchmark_RELEASE" / "dataset"
    for d in (voc / "JPEGImages", voc / "ImageSets" / "Segmentation", sbd):
        d.mkdir(parents=True)
    for name, image_id in (("train", "2007_000001"), ("val", "2007_000002")):  # what the pre-flight looks at
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text(image_id + "\n")
        (sbd / f"{name}.txt").write_text(image_id + "\n")
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())
    for cmd in cmds:
        words = [w.replace("/shared/", f"{tmp_path}/shared/") for w in shlex.split(cmd)[2:]]
        words = [w if not w.startswith(("model.weights=", "seg.weights=")) else w.split("=")[0] + "=none" for w in words]
        variants = [words] + ([] if "data=voc" in words else [words + ["data=voc", f"data.voc_root={tmp_path}/shared/"
                                                                       "VOCdevkit/VOC2012", "model.weights=none",
                                                                       "seg.weights=none", "teacher.weights=none"]])
        for w in variants:
            r = subprocess.run([sys.executable, str(SUBMIT), *w, "launch.dry_run=true", f"run={tmp_path}/run"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": path})
            assert r.returncode == 0 and "dry run: nothing submitted" in r.stdout, (w, r.stdout[-1500:], r.stderr[-1500:])


@pytest.mark.slow
def test_real_data_on_a_machine_with_slurm_asks_where_to_run(tmp_path):
    """Issue 25 #4: where sbatch is on PATH (a login node), a chain on real data without cluster= stops in one line
    asking for cluster=slurm or an explicit cluster=local; the toy data and an explicit cluster=local run."""
    import os

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    words = ["data=voc", f"data.voc_root={tmp_path / 'voc'}", "model.weights=none", "seg.weights=none",
             "teacher.weights=none", "stage=cls", f"run={tmp_path / 'run'}", "launch.dry_run=true"]
    r = subprocess.run([sys.executable, str(SUBMIT), *words], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "say cluster=slurm to submit the stages as jobs, or cluster=local" in r.stderr, r.stderr
    ok = subprocess.run([sys.executable, str(SUBMIT), *words, "cluster=local"], cwd=tmp_path, capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0 and "dry run: nothing submitted" in ok.stdout, ok.stderr
