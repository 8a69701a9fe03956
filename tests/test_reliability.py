"""Reliability and safety: bad inputs end in one-line errors or counted skips, crashes never leave partial artifacts,
resume is exact, untrusted files are never unpickled and keys never leave their folder. See docs/reliability.md."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import VOC_MINI, needs_fixtures, raw_samples
from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.data.shards import MANIFEST, SkipCounter, load_manifest, read_shard, split_urls, write_shard
from wsss_dist.data.stream import train_loader
from wsss_dist.data.voc import load_cls_labels, write_mask_png
from wsss_dist.engine import fit, newest_checkpoint, save_model_weights
from wsss_dist.errors import DataError, Interrupted

import engine_script as es

ROOT = Path(__file__).resolve().parents[1]
REAL_ID = "2007_000063"
REAL_VOC = VOC_MINI / "VOCdevkit" / "VOC2012"


# --------------------------------------------------------------------------------------------- helpers

def _cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m wsss_dist ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "wsss_dist", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def _user_error(r: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2, no traceback, and a last stderr line ``error: ...`` matching ``pattern``; returns that line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert re.search(pattern, lines[-1]), (pattern, lines[-1])
    return lines[-1]


class Payload:
    """A pickle that, when unpickled with arbitrary globals, writes ``marker`` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _jpeg(seed: int = 0, h: int = 20, w: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _restamp(shards_dir: Path, name: str) -> None:
    """Record a tar's current sha256 and size in the manifest (shards packed by another tool, broken inside)."""
    m = runs.read_json(shards_dir / MANIFEST)
    for info in m["splits"].values():
        if name in info["sha256"]:
            data = (shards_dir / name).read_bytes()
            info["sha256"][name] = hashlib.sha256(data).hexdigest()
            info["bytes"][name] = len(data)
    runs.write_json(shards_dir / MANIFEST, m)


def _opt(args: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))


@pytest.fixture(scope="module")
def trained_cls(shards, tmp_path_factory):
    """A run dir whose cls stage is finished (seeded random weights: what cam needs, without training)."""
    from wsss_dist.models.build import classifier_spec, create_model

    run = tmp_path_factory.mktemp("cls-run") / "run"
    cfg = make_config(shards + [f"run={run}"])
    torch.manual_seed(0)
    save_model_weights(create_model(classifier_spec(cfg)), run / "cls" / "model.safetensors")
    runs.write_json(run / "cls" / "model.json", classifier_spec(cfg))
    runs.mark_done(run, "cls", {"steps": 0})
    return run


def _run_copy(trained_cls: Path, dst: Path) -> Path:
    shutil.copytree(trained_cls, dst)
    return dst


# --------------------------------------------------------------------------------------------- 1. bad inputs (shards)

def _voc(root: Path) -> Path:
    """A VOC2012 layout: three copies of the real image with its mask and an XML; train = A, B; val = C."""
    voc = root / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for i in ("A", "B", "C"):
        shutil.copy(REAL_VOC / "JPEGImages" / f"{REAL_ID}.jpg", voc / "JPEGImages" / f"2007_00000{i}.jpg")
        shutil.copy(REAL_VOC / "SegmentationClass" / f"{REAL_ID}.png", voc / "SegmentationClass" / f"2007_00000{i}.png")
        (voc / "Annotations" / f"2007_00000{i}.xml").write_text(
            "<annotation><object><name>dog</name></object><object><name>chair</name></object></annotation>")
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_00000A\n2007_00000B\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_00000C\n")
    return voc


def _mask_with(voc: Path, image_id: str, value: int) -> None:
    m = np.array(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
    m[5:9, 5:9] = value
    write_mask_png(voc / "SegmentationClass" / f"{image_id}.png", m)


BAD_VOC = {  # case: (break the layout, what the one-line error must say)
    "truncated_jpeg": (lambda v: (v / "JPEGImages/2007_00000B.jpg").write_bytes(
        (v / "JPEGImages/2007_00000B.jpg").read_bytes()[:4000]), r"2007_00000B\.jpg: broken JPEG .*truncated"),
    "non_image_bytes_as_jpg": (lambda v: (v / "JPEGImages/2007_00000B.jpg").write_bytes(b"<html>not an image</html>"),
                               r"2007_00000B\.jpg: not a JPEG file"),
    "png_bytes_as_jpg": (lambda v: shutil.copy(v / "SegmentationClass/2007_00000B.png", v / "JPEGImages/2007_00000B.jpg"),
                         r"2007_00000B\.jpg: not a JPEG file"),
    "mask_value_outside_labels": (lambda v: _mask_with(v, "2007_00000B", 50),
                                  r"2007_00000B\.png: mask values must be 0\.\.20 or 255, found \[50\]"),
    "mask_size_differs": (lambda v: write_mask_png(v / "SegmentationClass/2007_00000B.png", np.zeros((10, 12), np.uint8)),
                          r"2007_00000B\.png: mask size 12x10 differs from the image's 500x375"),
    "missing_list_file": (lambda v: (v / "ImageSets/Segmentation/val.txt").unlink(), r"val\.txt: list file not found"),
    "missing_image": (lambda v: (v / "JPEGImages/2007_00000B.jpg").unlink(), r"2007_00000B\.jpg: image not found"),
    "missing_mask_of_seg_split": (lambda v: (v / "SegmentationClass/2007_00000C.png").unlink(),
                                  r"2007_00000C\.png: mask not found \(image 2007_00000C is in a segmentation list"),
    "unknown_class_in_xml": (lambda v: (v / "Annotations/2007_00000B.xml").write_text(
        "<annotation><object><name>unicorn</name></object></annotation>"),
        r"2007_00000B\.xml: unknown object name 'unicorn'; expected one of the 20 VOC classes"),
    "empty_split": (lambda v: (v / "ImageSets/Segmentation/val.txt").write_text("\n"), r"val\.txt: split 'val' is empty"),
    "path_as_id_in_list": (lambda v: (v / "ImageSets/Segmentation/train.txt").write_text("2007_00000A\n../../../etc/passwd\n"),
                           r"train\.txt: line 2: '\.\./\.\./\.\./etc/passwd' is not an image id"),
}


@needs_fixtures
@pytest.mark.parametrize("case", list(BAD_VOC))
def test_bad_dataset_file_is_a_one_line_error(tmp_path, case):
    """stage=shards data=voc on a broken VOC folder: exit 2, one line naming the file and what was expected."""
    voc = _voc(tmp_path)
    breaker, pattern = BAD_VOC[case]
    breaker(voc)
    r = _cli(["stage=shards", "data=voc", f"data.voc_root={voc}", f"data.shards_dir={tmp_path / 'shards'}",
              f"run={tmp_path / 'run'}"], tmp_path)
    _user_error(r, pattern)
    assert not (tmp_path / "shards" / MANIFEST).exists() and not runs.is_done(tmp_path / "run", "shards")


@needs_fixtures
def test_good_dataset_builds(tmp_path):
    """The same layout unbroken builds (so each failure above is caused by its one broken file)."""
    voc = _voc(tmp_path)
    r = _cli(["stage=shards", "data=voc", f"data.voc_root={voc}", f"data.shards_dir={tmp_path / 'shards'}",
              f"run={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert runs.read_done(tmp_path / "run", "shards")["train"] == 2


# --------------------------------------------------------------------------------------------- 1. bad inputs (config)

@pytest.mark.parametrize("arg, pattern", [
    ("cls.optim.lr=nan", r"cls\.optim\.lr=nan: expected a finite number"),
    ("cls.optim.lr=-0.1", r"cls\.optim\.lr=-0\.1: must be > 0"),
    ("cls.train.steps=0", r"cls\.train\.steps=0: must be ≥ 1"),
    ("cam.scales=[]", r"cam\.scales=\[\]: must be a non-empty list of numbers > 0"),
    ("data.max_skip_fraction=2", r"data\.max_skip_fraction=2\.0: must be in \[0, 1\]"),
    ("cls.train.mixed_precision=fp8", r"cls\.train\.mixed_precision=fp8: allowed values are no, fp16, bf16"),
])
def test_bad_config_value_is_a_one_line_error(tmp_path, arg, pattern):
    """(Unknown keys: tests/test_config.py::test_cli_user_error_is_one_line_without_traceback.)"""
    r = _cli(["stage=cls", arg, f"run={tmp_path / 'run'}"], tmp_path)
    _user_error(r, pattern)
    assert not (tmp_path / "run").exists()  # nothing was started


# --------------------------------------------------------------------------------------------- 1. bad inputs (weights)

def test_missing_weights_file_is_a_one_line_error(shards, tmp_path):
    r = _cli(shards + ["stage=cls", f"run={tmp_path / 'run'}", f"model.weights={tmp_path / 'nope.safetensors'}"], tmp_path)
    _user_error(r, r"weights file not found: .*nope\.safetensors")


def test_mismatched_weights_file_is_a_one_line_error(shards, tmp_path):
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "other.safetensors"))
    r = _cli(shards + ["stage=cls", f"run={tmp_path / 'run'}", f"model.weights={tmp_path / 'other.safetensors'}"], tmp_path)
    _user_error(r, r"other\.safetensors: weights do not fit .*missing.*file \(8, 3, 3, 3\) vs model \(64, 3, 7, 7\)")


def test_stage_without_its_upstream_is_a_one_line_error(shards, tmp_path):
    r = _cli(shards + ["stage=cam", f"run={tmp_path / 'run'}"], tmp_path)
    _user_error(r, r"stage 'cam' needs stage 'cls' .*run stage=cls first")


def test_nan_loss_is_a_one_line_error(shards, tmp_path):
    """A learning rate of 1e30 makes the loss NaN at step 2: the run stops, naming the step and what to change.
    (In-process, both nan and inf, no diverged checkpoint: tests/test_engine.py::test_non_finite_loss_raises_training_diverged.)"""
    r = _cli(shards + ["stage=cls", f"run={tmp_path / 'run'}", "cls.optim.lr=1e30", "cls.train.steps=3", "cls.train.log_every=3",
                       "cls.train.batch_size=2", "cls.train.crop=32"], tmp_path)
    _user_error(r, r"loss is (nan|inf) at step \d of cls/cam; lower the learning rate")
    assert newest_checkpoint(tmp_path / "run" / "cls") is None and not (tmp_path / "run" / "cls" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------- 1. broken samples in streams

def _broken_val_shards(shards_args: list[str], dst: Path) -> tuple[Path, int]:
    """A copy of the shards whose val split has one truncated JPEG and one non-image jpg (manifest re-stamped)."""
    shutil.copytree(_opt(shards_args, "data.shards_dir"), dst)
    name = Path(split_urls(dst, "val")[0]).name
    samples = raw_samples(dst / name)
    samples[1]["jpg"] = samples[1]["jpg"][: len(samples[1]["jpg"]) // 2]
    samples[3]["jpg"] = b"GIF89a this is not a JPEG"
    write_shard(dst / name, samples)
    _restamp(dst, name)
    return dst, runs.read_json(dst / MANIFEST)["splits"]["val"]["total"]


@pytest.mark.slow
def test_broken_samples_are_counted_in_done_and_fail_past_the_limit(shards, trained_cls, tmp_path):
    """stage=cam over shards with 2 broken samples: skipped and counted in cam/DONE; past max_skip_fraction: exit 2."""
    sdir, total = _broken_val_shards(shards, tmp_path / "shards")
    args = shards + [f"data.shards_dir={sdir}", "stage=cam", "cam.split=val", "cam.eval_split=val", "cam.scales=[1]",
                     "cam.flip=false"]
    run = _run_copy(trained_cls, tmp_path / "ok")
    r = _cli(args + [f"run={run}", "data.max_skip_fraction=0.2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    done = runs.read_done(run, "cam")
    assert done["skipped"] == 2 and done["samples"] == total - 2
    assert r.stderr.count("skipped broken data") == 2
    run = _run_copy(trained_cls, tmp_path / "strict")
    r = _cli(args + [f"run={run}"], tmp_path)  # default data.max_skip_fraction=0.01
    _user_error(r, rf"cam: 2 of {total} samples were broken and skipped, more than data.max_skip_fraction=0.01")
    assert not runs.is_done(run, "cam")


def test_train_stream_fails_past_max_skip_fraction(shards, tmp_path):
    """The training stream counts skips (tests/test_stream.py::test_broken_training_sample_is_counted) and raises
    once more than max_skip_fraction of a worker's epoch was broken."""
    sdir, total = _broken_val_shards(shards, tmp_path / "shards")
    urls = split_urls(sdir, "val")
    kw = dict(batch_size=2, crop=32, resize_long=(32, 48), shuffle_buffer=1)
    batches = [b for _, b in zip(range((total - 2) // 2), train_loader(urls, max_skip_fraction=0.2, **kw))]  # one epoch
    assert batches[-1]["skipped"] == 2 and all(k for b in batches for k in b["key"])
    with pytest.raises(DataError, match=rf"val-000000\.tar: 2 of {total} samples were broken.*max_skip_fraction=0\.1"):
        for _ in zip(range(8), train_loader(urls, max_skip_fraction=0.1, **kw)):
            pass


@pytest.mark.parametrize("bad", ["value_50", "other_size"])
def test_bad_mask_in_a_stream_is_skipped_and_counted(shards, tmp_path, bad):
    """A pseudo-label shard with a mask value outside {0..20, 255} or of another size: that sample is skipped, counted,
    and never reaches a batch (class 50 would crash or silently train on garbage)."""
    urls = split_urls(_opt(shards, "data.shards_dir"), "val")
    masks = tmp_path / "masks"  # hand-made label shards (in a stage folder they would need records)
    masks.mkdir()
    keys = [s["__key__"] for s in read_shard(urls[0], ("jpg", "cls.npy"))]
    sizes = {s["__key__"]: s["jpg"].shape[:2] for s in read_shard(urls[0], ("jpg",))}
    victim = keys[2]
    samples = []
    for k in keys:
        m = np.zeros(sizes[k], np.uint8)
        if k == victim and bad == "value_50":
            m[:4, :4] = 50
        elif k == victim:
            m = np.zeros((sizes[k][0] + 3, sizes[k][1]), np.uint8)
        samples.append({"__key__": k, "png": write_mask_png(None, m)})
    write_shard(masks / Path(urls[0]).name, samples)
    it = train_loader(urls, batch_size=1, crop=32, resize_long=None, shuffle_buffer=1, mask_dir=masks,
                      max_skip_fraction=0.5, jitter=False)
    got = [next(it) for _ in range(len(keys) - 1)]
    assert victim not in [b["key"][0] for b in got] and got[-1]["skipped"] == 1
    assert all(set(b["mask"].unique().tolist()) <= {0, 255} for b in got)


def test_truncated_tar_is_a_one_line_error(shards, trained_cls, tmp_path):
    """A cut tar (even one whose manifest entry was re-stamped) is refused naming the file: reading up to the cut
    would lose samples silently. (Cut and corrupt-header tars in-process:
    tests/test_shards.py::test_truncated_or_corrupt_tar_is_refused.)"""
    sdir = tmp_path / "shards"
    shutil.copytree(_opt(shards, "data.shards_dir"), sdir)
    tar = Path(split_urls(sdir, "val")[0])
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 // 512 * 512])  # cut at a block boundary
    _restamp(sdir, tar.name)
    run = _run_copy(trained_cls, tmp_path / "run")
    r = _cli(shards + [f"data.shards_dir={sdir}", "stage=cam", "cam.split=val", "cam.eval_split=val", f"run={run}"], tmp_path)
    _user_error(r, rf"{tar.name}: truncated tar \(.*\); rebuild it")


# --------------------------------------------------------------------------------------------- 2. changed shards, crashes

def test_shard_changed_after_the_manifest_is_refused(shards, tmp_path):
    """One byte of a shard changed after manifest.json was written: training (stage=cls) and inference reads
    (read_shard, used by cam/aff/pseudo/eval) refuse it, naming the file. (load_manifest: tests/test_shards.py::
    test_modified_or_missing_tar_is_detected.)"""
    sdir = tmp_path / "shards"
    shutil.copytree(_opt(shards, "data.shards_dir"), sdir)
    tar = Path(split_urls(sdir, "train_aug")[1])
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{tar.name}: sha256 differs from .*manifest\.json"):
        list(read_shard(str(tar), ("jpg", "cls.npy")))
    r = _cli(shards + [f"data.shards_dir={sdir}", "stage=cls", f"run={tmp_path / 'run'}"], tmp_path)
    _user_error(r, rf"{tar.name}: sha256 differs from .*manifest\.json \(corrupt or modified shard\); run stage=shards again")


@pytest.mark.slow
def test_kill_9_during_cam_keeps_finished_shards_and_resumes(shards, trained_cls, tmp_path):
    """SIGKILL while stage=cam writes its shards: no DONE, no partial shard; the rerun keeps the finished shards
    (same bytes and mtime) and computes only the rest. (kill -9 inside a checkpoint write:
    tests/test_engine.py::test_kill_9_while_writing_a_checkpoint.)"""
    sdir = tmp_path / "shards"
    args = shards + [f"data.shards_dir={sdir}", "data.shard_size=2", "stage=shards", f"run={tmp_path / 'shards-run'}"]
    pipeline.run(make_config(args))
    n_shards = len(split_urls(sdir, "val"))
    run = _run_copy(trained_cls, tmp_path / "run")
    cmd = shards + [f"data.shards_dir={sdir}", "data.shard_size=2", "stage=cam", "cam.split=val", "cam.eval_split=val",
                    "cam.scales=[1,0.5,1.5]", f"run={run}"]
    out = run / "cam"

    def finished() -> list[Path]:  # shards the stage counts as done: the tar and its per-shard record
        return sorted(p for p in out.glob("val-*.tar") if Path(f"{p}.json").is_file()) if out.is_dir() else []

    p = subprocess.Popen([sys.executable, "-m", "wsss_dist", *cmd], cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 900  # a safety net: the wait ends on the event (a finished shard)
        while not finished() and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    done_before = finished()
    assert 1 <= len(done_before) < n_shards, f"{len(done_before)} of {n_shards} shards when killed"
    assert not runs.is_done(run, "cam")
    before = {t.name: (t.stat().st_mtime_ns, t.read_bytes()) for t in done_before}
    for t in done_before:  # every shard on disk under its final name is whole
        assert len(list(read_shard(str(t), ("cam.npy", "cam.json")))) == 2
    r = _cli(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"cam: (\d+) of (\d+) shards of this rank already done, resuming", r.stderr)
    assert m and int(m.group(1)) == len(done_before) and int(m.group(2)) == n_shards, r.stderr[-2000:]
    assert {t.name: (t.stat().st_mtime_ns, t.read_bytes()) for t in done_before} == before  # not rewritten
    assert len(finished()) == n_shards
    for url in split_urls(sdir, "val"):
        want = [s["__key__"] for s in read_shard(url, ("cls.npy",))]
        got = list(read_shard(str(out / Path(url).name), ("cam.npy", "cam.json")))
        assert [s["__key__"] for s in got] == want
        assert all(s["cam.npy"].shape[0] == len(s["cam.json"]["classes"]) for s in got)
    assert runs.read_done(run, "cam")["samples"] == sum(runs.read_json(sdir / MANIFEST)["splits"]["val"]["counts"])


# --------------------------------------------------------------------------------------------- 3. exact resume of stage cls

@pytest.mark.slow
def test_cls_stage_resumed_after_three_random_signals_is_bitwise_equal(shards, tmp_path):
    """The real stage (python -m wsss_dist stage=cls, method=fmix, 2 DataLoader workers), stopped by SIGUSR1/SIGTERM at
    three random steps and rerun each time, ends with the uninterrupted run's weights, bit for bit."""
    steps = 14
    base = shards + ["stage=cls", "method=fmix", f"cls.train.steps={steps}", "cls.train.batch_size=4",
                     "cls.train.crop=32", "cls.train.resize_long=[32,48]", "cls.train.log_every=1",
                     "cls.train.ckpt_every=5", "data.num_workers=2"]
    pipeline.run(make_config(base + [f"run={tmp_path / 'ref'}"]))  # the uninterrupted run (in this process)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, steps - 4), 3))
    sigs = [rng.choice([signal.SIGUSR1, signal.SIGTERM]) for _ in targets]
    stopped: list[int] = []
    for target, sig in zip(targets, sigs):
        target = max(target, (stopped[-1] + 1) if stopped else 1)
        p = subprocess.Popen([sys.executable, "-m", "wsss_dist", *base, f"run={tmp_path / 'run'}"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines, sent = [], False
        for line in p.stderr:
            lines.append(line)
            m = re.search(rf"cls/fmix: step (\d+)/{steps} ", line)
            if m and int(m.group(1)) >= target and not sent:
                os.kill(p.pid, sig)
                sent = True
        p.wait(timeout=600)
        err = "".join(lines)
        assert p.returncode == pipeline.EXIT_INTERRUPTED, (seed, err[-3000:])
        assert err.strip().splitlines()[-1].startswith("interrupted: cls/fmix: stopped by " + signal.Signals(sig).name)
        stop = int(re.search(r"stopped at step (\d+)", err).group(1))
        if stopped:
            assert f"at step {stopped[-1]}" in err  # resumed where the previous run stopped
        stopped.append(stop)
    assert stopped == sorted(set(stopped)) and stopped[-1] < steps, (seed, stopped)
    r = _cli(base + [f"run={tmp_path / 'run'}"], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(tmp_path / "run" / "cls" / "model.safetensors")), load_file(str(tmp_path / "ref" / "cls" / "model.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], (seed, targets, stopped)
    assert runs.read_done(tmp_path / "run", "cls")["steps"] == steps


# --------------------------------------------------------------------------------------------- 4. untrusted files

def test_pickled_weights_file_is_refused_without_running_it(shards, tmp_path):
    """model.weights=evil.pth (a pickle whose __reduce__ writes a file): refused (weights_only), the code never runs."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, tmp_path / "evil.pth")
    r = _cli(shards + ["stage=cls", f"run={tmp_path / 'run'}", f"model.weights={tmp_path / 'evil.pth'}"], tmp_path)
    _user_error(r, r"evil\.pth: cannot be read as a state dict \(UnpicklingError")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is real: a plain unpickler runs it
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl", "legacy_train_state"])
def test_pickled_checkpoint_file_is_never_run(tmp_path, caplog, victim):
    """A checkpoint file replaced by a malicious pickle: resume never executes it (accelerate's files are read
    weights_only, the loop state is JSON or, in older checkpoints, a weights_only pickle) and stays exact."""
    marker = tmp_path / "pwned"
    t, o = es.configs(10, ckpt_every=3)
    ref = es.make_model()
    fit(model=ref, param_groups=ref.param_groups(), loss_fn=es.loss_fn, make_loader=es.make_loader,
        out_dir=tmp_path / "ref", train=t, optim=o, log_name="tiny")

    def stop_at_7(model, batch, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGUSR1)
        return es.loss_fn(model, batch, step)

    model = es.make_model()
    with pytest.raises(Interrupted):
        fit(model=model, param_groups=model.param_groups(), loss_fn=stop_at_7, make_loader=es.make_loader,
            out_dir=tmp_path / "run", train=t, optim=o, log_name="tiny")
    newest = newest_checkpoint(tmp_path / "run")
    assert newest.name == "step-00000008"
    if victim == "legacy_train_state":
        (newest / "train_state.json").unlink()
        torch.save(Payload(marker), newest / "custom_checkpoint_0.pkl")
    else:
        torch.save({"state": Payload(marker)}, newest / victim)
    model = es.make_model()
    with caplog.at_level(logging.INFO, logger="wsss_dist.engine"):
        fit(model=model, param_groups=model.param_groups(), loss_fn=es.loss_fn, make_loader=es.make_loader,
            out_dir=tmp_path / "run", train=t, optim=o, log_name="tiny")
    assert not marker.exists()
    if victim != "random_states_0.pkl":  # (our checkpoints hold no RNG pickles; a planted one is read weights_only
        #  by accelerate, fails, and is ignored: every step reseeds from (seed, step, rank))
        assert "step-00000008 could not be loaded" in caplog.text and "step-00000006 at step 6" in caplog.text
    a, b = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_pickled_cls_labels_npy_is_refused_without_running_it(tmp_path):
    """data.lists_dir's cls_labels.npy is a pickled dict: it is unpickled with numpy arrays only allowed.
    (The real psa/irn files still load: tests/test_data_voc.py::test_cls_labels_both_formats.)"""
    marker = tmp_path / "pwned"
    np.save(tmp_path / "cls_labels.npy", np.array({"2007_000032": Payload(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"cls_labels\.npy: cannot read as a dict .*refused to load global builtins\.exec"):
        load_cls_labels(tmp_path / "cls_labels.npy")
    assert not marker.exists()
    np.load(tmp_path / "cls_labels.npy", allow_pickle=True)  # the payload is real
    assert marker.exists()


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "pkl"])
def test_shard_with_a_pickle_member_is_refused_without_unpickling(shards, tmp_path, ext):
    """Inference reads and the training stream refuse a tar holding a pickle member; nothing is unpickled.
    (Writers refuse pickle members: tests/test_shards.py::test_pickle_member_is_refused.)"""
    marker = tmp_path / "pwned"
    y = np.eye(20, dtype=np.float32)[3]
    buf = io.BytesIO()
    np.save(buf, y)
    tar = _tar(tmp_path / "evil-000000.tar", [("a.jpg", _jpeg(0, 40, 40)), ("a.cls.npy", buf.getvalue()),
                                              (f"a.state.{ext}", pickle.dumps(Payload(marker)))])
    with pytest.raises(DataError, match=rf"a\.state\.{ext} has a pickle extension; refusing to read it"):
        list(read_shard(str(tar), ("jpg", "cls.npy")))
    with pytest.raises(DataError, match="pickle extension"):
        next(train_loader([str(tar)], batch_size=1, crop=32, resize_long=None, shuffle_buffer=1))
    assert not marker.exists()


def test_object_array_npy_in_a_shard_is_never_unpickled(tmp_path):
    """``cls.npy`` holding a pickled object array: np.load(allow_pickle=False) refuses it; the sample is skipped."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    good = io.BytesIO()
    np.save(good, np.eye(20, dtype=np.float32)[1])
    tar = _tar(tmp_path / "t.tar", [("a.jpg", _jpeg(1)), ("a.cls.npy", buf.getvalue()),
                                    ("b.jpg", _jpeg(2)), ("b.cls.npy", good.getvalue())])
    counter = SkipCounter()
    assert [s["__key__"] for s in read_shard(str(tar), ("jpg", "cls.npy"), counter)] == ["b"]
    assert counter.skipped == 1 and not marker.exists()


@pytest.mark.parametrize("name", ["../../evil", "/tmp/wsss-evil-abs", "sub/../../evil"])
def test_sample_keys_cannot_leave_the_output_dir(tmp_path, name):
    """A tar member named ``../../evil.jpg`` (or absolute): the reader skips that sample (counted), so a stage never
    writes a file named after it; write_shard refuses such keys too
    (tests/test_shards.py::test_write_shard_refuses_unsafe_keys)."""
    buf = io.BytesIO()
    np.save(buf, np.eye(20, dtype=np.float32)[1])
    tar = _tar(tmp_path / "in.tar", [(f"{name}.jpg", _jpeg(1)), (f"{name}.cls.npy", buf.getvalue()),
                                     ("ok.jpg", _jpeg(2)), ("ok.cls.npy", buf.getvalue())])
    out = tmp_path / "deep" / "out"
    counter = SkipCounter()
    samples = [{"__key__": s["__key__"], "cam.json": {"n": 1}} for s in read_shard(str(tar), ("jpg", "cls.npy"), counter)]
    assert [s["__key__"] for s in samples] == ["ok"] and counter.skipped == 1
    write_shard(out / "in.tar", samples)
    with pytest.raises(DataError, match="refused"):
        write_shard(out / "x.tar", [{"__key__": name, "cam.json": {"n": 1}}])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["deep", "deep/out", "deep/out/in.tar", "in.tar"]
    assert not Path("/tmp/wsss-evil-abs.cam.json").exists()


def test_manifest_cannot_point_outside_its_folder(shards, tmp_path):
    """A manifest listing ``../x.tar`` (a stage would read, and name outputs after, files elsewhere) is refused."""
    sdir = tmp_path / "shards"
    shutil.copytree(_opt(shards, "data.shards_dir"), sdir)
    m = runs.read_json(sdir / MANIFEST)
    m["splits"]["val"]["shards"][0] = "../../elsewhere/val-000000.tar"
    runs.write_json(sdir / MANIFEST, m)
    for verify in (False, True):
        with pytest.raises(DataError, match=r"shard name '\.\./\.\./elsewhere/val-000000\.tar' refused"):
            load_manifest(sdir, verify=verify)


def test_shard_done_marker_is_written_last(shards, tmp_path):
    """A process killed after an output shard's tar but before its per-shard record: the rerun must redo or finish it."""
    from wsss_dist.engine import map_shards

    cfg = make_config(shards + [f"run={tmp_path / 'run'}"])
    out = tmp_path / "run" / "x"

    def process(sample: dict) -> tuple[dict, None]:
        return {"__key__": sample["__key__"], "n.json": {"classes": int(sample["cls.npy"].sum())}}, None

    first = map_shards(cfg, "val", out, ("cls.npy",), process)
    name = Path(split_urls(cfg.shards_dir, "val")[0]).name
    (out / f"{name}.json").unlink()  # the state a kill -9 between the two writes leaves
    assert map_shards(cfg, "val", out, ("cls.npy",), process) == first
