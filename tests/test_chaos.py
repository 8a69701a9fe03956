"""Chaos: the whole toy chain through launch/submit.py, killed with SIGKILL (launcher and running job together) at
seeded random moments and rerun each time, ends with the same DONE metrics and bitwise the same weights as an
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

from conftest import TINY
from wsss_dist import runs

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launch" / "submit.py"
STAGES = ("shards", "cls", "cam", "aff", "pseudo", "seg", "eval")
# the only entries allowed to differ: timings, where the shards live, how much of the shards a rerun had to rebuild
OPERATIONAL = {"seconds", "cpu_seconds", "images_per_s", "verify_seconds", "shards_dir", "rebuilt", "verified"}
KILLS = 4


def args(tmp: Path, name: str) -> list[str]:
    return ["stage=all", "method=cam", f"run={tmp / name}", f"data.shards_dir={tmp / name}-shards",
            f"data.toy.root={tmp / name}-src", *TINY, "cls.train.ckpt_every=3", "aff.train.ckpt_every=2",
            "seg.train.ckpt_every=2", "report.num_images=2"]


def launch(words: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUBMIT), *words], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def metrics(run: Path, stage: str) -> dict:
    return {k: v for k, v in runs.read_done(run, stage).items() if k not in OPERATIONAL}


@pytest.mark.slow
def test_chain_survives_random_kill_9(tmp_path):
    ref = launch(args(tmp_path, "ref"), tmp_path)
    assert ref.wait(timeout=1800) == 0
    rng = random.Random(0)
    survived = 0
    for _ in range(KILLS):
        p = launch(args(tmp_path, "chaos"), tmp_path)
        try:
            p.wait(timeout=rng.uniform(3, 25))  # a random moment of the chain (or its end, if it comes first)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and the local job it runs
            p.wait()
            survived += 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        if p.returncode == 0:
            break
    last = launch(args(tmp_path, "chaos"), tmp_path)
    assert last.wait(timeout=1800) == 0
    assert survived >= 1
    for stage in STAGES:
        assert metrics(tmp_path / "chaos", stage) == metrics(tmp_path / "ref", stage), stage
    for stage in ("cls", "aff", "seg"):
        a = load_file(str(tmp_path / "chaos" / stage / "model.safetensors"))
        b = load_file(str(tmp_path / "ref" / stage / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    print(f"chaos: survived {survived} kill -9 of the launcher and its job")
