"""Benchmark: the class-count-dependent steps at VOC's 21 labels and COCO's 81, images with 2-4 classes.

    python -m bench.num_classes [--images 500] [--sweep-images 40] [--walks 10] [--repeats 3] [--json PATH]

* ``confusion_matrix`` over --images masks of 500×375 (ground truth and predictions: background + 2-4 classes
  per image drawn from the dataset's classes, ~5 % pixels 255), against the references' numpy ``bincount`` loop at
  the same class count;
* ``sweep_confusion`` (the CAM stage's 12-threshold mIoU sweep) of 3 CAMs per image, --sweep-images images;
* ``affinity_labels`` (threshold and psa modes) and ``propagate_labels`` (the random walk) of 3 classes on a 448-px
  image (56×56 grid at stride 8, D = 448): they see only the image's classes, so 21 or 81 labels only change the
  class ids.
Each figure is the best of --repeats interleaved passes; results are checked equal to the baseline. The figures go
to ``bench/out/num_classes.json`` (or ``--json PATH``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import common
from wsss_dist.methods.affinity import affinity_labels
from wsss_dist.methods.random_walk import propagate_labels
from wsss_dist.metrics import confusion_matrix, sweep_confusion

LABELS = {"voc": 21, "coco": 81}


def masks(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, ground truth) uint8 [n, 375, 500]: each image background + 2-4 of the c - 1 classes in blocks."""
    rng = np.random.default_rng(seed)
    gts = np.zeros((n, 375, 500), np.uint8)
    preds = np.zeros_like(gts)
    for i in range(n):
        ks = rng.choice(np.arange(1, c), size=int(rng.integers(2, 5)), replace=False)
        for m in (gts[i], preds[i]):
            for k in ks:
                y, x = rng.integers(0, 300), rng.integers(0, 400)
                m[y:y + int(rng.integers(40, 160)), x:x + int(rng.integers(40, 200))] = k
    gts[rng.random(gts.shape, dtype=np.float32) < 0.05] = 255
    return preds, gts


def numpy_loop(preds: np.ndarray, gts: np.ndarray, c: int) -> np.ndarray:
    """The references' per-image ``fast_hist``."""
    cm = np.zeros((c, c), np.int64)
    for p, g in zip(preds, gts):
        keep = g < c
        cm += np.bincount(c * g[keep].astype(np.int64) + p[keep], minlength=c * c).reshape(c, c)
    return cm


def ours(preds: np.ndarray, gts: np.ndarray, c: int) -> np.ndarray:
    """``confusion_matrix`` per image, summed."""
    cm = np.zeros((c, c), np.int64)
    for p, g in zip(preds, gts):
        cm += np.asarray(confusion_matrix(p, g, num_classes=c))
    return cm


def main() -> None:
    """Time every step at 21 and 81 labels."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--sweep-images", type=int, default=40)
    p.add_argument("--walks", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    fig = common.Figures("num_classes", args.json, **vars(args))
    fig.say(f"torch {torch.__version__}, numpy {np.__version__}, 2 threads, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"load average {common.load_text()}")
    rows = fig.put("steps", {})
    data = {name: masks(args.images, c, seed=1) for name, c in LABELS.items()}
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(args.sweep_images, 3, 375, 500, generator=g)
    feats = torch.randn(448, 56, 56, generator=g)
    walk_cams = torch.rand(3, 448, 448, generator=g)
    small = torch.rand(3, 56, 56, generator=g)
    ths = [0.05 * i for i in range(1, 13)]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, c in LABELS.items():
            preds, gts = data[name]
            t0 = time.perf_counter()
            ref = numpy_loop(preds, gts, c)
            best[f"numpy bincount loop, {c} labels"] = min(best.get(f"numpy bincount loop, {c} labels", 1e9),
                                                             time.perf_counter() - t0)
            t0 = time.perf_counter()
            cm = ours(preds, gts, c)
            key = f"confusion_matrix, {c} labels"
            best[key] = min(best.get(key, 1e9), time.perf_counter() - t0)
            assert np.array_equal(cm, ref), key
            classes = torch.tensor(sorted(np.random.default_rng(2).choice(np.arange(1, c), 3, replace=False)))
            t0 = time.perf_counter()
            for i in range(args.sweep_images):
                sweep_confusion(cams[i], classes, gts[i], ths, num_classes=c)
            key = f"sweep_confusion (12 thresholds), {c} labels"
            best[key] = min(best.get(key, 1e9), time.perf_counter() - t0)
            t0 = time.perf_counter()
            for mode in ("threshold", "psa"):
                affinity_labels(small, classes, mode=mode)
            key = f"affinity_labels (both modes, 56x56), {c} labels"
            best[key] = min(best.get(key, 1e9), time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _w in range(args.walks):
                label = propagate_labels(walk_cams, classes, feats)
            key = f"propagate_labels x{args.walks} (448 px, 3 classes), {c} labels"
            best[key] = min(best.get(key, 1e9), time.perf_counter() - t0)
            assert set(label.unique().tolist()) <= {0, *classes.tolist()}
    for key, t in best.items():
        rows[key] = {"best_s": t}
        fig.say(f"  {key:58s}: {t:.3f} s")
    fig.say(f"load average at the end: {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    main()
