"""Segmentation metrics: confusion matrix and mean IoU (VOC protocol, notes §11.2).

Confusion matrices are plain counts, so they are **summed** across images and
across ranks: each rank accumulates its own matrix, then the stage sums them
(``reduce_confusion`` below, an all-reduce with ``reduction="sum"``) before
calling :func:`miou` once on the total.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """Return a numpy view of a CPU tensor or array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(x)


def _check_pred_range(lo: int, hi: int, num_classes: int) -> None:
    """Raise if predictions fall outside [0, num_classes)."""
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"predictions must lie in [0, {num_classes}); got values in [{lo}, {hi}]"
        )


def _confusion_numpy(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int
) -> np.ndarray:
    """Confusion matrix of integer numpy arrays with one ``np.bincount``."""
    for name, x in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
    c2 = num_classes * num_classes
    if pred.size == 0:
        return np.zeros((num_classes, num_classes), np.int64)
    _check_pred_range(int(pred.min()), int(pred.max()), num_classes)
    gt = gt.reshape(-1)
    pred = pred.reshape(-1)
    if np.issubdtype(gt.dtype, np.signedinteger) and gt.min() < 0:
        keep = gt >= 0  # negative labels are invalid: drop them explicitly
        gt, pred = gt[keep], pred[keep]
    if 0 <= ignore_index < num_classes:
        keep = gt != ignore_index
        gt, pred = gt[keep], pred[keep]
    # gt >= num_classes (incl. the ignore label) maps past C*C and is cut off below,
    # which is cheaper than a boolean mask on every pixel.
    index = gt.astype(np.int64) * num_classes + pred
    return np.bincount(index, minlength=c2)[:c2].reshape(num_classes, num_classes)


def _confusion_torch(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Confusion matrix of integer tensors with ``torch.bincount`` (for accelerators)."""
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    if pred.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=pred.device)
    lo, hi = torch.aminmax(pred)
    _check_pred_range(int(lo), int(hi), num_classes)
    keep = (gt >= 0) & (gt < num_classes) & (gt != ignore_index)
    index = gt[keep] * num_classes + pred[keep]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrix(
    pred: ArrayLike, gt: ArrayLike, num_classes: int = 21, ignore_index: int = 255
) -> torch.Tensor:
    """Count pixels per (ground truth, prediction) pair → int64 [C, C], rows = ground truth.

    ``pred`` and ``gt`` are integer label maps of the same (any) shape, numpy arrays or
    tensors. Pixels whose ground truth is ``ignore_index`` or outside ``[0, C)`` are
    skipped (an ``ignore_index`` ≥ C costs no extra pass); a prediction outside
    ``[0, C)`` raises ``ValueError``. CPU data is counted with ``np.bincount`` (much
    faster than ``torch.bincount`` on CPU); tensors on an accelerator are counted there
    and the result stays on their device.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    accel = [x for x in (pred, gt) if isinstance(x, torch.Tensor) and x.device.type != "cpu"]
    if accel:
        dev = accel[0].device
        p = torch.as_tensor(pred, device=dev)
        g = torch.as_tensor(gt, device=dev)
        return _confusion_torch(p, g, num_classes, ignore_index)
    cm = _confusion_numpy(_as_numpy(pred), _as_numpy(gt), num_classes, ignore_index)
    return torch.from_numpy(cm)


def miou(cm: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean IoU and per-class IoU of a confusion matrix (rows = ground truth).

    IoU_c = cm_cc / (row_c + col_c - cm_cc); a class with row_c + col_c == 0 (absent
    from both ground truth and prediction) gets NaN and is left out of the mean.
    """
    m = _as_numpy(cm.cpu() if isinstance(cm, torch.Tensor) else cm).astype(np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    valid = ~np.isnan(iou)
    mean = float(iou[valid].mean()) if valid.any() else float("nan")
    return mean, iou


def reduce_confusion(cm: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Sum a per-rank confusion matrix over all processes (Accelerate) → CPU int64 [C, C]."""
    total = accelerator.reduce(cm.to(accelerator.device, torch.int64), reduction="sum")
    return total.cpu()
