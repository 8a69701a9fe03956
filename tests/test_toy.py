"""The toy generator: deterministic, idempotent, VOC/SBD layout that the readers accept, and a WSSS-shaped problem."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import TINY_TOY
from wsss_dist.config import ToyCfg
from wsss_dist.data.toy import MARKER_PAIRS, body_type, generate
from wsss_dist.data.voc import VOCSource


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = ToyCfg(seed=3, n_train=6, n_val=4, n_sbd=5, size=40)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    generate(tmp_path / "c", dataclasses.replace(cfg, seed=4))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and any(k.endswith(".mat") for k in a)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c.get(k) for k in jpgs)


def test_generate_is_idempotent_and_regenerates_on_change(tmp_path):
    cfg = ToyCfg(seed=0, n_train=4, n_val=3, n_sbd=2, size=40)
    voc, _ = generate(tmp_path, cfg)
    jpg = sorted((voc / "JPEGImages").iterdir())[0]
    before = jpg.stat().st_mtime_ns
    time.sleep(0.01)
    generate(tmp_path, cfg)
    assert jpg.stat().st_mtime_ns == before
    generate(tmp_path, dataclasses.replace(cfg, n_sbd=3))
    assert len(list((voc / "JPEGImages").iterdir())) == 4 + 3 + 3


def test_layout_is_valid_voc_and_sbd(toy_data, toy_source):
    voc, sbd = toy_data
    n = TINY_TOY
    train, val, aug = toy_source.ids("train"), toy_source.ids("val"), toy_source.ids("train_aug")
    assert (len(train), len(val), len(aug)) == (n["n_train"], n["n_val"], n["n_train"] + n["n_sbd"])
    assert set(train) <= set(aug) and not set(val) & set(aug)
    sbd_lists = set((sbd / "dataset" / "train.txt").read_text().split()) | set((sbd / "dataset" / "val.txt").read_text().split())
    assert sbd_lists & set(train), "SBD should overlap VOC train, as the real one does"
    for image_id in sorted(set(aug) | set(val)):
        assert (voc / "JPEGImages" / f"{image_id}.jpg").is_file() and (voc / "Annotations" / f"{image_id}.xml").is_file()
        m = toy_source.mask(image_id)  # validated: values and size
        assert m is not None
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as img:
            w, h = img.size
        assert w != h and 0.7 * n["size"] <= min(w, h) and max(w, h) <= 1.3 * n["size"]
        y = toy_source.labels(image_id)
        present = set(np.unique(m).tolist()) - {0, 255}
        assert set(np.flatnonzero(y) + 1) == present  # XML names = classes visible in the mask


def test_voc_masks_have_void_borders_and_sbd_masks_none(toy_data, toy_source):
    voc, sbd = toy_data
    for image_id in toy_source.ids("train"):
        m = toy_source.mask(image_id)
        objects = (m > 0) & (m < 255)
        assert (m == 255).any() and objects.any()
        # every object pixel touching background is separated from it by the void band
        assert not ((m[:, 1:] == 0) & objects[:, :-1]).any() and not ((m[1:] == 0) & objects[:-1]).any()
    mats = sorted((sbd / "dataset" / "cls").glob("*.mat"))
    assert mats
    for p in mats[:10]:
        seg = scipy.io.loadmat(p, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        assert seg.dtype == np.uint8 and 255 not in seg


def test_multi_label_images_and_class_design(toy_source):
    ys = np.stack([toy_source.labels(i) for i in toy_source.ids("train_aug") + toy_source.ids("val")])
    counts = ys.sum(1)
    assert counts.min() >= 1 and counts.max() >= 2 and (counts >= 2).mean() > 0.2
    assert len(set(MARKER_PAIRS)) == 20  # one marker per class
    assert len({body_type(c) for c in range(20)}) == 4  # bodies shared by 5 classes each


def test_marker_is_a_small_part_of_the_object(tmp_path):
    from wsss_dist.data.toy import MARKER_COLOURS, render

    img, lab, objects = render(np.random.default_rng(5), 96)
    c = objects[0][0]
    a, _ = MARKER_PAIRS[c]
    obj = lab == c + 1
    marker = obj & (np.abs(img.astype(int) - MARKER_COLOURS[a].astype(int)).sum(-1) < 30)
    assert 0 < marker.sum() < 0.15 * obj.sum()


@pytest.mark.slow
def test_default_size_generates_the_whole_train_aug(tmp_path):
    voc, _ = generate(tmp_path, ToyCfg())
    assert len(VOCSource(voc, tmp_path / "benchmark_RELEASE").ids("train_aug")) == 1200
