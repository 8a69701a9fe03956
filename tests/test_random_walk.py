"""Tests for the sparse random walk (wsss_dist.methods.random_walk)."""

import pytest
import torch
import torch.nn.functional as F

from wsss_dist.methods.random_walk import (
    native_available,
    propagate_labels,
    random_walk,
    random_walk_dense,
)

# "torch" is the eager reference; "native" is the compiled kernel, skipped where no C++ compiler works.
BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="native kernel unavailable")),
]


def _inputs(c, d, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(c, h, w, generator=g, dtype=dtype)
    features = torch.rand(d, h, w, generator=g, dtype=dtype) * 2
    return scores, features


@pytest.mark.parametrize(
    "h, w, radius, beta, logt",
    [(7, 9, 5, 8, 8), (12, 10, 5, 8, 8), (12, 10, 3, 8, 4), (9, 7, 4, 1, 6), (3, 4, 5, 8, 2), (1, 6, 2, 8, 0)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_equals_dense_float64(h, w, radius, beta, logt, backend):
    scores, features = _inputs(5, 8, h, w, seed=h * 100 + w)
    sparse = random_walk(scores, features, radius=radius, beta=beta, logt=logt, backend=backend)
    dense = random_walk_dense(scores, features, radius=radius, beta=beta, logt=logt)
    assert sparse.shape == scores.shape and sparse.dtype == torch.float64
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_channels_stay_zero_and_match_dense(backend):
    scores, features = _inputs(6, 4, 8, 11, seed=3)
    scores[[1, 4]] = 0
    sparse = random_walk(scores, features, logt=5, backend=backend)
    assert sparse[[1, 4]].abs().max() == 0
    torch.testing.assert_close(sparse, random_walk_dense(scores, features, logt=5), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_labels_agree_with_float64_dense(backend):
    h, w = 30, 34
    g = torch.Generator().manual_seed(0)
    # piecewise-constant features (two regions) plus noise, CAM-like blobs
    region = (torch.arange(w) > w // 2).float().expand(h, w)
    features = region[None] * torch.rand(16, 1, 1, generator=g) * 3 + 0.1 * torch.rand(16, h, w, generator=g)
    scores = F.avg_pool2d(torch.rand(1, 6, h, w, generator=g), 5, 1, 2)[0] ** 3
    dense = random_walk_dense(scores.double(), features.double())
    sparse32 = random_walk(scores.float(), features.float(), backend=backend)
    assert sparse32.dtype == torch.float32
    agree = (sparse32.argmax(0) == dense.argmax(0)).float().mean().item()
    assert agree >= 0.999
    torch.testing.assert_close(sparse32.double(), dense, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_features_diffuse_to_uniform_per_connected_area(backend):
    h, w = 6, 12
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    # two areas whose features differ by 200: affinity exp(-200)^8 == 0, i.e. disconnected
    features = torch.zeros(4, h, w, dtype=torch.float64)
    features[:, :, w // 2 :] = 200.0
    out = random_walk(scores, features, radius=3, beta=8, logt=10, backend=backend)
    left, right = out[:, :, : w // 2], out[:, :, w // 2 :]
    for part, src in ((left, scores[:, :, : w // 2]), (right, scores[:, :, w // 2 :])):
        flat = part.reshape(3, -1)
        assert (flat.max(1).values - flat.min(1).values).max() < 1e-6  # uniform within the area
        # the limit is a weighted mean of the area's initial scores
        assert (flat[:, 0] >= src.reshape(3, -1).min(1).values).all()
        assert (flat[:, 0] <= src.reshape(3, -1).max(1).values).all()
    assert (left[:, 0, 0] - right[:, 0, 0]).abs().max() > 1e-3  # areas do not mix


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_labels_shape_and_values(backend):
    big_h, big_w, stride = 37, 45, 8
    h, w = 5, 6  # ceil(37/8), ceil(45/8)
    g = torch.Generator().manual_seed(2)
    cams = torch.zeros(2, big_h, big_w)
    cams[0, 8:24, 8:24] = 1.0  # class 7: feature cells rows 1-2, cols 1-2
    cams[1, 24:, 32:] = 0.9  # class 12: feature cells rows 3-4, cols 4-5
    classes = torch.tensor([7, 12])
    # features separate the three areas (affinity ~ exp(-10 * 8) across them)
    features = 0.05 * torch.rand(8, h, w, generator=g)
    features[:, 1:3, 1:3] += 10
    features[:, 3:, 4:] += 20
    labels = propagate_labels(cams, classes, features, stride=stride, logt=3, backend=backend)
    assert labels.shape == (big_h, big_w) and labels.dtype == torch.long
    assert set(labels.unique().tolist()) <= {0, 7, 12}
    assert labels[12, 12] == 7 and labels[32, 40] == 12 and labels[2, 40] == 0 and labels[36, 2] == 0
    with pytest.raises(ValueError):
        propagate_labels(cams, classes, torch.rand(8, h + 1, w))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        random_walk(torch.rand(2, 4, 5), torch.rand(3, 4, 6))


@pytest.mark.skipif(not native_available(), reason="native kernel unavailable")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels", [1, 3, 6, 9])
def test_native_matches_torch_walk_multithreaded(threads, channels):
    """Channel groups of 4 + remainder, uneven tile splits over threads, a map wider than a tile row."""
    scores, features = _inputs(channels, 16, 23, 41, seed=channels)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = random_walk(scores, features, logt=6, backend="native")
    finally:
        torch.set_num_threads(before)
    reference = random_walk(scores, features, logt=6, backend="torch")
    torch.testing.assert_close(native, reference, rtol=1e-9, atol=1e-12)
    n32 = random_walk(scores.float(), features.float(), logt=6, backend="native")
    torch.testing.assert_close(n32, reference.float(), rtol=1e-4, atol=1e-6)


def test_auto_backend_equals_torch_and_bad_backend_raises():
    scores, features = _inputs(3, 8, 9, 13, seed=7)
    torch.testing.assert_close(
        random_walk(scores, features, logt=4), random_walk(scores, features, logt=4, backend="torch"),
        rtol=1e-9, atol=1e-12,
    )
    with pytest.raises(ValueError):
        random_walk(scores, features, backend="cuda")


def test_without_native_kernel_auto_falls_back_and_native_raises(monkeypatch, tmp_path):
    import wsss_dist.methods.random_walk as rw

    assert rw._build_kernel("/bin/false", tmp_path / "k.so") is False  # a compiler that fails: no library
    assert not (tmp_path / "k.so").exists()
    monkeypatch.setattr(rw, "_native_library", lambda: None)
    scores, features = _inputs(3, 8, 9, 13, seed=8)
    torch.testing.assert_close(
        random_walk(scores, features, logt=3), random_walk_dense(scores, features, logt=3), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(RuntimeError):
        random_walk(scores, features, backend="native")
