"""Packing into shards, the manifest (checksums, no-op rebuilds), safe writing and robust reading."""
from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_SHARD_SIZE, TINY_TOY
from wsss_dist import pipeline
from wsss_dist.config import make_config
from wsss_dist.data.shards import (MANIFEST, SkipCounter, build_shards, load_manifest, read_shard, split_ids, split_urls,
                                   write_shard)
from wsss_dist.data.voc import VOCSource
from wsss_dist.errors import DataError


def _jpeg(rng: np.random.Generator, h: int = 20, w: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_manifest_lists_shards_counts_ids_histogram(toy_shards, toy_source):
    m = load_manifest(toy_shards)  # verifies every sha256
    for split in ("train", "val", "train_aug"):
        info, ids = m["splits"][split], toy_source.ids(split)
        assert split_ids(m, split) == ids and info["total"] == len(ids) == sum(info["counts"])
        assert all(c <= TINY_SHARD_SIZE for c in info["counts"]) and info["with_mask"] == len(ids)
        assert info["shards"] == [f"{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert [Path(u).name for u in split_urls(toy_shards, split, m)] == info["shards"]
        hist = np.sum([toy_source.labels(i) for i in ids], axis=0)
        assert info["class_hist"] == hist.astype(int).tolist()
    assert m["splits"]["train_aug"]["total"] == TINY_TOY["n_train"] + TINY_TOY["n_sbd"]


def test_shard_contents_are_the_original_files(toy_shards, toy_source):
    url = split_urls(toy_shards, "train_aug")[0]
    with tarfile.open(url) as tf:
        names = tf.getnames()
        first = names[0].split(".")[0]
        raw = tf.extractfile(f"{first}.jpg").read()
    assert raw == toy_source.jpeg_bytes(first)  # never re-encoded
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls.npy", "seg.png"}
    samples = list(read_shard(url, ("jpg", "cls.npy", "seg.png")))
    assert len(samples) == len({n.split(".")[0] for n in names})
    for s in samples:
        with Image.open(toy_source.jpeg_path(s["__key__"])) as img:
            assert np.array_equal(s["jpg"], np.asarray(img.convert("RGB")))
        assert s["jpg"].dtype == np.uint8 and s["jpg"].ndim == 3
        assert np.array_equal(s["seg.png"], toy_source.mask(s["__key__"]))  # palette indices, bit-exact
        assert s["cls.npy"].dtype == np.float32 and np.array_equal(s["cls.npy"], toy_source.labels(s["__key__"]))


def test_rebuild_is_a_noop_and_a_change_rebuilds(toy_data, tmp_path, caplog):
    voc = tmp_path / "VOC2012"
    shutil.copytree(toy_data[0], voc)
    src = VOCSource(voc, toy_data[1])
    out = tmp_path / "shards"
    m1 = build_shards(src, out, splits=("train",), shard_size=8, progress=False)
    tars = sorted(out.glob("*.tar"))
    mtimes = [t.stat().st_mtime_ns for t in tars]
    with caplog.at_level(logging.INFO):
        m2 = build_shards(VOCSource(voc, toy_data[1]), out, splits=("train",), shard_size=8, progress=False)
    assert m2 == m1 and [t.stat().st_mtime_ns for t in tars] == mtimes and "up to date" in caplog.text
    # change one image's annotation: its labels change and the shards are rebuilt
    first = src.ids("train")[0]
    xml = voc / "Annotations" / f"{first}.xml"
    old = xml.stat().st_mtime_ns
    xml.write_text("<annotation><object><name>cow</name></object><object><name>sofa</name></object></annotation>")
    os.utime(xml, ns=(old + 10**9, old + 10**9))  # a new mtime whatever the file system's clock resolution
    m3 = build_shards(VOCSource(voc, toy_data[1]), out, splits=("train",), shard_size=8, progress=False)
    assert m3["fingerprint"] != m1["fingerprint"]
    s = next(read_shard(split_urls(out, "train", m3)[0], ("cls.npy",)))
    assert s["__key__"] == first and set(np.flatnonzero(s["cls.npy"])) == {9, 17}
    # fewer shards after a change: stale tars go away
    build_shards(VOCSource(voc, toy_data[1]), out, splits=("train",), shard_size=100, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]


def test_modified_or_missing_tar_is_detected(toy_shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(toy_shards, out)
    victim = out / "val-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    load_manifest(out, verify=False)
    with pytest.raises(DataError, match="val-000001.tar.*sha256"):
        load_manifest(out)
    victim.unlink()
    with pytest.raises(DataError, match="val-000001.tar.*missing"):
        load_manifest(out)
    (out / MANIFEST).unlink()
    with pytest.raises(DataError, match="run stage=shards first"):
        load_manifest(out)
    with pytest.raises(DataError, match="no split"):
        split_urls(toy_shards, "test")


def test_broken_samples_are_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    good = _jpeg(rng)
    y = np.eye(20, dtype=np.float32)[3]
    samples = [
        {"__key__": "a", "jpg": good, "cls.npy": y},
        {"__key__": "b", "jpg": good[: len(good) // 2], "cls.npy": y},  # truncated JPEG
        {"__key__": "c", "jpg": b"this is not an image", "cls.npy": y},  # non-image bytes
        {"__key__": "d", "jpg": good},  # missing key
        {"__key__": "e", "jpg": _jpeg(rng), "cls.npy": y},
    ]
    assert write_shard(tmp_path / "t.tar", samples) == 5
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        got = list(read_shard(str(tmp_path / "t.tar"), ("jpg", "cls.npy"), counter))
    assert [s["__key__"] for s in got] == ["a", "e"]
    assert counter.skipped == 3 and counter.seen == 2 and counter.fraction() == pytest.approx(0.6)
    assert caplog.text.count("skipped broken data") == 3
    counter.check(0.7)
    with pytest.raises(DataError, match="3 of 5"):
        counter.check(0.5)
    # keys not asked for are not decoded: a broken jpg does not matter for a labels-only read
    assert [s["__key__"] for s in read_shard(str(tmp_path / "t.tar"), ("cls.npy",))] == ["a", "b", "c", "e"]


def test_truncated_or_corrupt_tar_is_refused(toy_shards, tmp_path):
    """Reading up to a cut (or a bad header) would silently lose the rest of the tar: it is an error naming the file."""
    src = Path(split_urls(toy_shards, "train_aug")[0])
    data = src.read_bytes()
    cut = tmp_path / src.name
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=rf"{cut.name}: truncated tar"):
        list(read_shard(str(cut), ("jpg", "cls.npy")))
    bad = bytearray(data)
    second = next(i for i in range(512, len(bad), 512) if bad[i:i + 5] != bytes(5) and bad[i + 257:i + 262] == b"ustar")
    bad[second + 148:second + 156] = b"0000000\0"  # the second member's header checksum no longer fits
    cut.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=rf"{cut.name}.*corrupt or unreadable tar"):
        list(read_shard(str(cut), ("jpg", "cls.npy")))


def test_pickle_member_is_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name, payload in (("x.jpg", _jpeg(np.random.default_rng(1))), ("x.pkl", b"\x80\x04K\x01.")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="pickle"):
        list(read_shard(str(path), ("jpg",)))
    with pytest.raises(DataError, match="pickle"):
        list(read_shard(str(path), ("pkl",)))
    with pytest.raises(DataError, match="refused"):
        write_shard(tmp_path / "w.tar", [{"__key__": "x", "state.pth": b"..."}])


@pytest.mark.parametrize("key", ["../x", "../../etc/passwd", "/abs", "a/b", "a\x00b", "..", "", "a.b", None])
def test_write_shard_refuses_unsafe_keys(tmp_path, key):
    with pytest.raises(DataError, match="refused"):
        write_shard(tmp_path / "t.tar", [{"__key__": key, "png": b"x"}])
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_write_shard_values_and_empty_shard(tmp_path):
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    n = write_shard(tmp_path / "t.tar", [{"__key__": "k-1", "a.npy": arr, "b.json": {"x": [1, 2]}, "c.txt": "hi"}])
    s = next(read_shard(str(tmp_path / "t.tar"), ("a.npy", "b.json", "c.txt")))
    assert n == 1 and np.array_equal(s["a.npy"], arr) and s["b.json"] == {"x": [1, 2]} and s["c.txt"] == "hi"
    assert write_shard(tmp_path / "empty.tar", []) == 0 and list(read_shard(str(tmp_path / "empty.tar"), ("png",))) == []


def test_stage_shards_toy_then_voc_layout(tmp_path):
    toy = [f"data.toy.{k}={v}" for k, v in TINY_TOY.items()] + [f"data.toy.root={tmp_path / 'src'}"]
    cfg = make_config(["stage=shards", "data=toy", f"run={tmp_path / 'r1'}", f"data.shards_dir={tmp_path / 's1'}",
                       "data.shard_size=8", *toy])
    out = pipeline.run(cfg)["shards"]
    assert (out["train"], out["val"], out["train_aug"]) == (24, 16, 40)
    tars = {p: p.stat().st_mtime_ns for p in (tmp_path / "s1").glob("*.tar")}
    cfg2 = make_config(["stage=shards", "data=toy", f"run={tmp_path / 'r1b'}", f"data.shards_dir={tmp_path / 's1'}",
                        "data.shard_size=8", *toy])
    assert pipeline.run(cfg2)["shards"]["train_aug"] == 40
    assert {p: p.stat().st_mtime_ns for p in tars} == tars
    voc = make_config(["stage=shards", "data=voc", f"data.voc_root={tmp_path / 'src/VOCdevkit/VOC2012'}",
                       f"data.sbd_root={tmp_path / 'src/benchmark_RELEASE'}", f"data.shards_dir={tmp_path / 's2'}",
                       "data.shard_size=8", f"run={tmp_path / 'r2'}"])
    out2 = pipeline.run(voc)["shards"]
    assert (out2["train"], out2["val"], out2["train_aug"]) == (24, 16, 40)
    a, b = load_manifest(tmp_path / "s1"), load_manifest(tmp_path / "s2")
    assert all(a["splits"][s]["sha256"] == b["splits"][s]["sha256"] for s in a["splits"])  # reproducible tars


def test_tar_bytes_are_webdatasets_tarwriter_bytes():
    """The packer writes tars with the standard library (a packing process never imports webdataset and torch):
    byte for byte what webdataset's TarWriter(encoder=False, mtime=0) writes, so shards already packed stay valid."""
    import io

    import numpy as np
    import webdataset as wds

    from wsss_dist.data.tario import _encode, tar_bytes

    samples = [{"__key__": f"2007_{i:06d}", "jpg": bytes(range(i, i + 200)), "cls.npy": np.eye(20, dtype=np.float32)[i],
                "seg.png": b"\x89PNG" * (i + 1), "meta.json": {"i": i}} for i in range(3)]
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=0)
    for s in samples:
        writer.write({"__key__": s["__key__"], **{k: _encode(k, v) for k, v in s.items() if k != "__key__"}})
    writer.close()
    data, n = tar_bytes(samples)
    assert n == 3 and data == buf.getvalue() and len(data) % 10240 == 0
