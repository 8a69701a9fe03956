"""Chaos: the whole toy chain through launch/submit.py, killed with SIGKILL or SIGTERM (to the process group: the
launcher and the running job with its reader workers together, as ``scancel`` and container stops do) at seeded
random moments and rerun each time, ends with the same DONE metrics and bitwise the same weights as an
uninterrupted chain."""
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SHORT
from wsss_dist import runs

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launch" / "submit.py"
STAGES = ("shards", "cls", "cam", "aff", "pseudo", "seg", "eval")
# the only entries allowed to differ: timings, where the shards live, how much of the shards a rerun had to rebuild
OPERATIONAL = {"seconds", "cpu_seconds", "images_per_s", "verify_seconds", "shards_dir", "rebuilt", "verified"}
KILLS = 4
SIGNALS = (signal.SIGTERM, signal.SIGKILL)  # kill i sends SIGNALS[i % 2]


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which no parent may reap here, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def drain(pgid: int, timeout: float = 600) -> None:
    """Wait until the group's processes have ended (after SIGTERM a local job checkpoints, requeues itself and may
    finish its stages); SIGKILL what is left after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def args(tmp: Path, name: str) -> list[str]:
    # SHORT: what is tested is the orchestration (kill, checkpoint, rerun), not how long a stage trains; every trainer
    # still checkpoints mid-stage (cls 6 steps, aff and seg 3, every 2)
    return ["stage=all", "method=cam", f"run={tmp / name}", f"data.shards_dir={tmp / name}-shards",
            f"data.toy.root={tmp / name}-src", *SHORT, "cls.train.ckpt_every=2", "aff.train.ckpt_every=2",
            "seg.train.ckpt_every=2", "report.num_images=2", "data.num_workers=2"]  # reader workers, as on a cluster


def launch(words: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUBMIT), *words], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def metrics(run: Path, stage: str) -> dict:
    return {k: v for k, v in runs.read_done(run, stage).items() if k not in OPERATIONAL}


@pytest.mark.slow
def test_chain_survives_random_kill_9(tmp_path):
    start = time.monotonic()
    ref = launch(args(tmp_path, "ref"), tmp_path)
    assert ref.wait(timeout=1800) == 0
    span = time.monotonic() - start  # the kills land within the chain's own length (it varies with the machine)
    rng = random.Random(0)
    survived = {signal.SIGKILL: 0, signal.SIGTERM: 0}
    for i in range(KILLS):
        p = launch(args(tmp_path, "chaos"), tmp_path)
        sig = SIGNALS[i % len(SIGNALS)]
        try:
            p.wait(timeout=rng.uniform(0.1, 0.8) * span)  # a random moment of the chain (or its end, if it comes first)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, sig)  # the launcher and the local job it runs, with its reader workers
            p.wait()
            survived[sig] += 1
        finally:
            drain(p.pid)
        if p.returncode == 0:
            break
    last = launch(args(tmp_path, "chaos"), tmp_path)
    assert last.wait(timeout=1800) == 0
    assert survived[signal.SIGTERM] >= 1, survived  # the first kill (TERM) always comes before the chain ends
    for stage in STAGES:
        assert metrics(tmp_path / "chaos", stage) == metrics(tmp_path / "ref", stage), stage
    for stage in ("cls", "aff", "seg"):
        a = load_file(str(tmp_path / "chaos" / stage / "model.safetensors"))
        b = load_file(str(tmp_path / "ref" / stage / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    print(f"chaos: survived {survived[signal.SIGKILL]} kill -9 and {survived[signal.SIGTERM]} process-group SIGTERM of "
          "the launcher and its job")
