"""Benchmark: the shards stage packing a COCO-2014-layout set with 1 and with 2 packing processes (data.pack_workers).

    python -m bench.pack_coco [--images 300] [--val 60] [--shard-size 50] [--repeats 2] [--workdir DIR] [--json PATH]

Generates, in COCO's official layout (``train2014/``, ``val2014/`` JPEGs, ``annotations/instances_{train,val}2014.json``
with COCO's 80 non-contiguous category ids), --images train and --val val images of 640×480 (COCO's typical size),
each with 2-6 polygon instances of random categories and every fifth one an RLE crowd region, JPEG quality 90
(~COCO's bytes per image). Then packs them with :func:`wsss_dist.data.shards.update_shards` (JPEG check, mask
rendering by pycocotools, PNG encoding, tar, sha256) into a fresh folder per run, 1 and 2 workers interleaved
--repeats times; the two sets of tars must be byte-identical. Prints images/s per worker count (median of the
repeats) and the projected time for COCO's 82,081 + 40,137 images; figures to ``bench/out/pack_coco.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import common
from wsss_dist.registry import COCO_CLASSES

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 category ids
COCO_IMAGES = 82_081 + 40_137  # the WSSS references' train + val (images with annotations)
H, W = 480, 640


def _polygon(rng: np.random.Generator) -> list[float]:
    """A random star-shaped polygon (8-16 vertices) inside the image, as COCO's flat [x1, y1, x2, y2, ...]."""
    cx, cy = rng.uniform(80, W - 80), rng.uniform(60, H - 60)
    n = int(rng.integers(8, 17))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(20, 140, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, W - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, H - 1)
    return np.stack([xs, ys], 1).round(2).ravel().tolist()


def generate(root: Path, n_train: int, n_val: int, seed: int = 0) -> None:
    """A COCO-2014 layout of ``n_train`` + ``n_val`` 640×480 images with polygon instances and RLE crowds."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, COCO_CLASSES)]
    yy, xx = np.mgrid[0:H, 0:W]
    ann_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2014").mkdir(exist_ok=True)
        images, anns = [], []
        for k in range(n):
            image_id = (1_000_000 if split == "val" else 0) + k + 1
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            base = rng.integers(0, 255, 3)
            img = (base + 60 * np.sin(xx / rng.uniform(20, 90))[..., None] + 40 * np.cos(yy / rng.uniform(20, 90))[
                ..., None] + rng.normal(0, 18, (H, W, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"{split}2014" / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": H, "width": W})
            for _ in range(int(rng.integers(2, 7))):
                poly = _polygon(rng)
                anns.append({"id": ann_id, "image_id": image_id, "category_id": int(rng.choice(COCO_IDS)),
                             "segmentation": [poly], "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1]})
                ann_id += 1
            if k % 5 == 0:
                m = np.zeros((H, W), np.uint8, order="F")
                y, x = rng.integers(0, H - 120), rng.integers(0, W - 160)
                m[y:y + 120, x:x + 160] = 1
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": rle,
                             "iscrowd": 1, "area": 1.0, "bbox": [0, 0, 1, 1]})
                ann_id += 1
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))


def main() -> None:
    """Generate the set, pack it with 1 and 2 processes interleaved, print and save images/s."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from wsss_dist.data.coco import COCOSource
    from wsss_dist.data.shards import update_shards

    fig = common.Figures("pack_coco", args.json, images=args.images, val=args.val, shard_size=args.shard_size,
                         repeats=args.repeats)
    with common.work_dir(args.workdir, "pack_coco") as work:
        t0 = time.perf_counter()
        if not (work / "coco" / "annotations" / "instances_val2014.json").is_file():
            generate(work / "coco", args.images, args.val)
        total = args.images + args.val
        fig.say(f"COCO layout: {args.images} + {args.val} images of {W}x{H} in {work / 'coco'} "
                f"({time.perf_counter() - t0:.1f} s); load average {common.load_text()}")

        def pack(workers: int) -> float:
            out = work / f"shards-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            source = COCOSource(work / "coco")
            t = time.perf_counter()
            update_shards(source, out, splits=source.splits, shard_size=args.shard_size, progress=False,
                          workers=workers)
            return time.perf_counter() - t

        times, loads = common.interleaved({"1": lambda: pack(1), "2": lambda: pack(2)}, args.repeats)
        tars = sorted(p.name for p in (work / "shards-1").glob("*.tar"))
        same = tars == sorted(p.name for p in (work / "shards-2").glob("*.tar")) and all(
            (work / "shards-1" / t).read_bytes() == (work / "shards-2" / t).read_bytes() for t in tars)
        assert same, "1 and 2 workers wrote different shards"
        fig.say(f"{'workers':>7s}  {'seconds (median, min-max)':>30s}  {'images/s':>8s}  "
                f"{'COCO 122,218 images':>20s}")
        for w, ts in times.items():
            rate = total / common.median(ts)
            hours = COCO_IMAGES / rate / 3600
            fig.put(f"workers_{w}", {"seconds": ts, "images_per_s": rate, "coco_hours": hours})
            fig.say(f"{w:>7s}  {common.fmt_times(ts):>30s}  {rate:8.1f}  {hours:17.2f} h")
        fig.put("byte_identical", same)
        fig.put("load_1min_after_each", loads)
        fig.say(f"{len(tars)} tars byte-identical for 1 and 2 workers; load average at the end: {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    main()
