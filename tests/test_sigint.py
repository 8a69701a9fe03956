"""Ctrl-C during training: the first SIGINT checkpoints at the end of the step and exits 130 with one line (rerun
resumes); a second SIGINT while the first is pending aborts at once."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsss_dist import runs
from wsss_dist.engine import newest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12

# A trainer (tests/engine_script.py's tiny model) whose step 2 blocks until a file that never appears: a long step.
BLOCKING_TRAINER = """
import logging, sys, time
from pathlib import Path
import engine_script as es
from wsss_dist.engine import fit
from wsss_dist.pipeline import exit_on_user_error, setup_logging

out = Path(sys.argv[1])
setup_logging("INFO")

def loss(model, batch, step):
    if step == 2:
        logging.getLogger("blocking").warning("step 2 blocks until %s appears", out / "never")
        deadline = time.time() + 600
        while not (out / "never").exists() and time.time() < deadline:
            time.sleep(0.01)
    return es.loss_fn(model, batch, step)

train, optim = es.configs(8, ckpt_every=100)
model = es.make_model()
exit_on_user_error(lambda: fit(model=model, param_groups=model.param_groups(), loss_fn=loss,
                               make_loader=es.make_loader, out_dir=out / "train", train=train, optim=optim,
                               log_name="tiny"))
"""


def _start(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (a terminal's Ctrl-C reaches the whole process group: killpg)."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _read_until(p: subprocess.Popen, pattern: str, lines: list[str]) -> re.Match | None:
    """Read ``p``'s stderr lines into ``lines`` until one matches ``pattern`` (None at the end of the stream)."""
    for line in p.stderr:
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    return None


def _finish(p: subprocess.Popen, lines: list[str]) -> str:
    """The rest of stderr, after the process ended (a 600 s safety net; killed if it hangs)."""
    try:
        lines.extend(p.stderr)
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return "".join(lines)


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_the_rerun_resumes(shards, tmp_path):
    """python -m wsss_dist stage=cls (2 DataLoader workers), SIGINT to its process group after step 2: it finishes
    the step, writes the checkpoint of the step it stopped at, exits 130 with one ``interrupted:`` line; the same
    command again resumes from that checkpoint and finishes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsss_dist", *shards, "stage=cls", "method=cam", f"cls.train.steps={STEPS}",
           "cls.train.batch_size=4", "cls.train.crop=32", "cls.train.resize_long=[32,48]", "cls.train.log_every=1",
           f"cls.train.ckpt_every={10 * STEPS}", "data.num_workers=2", f"run={run}"]
    p = _start(cmd, tmp_path)
    lines: list[str] = []
    assert _read_until(p, rf"cls/cam: step 2/{STEPS} ", lines), _finish(p, lines)[-3000:]
    os.killpg(p.pid, signal.SIGINT)
    err = _finish(p, lines)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted: cls/cam: stopped by SIGINT at step (\d+) of {STEPS}, checkpoint written in "
                     rf"{re.escape(str(run / 'cls' / 'ckpt'))}; run the same command again to resume", last)
    assert m, last
    stop = int(m.group(1))
    assert 2 <= stop < STEPS
    assert err.count("received SIGINT") == 1  # the trainer acts; its DataLoader workers ignore the signal
    assert newest_checkpoint(run / "cls").name == f"step-{stop:08d}"
    assert not runs.is_done(run, "cls") and not (run / "cls" / "LOCK").exists()

    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run / 'cls' / 'ckpt' / f'step-{stop:08d}'} at step {stop}" in r.stderr, r.stderr[-3000:]
    assert runs.read_done(run, "cls")["steps"] == STEPS


def test_second_ctrl_c_aborts_at_once(tmp_path):
    """Ctrl-C twice during a step that would never end on its own: the second one aborts the process at once,
    without a checkpoint (the step never finishes, so none could be written), with one line and exit 130."""
    script = tmp_path / "blocking_trainer.py"
    script.write_text(BLOCKING_TRAINER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = _start([sys.executable, str(script), str(tmp_path)], tmp_path, env)
    lines: list[str] = []
    assert _read_until(p, r"step 2 blocks until", lines), _finish(p, lines)[-3000:]
    os.killpg(p.pid, signal.SIGINT)
    assert _read_until(p, r"received SIGINT: writing a checkpoint at the end of this step", lines), \
        _finish(p, lines)[-3000:]
    os.killpg(p.pid, signal.SIGINT)
    err = _finish(p, lines)
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "received SIGINT again: aborting without a checkpoint" in err and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted: stopped by SIGINT (everything finished so far is kept); run "
                                            "the same command again to resume")
    assert not (tmp_path / "never").exists()
    assert newest_checkpoint(tmp_path / "train") is None


def test_stage_job_does_not_requeue_after_ctrl_c(tmp_path, monkeypatch):
    """StageJob (submitit's job callable): an Interrupted from SIGINT is re-raised (the user stopped it), one from
    SIGUSR2 (a time-out) goes to submitit's requeue handler."""
    import submitit

    from wsss_dist import launcher
    from wsss_dist.errors import Interrupted

    requeued = []

    class Env:
        num_tasks, job_id = 1, "1"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(submitit, "JobEnvironment", Env)
    monkeypatch.setattr(launcher.jobs, "setup_logging", lambda level: None)
    monkeypatch.setattr(launcher.jobs, "submitit_requeue_handler", lambda env: lambda signum, frame: requeued.append(signum))
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}  # StageJob binds the requeue handler

    def stopped_by(signum: int):
        def run_stage(cfg, stage):
            raise Interrupted(signum, f"cls/cam: stopped by {signal.Signals(signum).name}")
        return run_stage

    job = launcher.StageJob(["stage=cls", f"run={tmp_path / 'run'}"], "cls", str(tmp_path))
    try:
        monkeypatch.setattr(launcher.jobs, "run_stage", stopped_by(signal.SIGINT))
        with pytest.raises(Interrupted) as e:
            job()
        assert e.value.signum == signal.SIGINT and requeued == []
        monkeypatch.setattr(launcher.jobs, "run_stage", stopped_by(signal.SIGUSR2))
        with pytest.raises(SystemExit):
            job()
        assert requeued == [signal.SIGUSR2]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_its_local_job_with_a_checkpoint(shards, tmp_path):
    """``kill <launcher pid>`` (SIGTERM to the launcher alone, as a container stop or a tmux kill sends) while its
    local cls job trains: the launcher cancels the job, which checkpoints; one ``interrupted:`` line, exit 3; the same
    command again resumes from that checkpoint."""
    run = tmp_path / "run"
    steps = 20
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), *shards, "stage=cls", "method=cam",
           f"cls.train.steps={steps}", "cls.train.batch_size=4", "cls.train.crop=32", "cls.train.resize_long=[32,48]",
           f"cls.train.ckpt_every={10 * steps}", "cls.train.log_every=1", f"run={run}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 300

        def training() -> bool:  # the job's log shows a training step
            return any(f"step 3/{steps} " in f.read_text(errors="replace") for f in (run / "logs").glob("*_log.err"))

        while not training():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM; running local jobs are cancelled")
    ckpt = newest_checkpoint(run / "cls")  # the launcher waited for its job to checkpoint and end
    assert ckpt is not None and not runs.is_done(run, "cls") and not (run / "cls" / "LOCK").exists()
    left = [a for a in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
            if str(run / "logs") in a]
    assert not left, left  # no controller or task of the job is left running
    r = subprocess.run([sys.executable, "-m", "wsss_dist", *cmd[2:]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpt}" in r.stderr, r.stderr[-3000:]
    assert runs.read_done(run, "cls")["steps"] == steps
