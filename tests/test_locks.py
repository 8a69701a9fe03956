"""One owner per (run, stage): wsss_dist.locks.StageLock and its use in pipeline.run_stage."""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.errors import StageLocked, StageNotDone
from wsss_dist.locks import StageLock

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _write_lock(run: Path, stage: str, *, host: str = HOST, pid: int | None = None, job: str | None = None,
                age_s: float = 0.0) -> Path:
    """A LOCK as another holder left it, its heartbeat ``age_s`` seconds old."""
    path = run / stage / "LOCK"
    beat = time.time() - age_s
    runs.write_json(path, {"host": host, "pid": os.getpid() if pid is None else pid, "job": job, "started": beat,
                           "heartbeat": beat})
    os.utime(path, (beat, beat))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _holder(path: Path) -> dict:
    return json.loads(path.read_text())


def test_lock_file_names_its_holder_and_a_second_lock_is_refused(tmp_path):
    with StageLock(tmp_path, "cls") as lock:
        assert lock.path == tmp_path / "cls" / "LOCK"
        rec = _holder(lock.path)
        assert (rec["host"], rec["pid"], rec["job"]) == (HOST, os.getpid(), None)
        assert abs(rec["started"] - time.time()) < 60 and rec["heartbeat"] == rec["started"]
        with pytest.raises(StageLocked) as e:
            StageLock(tmp_path, "cls").acquire()
        msg = str(e.value)
        assert f"host {HOST} pid {os.getpid()} job none, heartbeat 0 s ago" in msg and str(lock.path) in msg
        assert _holder(lock.path) == rec  # the refused starter left the lock alone
        with StageLock(tmp_path, "cam"):  # another stage of the run is another lock
            pass
    assert not (tmp_path / "cls" / "LOCK").exists()
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == []  # no temp or guard files left
    with StageLock(tmp_path, "cls"):  # released: free again
        pass


def test_cli_refuses_a_stage_whose_lock_a_live_process_holds(tmp_path):
    """``python -m wsss_dist stage=shards`` on a run whose shards/LOCK this (live) test process holds: exit 2, one
    line naming the holder and the LOCK; the lock is untouched and nothing was built."""
    run = tmp_path / "run"
    lock = _write_lock(run, "shards", job="777", age_s=20)
    before = lock.read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "wsss_dist", "stage=shards", f"run={run}",
                        f"data.toy.root={tmp_path / 'src'}", f"data.shards_dir={tmp_path / 'shards'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: stage shards of run {re.escape(str(run))} is running elsewhere \(host {re.escape(HOST)} "
                        rf"pid {os.getpid()} job 777, heartbeat 2\d s ago; lock {re.escape(str(lock))}\).*", last), last
    assert lock.read_bytes() == before
    assert not runs.is_done(run, "shards") and not (tmp_path / "shards").exists()


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, "cls", pid=dead)
    with caplog.at_level(logging.WARNING, logger="wsss_dist.locks"), StageLock(tmp_path, "cls") as lock:
        assert _holder(lock.path)["pid"] == os.getpid()
    assert f"taking over {lock.path} (host {HOST} pid {dead}" in caplog.text
    assert f"pid {dead} is not running on this host" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie states are read from Linux's /proc")
def test_lock_of_a_killed_but_unreaped_pid_is_taken_over(tmp_path, caplog):
    """After ``kill -9`` of a local chain its orphaned job is a zombie until init reaps it (seconds, here): the rerun
    takes its lock over at once instead of refusing a process that no longer runs (seen in CI: test_launch's
    test_chain_killed_mid_stage_reruns_only_the_rest)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, "cam", pid=p.pid)
        with pytest.raises(StageLocked):  # alive: refused
            StageLock(tmp_path, "cam").acquire()
        p.kill()
        deadline = time.time() + 30
        while time.time() < deadline and Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # dead, not reaped (we do not wait() yet): a zombie
        with caplog.at_level(logging.WARNING, logger="wsss_dist.locks"), StageLock(tmp_path, "cam") as lock:
            assert _holder(lock.path)["pid"] == os.getpid()
        assert f"pid {p.pid} is not running on this host" in caplog.text
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_live_pid_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path, caplog):
    """pid 1 of another host with a fresh heartbeat may be alive: refused; with a heartbeat older than stale_s it is
    taken over."""
    _write_lock(tmp_path, "seg", host="node-elsewhere", pid=1, age_s=100)
    with pytest.raises(StageLocked, match=r"host node-elsewhere pid 1 job none, heartbeat 1\d\d s ago"):
        StageLock(tmp_path, "seg", stale_s=300).acquire()
    _write_lock(tmp_path, "seg", host="node-elsewhere", pid=1, age_s=400)
    with caplog.at_level(logging.WARNING, logger="wsss_dist.locks"), StageLock(tmp_path, "seg", stale_s=300) as lock:
        assert _holder(lock.path)["host"] == HOST
    assert "heartbeat older than 300 s" in caplog.text


def test_lock_of_our_own_slurm_job_is_taken_over(tmp_path, monkeypatch, caplog):
    """A requeued SLURM job (same SLURM_JOB_ID) takes over its predecessor's lock; another job's is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, "cls", host="node-a", pid=1, job="4243")
    with pytest.raises(StageLocked, match=r"host node-a pid 1 job 4243"):
        StageLock(tmp_path, "cls").acquire()
    _write_lock(tmp_path, "cls", host="node-a", pid=1, job="4242")
    with caplog.at_level(logging.WARNING, logger="wsss_dist.locks"), StageLock(tmp_path, "cls") as lock:
        assert _holder(lock.path)["job"] == "4242" and _holder(lock.path)["pid"] == os.getpid()
    assert "our own SLURM job 4242, requeued" in caplog.text


def test_heartbeat_refreshes_the_lock(tmp_path):
    """The holder touches LOCK every stale_s/4: an mtime set back an hour comes forward again."""
    with StageLock(tmp_path, "cls", stale_s=0.4) as lock:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        deadline = time.time() + 30
        while lock.path.stat().st_mtime < old + 1800 and time.time() < deadline:
            time.sleep(0.01)
        assert time.time() - lock.path.stat().st_mtime < 60
        with pytest.raises(StageLocked):  # fresh again, so held
            StageLock(tmp_path, "cls", stale_s=0.4).acquire()


def test_lock_taken_over_meanwhile_is_not_removed_at_release(tmp_path):
    with StageLock(tmp_path, "cls") as lock:
        other = _write_lock(tmp_path, "cls", host="node-b", pid=1)
        theirs = other.read_bytes()
    assert lock.path.read_bytes() == theirs


def test_concurrent_take_overs_of_one_stale_lock_give_one_owner(tmp_path):
    """Eight starters at once against one stale lock: exactly one holds it, the others are refused."""
    _write_lock(tmp_path, "cls", host="node-gone", pid=1, age_s=1000)
    n, start, done = 8, threading.Barrier(8), threading.Event()
    won, refused = [], []

    def starter() -> None:
        lock = StageLock(tmp_path, "cls")
        start.wait()
        try:
            lock.acquire()
        except StageLocked:
            refused.append(lock)
            return
        won.append(lock)
        done.wait(60)
        lock.release()

    threads = [threading.Thread(target=starter) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(won) + len(refused) < n and time.time() < deadline:
        time.sleep(0.01)
    done.set()
    for t in threads:
        t.join(60)
    assert (len(won), len(refused)) == (1, n - 1)
    assert not (tmp_path / "cls" / "LOCK").exists() and list((tmp_path / "cls").iterdir()) == []


def test_run_stage_holds_the_lock_on_rank_0_and_removes_it_when_the_stage_raises(tmp_path, monkeypatch):
    """pipeline.run_stage: rank 0 holds cam/LOCK while the stage runs and removes it when the stage raises; other
    ranks and the report stage take no lock."""
    import wsss_dist.stages.cam as cam
    import wsss_dist.stages.report as report

    cfg = make_config([f"run={tmp_path / 'run'}"])
    lock = cfg.run_dir / "cam" / "LOCK"
    seen = []

    def failing(cfg):
        seen.append(_holder(lock) if lock.exists() else None)
        raise StageNotDone("no cls")

    monkeypatch.setattr(cam, "run", failing)
    with pytest.raises(StageNotDone):
        pipeline.run_stage(cfg, "cam")
    assert len(seen) == 1 and seen[0] is not None, seen
    assert (seen[0]["host"], seen[0]["pid"], seen[0]["job"]) == (HOST, os.getpid(), None)
    assert not lock.exists()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(StageNotDone):
        pipeline.run_stage(cfg, "cam")
    assert seen[1] is None
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(report, "run", lambda cfg: {"seen": (cfg.run_dir / "report" / "LOCK").exists()})
    assert pipeline.run_stage(cfg, "report")["seen"] is False


def test_locks_module_imports_only_errors_runs_and_the_standard_library():
    tree = ast.parse((ROOT / "wsss_dist" / "locks.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                imported |= {f".{node.module}"} if node.module else {f".{a.name}" for a in node.names}
            else:
                imported.add(node.module.split(".")[0])
    ours = {m for m in imported if m.startswith(".")}
    assert ours <= {".runs", ".errors"}, ours
    assert imported - ours <= set(sys.stdlib_module_names), imported - ours
