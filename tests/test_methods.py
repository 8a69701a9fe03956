"""Mixing, losses and sub-category clustering (CPU, tiny tensors)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_dist.methods.losses import concentration_loss, entropy_loss, mixed_loss, multilabel_loss
from wsss_dist.methods.mixing import (MixResult, fmix, fmix_mask, manifold_mix_fn, manifold_mixup, mixup,
                                      sample_layer)
from wsss_dist.methods.subcategory import cluster_subcategories


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_freq_energy(mask: torch.Tensor, cutoff: float = 0.1) -> float:
    """Fraction of the spectral energy of (mask − mean) at radial frequency ≤ cutoff."""
    h, w = mask.shape
    spec = torch.fft.fft2(mask - mask.mean()).abs() ** 2
    f = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    return float(spec[f <= cutoff].sum() / spec.sum())


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (37, 53)])
def test_fmix_mask_mean_values_shape(shape):
    n = shape[0] * shape[1]
    for seed in range(10):
        lam, mask = fmix_mask(shape, generator=_gen(seed))
        assert mask.shape == shape and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.0 <= lam <= 1.0
        assert abs(mask.mean().item() - lam) <= 1.0 / n + 1e-9


def test_fmix_mask_reproducible_and_low_frequency():
    lam1, m1 = fmix_mask((40, 56), generator=_gen(3))
    lam2, m2 = fmix_mask((40, 56), generator=_gen(3))
    assert lam1 == lam2 and torch.equal(m1, m2)
    lam3, m3 = fmix_mask((40, 56), generator=_gen(4))
    assert lam3 != lam1 or not torch.equal(m1, m3)
    g = _gen(0)
    fm, rnd = [], []
    for _ in range(10):
        lam, mask = fmix_mask((40, 56), generator=g)
        if not 0.1 < mask.mean() < 0.9:
            continue
        flat = torch.zeros(mask.numel())
        flat[torch.randperm(mask.numel(), generator=g)[: int(mask.sum())]] = 1
        fm.append(_low_freq_energy(mask))
        rnd.append(_low_freq_energy(flat.view(mask.shape)))
    assert len(fm) >= 3
    assert min(fm) > 0.6 and max(rnd) < 0.15  # FMix masks are blobs, random masks are white noise


def test_fmix_and_mixup_batches():
    x = torch.randn(6, 3, 20, 28)
    r = fmix(x, generator=_gen(1))
    assert isinstance(r, MixResult) and sorted(r.index.tolist()) == list(range(6))
    lam, mask = fmix_mask((20, 28), generator=_gen(1))  # same draws: same mask and λ
    assert r.lam == lam
    assert torch.allclose(r.x, mask * x + (1 - mask) * x[r.index])
    m = mixup(x, alpha=0.2, generator=_gen(2))
    assert sorted(m.index.tolist()) == list(range(6)) and 0.0 <= m.lam <= 1.0
    assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * x[m.index])
    m2 = mixup(x, alpha=0.2, generator=_gen(2))
    assert m2.lam == m.lam and torch.equal(m2.index, m.index)
    g = _gen(5)
    lams = np.array([mixup(x, alpha=0.2, generator=g).lam for _ in range(300)])
    assert 0.35 < lams.mean() < 0.65  # Beta(0.2, 0.2) is symmetric ...
    assert ((lams < 0.1) | (lams > 0.9)).mean() > 0.5  # ... and U-shaped


def test_manifold_helpers():
    g = _gen(0)
    layers = {sample_layer(6, g) for _ in range(200)}
    assert layers == set(range(6))
    h = torch.randn(4, 5, 3, 3)
    idx = torch.tensor([1, 2, 3, 0])
    assert torch.allclose(manifold_mix_fn(idx, 0.3)(h), 0.3 * h + 0.7 * h[idx])
    x = torch.randn(4, 3, 8, 8)
    mix, mix_at, fn = manifold_mixup(x, num_stages=4, alpha=0.2, generator=_gen(1))
    assert mix.x is x and 0 <= mix_at < 4
    assert torch.allclose(fn(h), mix.lam * h + (1 - mix.lam) * h[mix.index])


def _concentration_loop(cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    b, c, h, w = cams.shape
    p_all = torch.softmax(cams, dim=1)
    total = cams.new_zeros(())
    for i in range(b):
        for k in range(c):
            if labels[i, k] <= 0.5:
                continue
            p = p_all[i, k] + 1e-3
            p = p / p.sum()
            mx = sum(p[r, col] * (2 * col / w - 1) for r in range(h) for col in range(w))
            my = sum(p[r, col] * (2 * r / h - 1) for r in range(h) for col in range(w))
            total = total + sum(p[r, col] * ((2 * col / w - 1 - mx) ** 2 + (2 * r / h - 1 - my) ** 2)
                                for r in range(h) for col in range(w))
    return total / b


def test_concentration_loss_matches_loop_non_square():
    torch.manual_seed(0)
    cams = F.relu(torch.randn(3, 4, 5, 7)) * 3
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    a = cams.clone().requires_grad_(True)
    b = cams.clone().requires_grad_(True)
    got, ref = concentration_loss(a, labels), _concentration_loop(b, labels)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    assert a.grad.abs().sum() > 0 and torch.allclose(a.grad, b.grad, atol=1e-6)
    assert concentration_loss(cams, torch.zeros(3, 4)).item() == 0.0
    peaked = torch.zeros(1, 4, 6, 10)
    peaked[0, 1] = 20.0
    peaked[0, 0, 2, 3] = 40.0  # after the softmax over classes, class 0 is concentrated in one pixel
    flat = torch.zeros(1, 4, 6, 10)
    one = torch.tensor([[1.0, 0, 0, 0]])
    assert concentration_loss(peaked, one) < 0.5 * concentration_loss(flat, one)


def test_entropy_on_predictions_vs_labels():
    logits = torch.zeros(2, 20, requires_grad=True)
    assert math.isclose(entropy_loss(logits).item(), math.log(2), rel_tol=1e-4)
    assert entropy_loss(torch.full((2, 20), 30.0)).item() < 1e-3
    (entropy_loss(logits + torch.randn(2, 20))).backward()
    assert logits.grad.abs().sum() > 0
    labels = (torch.rand(4, 20) > 0.5).float()
    labels2 = (torch.rand(4, 20) > 0.5).float()
    # the seed's bug: entropy of sigmoid(labels) is a per-entry constant, independent of the network
    const = lambda p: -(p * math.log(p + 1e-5) + (1 - p) * math.log(1 - p + 1e-5))  # noqa: E731
    s0, s1 = 0.5, 1 / (1 + math.exp(-1))
    expect = labels.mean().item() * const(s1) + (1 - labels.mean().item()) * const(s0)
    assert math.isclose(entropy_loss(labels).item(), expect, rel_tol=1e-4)
    probs = torch.full((2, 3), 0.5)
    assert math.isclose(entropy_loss(probs, from_probs=True).item(), math.log(2), rel_tol=1e-4)
    assert entropy_loss(labels2, from_probs=True).item() < 1e-3  # 0/1 probabilities: no entropy


def test_multilabel_and_mixed_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 20), (torch.rand(4, 20) > 0.7).float()
    s = torch.sigmoid(logits)
    manual = -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()
    assert torch.allclose(multilabel_loss(logits, y), manual, atol=1e-6)
    mix = MixResult(torch.empty(0), torch.tensor([3, 2, 1, 0]), 0.3)
    want = 0.3 * multilabel_loss(logits, y) + 0.7 * multilabel_loss(logits, y[mix.index])
    assert torch.allclose(mixed_loss(multilabel_loss, logits, y, mix), want)


def _blobs(seed: int = 0):
    """Class 0: blobs 0-2; class 1: blobs 2-4 (blob 2 images have both); class 2: one image; class 3: none."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 32)) * 4
    feats, labels, blob = [], [], []
    plan = [(0, [0]), (1, [0]), (2, [0, 1]), (3, [1]), (4, [1])]
    for b, classes in plan:
        for _ in range(15):
            feats.append(centres[b] + rng.normal(size=32) * 0.2)
            lab = np.zeros(5, np.float32)
            lab[classes] = 1
            labels.append(lab)
            blob.append(b)
    feats.append(rng.normal(size=32) * 4)
    lab = np.zeros(5, np.float32)
    lab[[2, 4]] = 1
    labels.append(lab)
    blob.append(5)
    return np.stack(feats).astype(np.float32), np.stack(labels), np.array(blob)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs_a = a[:, None] == a[None, :]
    pairs_b = b[:, None] == b[None, :]
    return bool((pairs_a == pairs_b).all())


@pytest.mark.parametrize("method", ["finch", "kmeans"])
def test_cluster_subcategories_recovers_blobs(method):
    feats, labels, blob = _blobs()
    sub = cluster_subcategories(feats, labels, method=method, k=3, seed=0)
    assert sub.sub_labels.shape == (len(feats), sub.num_sub) and sub.sub_labels.dtype == np.float32
    assert sub.parent.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 4] and sub.num_sub == 9
    # one sub-label per parent class an image has
    per_parent = sub.sub_labels @ np.eye(5, dtype=np.float32)[sub.parent]
    assert np.array_equal(per_parent, labels)
    for c in range(2):
        rows = labels[:, c] > 0.5
        assigned = sub.sub_labels[rows][:, sub.parent == c].argmax(1)
        assert _same_partition(assigned, blob[rows])
    assert sub.sub_labels[:, sub.parent == 3].sum() == 0  # class without images: an empty sub-category
    assert sub.sub_labels[:, sub.parent == 2].sum() == 1 and sub.sub_labels[:, sub.parent == 4].sum() == 1


def test_cluster_subcategories_small_classes_and_partitions():
    feats, labels, _ = _blobs(1)
    km = cluster_subcategories(feats, labels, method="kmeans", k=10, seed=0)
    assert np.bincount(km.parent, minlength=5)[[2, 3]].tolist() == [1, 1]
    assert km.num_sub == len(km.parent) == km.sub_labels.shape[1]
    first = cluster_subcategories(feats, labels, method="finch", partition="first")
    last = cluster_subcategories(feats, labels, method="finch", partition="last")
    col0 = cluster_subcategories(feats, labels, method="finch", partition=0)
    assert first.num_sub >= last.num_sub and np.array_equal(first.sub_labels, col0.sub_labels)
    big = cluster_subcategories(feats, labels, method="finch", partition=99)  # clamped to the coarsest
    assert np.array_equal(big.sub_labels, last.sub_labels)
    one = cluster_subcategories(feats[:1], labels[:1], method="finch")
    assert one.num_sub == 5 and one.sub_labels.sum() == labels[0].sum()
    with pytest.raises(ValueError, match="method"):
        cluster_subcategories(feats, labels, method="dbscan")
