"""Environment faults end in one line naming the path and the cause (exit 2), never a traceback; nothing
half-written is trusted afterwards. Full and read-only disks are small tmpfs mounts (root only)."""
import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import TINY_TOY

ROOT = Path(__file__).resolve().parent.parent
TOY = [f"data.toy.{k}={v}" for k, v in TINY_TOY.items()] + ["data.shard_size=8", "data.num_workers=0"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, f"wsss-{uuid.uuid4().hex[:6]}", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def wsss(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "wsss_dist", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    for w in words:
        assert w in last, last
    return last


@pytest.mark.slow
@needs_root
def test_full_disk_while_writing_shards(tmp_path):
    with tmpfs(tmp_path / "full", "96k") as full:
        r = wsss(["stage=shards", f"run={tmp_path / 'run'}", f"data.shards_dir={full / 'shards'}",
                  f"data.toy.root={tmp_path / 'src'}", *TOY], tmp_path)
        one_line_error(r, "No space left on device", str(full / "shards"), f"MiB free on {full}")
        assert not list((full / "shards").glob("*.tar")) or not (full / "shards" / "manifest.json").exists()


@pytest.mark.slow
@needs_root
def test_full_disk_while_checkpointing(tmp_path):
    common = [f"data.shards_dir={tmp_path / 'shards'}", f"data.toy.root={tmp_path / 'src'}", *TOY]
    assert wsss(["stage=shards", f"run={tmp_path / 'r0'}", *common], tmp_path).returncode == 0
    with tmpfs(tmp_path / "full", "3m") as full:
        r = wsss(["stage=cls", f"run={full / 'run'}", "cls.train.steps=4", "cls.train.ckpt_every=2",
                  "cls.train.batch_size=4", *common], tmp_path)
        one_line_error(r, "No space left on device", str(full / "run" / "cls" / "ckpt"), f"MiB free on {full}")
        assert not list((full / "run" / "cls" / "ckpt").glob("step-*"))  # no checkpoint that could be trusted
        assert not (full / "run" / "cls" / "DONE").exists()


@pytest.mark.slow
@needs_root
def test_read_only_run_directory(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        r = wsss(["stage=shards", f"run={ro / 'run'}", f"data.shards_dir={tmp_path / 'shards'}",
                  f"data.toy.root={tmp_path / 'src'}", *TOY], tmp_path)
        one_line_error(r, "Read-only file system", str(ro / "run"))


@pytest.mark.parametrize("key", ["run", "data.shards_dir"])
def test_run_or_shards_dir_pointing_at_a_file(tmp_path, key):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    args = {"run": tmp_path / "run", "data.shards_dir": tmp_path / "shards"}
    args[key] = afile
    r = wsss(["stage=shards", *(f"{k}={v}" for k, v in args.items()), f"data.toy.root={tmp_path / 'src'}", *TOY], tmp_path)
    one_line_error(r, str(afile))
    assert afile.read_text() == "not a directory"


@needs_root
def test_launcher_refuses_a_read_only_shards_dir_before_any_job(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        r = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "stage=shards", f"run={tmp_path / 'run'}",
                            f"data.shards_dir={ro / 'shards'}", f"data.toy.root={tmp_path / 'src'}", *TOY],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {ro / 'shards'}: "), r.stderr
        assert "not writable" in r.stderr and not (tmp_path / "run" / "logs").exists()  # no job was started
