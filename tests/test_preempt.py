"""Preemption with reader workers: SIGTERM to the whole process group (what ``scancel``, SLURM preemption and a
container stop send) while 2 DataLoader reader workers run. The workers ignore it, the main process checkpoints
(training) or finishes the shards read to their end (inference), exits 3 with one line, and the rerun ends bitwise
equal to an uninterrupted run."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY
from test_sigint import _finish, _read_until, _start
from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.engine import newest_checkpoint

pytestmark = pytest.mark.slow  # signals to real training and inference runs

STEPS = 12
OPERATIONAL = {"seconds", "cpu_seconds", "images_per_s"}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> list[str]:
    """TINY toy data in 2-image shards (24 train_aug shards): an inference stage takes many shard ends."""
    root = tmp_path_factory.mktemp("preempt")
    words = TINY + [f"data.toy.root={root / 'src'}", f"data.shards_dir={root / 'shards'}", "data.shard_size=2"]
    pipeline.run(make_config(words + ["stage=shards", f"run={root / 'runs' / 'shards'}"]))
    return words + ["method=cam", f"cls.train.steps={STEPS}", "cls.train.log_every=1",
                    f"cls.train.ckpt_every={10 * STEPS}", "data.num_workers=2"]


@pytest.fixture(scope="module")
def reference(many_shards, tmp_path_factory) -> Path:
    """The uninterrupted run (stage cls, then stage cam), in this process: what the stopped and rerun ones equal."""
    ref = tmp_path_factory.mktemp("preempt-ref") / "ref"
    for stage in ("cls", "cam"):
        pipeline.run(make_config(many_shards + [f"stage={stage}", f"run={ref}"]))
    return ref


def _cmd(words: list[str], run: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", "wsss_dist", *words, f"stage={stage}", f"run={run}"]


def _metrics(run: Path, stage: str) -> dict:
    return {k: v for k, v in runs.read_done(run, stage).items() if k not in OPERATIONAL}


def _ok(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_group_sigterm_in_training_and_inference_checkpoints_exits_3_and_resumes_bitwise(many_shards, reference,
                                                                                          tmp_path):
    """stage=cls and then stage=cam, each with 2 reader workers, SIGTERM to the process group mid-stage: exit 3, one
    ``interrupted: … stopped by SIGTERM … run the same command again to resume`` line, no traceback, a checkpoint
    (cls) / the finished CAM shards (cam) kept; the reruns end bitwise equal to an uninterrupted run."""
    ref, run = reference, tmp_path / "run"

    # training: TERM to the group after step 2
    cmd = _cmd(many_shards, run, "cls")
    p = _start(cmd, tmp_path)
    lines: list[str] = []
    assert _read_until(p, rf"cls/cam: step 2/{STEPS} ", lines), _finish(p, lines)[-3000:]
    os.killpg(p.pid, signal.SIGTERM)
    err = _finish(p, lines)
    assert p.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted: cls/cam: stopped by SIGTERM at step (\d+) of {STEPS}, checkpoint written in "
                     rf"{re.escape(str(run / 'cls' / 'ckpt'))}; run the same command again to resume", last)
    assert m, last
    stop = int(m.group(1))
    assert 2 <= stop < STEPS and newest_checkpoint(run / "cls").name == f"step-{stop:08d}"
    assert err.count("received SIGTERM") == 1  # the trainer acts; its reader workers ignore the signal
    r = _ok(cmd, tmp_path)
    assert f"resuming from {run / 'cls' / 'ckpt' / f'step-{stop:08d}'} at step {stop}" in r.stderr, r.stderr[-3000:]
    a, b = load_file(str(run / "cls" / "model.safetensors")), load_file(str(ref / "cls" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # inference: TERM to the group once the first CAM shard is on disk
    cmd = _cmd(many_shards, run, "cam")
    p = _start(cmd, tmp_path)
    deadline = time.time() + 300
    while not list((run / "cam").glob("*.tar")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGTERM)
    err = _finish(p, [])
    assert p.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted: cam: stopped by SIGTERM with (\d+) of (\d+) shards of this rank written in "
                     rf"{re.escape(str(run / 'cam'))} \(a shard being read when the signal came is redone\); run the "
                     r"same command again to resume", last)
    assert m, last
    written, total = int(m.group(1)), int(m.group(2))
    assert 1 <= written < total == 24
    assert len(list((run / "cam").glob("*.tar"))) == written and not runs.is_done(run, "cam")
    assert not (run / "cam" / "LOCK").exists()
    r = _ok(cmd, tmp_path)
    assert f"{written} of {total} shards of this rank already done, resuming" in r.stderr, r.stderr[-3000:]
    assert _metrics(run, "cam") == _metrics(ref, "cam")
    names = sorted(p.name for p in (ref / "cam").iterdir() if p.name.endswith((".tar", ".cm.npy")))
    assert names == sorted(p.name for p in (run / "cam").iterdir() if p.name.endswith((".tar", ".cm.npy")))
    assert all((run / "cam" / n).read_bytes() == (ref / "cam" / n).read_bytes() for n in names)


def test_ctrl_c_in_an_inference_stage_is_one_line_exit_130(many_shards, reference, tmp_path):
    """Ctrl-C (SIGINT to the group) in stage=cam with 2 reader workers: exit 130, one ``interrupted:`` line, no
    KeyboardInterrupt traceback; the finished shards are kept."""
    run = tmp_path / "run"
    shutil.copytree(reference / "cls", run / "cls")  # the trained classifier the CAMs come from
    p = _start(_cmd(many_shards, run, "cam"), tmp_path)
    deadline = time.time() + 300
    while not list((run / "cam").glob("*.tar")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGINT)
    err = _finish(p, [])
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: cam: stopped by SIGINT with \d+ of 24 shards of this rank written in .*; run "
                        r"the same command again to resume", last), last
