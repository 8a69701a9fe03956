"""The dataset registry and its sources: a user's folder (CSV/JSON labels, masks, split lists, one-line errors
naming file and line) and COCO-2014 (instances JSON with polygons, RLE and crowd regions rendered by pycocotools),
all on data generated here; a 3-class folder runs shards → cls → cam with 3-class heads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_dist.errors import DataError
from wsss_dist.registry import COCO_CLASSES, DATASETS, VOC_CLASSES

# COCO's category ids: 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 (notes §16.2)
ROOT = Path(__file__).resolve().parents[1]
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_registry_entries():
    assert DATASETS["voc"].classes == VOC_CLASSES and DATASETS["voc"].num_classes == 20
    assert DATASETS["voc"].num_labels == 21 and DATASETS["voc"].ignore == 255
    assert DATASETS["toy"].classes == VOC_CLASSES
    assert DATASETS["coco"].num_classes == 80 and DATASETS["coco"].num_labels == 81 and len(set(COCO_CLASSES)) == 80
    assert DATASETS["coco"].splits == ("train", "val") and dict(DATASETS["coco"].images) == {"train": 82081, "val": 40137}
    assert DATASETS["folder"].classes == () and DATASETS["folder"].seg_splits == ()
    assert len(COCO_IDS) == 80


def test_label_checks_follow_the_class_count():
    from wsss_dist.data.tario import decode_value
    from wsss_dist.data.voc import write_mask_png

    png = write_mask_png(None, np.array([[0, 50], [80, 255]], np.uint8))
    with pytest.raises(ValueError, match=r"0\.\.20 or 255, found \[50, 80\]"):
        decode_value("seg.png", png)  # VOC's default
    assert decode_value("seg.png", png, num_labels=81).tolist() == [[0, 50], [80, 255]]
    with pytest.raises(ValueError, match=r"0\.\.3 or 255"):
        decode_value("seg.png", png, num_labels=4)


# ---------------------------------------------------------------------------------------------------------------------
# data=folder

FOLDER_CLASSES = ("red", "green", "blue")
COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}


def make_folder(root: Path, n_train: int = 18, n_val: int = 6, size: int = 48, seed: int = 0) -> dict:
    """A 3-class folder dataset: coloured squares on grey; images, labels.csv, masks/, lists/ (val.txt only)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "lists").mkdir()
    lines, truth = ["image,labels"], {}
    for i in range(n_train + n_val):
        img = np.full((size, size + 8, 3), 128, np.uint8)
        mask = np.zeros(img.shape[:2], np.uint8)
        classes = sorted(rng.choice([1, 2, 3], size=int(rng.integers(1, 3)), replace=False).tolist())
        for c in classes:
            y, x = rng.integers(0, size - 16, 2)
            img[y:y + 16, x:x + 16] = COLOURS[c]
            mask[y:y + 16, x:x + 16] = c
        name = f"img_{i:03d}"
        if i == 1:  # one PNG image: packed re-encoded as JPEG
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            lines.append(f"{name}.png," + ",".join(FOLDER_CLASSES[c - 1] for c in classes))
        else:
            Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=95)
            lines.append(f"{name}," + ",".join(FOLDER_CLASSES[c - 1] for c in classes))
        Image.fromarray(mask, "L").save(root / "masks" / f"{name}.png")
        truth[name] = (classes, mask)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "lists" / "val.txt").write_text("\n".join(f"img_{i:03d}" for i in range(n_train, n_train + n_val)) + "\n")
    (root / "lists" / "train.txt").write_text("\n".join(f"img_{i:03d}.jpg" if i != 1 else "img_001.png"
                                                        for i in range(n_train)) + "\n")
    return truth


def test_folder_source_reads_labels_masks_and_splits(tmp_path):
    from wsss_dist.data.folder import FolderSource

    truth = make_folder(tmp_path)
    src = FolderSource(tmp_path / "images", tmp_path / "labels.csv", classes="red,green,blue",
                       masks=tmp_path / "masks", split_lists=tmp_path / "lists")
    assert src.classes == FOLDER_CLASSES
    assert src.ids("train") == [f"img_{i:03d}" for i in range(18)] == src.ids("train_aug")
    assert src.ids("val") == [f"img_{i:03d}" for i in range(18, 24)]
    for k, (classes, mask) in truth.items():
        y = np.zeros(3, np.float32)
        y[np.array(classes) - 1] = 1
        assert np.array_equal(src.labels(k), y) and np.array_equal(src.mask(k), mask)
    assert src.jpeg_bytes("img_001")[:2] == b"\xff\xd8"  # the PNG re-encoded
    # classes read from the file: sorted names
    assert FolderSource(tmp_path / "images", tmp_path / "labels.csv").classes == ("blue", "green", "red")
    # no split lists: val = the images with a mask (all of them here)
    assert FolderSource(tmp_path / "images", tmp_path / "labels.csv", masks=tmp_path / "masks").ids("val") == sorted(truth)


def test_folder_json_labels(tmp_path):
    from wsss_dist.data.folder import FolderSource

    make_folder(tmp_path, n_train=3, n_val=0)
    (tmp_path / "labels.json").write_text(json.dumps(
        {"classes": ["blue", "red", "green"], "images": {"img_000.jpg": ["red"], "img_001": ["green", "blue"],
                                                          "img_002": []}}, indent=1))
    src = FolderSource(tmp_path / "images", tmp_path / "labels.json")
    assert src.classes == ("blue", "red", "green")
    assert src.labels("img_001").tolist() == [1, 0, 1] and src.labels("img_002").tolist() == [0, 0, 0]


@pytest.mark.parametrize("text, line, match", [
    ("image,labels\nimg_000,red\nimg_001,rde\n", 3, r"unknown class 'rde'"),
    ("img_000,red\nnope.jpg,red\n", 2, r"image 'nope.jpg' not found"),
    ("img_000,red\nimg_001\n", 2, r"'img_001' has no class column"),
    ("img_000,red\nimg_000.jpg,green\n", 2, r"image 'img_000' listed twice"),
    ("img_000,red\n,green\n", 2, r"no image name"),
    ("img_000,red\n../images/img_001.jpg,red\n", 2, r"not found"),
])
def test_folder_malformed_csv_lines_are_one_line_errors(tmp_path, text, line, match):
    from wsss_dist.data.folder import FolderSource

    make_folder(tmp_path, n_train=3, n_val=0)
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError) as e:
        FolderSource(tmp_path / "images", tmp_path / "bad.csv", classes="red,green,blue")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'bad.csv'}: line {line}: ")
    assert __import__("re").search(match, msg), msg


def test_folder_every_malformed_line_is_counted_and_json_errors_name_the_line(tmp_path):
    from wsss_dist.data.folder import FolderSource

    make_folder(tmp_path, n_train=3, n_val=0)
    (tmp_path / "bad.csv").write_text("img_000,cat\nimg_001,red\nimg_002,dog\nmissing,red\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 1: unknown class 'cat'.*\(and 2 more malformed lines: 3, 4\)"):
        FolderSource(tmp_path / "images", tmp_path / "bad.csv", classes="red,green,blue")
    (tmp_path / "bad.json").write_text('{\n "img_000": ["red"],\n "img_001": ["red"]\n "img_002": []\n}')
    with pytest.raises(DataError, match=r"bad\.json: line 4: not valid JSON"):
        FolderSource(tmp_path / "images", tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{\n "img_000": ["red"],\n "img_001": "red",\n "img_002": [3]\n}')
    with pytest.raises(DataError, match=r"bad\.json: line 4: 'img_002': expected a list of class names"):
        FolderSource(tmp_path / "images", tmp_path / "bad.json")
    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "val.txt").write_text("img_000\nimg_009\n")
    with pytest.raises(DataError, match=r"val\.txt: line 2: 'img_009' is not an image of the labels file"):
        FolderSource(tmp_path / "images", tmp_path / "labels.csv", split_lists=tmp_path / "lists").ids("val")
    Image.fromarray(np.full((48, 56), 7, np.uint8), "L").save(tmp_path / "masks" / "img_000.png")
    with pytest.raises(DataError, match=r"img_000\.png: mask values must be 0\.\.3 .* found \[7\]"):
        FolderSource(tmp_path / "images", tmp_path / "labels.csv", classes="red,green,blue",
                     masks=tmp_path / "masks").mask("img_000")


def test_folder_data_is_a_config_error_without_root_and_labels():
    from wsss_dist.config import make_config
    from wsss_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="data=folder needs data.root"):
        make_config(["data=folder", "stage=shards"])
    with pytest.raises(ConfigError, match="cls.split=train_aug: data=coco has the splits train, val"):
        make_config(["data=coco", "stage=cls", "cls.split=train_aug"])


FAST = ["data.num_workers=0", "data.shard_size=8", "model.backbone=resnet18", "cls.train.steps=4",
        "cls.train.batch_size=4", "cls.train.crop=32", "cls.train.resize_long=[32,48]", "cam.scales=[1.0]"]


def test_a_3_class_folder_runs_shards_cls_cam_with_3_class_heads(tmp_path):
    from wsss_dist import pipeline, runs
    from wsss_dist.config import make_config
    from wsss_dist.data.shards import load_manifest, read_shard, split_urls
    from wsss_dist.models.build import load_model

    truth = make_folder(tmp_path / "data")
    d = tmp_path / "data"
    words = ["data=folder", f"data.root={d / 'images'}", f"data.labels={d / 'labels.csv'}", f"data.masks={d / 'masks'}",
             f"data.split_lists={d / 'lists'}", "data.classes=red,green,blue",  # the masks' order
             f"data.shards_dir={tmp_path / 'shards'}", f"run={tmp_path / 'run'}", *FAST]
    pipeline.run(make_config(words + ["stage=shards,cls,cam"]))
    manifest = load_manifest(tmp_path / "shards")
    assert manifest["classes"] == ["red", "green", "blue"]
    # the shards hold exactly the generated labels and masks, in the manifest's class order
    for split, ids in (("train", [f"img_{i:03d}" for i in range(18)]), ("val", [f"img_{i:03d}" for i in range(18, 24)])):
        got = {s["__key__"]: s for u in split_urls(tmp_path / "shards", split) for s in read_shard(u, ("cls.npy", "seg.png"), num_labels=4)}
        assert sorted(got) == ids
        for k, s in got.items():
            classes, mask = truth[k]
            assert np.array_equal(s["seg.png"], mask)
            assert s["cls.npy"].tolist() == [float(c in classes) for c in (1, 2, 3)]
    cls = load_model(tmp_path / "run" / "cls")
    assert cls.num_classes == 3 and cls.classifier.weight.shape[0] == 3
    assert runs.read_json(tmp_path / "run" / "cls" / "model.json")["num_classes"] == 3
    cam = runs.read_json(tmp_path / "run" / "cam" / "DONE")
    metrics = cam.get("metrics", cam)
    assert len(metrics["iou"]) == 4 and np.array(metrics["confusion"]).shape == (4, 4)


# ---------------------------------------------------------------------------------------------------------------------
# data=coco

def _poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco(root: Path) -> dict:
    """A tiny COCO-2014 layout: per split a few JPEGs and an instances JSON with polygons, compressed and
    uncompressed RLE, a crowd region, an image without annotations and non-contiguous category ids."""
    from pycocotools import mask as mask_utils

    (root / "annotations").mkdir(parents=True)
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, COCO_CLASSES)]
    H, W = 40, 48
    out = {}
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for n in range(3):
            image_id = 100 * (split == "val") + n + 1
            name = f"COCO_{split}2014_{image_id:012d}"
            Image.fromarray(np.full((H, W, 3), 60 * n, np.uint8)).save(root / f"{split}2014" / f"{name}.jpg")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": H, "width": W})
            if n == 2:
                continue  # no annotation: dropped
            # person (id 1 → 1) polygon; dog (id 18 → 17) compressed RLE; toothbrush (id 90 → 80) uncompressed RLE
            m_dog = np.zeros((H, W), np.uint8, order="F")
            m_dog[10:30, 20:40] = 1
            rle = mask_utils.encode(np.asfortranarray(m_dog))
            rle["counts"] = rle["counts"].decode("ascii")
            m_tb = np.zeros((H, W), np.uint8)
            m_tb[0:4, 0:6] = 1
            flat = m_tb.flatten(order="F")
            counts, cur, run = [], 0, 0
            for v in flat:
                if v != cur:
                    counts.append(run)
                    cur, run = v, 0
                run += 1
            counts.append(run)
            anns += [
                {"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                 "segmentation": _poly(2, 2, 22, 22), "area": 400.0, "bbox": [2, 2, 20, 20]},
                {"id": len(anns) + 2, "image_id": image_id, "category_id": 18, "iscrowd": 0,
                 "segmentation": rle, "area": 400.0, "bbox": [20, 10, 20, 20]},
                {"id": len(anns) + 3, "image_id": image_id, "category_id": 90, "iscrowd": 0,
                 "segmentation": {"size": [H, W], "counts": [int(c) for c in counts]}, "area": 24.0,
                 "bbox": [0, 0, 6, 4]},
            ]
            if n == 1:  # a crowd of airplanes (id 5) in the lower band, partly under the dog
                m_crowd = np.zeros((H, W), np.uint8)
                m_crowd[32:40, 10:48] = 1
                m_crowd[25:32, 30:48] = 1
                crowd = mask_utils.encode(np.asfortranarray(m_crowd))
                crowd["counts"] = crowd["counts"].decode("ascii")
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 5, "iscrowd": 1,
                             "segmentation": crowd, "area": float(m_crowd.sum()), "bbox": [10, 25, 38, 15]})
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
        out[split] = [im["file_name"][:-4] for im in images]
    return out


def expected_coco_mask(with_crowd: bool, crowd: str) -> np.ndarray:
    """The hand-computed mask of the generated images (see make_coco)."""
    H, W = 40, 48
    m = np.zeros((H, W), np.uint8)
    crowd_px = np.zeros((H, W), bool)
    crowd_px[32:40, 10:48] = True
    crowd_px[25:32, 30:48] = True
    if with_crowd and crowd == "ignore":
        m[crowd_px] = 255
    m[2:22, 2:22] = 1  # person: the polygon (2,2)-(22,22), pixels 2..21 (test_coco_polygon_rendering)
    m[10:30, 20:40] = 17  # dog: over the person (annotation order)
    m[0:4, 0:6] = 80  # toothbrush, last
    if with_crowd and crowd == "class":
        m[crowd_px] = 5  # airplane (id 5 → 5) painted last, like any object
    return m


@pytest.mark.parametrize("crowd", ["ignore", "background", "class"])
def test_coco_masks_match_hand_computed_expectations(tmp_path, crowd):
    from wsss_dist.data.coco import COCOSource

    pytest.importorskip("pycocotools")
    make_coco(tmp_path)
    src = COCOSource(tmp_path, crowd=crowd)
    ids = src.ids("train")
    assert ids == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]  # the unannotated one dropped
    assert np.array_equal(src.mask(ids[0]), expected_coco_mask(False, crowd))
    assert np.array_equal(src.mask(ids[1]), expected_coco_mask(True, crowd))
    y = src.labels(ids[1])
    assert np.flatnonzero(y).tolist() == [0, 4, 16, 79]  # person, airplane (the crowd), dog, toothbrush
    assert np.flatnonzero(src.labels(ids[0])).tolist() == [0, 16, 79]


def test_coco_polygon_rendering(tmp_path):
    """pycocotools fills the polygon (2,2)-(22,22) as pixels 2..21 of each axis: the rectangle, no more."""
    pytest.importorskip("pycocotools")
    from wsss_dist.data.coco import annotation_mask

    m = annotation_mask(_poly(2, 2, 22, 22), 40, 48)
    want = np.zeros((40, 48), np.uint8)
    want[2:22, 2:22] = 1
    assert m.dtype == np.uint8 and np.array_equal(m, want)


def test_coco_shards_hold_the_rendered_truth_and_categories_are_checked(tmp_path):
    pytest.importorskip("pycocotools")
    from wsss_dist import pipeline
    from wsss_dist.config import make_config
    from wsss_dist.data.coco import COCOSource
    from wsss_dist.data.shards import load_manifest, read_shard, split_urls

    ids = make_coco(tmp_path / "coco")
    pipeline.run(make_config(["data=coco", f"data.coco_root={tmp_path / 'coco'}", f"data.shards_dir={tmp_path / 'sh'}",
                              f"run={tmp_path / 'run'}", "stage=shards"]))
    m = load_manifest(tmp_path / "sh")
    assert list(m["splits"]) == ["train", "val"] and len(m["classes"]) == 80 and m["data"]["data.coco_crowd"] == "ignore"
    src = COCOSource(tmp_path / "coco")
    for split in ("train", "val"):
        got = {s["__key__"]: s for u in split_urls(tmp_path / "sh", split)
               for s in read_shard(u, ("cls.npy", "seg.png"), num_labels=81)}
        assert sorted(got) == ids[split][:2]
        for k, s in got.items():
            assert np.array_equal(s["seg.png"], src.mask(k)) and np.array_equal(s["cls.npy"], src.labels(k))
        assert m["splits"][split]["class_hist"][16] == 2  # dog in both images
    # a JSON whose categories are not COCO's 80 is refused, naming the file
    p = tmp_path / "coco" / "annotations" / "instances_val2014.json"
    data = json.loads(p.read_text())
    data["categories"][3]["name"] = "moped"
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_val2014\.json: its categories in id order are not COCO's 80 \('moped'"):
        COCOSource(tmp_path / "coco").ids("val")


# ---------------------------------------------------------------------------------------------------------------------
# the whole chain on each layout

CHAIN = [*FAST, "cls.train.steps=6", "aff.train.steps=3", "aff.train.batch_size=4", "aff.train.crop=48",
         "aff.train.resize_long=[40,56]", "aff.radius=3", "pseudo.radius=3", "pseudo.logt=2", "seg.train.steps=3",
         "seg.train.batch_size=4", "seg.train.crop=48", "seg.eval_scales=[1.0]"]


def make_coco_chain(root: Path, n: int = 10, seed: int = 0) -> None:
    """A COCO-2014 layout of ``n`` images per split (+ one unannotated), each with 1-2 polygon objects of 3
    categories whose ids are not contiguous (person 1, dog 18, toothbrush 90) and a crowd region on some."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": i, "name": nm} for i, nm in zip(COCO_IDS, COCO_CLASSES)]
    colour = {1: (200, 40, 40), 18: (40, 180, 40), 90: (40, 40, 200)}
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for i in range(n + 1):
            name = f"COCO_{split}2014_{i + 1:012d}"
            img = np.full((48, 56, 3), 120, np.uint8)
            images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": 48, "width": 56})
            if i < n:
                for cat in rng.choice([1, 18, 90], size=int(rng.integers(1, 3)), replace=False):
                    y, x = (int(v) for v in rng.integers(0, 30, 2))
                    img[y:y + 16, x:x + 16] = colour[int(cat)]
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cat), "iscrowd": 0,
                                 "segmentation": _poly(x, y, x + 16, y + 16), "area": 256.0, "bbox": [x, y, 16, 16]})
                if i % 3 == 0:
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                                 "segmentation": _poly(0, 44, 56, 48), "area": 224.0, "bbox": [0, 44, 56, 4]})
            Image.fromarray(img).save(root / f"{split}2014" / f"{name}.jpg", quality=95)
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "coco"])
def test_the_whole_chain_runs_on_each_layout_to_a_val_miou(tmp_path, layout):
    """``python launch/submit.py stage=all data=folder|coco ...`` (local jobs) on generated data in the folder and
    COCO layouts: heads of the data's class count, a val mIoU, and the report's per-class tables in the data's class
    names."""
    if layout == "coco":
        pytest.importorskip("pycocotools")
    from wsss_dist import runs

    d = tmp_path / "data"
    if layout == "folder":
        make_folder(d)
        words = ["data=folder", f"data.root={d / 'images'}", f"data.labels={d / 'labels.csv'}",
                 f"data.masks={d / 'masks'}", f"data.split_lists={d / 'lists'}", "data.classes=red,green,blue"]
        names, labels = ["red", "green", "blue"], 4
    else:
        make_coco_chain(d)
        words = ["data=coco", f"data.coco_root={d}", "model.weights=none", "seg.weights=none",
                 "seg.backbone=resnet18", "seg.frozen_bn=false", "model.frozen_bn=false", "aff.stride=4",
                 "slurm.gpus_per_node=0"]  # the coco preset's stages ask for a GPU each
        names, labels = ["person", "dog", "toothbrush"], 81
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "cluster=local", *words, *CHAIN, "stage=all",
                        f"data.shards_dir={tmp_path / 'shards'}", f"run={tmp_path / 'run'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.strip().splitlines()[-1].startswith("results: CAM "), r.stdout[-2000:]
    done = runs.read_json(tmp_path / "run" / "eval" / "DONE")
    ev = done.get("metrics", done)
    assert isinstance(ev["miou"], float) and len(ev["iou"]) == labels
    assert runs.read_json(tmp_path / "run" / "seg" / "model.json")["num_classes"] == labels
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    if layout == "folder":  # one column per class
        header = next(ln for ln in report.splitlines() if ln.startswith("| method | split | bg |"))
        assert all(f" {n} " in header for n in names) and header.count("|") == labels + 3
    else:  # 81 labels: one row per class
        table = report.split("## DeepLab per-class IoU (val)")[1].split("\n## ")[0]
        assert table.count("\n| ") == labels + 1 and all(f"\n| {n} |" in table for n in names)


def test_per_class_tables_stay_readable_at_coco_s_class_count():
    """Up to VOC's 21 labels a column per class (as before); COCO's 81: a row per class, best first."""
    from wsss_dist.stages.report import per_class_table

    rows = [{"method": "cam", "split": "train", "iou_eval": [0.5, 0.1, None, 0.9]},
            {"method": "fmix", "split": "train", "iou_eval": None}]
    h, t = per_class_table(rows, "eval", ("a", "b", "c"))
    assert h == ["method", "split", "bg", "a", "b", "c"] and t[0] == ["cam", "train", "50.0", "10.0", "–", "90.0"]
    assert t[1] == ["fmix", "train", "–", "–", "–", "–"]
    iou = [i / 100 for i in range(81)]
    rows[0]["iou_eval"] = iou
    h, t = per_class_table(rows, "eval", COCO_CLASSES)
    assert h == ["class", "cam (train)", "fmix (train)"] and len(t) == 81
    assert t[0] == ["toothbrush", "80.0", "–"] and t[-1] == ["bg", "0.0", "–"]


def test_parallel_packing_writes_the_same_shards(tmp_path):
    """data.pack_workers=2 packs in 2 spawn processes: the same tar bytes and the same manifest as 1 process; the
    folder dataset's class names recorded."""
    from wsss_dist.data.folder import FolderSource
    from wsss_dist.data.shards import PROGRESS, update_shards

    make_folder(tmp_path / "d")
    src = FolderSource(tmp_path / "d" / "images", tmp_path / "d" / "labels.csv", classes="red,green,blue",
                       masks=tmp_path / "d" / "masks")
    one = update_shards(src, tmp_path / "one", splits=src.splits, shard_size=4, progress=False).manifest
    two = update_shards(src, tmp_path / "two", splits=src.splits, shard_size=4, progress=False, workers=2).manifest
    assert one == two and len(one["splits"]["train"]["shards"]) == 6 and one["classes"] == ["red", "green", "blue"]
    tars = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    assert len(tars) == sum(len(info["shards"]) for info in one["splits"].values())
    assert all((tmp_path / "one" / t).read_bytes() == (tmp_path / "two" / t).read_bytes() for t in tars)
    assert not (tmp_path / "two" / PROGRESS).exists() and not list((tmp_path / "two").glob(".*tmp*"))


def test_failed_packing_names_the_shard_and_a_rerun_packs_only_the_rest(tmp_path, caplog, monkeypatch):
    """A broken image stops a 2-process build in one DataError naming its shard, no half tar left; a build stopped
    by Ctrl-C keeps what it packed (progress journal) and the rerun packs only the other shards, ending as a clean
    build."""
    from wsss_dist.data import packing
    from wsss_dist.data.folder import FolderSource
    from wsss_dist.data.shards import PROGRESS, update_shards

    make_folder(tmp_path / "d")
    src = FolderSource(tmp_path / "d" / "images", tmp_path / "d" / "labels.csv", classes="red,green,blue",
                       masks=tmp_path / "d" / "masks")
    clean = update_shards(src, tmp_path / "clean", splits=src.splits, shard_size=4, progress=False).manifest
    jpg = src.jpeg_path(src.ids("train")[13])  # in shard train-000003
    good = jpg.read_bytes()
    jpg.write_bytes(good[: len(good) // 2])
    out = tmp_path / "s"
    with pytest.raises(DataError) as err:
        update_shards(src, out, splits=src.splits, shard_size=4, progress=False, workers=2)
    msg = str(err.value)
    assert "\n" not in msg and f"{out / 'train-000003.tar'}: not packed" in msg and jpg.name in msg
    assert not (out / "manifest.json").exists() and not (out / "train-000003.tar").exists()
    assert not list(out.glob(".*.tar.tmp-*"))
    jpg.write_bytes(good)

    src = FolderSource(tmp_path / "d" / "images", tmp_path / "d" / "labels.csv", classes="red,green,blue",
                       masks=tmp_path / "d" / "masks")
    pack_one = packing._pack_one

    def interrupted(source, split, index, *a):
        if (split, index) == ("train", 3):
            raise KeyboardInterrupt
        return pack_one(source, split, index, *a)

    monkeypatch.setattr(packing, "_pack_one", interrupted)
    out = tmp_path / "t"
    with pytest.raises(KeyboardInterrupt):
        update_shards(src, out, splits=src.splits, shard_size=4, progress=False)
    monkeypatch.setattr(packing, "_pack_one", pack_one)
    kept = json.loads((out / PROGRESS).read_text())["shards"] if (out / PROGRESS).exists() else {}
    assert sorted(kept) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stamps = {n: (out / n).stat().st_mtime_ns for n in kept}
    caplog.set_level("INFO", logger="wsss_dist.data.shards")
    report = update_shards(src, out, splits=src.splits, shard_size=4, progress=False, workers=2)
    assert "3 shards already packed by an interrupted build (verified); packing the other 15" in caplog.text
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == stamps  # not rewritten
    assert not (out / PROGRESS).exists()
    assert {k: v for k, v in report.manifest.items() if k != "fingerprint"} == {
        k: v for k, v in clean.items() if k != "fingerprint"}  # the fixed image's mtime is in the fingerprint


@pytest.mark.slow
def test_sigterm_stops_the_packing_processes_and_the_rerun_finishes(tmp_path):
    """SIGTERM to a stage packing with 2 processes: it ends (no orphan packer, no half or temporary tar); the rerun
    keeps the recorded shards and ends with the manifest and tars of an uninterrupted build."""
    import os
    import signal
    import time

    from wsss_dist.data.folder import FolderSource
    from wsss_dist.data.shards import PROGRESS, update_shards

    make_folder(tmp_path / "d", n_train=150, n_val=8)
    args = (tmp_path / "d" / "images", tmp_path / "d" / "labels.csv")
    kw = dict(classes="red,green,blue", masks=tmp_path / "d" / "masks")
    out = tmp_path / "s"
    code = ("import sys\nfrom wsss_dist.data.folder import FolderSource\nfrom wsss_dist.data.shards import update_shards\n"
            "if __name__ == '__main__':\n"
            f"    src = FolderSource({str(args[0])!r}, {str(args[1])!r}, classes='red,green,blue', masks={str(kw['masks'])!r})\n"
            f"    update_shards(src, {str(out)!r}, splits=src.splits, shard_size=1, progress=False, workers=2)\n")
    (tmp_path / "pack.py").write_text(code)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pack.py")], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.tar"))) < 5 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0 and "KeyboardInterrupt: signal 15" in text
    assert not list(out.glob(".*.tar.tmp-*")) and not (out / "manifest.json").exists()
    kept = json.loads((out / PROGRESS).read_text())["shards"] if (out / PROGRESS).exists() else {}
    src = FolderSource(*args, **kw)
    report = update_shards(src, out, splits=src.splits, shard_size=1, progress=False, workers=2)
    clean = update_shards(src, tmp_path / "clean", splits=src.splits, shard_size=1, progress=False).manifest
    assert report.manifest == clean and not (set(report.rebuilt) & set(kept))
    assert len(kept) + len(report.rebuilt) == sum(len(i["shards"]) for i in clean["splits"].values())
    assert all((out / n).read_bytes() == (tmp_path / "clean" / n).read_bytes() for n in clean["splits"]["val"]["shards"])


def test_coco_pre_rendered_masks_are_packed_instead(tmp_path):
    """data.coco_masks: <split>2014/<name>.png (or <name>.png) are read instead of rendering; raw category ids
    (values above 80) are refused naming the file."""
    pytest.importorskip("pycocotools")
    from wsss_dist.data.coco import COCOSource
    from wsss_dist.data.voc import write_mask_png

    make_coco(tmp_path / "coco")
    rendered = COCOSource(tmp_path / "coco")
    (tmp_path / "m" / "train2014").mkdir(parents=True)
    ids = rendered.ids("train")
    write_mask_png(tmp_path / "m" / "train2014" / f"{ids[0]}.png", rendered.mask(ids[0]))
    odd = rendered.mask(ids[1])
    odd[odd == 17] = 3
    write_mask_png(tmp_path / "m" / f"{ids[1]}.png", odd)
    src = COCOSource(tmp_path / "coco", masks=tmp_path / "m")
    assert np.array_equal(src.mask(ids[0]), rendered.mask(ids[0])) and np.array_equal(src.mask(ids[1]), odd)
    bad = odd.copy()
    bad[0, 0] = 90
    write_mask_png(tmp_path / "m" / f"{ids[1]}.png", bad)
    with pytest.raises(DataError, match=rf"{ids[1]}\.png: mask values must be 0\.\.80 or 255, found \[90\]"):
        src.mask(ids[1])
    with pytest.raises(DataError, match=r"mask not found in data\.coco_masks"):
        COCOSource(tmp_path / "coco", masks=tmp_path / "m").mask(rendered.ids("val")[0])


@pytest.mark.slow
def test_local_coco_without_the_gpus_its_stages_ask_for_fails_before_any_job(tmp_path):
    """data=coco's stages ask for a GPU each: on a machine without one, a local chain stops in one line before any
    job (naming slurm.gpus_per_node=0), instead of a job failing after the shards were packed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    pytest.importorskip("pycocotools")
    make_coco_chain(tmp_path / "data")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "cluster=local", "data=coco",
                        f"data.coco_root={tmp_path / 'data'}", "model.weights=none", "seg.weights=none",
                        f"data.shards_dir={tmp_path / 'shards'}", f"run={tmp_path / 'run'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage ") and "slurm.gpus_per_node=0" in last, last
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "shards").exists()  # no job ran


def test_figures_use_the_registry_palette_and_the_folder_class_names(monkeypatch):
    """The report's grids colour labels in the dataset's registry palette (distinct for every label 0..255) and their
    legend names a folder dataset's own classes; at COCO's 81 labels it lists only the labels the grid shows."""
    from wsss_dist import viz
    from wsss_dist.stages import report

    colours = viz.palette("folder")
    assert len({tuple(c) for c in colours.tolist()}) == 256 and DATASETS["folder"].palette == "voc"
    entries = viz.legend_entries(FOLDER_CLASSES, colours)
    assert [(i, n) for i, n, _ in entries] == [(0, "background"), *((i + 1, n) for i, n in enumerate(FOLDER_CLASSES))]
    assert [rgb for *_, rgb in entries] == [tuple(colours[i].tolist()) for i in range(len(entries))]
    coco = viz.legend_entries(COCO_CLASSES, viz.palette("coco"), present={0, 17, 80, 255})
    assert [(i, n) for i, n, _ in coco] == [(0, "background"), (17, "dog"), (80, "toothbrush")]
    assert len(viz.legend_entries(VOC_CLASSES, viz.palette("voc"), present={0})) == 21  # VOC: always all 21
    label = np.array([[0, 1], [2, 3]], np.uint8)
    assert np.array_equal(viz.colorize(label, colours), colours[label])

    seen = {}

    def keep(fig):
        seen["legend"] = [(t.get_text(), tuple(h.get_facecolor()[:3])) for t, h in
                          zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)]
        return b"png"

    monkeypatch.setattr(report, "_png", keep)
    report.grid_figure([[viz.colorize(label, colours)]], ["ground truth"], FOLDER_CLASSES, colours, {0, 1, 2, 3})
    assert [n for n, _ in seen["legend"]] == ["background", *FOLDER_CLASSES]
    assert np.allclose([c for _, c in seen["legend"]], colours[: len(FOLDER_CLASSES) + 1] / 255)
    report.grid_figure([[viz.colorize(label, colours)]], ["gt"], COCO_CLASSES, viz.palette("coco"), {0, 1, 2, 3})
    assert [n for n, _ in seen["legend"]] == ["background", *COCO_CLASSES[:3]]
