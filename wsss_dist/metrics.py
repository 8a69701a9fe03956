"""Segmentation metrics: confusion matrix and mean IoU (VOC protocol, notes §11.2), the CAM threshold sweep.

Confusion matrices are plain counts, so they are **summed** across images and across ranks: the inference engine
writes one matrix per shard and sums them before :func:`miou` is called once on the total.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .registry import VOC_LABELS

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
_CHUNK = 2**18  # pixels per np.bincount: its int64 index (2 MiB) stays in cache and is reused, also for batches
IGNORE = 255  # the label of pixels that are neither scored nor trained on (VOC's void band, unsure affinity labels)


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
    """Confusion matrix of integer numpy arrays: ``np.bincount`` over cache-sized chunks of pixels."""
    for name, x in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
    c2 = num_classes * num_classes
    gt = gt.reshape(-1)
    pred = pred.reshape(-1)
    signed_gt = np.issubdtype(gt.dtype, np.signedinteger)
    mask_ignore = 0 <= ignore_index < num_classes
    # Chunks of _CHUNK pixels share one preallocated index buffer and are range-checked while in
    # cache: a batch of masks [B, H, W] costs what B single masks cost, instead of whole-batch
    # int64 temporaries and extra passes over memory. gt >= num_classes (incl. the ignore label)
    # maps past C*C and is cut off after the count, cheaper than a boolean mask on every pixel.
    counts = np.zeros(c2, np.int64)
    buf = np.empty(min(gt.size, _CHUNK), np.int64)
    for start in range(0, gt.size, _CHUNK):
        g, p = gt[start : start + _CHUNK], pred[start : start + _CHUNK]
        _check_pred_range(int(p.min()), int(p.max()), num_classes)
        if (signed_gt and g.min() < 0) or mask_ignore:
            keep = (g >= 0) & (g != ignore_index)  # negative labels are invalid: drop them explicitly
            g, p = g[keep], p[keep]
        index = buf[: g.size]
        np.multiply(g, num_classes, out=index, dtype=np.int64)
        np.add(index, p, out=index, dtype=np.int64)
        counts += np.bincount(index, minlength=c2)[:c2]
    return counts.reshape(num_classes, num_classes)


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
    pred: ArrayLike, gt: ArrayLike, num_classes: int = VOC_LABELS, ignore_index: int = IGNORE
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


def miou_metrics(cm: np.ndarray | None) -> dict:
    """``{"miou", "iou", "confusion"}`` from a C×C confusion matrix (C = background + the dataset's classes) (``miou`` None when there was no ground truth)."""
    if cm is None:
        return {"miou": None, "iou": None}
    m, iou = miou(cm)
    return {"miou": float(m), "iou": [None if np.isnan(x) else float(x) for x in iou], "confusion": np.asarray(cm).tolist()}


def gt_confusion(pred: np.ndarray, sample: dict, num_classes: int = VOC_LABELS) -> np.ndarray | None:
    """Confusion matrix of a label map against the sample's ``seg.png`` (None without ground truth)."""
    gt = sample.get("seg.png")
    if gt is None:
        return None
    return np.asarray(confusion_matrix(pred, gt, num_classes))


def sweep_confusion(cams: torch.Tensor, classes: torch.Tensor, gt: np.ndarray | torch.Tensor,
                    ths: Sequence[float], num_classes: int = VOC_LABELS) -> np.ndarray:
    """Confusion matrices [T, C, C] of CAM labels at every background threshold t of ``ths``, in one count.

    The label of a pixel at threshold t is ``classes[argmax CAM]`` where the maximum exceeds t, else 0 (background;
    ``wsss_dist.stages.cam.cam_labels``). Equal to stacking ``confusion_matrix`` of those maps against ``gt`` (ground
    truth ≥ C, e.g. 255, ignored), but the channel maximum is taken once and all thresholds share one
    ``np.bincount``: a pixel with maximum v and arg-max class f is foreground for exactly the thresholds t < v
    (compared in float32).
    """
    C, T = num_classes, len(ths)
    if tuple(gt.shape) != tuple(cams.shape[-2:]):
        raise ValueError(f"ground truth is {tuple(gt.shape)}, CAMs are {tuple(cams.shape[-2:])}")
    gt = np.asarray(gt.cpu() if isinstance(gt, torch.Tensor) else gt).reshape(-1)
    if len(classes) == 0:
        value = np.full(gt.shape, -np.inf, np.float32)
        fg = np.zeros(gt.shape, np.int64)
    else:
        v, idx = cams.max(0)
        value = v.float().cpu().numpy().reshape(-1)
        fg = classes.to(idx.device)[idx].cpu().numpy().reshape(-1).astype(np.int64)
    if fg.size and (fg.min() < 0 or fg.max() >= C):
        raise ValueError(f"class ids must lie in [0, {C}); got {fg.min()}..{fg.max()}")
    keep = (gt < C) & (gt >= 0) if np.issubdtype(gt.dtype, np.signedinteger) else gt < C  # drops the ignore label 255
    th = np.asarray(ths, np.float32)
    order = np.argsort(th, kind="stable")
    k = np.searchsorted(th[order], value[keep], side="left")  # how many (sorted) thresholds lie below the pixel's value
    index = (k * C + gt[keep].astype(np.int64)) * C + fg[keep]
    hist = np.bincount(index, minlength=(T + 1) * C * C)[:(T + 1) * C * C].reshape(T + 1, C, C)  # [k, gt, class]
    above = np.cumsum(hist[::-1], axis=0)[::-1]  # above[j] = pixels with k >= j
    below = np.cumsum(hist.sum(-1), axis=0)  # below[j, g] = pixels of row g with k <= j (background at threshold j)
    out = np.empty((T, C, C), np.int64)
    for j in range(T):
        cm = above[j + 1].copy()
        cm[:, 0] += below[j]
        out[order[j]] = cm
    return out
