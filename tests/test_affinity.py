"""Tests for the AffinityNet training side (wsss_dist.methods.affinity)."""

import math

import pytest
import torch

from wsss_dist.methods.affinity import (
    affinity_labels,
    affinity_loss,
    affinity_offsets,
    pair_labels,
    pairwise_affinity,
)


def test_offsets_half_plane():
    offs = affinity_offsets(5)
    assert len(offs) == 34 and len(set(offs)) == 34
    assert offs[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    for dy, dx in offs:
        assert 0 < dy * dy + dx * dx < 25
        assert dy > 0 or (dy == 0 and dx > 0)  # one of each mirrored pair
        assert (-dy, -dx) not in offs
    assert len(affinity_offsets(2)) == 4  # (0,1), (1,-1), (1,0), (1,1)


def test_pairwise_affinity_identical_and_distance():
    b, d, h, w = 2, 3, 9, 12
    flat = torch.ones(b, d, h, w)
    aff = pairwise_affinity(flat, radius=5)
    assert aff.shape == (b, 34, h - 4, w - 8)
    assert torch.allclose(aff, torch.ones_like(aff))

    # feature = column index: |f_i - f_j| = |dx|, so a = exp(-|dx|), decreasing with distance
    ramp = torch.arange(w, dtype=torch.float32).expand(b, d, h, w)
    aff = pairwise_affinity(ramp, radius=5)
    for p, (dy, dx) in enumerate(affinity_offsets(5)):
        assert torch.allclose(aff[:, p], torch.full_like(aff[:, p], math.exp(-abs(dx))))

    # source (0, 4) vs target (dy, 4 + dx): check one pair directly on random features
    f = torch.randn(1, 5, h, w)
    aff = pairwise_affinity(f, radius=5)
    p = affinity_offsets(5).index((2, -3))
    expected = torch.exp(-(f[0, :, 0 + 2, 4 - 3] - f[0, :, 0, 4]).abs().mean())
    assert aff[0, p, 0, 0] == pytest.approx(expected.item(), rel=1e-6)


def _toy_cams():
    # two classes (ids 3 and 15) on a 1x5 strip
    cams = torch.tensor([[[0.9, 0.5, 0.2, 0.01, 0.0]], [[0.1, 0.6, 0.1, 0.02, 0.0]]])
    return cams, torch.tensor([3, 15])


def test_affinity_labels_threshold_mode():
    cams, classes = _toy_cams()
    lab = affinity_labels(cams, classes, mode="threshold", conf_fg=0.30, conf_bg=0.05)
    # max = [.9, .6, .2, .02, 0]: fg, fg (argmax class 15), uncertain, bg, bg
    assert lab.dtype == torch.long
    assert lab.tolist() == [[3, 15, 255, 0, 0]]


def test_affinity_labels_psa_mode():
    cams, classes = _toy_cams()
    lab = affinity_labels(cams, classes, mode="psa", alpha_low=4, alpha_high=32)
    # bg_low = (1-max)^4 = [1e-4, .0256, .41, .92, 1]; bg_high = (1-max)^32 = [~0, ~0, 8e-4, .52, 1]
    # low-alpha argmax: 3, 15, bg, bg, bg -> 3, 15, 255, 255, 255
    # high-alpha argmax bg where bg_high > max cam: pixels 3, 4 -> 0; pixel 2 stays 255
    assert lab.tolist() == [[3, 15, 255, 0, 0]]
    # a CRF hook sees [1 + K, h, w] stacks and its output decides the argmax
    seen = []

    def crf(scores):
        seen.append(tuple(scores.shape))
        out = scores.clone()
        out[0] = 0  # refine away all background
        return out

    lab = affinity_labels(cams, classes, mode="psa", crf=crf)
    assert seen == [(3, 1, 5), (3, 1, 5)]
    # all-zero pixel 4 is a tie, which goes to the background channel
    assert lab.tolist() == [[3, 15, 3, 15, 0]]


def test_affinity_labels_no_class():
    lab = affinity_labels(torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long), mode="psa")
    assert lab.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_pair_labels_and_loss_terms():
    radius = 2  # offsets (0,1), (1,-1), (1,0), (1,1); sources rows [0,h-1), cols [1,w-1)
    labels = torch.tensor([[[0, 0, 5, 5], [0, 255, 5, 7], [1, 1, 1, 1]]])
    bg_pos, fg_pos, neg = pair_labels(labels, radius)
    assert bg_pos.shape == (1, 4, 2, 2)
    offs = affinity_offsets(radius)
    # enumerate the pairs directly
    for p, (dy, dx) in enumerate(offs):
        for y in range(2):
            for x in range(2):
                s = labels[0, y, x + 1].item()
                t = labels[0, y + dy, x + 1 + dx].item()
                valid = s != 255 and t != 255
                assert bg_pos[0, p, y, x] == (valid and s == t == 0)
                assert fg_pos[0, p, y, x] == (valid and s == t != 0)
                assert neg[0, p, y, x] == (valid and s != t)

    aff = torch.rand(bg_pos.shape, generator=torch.Generator().manual_seed(0))
    total, terms = affinity_loss(aff, bg_pos, fg_pos, neg)
    vals = {"bg": [], "fg": [], "neg": []}
    for idx in torch.nonzero(torch.ones_like(aff, dtype=torch.bool)).tolist():
        a = aff[tuple(idx)].item()
        if bg_pos[tuple(idx)]:
            vals["bg"].append(-math.log(a + 1e-5))
        if fg_pos[tuple(idx)]:
            vals["fg"].append(-math.log(a + 1e-5))
        if neg[tuple(idx)]:
            vals["neg"].append(-math.log(1 + 1e-5 - a))
    assert all(vals.values())  # every term has pairs in this example
    expected = {k: sum(v) / (len(v) + 1e-5) for k, v in vals.items()}
    for k in expected:
        assert terms[k].item() == pytest.approx(expected[k], rel=1e-5)
    assert total.item() == pytest.approx(expected["bg"] / 4 + expected["fg"] / 4 + expected["neg"] / 2, rel=1e-5)


def test_loss_backpropagates_to_features():
    f = torch.randn(1, 4, 6, 10, requires_grad=True)
    labels = torch.randint(0, 3, (1, 6, 10))
    aff = pairwise_affinity(f, radius=3)
    total, _ = affinity_loss(aff, *pair_labels(labels, radius=3))
    total.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_dense_crf_snaps_labels_to_the_colour_edge():
    """psa's dense CRF (pydensecrf2): a score boundary 4 px off a colour edge moves onto the edge."""
    import numpy as np

    pytest.importorskip("pydensecrf", reason="pydensecrf2 is not installed (it builds from source: a C++ compiler; "
                                             "bash launch/setup.sh --test installs it where one is)")

    from wsss_dist.methods.crf import crf_for, dense_crf

    h, w = 32, 32
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :16] = (220, 30, 30)
    image[:, 16:] = (30, 30, 220)
    scores = np.full((2, h, w), 0.4, np.float32)
    scores[0, :, :20], scores[1, :, 20:] = 0.6, 0.6  # plain argmax puts the edge at x = 20
    q = dense_crf(image, scores)
    assert q.shape == (2, h, w) and np.allclose(q.sum(0), 1, atol=1e-4)
    labels = q.argmax(0)
    assert (labels[:, :16] == 0).all() and (labels[:, 16:] == 1).all()
    # as affinity_labels' crf hook: psa-mode labels follow the image, not the CAM blur
    cams = torch.zeros(1, h, w)
    cams[0, :, :20] = 0.5
    plain = affinity_labels(cams, torch.tensor([3]), mode="psa")
    refined = affinity_labels(cams, torch.tensor([3]), mode="psa", crf=crf_for(image))
    assert (plain[:, 16:20] == 3).all() and (refined[:, 17:20] != 3).all() and (refined[:, :15] == 3).all()
