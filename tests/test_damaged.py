"""Damaged files the package wrote (DONE, model.json, metrics.json, npz, npy) and non-UTF-8 list
files: one DataError line naming the file, what is wrong and what to do (exit 2), never a traceback; following the
advice literally gets the run going again."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.data.voc import VOCSource
from wsss_dist.errors import DamagedFile, DataError

pytestmark = pytest.mark.slow  # a trained run (cls + cam) that each test damages


@pytest.fixture(scope="module")
def done_run(shards, tmp_path_factory):  # noqa: F811
    """A run whose cls and cam stages are done."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    pipeline.run(make_config(shards + [f"run={run}", "stage=[cls,cam]", "method=cam"]))
    return run


def _copy(done_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    return run


def _stage(shards, run: Path, stage: str, *words: str) -> dict:  # noqa: F811
    return pipeline.run(make_config(shards + [f"run={run}", f"stage={stage}", "method=cam", *words]))


def _follow(advice: str) -> tuple[str, str]:
    """What an error's advice says to run (``run stage=S again with redo=S (…)``): the words, to run literally."""
    m = re.fullmatch(r"run stage=(\w+) again with (redo=\1) \(it starts \1 over; the stages after it follow\)", advice)
    assert m, advice
    return m.group(1), m.group(2)


def _error(e: DamagedFile, path: Path) -> str:
    """The advice of a DamagedFile about ``path`` (asserting the message's shape: path, what, advice; one line)."""
    msg = str(e)
    assert "\n" not in msg and msg.startswith(f"{path}: damaged file ("), msg
    return msg.split("); ", 1)[1]


@pytest.mark.parametrize("damage", [b"{bad", b"\xff\xfe{}"], ids=["not-json", "not-utf8"])
def test_damaged_model_json_is_one_line_and_the_advice_works(shards, done_run, tmp_path, damage):  # noqa: F811
    run = _copy(done_run, tmp_path)
    path = run / "cls" / "model.json"
    path.write_bytes(damage)
    with pytest.raises(DamagedFile) as e:
        _stage(shards, run, "cam")
    advice = _error(e.value, path)
    assert _follow(advice) == ("cls", "redo=cls")
    _stage(shards, run, *_follow(advice))
    assert runs.read_done(run, "cam")["samples"] > 0 and _stage(shards, run, "cam")["cam"]["samples"] > 0


def test_damaged_done_is_one_line_and_the_advice_works(shards, done_run, tmp_path):  # noqa: F811
    run = _copy(done_run, tmp_path)
    path = run / "cls" / "DONE"
    path.write_bytes(b'{"steps": 12, "loss": 0.5')
    with pytest.raises(DamagedFile) as e:
        _stage(shards, run, "cls")
    advice = _error(e.value, path)
    assert _follow(advice) == ("cls", "redo=cls")
    assert _stage(shards, run, *_follow(advice))["cls"]["steps"] == 12


def test_damaged_metrics_json_is_one_line_and_the_advice_works(shards, done_run, tmp_path):  # noqa: F811
    run = _copy(done_run, tmp_path)
    (run / "cls" / "DONE").unlink()
    path = run / "cls" / "metrics.json"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DamagedFile) as e:
        _stage(shards, run, "cls")
    advice = _error(e.value, path)
    assert _stage(shards, run, *_follow(advice))["cls"]["steps"] == 12


def test_damaged_file_ends_the_command_line_in_one_line(shards, done_run, tmp_path):  # noqa: F811
    """python -m wsss_dist on a run with a damaged model.json: exit 2, one ``error:`` line, no traceback."""
    run = _copy(done_run, tmp_path)
    (run / "cls" / "model.json").write_bytes(b"{bad")
    r = subprocess.run([sys.executable, "-m", "wsss_dist", *shards, f"run={run}", "stage=cam", "method=cam"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {run / 'cls' / 'model.json'}: damaged file (not valid JSON: Expecting property name enclosed in "
        f"double quotes at line 1 column 2); run stage=cls again with redo=cls (it starts cls over; the stages after it "
        "follow)")


def test_read_npz_and_npy_name_the_file(tmp_path):
    good = runs.write_npz(tmp_path / "cls" / "subcategories.npz", keys=np.array(["a"]), sub_labels=np.zeros((1, 2)))
    assert set(runs.read_npz(good, keys=("keys", "sub_labels"))) == {"keys", "sub_labels"}
    with pytest.raises(DamagedFile, match=r"subcategories.npz: damaged file \(no array 'parent'"):
        runs.read_npz(good, keys=("keys", "parent"))
    for data in (b"", b"PK\x03\x04garbage", good.read_bytes()[:40]):
        good.write_bytes(data)
        with pytest.raises(DamagedFile, match=r"subcategories.npz: damaged file \(not a readable npz"):
            runs.read_npz(good)
    bad = tmp_path / "x.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DamagedFile, match=r"x.npy: damaged file \(not a readable npy"):
        runs.read_npy(bad)


def test_non_utf8_list_file_is_a_data_error(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_bytes(b"2007_000032\n\xff\xfe2007_000039\n")
    with pytest.raises(DataError, match=r"train.txt: line 2 is not UTF-8 text"):
        VOCSource(root).ids("train")
