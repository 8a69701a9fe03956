"""Benchmark: confusion matrix over 1449 masks of 500×375 (VOC val size); prints times.

    python -m bench.confusion [--images 1449] [--repeats 3] [--batch 64] [--torch-images 145] [--json PATH]

Compares, on the same random uint8 masks (21 classes, ~5 % ignore label 255):
  * wsss_dist.metrics.confusion_matrix called per image (numpy arrays and CPU tensors),
  * confusion_matrix on CPU tensors in batches of --batch masks [B, H, W] (as an
    inference loop hands them over): uint8 predictions, and int64 predictions (argmax output),
  * the usual per-image numpy loop (psa/irn/deeplab ``fast_hist``):
    keep = gt < C; np.bincount(C * gt[keep] + pred[keep], minlength=C*C),
  * the same loop with torch.bincount (on the first --torch-images masks, time scaled up).
Each figure is the best of --repeats passes over all images; the variants are interleaved
pass by pass (the machine is shared) and all results are checked equal. The figures also go to
``bench/out/confusion.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import common
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


def ours_batched(preds: torch.Tensor, gts: torch.Tensor, batch: int) -> torch.Tensor:
    """wsss_dist.metrics.confusion_matrix per batch of masks [B, H, W], summed."""
    cm = torch.zeros(C, C, dtype=torch.int64)
    for s in range(0, len(preds), batch):
        cm += confusion_matrix(preds[s : s + batch], gts[s : s + batch], num_classes=C)
    return cm


def main() -> None:
    """Build the masks, time every variant, check they agree."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1449)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--torch-images", type=int, default=145, help="images for the torch.bincount loop (scaled up)")
    p.add_argument("--json", default=None, help="where to write the figures (default bench/out/confusion.json)")
    args = p.parse_args()
    fig = common.Figures("confusion", args.json, images=args.images, repeats=args.repeats, batch=args.batch,
                         torch_images=args.torch_images)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    shape = (args.images, 375, 500)
    gts = rng.integers(0, C, size=shape, dtype=np.uint8)
    gts[rng.random(shape, dtype=np.float32) < 0.05] = 255
    preds = rng.integers(0, C, size=shape, dtype=np.uint8)
    fig.say(f"{args.images} masks of 500x375, torch {torch.__version__}, numpy {np.__version__}, "
            f"2 threads, {time.strftime('%Y-%m-%d %H:%M %Z')}, load average {common.load_text()}")
    tp, tg = torch.from_numpy(preds), torch.from_numpy(gts)
    tp64 = tp.long()
    variants = {
        "numpy bincount loop (baseline)": (numpy_loop, preds, gts),
        "confusion_matrix, numpy, per image": (ours, preds, gts),
        "confusion_matrix, CPU tensors, per image": (ours, tp, tg),
        f"confusion_matrix, CPU tensors, batches of {args.batch} (uint8)": (
            lambda p, g: ours_batched(p, g, args.batch), tp, tg),
        f"confusion_matrix, CPU tensors, batches of {args.batch} (int64 pred)": (
            lambda p, g: ours_batched(p, g, args.batch), tp64, tg),
    }
    times: dict[str, float] = {name: float("inf") for name in variants}
    ref = None
    for _ in range(args.repeats):  # interleaved: each pass runs every variant once
        for name, (fn, p_, g_) in variants.items():
            t, cm = common.best_of(fn, 1, p_, g_)
            times[name] = min(times[name], t)
            cm = np.asarray(cm)
            ref = cm if ref is None else ref
            assert np.array_equal(cm, ref), name
    n_torch = min(args.images, args.torch_images)  # ~100x slower than the rest on a loaded machine: a subset, scaled
    t_torch, cm_tb = common.best_of(torch_loop, 1, tp[:n_torch], tg[:n_torch])
    assert np.array_equal(cm_tb.numpy(), numpy_loop(preds[:n_torch], gts[:n_torch]))
    t_torch *= args.images / n_torch
    base = times["numpy bincount loop (baseline)"]
    what = f"torch.bincount loop ({n_torch} images, scaled)" if n_torch < args.images else "torch.bincount loop"
    times[what] = t_torch
    rows = fig.put("variants", {})
    for name, t in times.items():
        rows[name] = {"best_s": t, "vs_baseline": t / base}
        fig.say(f"  {name:58s}: {t:.2f} s ({t / base:.2f}x baseline)")
    fig.say(f"load average at the end: {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    main()
