"""Rebuilding repairs: stage=shards verifies every tar against the manifest and rewrites exactly the damaged ones;
broken mask files are one-line DataErrors naming the file."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import TINY_SHARD_SIZE, TINY_TOY
from wsss_dist import runs
from wsss_dist.data.shards import MANIFEST, SkipCounter, build_shards, load_manifest, read_shard, split_urls
from wsss_dist.data.voc import VOCSource, read_mask_png
from wsss_dist.errors import DataError

N_TOY_SHARDS = 4 + 3 + 7  # train 24, val 16, train_aug 40 samples at 6 per shard


@pytest.fixture
def shards(toy_shards, tmp_path) -> Path:
    """A private copy of the session's toy shards (same inputs: the fingerprint matches)."""
    out = tmp_path / "shards"
    shutil.copytree(toy_shards, out)
    return out


def _rebuild(source: VOCSource, out: Path) -> dict:
    return build_shards(source, out, shard_size=TINY_SHARD_SIZE, progress=False)


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*.tar"))}


def _assert_readable(out: Path) -> None:
    """The manifest verifies and every shard reads completely, nothing skipped."""
    manifest = load_manifest(out)
    for split, info in manifest["splits"].items():
        counter = SkipCounter()
        keys = ("jpg", "cls.npy", "seg.png")
        n = sum(1 for url in split_urls(out, split, manifest) for _ in read_shard(url, keys, counter))
        assert n == info["total"] and counter.skipped == 0


def _assert_only_rebuilt(before: dict, out: Path, victim: str) -> None:
    """``victim`` is back with its original bytes; every other tar kept its mtime and bytes."""
    after = _snapshot(out)
    assert set(after) == set(before)
    assert after[victim][1] == before[victim][1]  # tars are reproducible: the rebuilt one equals the original
    assert {n: v for n, v in after.items() if n != victim} == {n: v for n, v in before.items() if n != victim}


def test_flipped_byte_rebuilds_only_that_shard(shards, toy_source, caplog):
    before = _snapshot(shards)
    victim = shards / "val-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match="val-000001.tar: sha256 differs.*run stage=shards again"):
        load_manifest(shards)
    with caplog.at_level(logging.INFO):
        _rebuild(toy_source, shards)
    assert "val-000001.tar: sha256 differs" in caplog.text and "up to date" not in caplog.text
    _assert_only_rebuilt(before, shards, victim.name)
    _assert_readable(shards)


def test_truncated_tar_is_rebuilt(shards, toy_source):
    before = _snapshot(shards)
    victim = shards / "train_aug-000002.tar"
    victim.write_bytes(before[victim.name][1][: len(before[victim.name][1]) // 2])
    _rebuild(toy_source, shards)
    _assert_only_rebuilt(before, shards, victim.name)
    _assert_readable(shards)


def test_deleted_tar_is_rebuilt(shards, toy_source):
    before = _snapshot(shards)
    (shards / "train-000000.tar").unlink()
    with pytest.raises(DataError, match="missing; run stage=shards again"):
        load_manifest(shards)
    _rebuild(toy_source, shards)
    _assert_only_rebuilt(before, shards, "train-000000.tar")
    _assert_readable(shards)


def test_wrong_sha256_in_manifest_rebuilds_that_shard(shards, toy_source):
    """Chosen behaviour: the sources decide; the shard is rebuilt from them and its true sha256 recorded."""
    manifest = runs.read_json(shards / MANIFEST)
    true_sha = manifest["splits"]["val"]["sha256"]["val-000000.tar"]
    manifest["splits"]["val"]["sha256"]["val-000000.tar"] = "0" * 64
    runs.write_json(shards / MANIFEST, manifest)
    before = _snapshot(shards)
    with pytest.raises(DataError, match="sha256 differs"):
        load_manifest(shards)
    _rebuild(toy_source, shards)
    after = _snapshot(shards)
    assert after["val-000000.tar"][0] != before["val-000000.tar"][0]  # rewritten ...
    _assert_only_rebuilt(before, shards, "val-000000.tar")  # ... with the same bytes, nothing else touched
    assert runs.read_json(shards / MANIFEST)["splits"]["val"]["sha256"]["val-000000.tar"] == true_sha
    _assert_readable(shards)


def test_unchanged_build_verifies_and_rewrites_nothing(shards, toy_source, caplog):
    from wsss_dist.data.shards import update_shards

    before = _snapshot(shards)
    manifest_mtime = (shards / MANIFEST).stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        report = update_shards(toy_source, shards, shard_size=TINY_SHARD_SIZE, progress=False)
    assert report.verified == N_TOY_SHARDS and report.rebuilt == [] and report.verify_seconds >= 0
    assert not report.full and report.manifest == runs.read_json(shards / MANIFEST)
    assert f"verified {N_TOY_SHARDS} shards" in caplog.text and "up to date" in caplog.text
    assert _snapshot(shards) == before and (shards / MANIFEST).stat().st_mtime_ns == manifest_mtime
    # a damaged shard is reported as verified and rebuilt
    (shards / "val-000002.tar").unlink()
    report = update_shards(toy_source, shards, shard_size=TINY_SHARD_SIZE, progress=False)
    assert report.verified == N_TOY_SHARDS and report.rebuilt == ["val-000002.tar"] and not report.full


def _drop_sha256(m: dict) -> object:
    del m["splits"]["train"]["sha256"]
    return m


@pytest.mark.parametrize("damage", [
    lambda m: "{not json",
    lambda m: [],
    _drop_sha256,
    lambda m: {"fingerprint": m["fingerprint"], "splits": {}},
], ids=["not-json", "not-an-object", "split-without-sha256", "fields-missing"])
def test_invalid_manifest_means_full_rebuild(shards, toy_source, caplog, damage):
    good = runs.read_json(shards / MANIFEST)
    bad = damage(runs.read_json(shards / MANIFEST))
    runs.atomic_write(shards / MANIFEST, bad if isinstance(bad, str) else json.dumps(bad))
    before = _snapshot(shards)
    with caplog.at_level(logging.WARNING):
        _rebuild(toy_source, shards)
    assert "as absent: rebuilding every shard" in caplog.text
    assert runs.read_json(shards / MANIFEST) == good
    after = _snapshot(shards)
    assert all(after[n][0] != before[n][0] and after[n][1] == before[n][1] for n in before)  # all rewritten, same bytes
    _assert_readable(shards)


def test_stage_reports_verified_and_rebuilt(tmp_path, toy_cfg):
    from wsss_dist.config import make_config
    from wsss_dist.stages import shards as shards_stage

    toy = [f"data.toy.{k}={v}" for k, v in TINY_TOY.items()] + [f"data.toy.root={toy_cfg.root}"]
    cfg = make_config(["stage=shards", "data=toy", f"run={tmp_path / 'r'}", f"data.shards_dir={tmp_path / 's'}",
                       "data.shard_size=8", *toy])
    first = shards_stage.run(cfg)
    assert (first["shards"], first["verified"], first["rebuilt"]) == (10, 0, 10)
    (tmp_path / "s" / "train_aug-000003.tar").write_bytes(b"\0" * 1024)
    again = shards_stage.run(cfg)
    assert (again["shards"], again["verified"], again["rebuilt"]) == (10, 10, 1) and again["verify_seconds"] >= 0
    _assert_readable(tmp_path / "s")


@pytest.fixture
def toy_copy(toy_data, tmp_path) -> tuple[Path, Path]:
    """A private copy of the toy VOC + SBD folders (made by wsss_dist.data.toy.generate), safe to damage."""
    voc, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE"
    shutil.copytree(toy_data[0], voc)
    shutil.copytree(toy_data[1], sbd)
    return voc, sbd


@pytest.mark.parametrize("damage", ["random-bytes", "cut-in-half"])
def test_broken_mask_png_is_a_data_error(toy_copy, tmp_path, damage):
    voc, sbd = toy_copy
    src = VOCSource(voc, sbd)
    png = voc / "SegmentationClass" / f"{src.ids('train')[1]}.png"
    data = png.read_bytes()
    png.write_bytes(os.urandom(len(data)) if damage == "random-bytes" else data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"{png}: broken mask PNG")) as exc:
        build_shards(src, tmp_path / "out", splits=("train",), shard_size=8, progress=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="<bytes>: broken mask PNG"):
        read_mask_png(png.read_bytes())


def test_garbage_sbd_mat_is_a_data_error(toy_copy, tmp_path):
    voc, sbd = toy_copy
    src = VOCSource(voc, sbd)
    sbd_only = next(i for i in src.ids("train_aug") if not (voc / "SegmentationClass" / f"{i}.png").exists())
    mat = sbd / "dataset" / "cls" / f"{sbd_only}.mat"
    mat.write_bytes(os.urandom(mat.stat().st_size))
    with pytest.raises(DataError, match=re.escape(f"{mat}: expected an SBD .mat")) as exc:
        build_shards(src, tmp_path / "out", splits=("train_aug",), shard_size=8, progress=False)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ stage outputs: checked when read, repaired by their stage
def test_damaged_stage_output_is_refused_when_read_and_its_stage_redoes_exactly_it(shards, tmp_path):
    """A CAM shard damaged between stages: the next stage refuses it in one DataError naming it and the repair
    (``stage=cam``), which redoes exactly that shard (same bytes as before); the next stage then runs."""
    import torch

    from wsss_dist import pipeline
    from wsss_dist.config import make_config
    from wsss_dist.models.build import classifier_spec, create_model, write_spec
    from wsss_dist.models.weights import save_model_weights

    run = tmp_path / "run"
    words = [f"data.shards_dir={shards}", f"data.toy.root={tmp_path / 'src'}", f"run={run}", "data.num_workers=0",
             "cam.split=val", "cam.eval_split=val", "aff.train.steps=2", "aff.train.batch_size=2", "aff.train.crop=48"]
    cfg = make_config(words + ["stage=cam"])
    torch.manual_seed(0)
    save_model_weights(create_model(classifier_spec(cfg)), run / "cls" / "model.safetensors")  # random weights will do
    write_spec(run / "cls", classifier_spec(cfg))
    runs.mark_done(run, "cls", {"steps": 0})
    pipeline.run(cfg)
    tars = sorted((run / "cam").glob("val-*.tar"))
    assert len(tars) == 3
    victim, good = tars[1], bytes(tars[1].read_bytes())
    data = bytearray(good)
    data[len(data) // 3] ^= 0xFF  # inside a member: still a readable tar, other content
    victim.write_bytes(bytes(data))
    mtimes = {t: t.stat().st_mtime_ns for t in tars if t != victim}
    with pytest.raises(DataError, match=rf"{re.escape(str(victim))}: sha256 differs from its record .*run stage=cam again"):
        pipeline.run(make_config(words + ["stage=aff"]))
    assert not runs.is_done(run, "aff")
    pipeline.run(make_config(words + ["stage=cam"]))  # done, but named alone: verifies and redoes the damaged shard
    assert victim.read_bytes() == good and {t: t.stat().st_mtime_ns for t in mtimes} == mtimes
    pipeline.run(make_config(words + ["stage=aff"]))
    assert runs.is_done(run, "aff")
    assert read_shard(str(victim), ("cam.npy",)) is not None
    assert json.loads((run / "cam" / f"{victim.name}.json").read_text())["stage"] == "cam"
