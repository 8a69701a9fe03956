"""VOC/SBD readers on the real fixture files (voc_mini, psa/irn lists) and on hand-built SBD .mat files."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import VOC_LISTS, VOC_MINI, needs_fixtures
from wsss_dist.data.voc import (CLASS_TO_INDEX, CLASSES, PALETTE, VOCSource, load_cls_labels, mask_labels,
                                read_mask_png, write_mask_png)
from wsss_dist.errors import DataError

REAL_ID = "2007_000063"
REAL_VOC = VOC_MINI / "VOCdevkit" / "VOC2012"
EXTRA = sorted((VOC_MINI / "extra" / "SegmentationClassAug").glob("*.png"))
pytestmark = needs_fixtures


def _xml(names: list[str]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


@pytest.fixture
def voc(tmp_path) -> Path:
    """A VOC2012 layout holding the real image + mask, an XML, and train/val lists."""
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    shutil.copy(REAL_VOC / "JPEGImages" / f"{REAL_ID}.jpg", root / "JPEGImages")
    shutil.copy(REAL_VOC / "SegmentationClass" / f"{REAL_ID}.png", root / "SegmentationClass")
    (root / "Annotations" / f"{REAL_ID}.xml").write_text(_xml(["dog", "chair", "chair"]))
    (root / "ImageSets/Segmentation/train.txt").write_text(f"{REAL_ID}\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("")
    return root


def test_class_names_and_palette_match_the_real_files():
    assert len(CLASSES) == 20 and CLASSES[0] == "aeroplane" and CLASSES[-1] == "tvmonitor"
    assert CLASS_TO_INDEX["chair"] == 8 and CLASS_TO_INDEX["dog"] == 11
    with Image.open(REAL_VOC / "SegmentationClass" / f"{REAL_ID}.png") as img:
        pal = np.array(img.getpalette(), np.uint8).reshape(-1, 3)
    assert PALETTE.shape == (256, 3) and np.array_equal(PALETTE[: len(pal)], pal)


def test_real_image_labels_and_mask(voc):
    src = VOCSource(voc)
    assert src.ids("train") == [REAL_ID]
    y = src.labels(REAL_ID)
    assert y.dtype == np.float32 and y.shape == (20,)
    assert set(np.flatnonzero(y)) == {CLASS_TO_INDEX["chair"], CLASS_TO_INDEX["dog"]}
    with Image.open(REAL_VOC / "SegmentationClass" / f"{REAL_ID}.png") as img:
        want = np.array(img)
    m = src.mask(REAL_ID)
    assert m.dtype == np.uint8 and np.array_equal(m, want)
    assert set(np.unique(m)) == {0, 9, 12, 255}
    assert src.jpeg_bytes(REAL_ID) == (REAL_VOC / "JPEGImages" / f"{REAL_ID}.jpg").read_bytes()
    with pytest.raises(DataError, match="empty"):
        src.ids("val")


def test_labels_fall_back_to_the_mask_without_xml():
    src = VOCSource(REAL_VOC)  # the fixture has no Annotations folder
    assert np.array_equal(src.labels(REAL_ID), mask_labels(src.mask(REAL_ID)))
    assert set(np.flatnonzero(src.labels(REAL_ID))) == {8, 11}


@pytest.mark.parametrize("path", EXTRA, ids=lambda p: p.stem)
def test_real_segmentation_class_aug_masks(path, tmp_path):
    m = read_mask_png(path)
    vals = set(np.unique(m).tolist())
    assert vals <= set(range(21)) | {255} and len(vals) >= 2
    data = write_mask_png(tmp_path / "m.png", m)
    assert (tmp_path / "m.png").read_bytes() == data
    assert np.array_equal(read_mask_png(data), m)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and np.array_equal(np.array(img.getpalette(), np.uint8).reshape(-1, 3), PALETTE)


def test_the_57_extra_masks_are_there():
    assert len(EXTRA) == 57


@pytest.mark.parametrize("fmt", ["psa", "irn"])
def test_train_aug_from_real_lists(voc, fmt):
    src = VOCSource(voc, lists_dir=VOC_LISTS / fmt)
    ids = src.ids("train_aug")
    assert len(ids) == 10582 == len(set(ids))
    assert ids[0] == "2007_000032" and all(len(i) == 11 and i[4] == "_" for i in ids)


def test_train_aug_lists_agree_between_formats(voc):
    psa = VOCSource(voc, lists_dir=VOC_LISTS / "psa").ids("train_aug")
    irn = VOCSource(voc, lists_dir=VOC_LISTS / "irn").ids("train_aug")
    assert sorted(psa) == sorted(irn)


def test_cls_labels_both_formats():
    psa, irn = load_cls_labels(VOC_LISTS / "psa" / "cls_labels.npy"), load_cls_labels(VOC_LISTS / "irn" / "cls_labels.npy")
    assert len(psa) == len(irn) == 12031 and set(psa) == set(irn)
    common = sorted(psa)[:200]
    assert all(np.array_equal(psa[k], irn[k]) for k in common)
    y = psa[REAL_ID]
    assert y.dtype == np.float32 and {8, 11} <= set(np.flatnonzero(y))


def test_labels_from_cls_labels_when_no_xml(tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(REAL_VOC, root)
    src = VOCSource(root, lists_dir=VOC_LISTS / "irn")
    assert np.array_equal(src.labels(REAL_ID), load_cls_labels(VOC_LISTS / "psa" / "cls_labels.npy")[REAL_ID])


def _sbd(tmp_path: Path, seg: np.ndarray, image_id: str, train: list[str], val: list[str]) -> Path:
    sbd = tmp_path / "benchmark_RELEASE"
    (sbd / "dataset" / "cls").mkdir(parents=True)
    scipy.io.savemat(sbd / "dataset" / "cls" / f"{image_id}.mat",
                     {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.unique(seg)[1:]}})
    (sbd / "dataset" / "train.txt").write_text("".join(i + "\n" for i in train))
    (sbd / "dataset" / "val.txt").write_text("".join(i + "\n" for i in val))
    return sbd


def test_sbd_mat_reads_back_and_train_aug_is_the_union_minus_val(voc, tmp_path):
    sbd_id = "2008_000002"
    with Image.open(voc / "JPEGImages" / f"{REAL_ID}.jpg") as img:
        w, h = img.size
        img.save(voc / "JPEGImages" / f"{sbd_id}.jpg")
    seg = np.zeros((h, w), np.uint8)
    seg[50:200, 100:300] = 15
    seg[10:40, 10:40] = 7
    (voc / "ImageSets/Segmentation/val.txt").write_text("2009_000001\n")
    sbd = _sbd(tmp_path, seg, sbd_id, [sbd_id, REAL_ID, "2009_000001"], [sbd_id])
    src = VOCSource(voc, sbd)
    assert src.ids("train_aug") == [REAL_ID, sbd_id]
    m = src.mask(sbd_id)
    assert m.dtype == np.uint8 and np.array_equal(m, seg)
    assert set(np.flatnonzero(src.labels(sbd_id))) == {6, 14}  # no XML: from the mask (cat, person)
    assert src.mask(REAL_ID) is not None  # SegmentationClass wins over SBD


def test_bad_mask_values_and_sizes_are_refused(voc):
    src = VOCSource(voc)
    m = src.mask(REAL_ID).copy()
    m[0, 0] = 50
    write_mask_png(voc / "SegmentationClass" / f"{REAL_ID}.png", m)
    with pytest.raises(DataError, match=rf"{REAL_ID}\.png.*0\.\.20 or 255"):
        src.mask(REAL_ID)
    write_mask_png(voc / "SegmentationClass" / f"{REAL_ID}.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=rf"{REAL_ID}\.png.*size"):
        src.mask(REAL_ID)


def test_unknown_xml_name_missing_files_and_lists(voc, tmp_path):
    (voc / "Annotations" / f"{REAL_ID}.xml").write_text(_xml(["dog", "unicorn"]))
    with pytest.raises(DataError, match=rf"{REAL_ID}\.xml.*'unicorn'"):
        VOCSource(voc).labels(REAL_ID)
    with pytest.raises(DataError, match="2007_999999.jpg"):
        VOCSource(voc).jpeg_bytes("2007_999999")
    (voc / "ImageSets/Segmentation/train.txt").unlink()
    with pytest.raises(DataError, match="train.txt"):
        VOCSource(voc).ids("train")
    with pytest.raises(DataError, match="not found"):
        VOCSource(tmp_path / "nowhere")


@pytest.mark.slow
def test_the_voc_path_is_checked_before_any_job(tmp_path, toy_data):
    """Issue 25 #2: a wrong data.voc_root is one line before any job (not a traceback inside it); VOC without SBD
    warns that train_aug is VOC train only, with the count."""
    import subprocess
    import sys

    submit = Path(__file__).resolve().parents[1] / "launch" / "submit.py"
    voc_root, _ = toy_data
    base = ["data=voc", "cluster=local", "stage=shards", f"run={tmp_path / 'run'}", f"data.shards_dir={tmp_path / 'shards'}",
            "model.weights=none", "seg.weights=none", "teacher.weights=none"]
    bad = subprocess.run([sys.executable, str(submit), *base, f"data.voc_root={tmp_path / 'nope'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nope'}: VOC "
                                                                                   "folder not found"), bad.stderr
    assert "running as local job" not in bad.stdout and not (tmp_path / "run" / "logs").exists()
    warned = subprocess.run([sys.executable, str(submit), *base, f"data.voc_root={voc_root}", "launch.dry_run=true"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert warned.returncode == 0, warned.stderr
    assert re.search(r"warning: data.sbd_root is not set: train_aug is VOC train only \(24 images, not 10,582", warned.stdout), \
        warned.stdout
