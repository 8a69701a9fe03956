"""Tests for wsss_dist.metrics: confusion matrix and mIoU."""

import math

import numpy as np
import pytest
import torch

from wsss_dist.metrics import confusion_matrix, miou


def test_hand_computed_2x3_example():
    gt = np.array([[0, 1, 1], [2, 255, 1]])
    pred = np.array([[0, 1, 2], [2, 0, 0]])
    # pairs (gt, pred): (0,0) (1,1) (1,2) (2,2) [ignored] (1,0)
    expected = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.int64)
    cm = confusion_matrix(pred, gt, num_classes=3)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    m, iou = miou(cm)
    # IoU_0 = 1/(1+2-1), IoU_1 = 1/(3+1-1), IoU_2 = 1/(1+2-1)
    np.testing.assert_allclose(iou, [1 / 2, 1 / 3, 1 / 2])
    assert m == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_ignore_and_out_of_range_gt_are_skipped():
    gt = np.array([255, 255, 7, 1])
    pred = np.array([0, 1, 2, 1])
    cm = confusion_matrix(pred, gt, num_classes=3)
    assert cm.sum() == 1 and cm[1, 1] == 1
    # an ignore index inside the class range is honoured too
    cm0 = confusion_matrix(np.array([0, 1]), np.array([0, 1]), num_classes=3, ignore_index=0)
    assert cm0.sum() == 1 and cm0[1, 1] == 1


def test_prediction_out_of_range_raises():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([3]), np.array([0]), num_classes=3)


def test_absent_class_is_nan_and_excluded():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), num_classes=3)
    m, iou = miou(cm)
    assert math.isnan(iou[2])
    assert m == pytest.approx(np.mean([1 / 2, 1 / 2]))


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 21, size=(2, 37, 23)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 21, size=gt.shape).astype(np.uint8)
    a = confusion_matrix(pred, gt)
    b = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt))
    c = confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(gt).long())
    assert torch.equal(a, b) and torch.equal(a, c)
    keep = gt != 255
    assert a.sum() == keep.sum()
    # independent count for a few cells
    for g, p in [(0, 0), (3, 5), (20, 1)]:
        assert a[g, p] == np.sum((gt == g) & (pred == p))


def test_matrices_sum_across_parts():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, size=(4, 8))
    pred = rng.integers(0, 5, size=(4, 8))
    whole = confusion_matrix(pred, gt, num_classes=5)
    parts = confusion_matrix(pred[:2], gt[:2], num_classes=5) + confusion_matrix(pred[2:], gt[2:], num_classes=5)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("chunk", [7, 1000, 2**18])
def test_batched_tensors_equal_per_image_loop(monkeypatch, chunk):
    """A [B, H, W] batch (torch or numpy, any int dtype, chunked or not) counts what the per-image loop counts."""
    from wsss_dist import metrics

    monkeypatch.setattr(metrics, "_CHUNK", chunk)
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 21, size=(5, 19, 23)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 21, size=gt.shape).astype(np.uint8)
    ref = np.zeros((21, 21), np.int64)
    for p, g in zip(pred, gt):
        keep = g < 21
        ref += np.bincount(21 * g[keep].astype(np.int64) + p[keep], minlength=441).reshape(21, 21)
    tp, tg = torch.from_numpy(pred), torch.from_numpy(gt)
    for p, g in ((tp, tg), (tp.long(), tg), (tp.long(), tg.long()), (pred, gt), (tp.transpose(1, 2), tg.transpose(1, 2))):
        assert np.array_equal(confusion_matrix(p, g).numpy(), ref)
    # negative ground truth and an in-range ignore index are dropped in every chunk
    g64 = tg.long().clone()
    g64[0, 0, :5] = -1
    keep = (g64 >= 0) & (g64 < 21) & (g64 != 3)
    cm = confusion_matrix(tp, g64, ignore_index=3)
    assert cm.sum() == keep.sum() and cm[3].sum() == 0
    # a bad prediction in the last chunk still raises
    bad = tp.clone()
    bad[-1, -1, -1] = 21
    with pytest.raises(ValueError):
        confusion_matrix(bad, tg)
    assert confusion_matrix(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint8)).sum() == 0
