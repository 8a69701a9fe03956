"""Dense CRF on final predictions (eval.crf, deeplab-pytorch's post-processing, notes §14)."""
import importlib.util

import numpy as np
import pytest

from wsss_dist.config import make_config
from wsss_dist.errors import ConfigError
from wsss_dist.methods.crf import CrfParams, crf_image, crf_predictions

needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                               reason="pydensecrf2 (the [crf] extra) is not installed")


def _two_regions(h=40, w=60, edge=30, blur=6):
    """An image with a sharp colour edge at column ``edge`` and soft probabilities whose boundary is ``blur`` px off."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :edge] = (200, 40, 40)
    rgb[:, edge:] = (30, 160, 220)
    probs = np.full((21, h, w), 1e-4, np.float32)
    x = np.arange(w)[None, :].repeat(h, 0)
    p_right = 1 / (1 + np.exp(-(x - (edge - blur)) / 3.0))  # the soft boundary sits left of the colour edge
    probs[0] = 1 - p_right
    probs[12] = p_right
    probs /= probs.sum(0, keepdims=True)
    return rgb, probs


@needs_crf
def test_crf_moves_labels_to_the_colour_edge_and_keeps_the_images_classes():
    rgb, probs = _two_regions()
    before = probs.argmax(0)
    after = crf_predictions(rgb, probs, CrfParams(bi_rgb_std=13, bi_w=10))
    assert set(np.unique(after)) <= {0, 12}  # never a class the predictions do not hold
    changed = after != before
    assert changed.any() and np.nonzero(changed)[1].min() >= 30 - 6 - 1 and np.nonzero(changed)[1].max() < 30
    assert (after[:, :30] == 0).mean() > (before[:, :30] == 0).mean()  # the background now reaches the edge


def test_deeplab_pytorch_wrap_reproduces_the_cast():
    rgb = np.array([[[122, 116, 104], [0, 0, 0], [255, 255, 255]]], np.uint8)  # RGB
    out = crf_image(rgb, "deeplab_pytorch_wrap")
    # B − 104.008, G − 116.669, R − 122.675, truncated toward zero, mod 256
    assert out[0, 0].tolist() == [0, 0, 0]  # −0.008, −0.669, −0.675 → 0
    assert out[0, 1].tolist() == [256 - 104, 256 - 116, 256 - 122]  # negative values wrap to ≈ 255 − value
    assert out[0, 2].tolist() == [150, 138, 132]
    assert np.array_equal(crf_image(rgb, "rgb"), rgb)


def test_eval_crf_keys_are_checked(monkeypatch):
    cfg = make_config(["eval.crf=true", "eval.crf_image=deeplab_pytorch_wrap"])
    assert cfg.eval.crf and cfg.eval.crf_bi_xy_std == 67 and cfg.eval.crf_pos_w == 3
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydensecrf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.crf=true needs .*pip install"):
        make_config(["eval.crf=true"])


@needs_crf
def test_pseudo_label_crf_moves_the_edge_and_stays_within_the_images_labels():
    """pseudo.crf: a label map whose boundary is 4 px off the colour edge is pulled to it; labels ⊂ the given set."""
    from wsss_dist.methods.crf import crf_labels, label_probs

    h, w, edge = 40, 60, 30
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :edge] = (200, 40, 40)
    rgb[:, edge:] = (30, 160, 220)
    label = np.zeros((h, w), np.uint8)
    label[:, edge - 4:] = 12
    label[:4, :4] = 7  # a third label of the set, in a corner of uniform colour
    probs = label_probs(label.astype(np.int64) // 6, 3)  # 0, 7, 12 → 0, 1, 2
    assert probs.shape == (3, h, w) and np.allclose(probs.sum(0), 1) and probs[2, 0, -1] == pytest.approx(0.7)
    rgb.flags.writeable = False  # as a decoded shard image may be
    after = crf_labels(rgb, label, np.array([0, 7, 12]), CrfParams(bi_rgb_std=13, bi_w=10))
    assert after.dtype == label.dtype and set(np.unique(after)) <= {0, 7, 12}
    assert (after[:, edge - 4:edge] == 0).mean() > 0.9 and (after[:, edge:] == 12).all()  # moved to the colour edge
    assert crf_labels(rgb, label * 0, np.array([0])).max() == 0  # one label: nothing to decide
    with pytest.raises(ValueError, match="not in"):
        crf_labels(rgb, label, np.array([0, 12]))  # a label outside the set is a bug upstream, not silently kept


def test_pseudo_crf_keys_are_checked_and_enter_the_fingerprint_only_when_on(monkeypatch):
    from wsss_dist.fingerprints import stage_settings

    assert not any(k.startswith("pseudo.crf") for k in stage_settings(make_config([]), "pseudo"))
    if importlib.util.find_spec("pydensecrf") is not None:
        on = stage_settings(make_config(["pseudo.crf=true"]), "pseudo")
        assert on["pseudo.crf"] is True and on["pseudo.crf_gt_prob"] == 0.7 and on["pseudo.crf_image"] == "rgb"
    with pytest.raises(ConfigError, match="pseudo.crf_gt_prob"):
        make_config(["pseudo.crf_gt_prob=1.5"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydensecrf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pseudo.crf=true needs .*pip install"):
        make_config(["pseudo.crf=true"])
