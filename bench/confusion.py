"""Benchmark: confusion matrix over 1449 masks of 500×375 (VOC val size); prints times.

    python bench/confusion.py [--images 1449] [--repeats 3]

Compares, on the same random uint8 masks (21 classes, ~5 % ignore label 255):
  * wsss_dist.metrics.confusion_matrix called per image (numpy arrays and CPU tensors),
  * the usual per-image numpy loop (psa/irn/deeplab ``fast_hist``):
    keep = gt < C; np.bincount(C * gt[keep] + pred[keep], minlength=C*C),
  * the same loop with torch.bincount.
Each figure is the best of --repeats passes over all images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from wsss_dist.metrics import confusion_matrix

C = 21


def numpy_loop(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Per-image masked np.bincount (the reference implementations' fast_hist)."""
    cm = np.zeros((C, C), np.int64)
    for pred, gt in zip(preds, gts):
        keep = gt < C
        cm += np.bincount(C * gt[keep].astype(np.int64) + pred[keep], minlength=C * C).reshape(C, C)
    return cm


def torch_loop(preds: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
    """Per-image masked torch.bincount."""
    cm = torch.zeros(C, C, dtype=torch.int64)
    for pred, gt in zip(preds, gts):
        keep = gt < C
        cm += torch.bincount(C * gt[keep].long() + pred[keep].long(), minlength=C * C).reshape(C, C)
    return cm


def ours(preds, gts) -> torch.Tensor:
    """wsss_dist.metrics.confusion_matrix per image, summed."""
    cm = torch.zeros(C, C, dtype=torch.int64)
    for pred, gt in zip(preds, gts):
        cm += confusion_matrix(pred, gt, num_classes=C)
    return cm


def best_of(fn, repeats: int, *args) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls and the last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    """Build the masks, time every variant, check they agree."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1449)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    shape = (args.images, 375, 500)
    gts = rng.integers(0, C, size=shape, dtype=np.uint8)
    gts[rng.random(shape, dtype=np.float32) < 0.05] = 255
    preds = rng.integers(0, C, size=shape, dtype=np.uint8)
    print(f"{args.images} masks of 500x375, torch {torch.__version__}, numpy {np.__version__}, "
          f"2 threads, {time.strftime('%Y-%m-%d')}")
    t_np, ref = best_of(numpy_loop, args.repeats, preds, gts)
    t_ours, cm = best_of(ours, args.repeats, preds, gts)
    t_ours_t, cm_t = best_of(ours, args.repeats, torch.from_numpy(preds), torch.from_numpy(gts))
    t_torch, cm_tb = best_of(torch_loop, 1, torch.from_numpy(preds), torch.from_numpy(gts))
    assert np.array_equal(cm.numpy(), ref) and torch.equal(cm, cm_t) and torch.equal(cm, cm_tb)
    print(f"  numpy bincount loop (baseline)      : {t_np:.2f} s")
    print(f"  confusion_matrix, numpy inputs      : {t_ours:.2f} s ({t_ours / t_np:.2f}x baseline)")
    print(f"  confusion_matrix, CPU tensor inputs : {t_ours_t:.2f} s ({t_ours_t / t_np:.2f}x baseline)")
    print(f"  torch.bincount loop                 : {t_torch:.2f} s ({t_torch / t_np:.2f}x baseline)")


if __name__ == "__main__":
    main()
