"""IRN's formulas (wsss_dist.methods.irn) against their definitions on small hand-built inputs (notes §5.7-5.9, §13)."""
import itertools

import pytest
import torch

from wsss_dist.methods.affinity import affinity_labels, affinity_loss, affinity_offsets, pair_labels
from wsss_dist.methods.irn import balanced_pair_loss, boundary_affinity, path_max, path_offsets, propagate_irn
from wsss_dist.methods.random_walk import native_available, random_walk_affinity

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="no native kernel"))]


def test_directions_and_paths_match_the_notes():
    assert len(affinity_offsets(5)) == 34 and len(affinity_offsets(10)) == 152  # §13.3
    assert len(path_offsets(0, 4)) == 5 and len(path_offsets(2, 3)) == 8 and len(path_offsets(4, -2)) == 11
    assert set(path_offsets(0, 4)) == {(0, x) for x in range(5)}
    for dy, dx in affinity_offsets(10):  # both end points on the path, every point in the box
        p = path_offsets(dy, dx)
        assert (0, 0) in p and (dy, dx) in p
        assert all(min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx) for y, x in p)
    assert set(path_offsets(1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # distance² of (0,1), (1,0): 1/2 < 1


def _path_max_reference(b: torch.Tensor, radius: int, crop: bool) -> torch.Tensor:
    """Per source pixel and direction: the max of B over the box points at line distance² < 1 (1 outside the map)."""
    h, w = b.shape
    r = radius - 1
    rows, cols = (range(h - r), range(r, w - r)) if crop else (range(h), range(w))
    dirs = affinity_offsets(radius)
    out = torch.zeros(len(dirs), len(rows), len(cols), dtype=b.dtype)
    for p, (dy, dx) in enumerate(dirs):
        for i, y in enumerate(rows):
            for j, x in enumerate(cols):
                vals = []
                for py in range(min(0, dy), max(0, dy) + 1):
                    for px in range(min(0, dx), max(0, dx) + 1):
                        if (dy * px - dx * py) ** 2 < dy * dy + dx * dx:
                            yy, xx = y + py, x + px
                            vals.append(float(b[yy, xx]) if 0 <= yy < h and 0 <= xx < w else 1.0)
                out[p, i, j] = max(vals)
    return out


@pytest.mark.parametrize("crop", [True, False])
def test_path_max_and_affinity_match_the_definition(crop):
    b = torch.rand(9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _path_max_reference(b, 4, crop)
    torch.testing.assert_close(path_max(b, 4, crop=crop), ref)
    torch.testing.assert_close(boundary_affinity(b[None], 4, crop=crop)[0], 1 - ref)


def test_path_max_gradient_reaches_each_paths_maximum_only():
    b = torch.zeros(1, 4, 8)
    b[0, 0, 4] = 0.9  # on the path (0,3)→(0,6), off the path (0,3)→(1,3)
    b.requires_grad_(True)
    m = path_max(b, 4)  # sources: row 0, cols 3..4
    v = m.detach()
    across, down = affinity_offsets(4).index((0, 3)), affinity_offsets(4).index((1, 0))
    assert float(v[0, across, 0, 0]) == pytest.approx(0.9) and float(v[0, down, 0, 0]) == 0
    m[0, across, 0, 0].backward()
    assert b.grad[0, 0, 4] == 1 and b.grad.abs().sum() == 1


def test_ir_labels_thresholds():
    """IR labels: fg where max CAM > 0.30, bg where max CAM ≤ 0.05 (ties go to the plane), 255 between."""
    cams = torch.tensor([[[0.50, 0.31, 0.30, 0.20, 0.05, 0.01]], [[0.10, 0.00, 0.00, 0.00, 0.00, 0.00]]])
    label = affinity_labels(cams, torch.tensor([3, 7]), mode="threshold", conf_fg=0.30, conf_bg=0.05)
    assert label[0].tolist() == [3, 3, 255, 255, 0, 0]
    cams2 = torch.tensor([[[0.1, 0.6]], [[0.4, 0.2]]])
    assert affinity_labels(cams2, torch.tensor([3, 7]))[0].tolist() == [7, 3]


def test_loss_balancing_is_irn_s():
    """(L_bg/2 + L_fg/2 + L_neg)/2, each term a mean over its own pair count, whatever the counts."""
    labels = torch.tensor([[[0, 0, 0, 5, 5, 255, 2, 2]] * 4])
    aff = torch.rand(1, len(affinity_offsets(2)), 3, 6, generator=torch.Generator().manual_seed(1))
    bg, fg, neg = pair_labels(labels, 2)
    total, terms = affinity_loss(aff, bg, fg, neg)
    lbg = -(torch.log(aff[bg] + 1e-5)).sum() / (bg.sum() + 1e-5)
    lfg = -(torch.log(aff[fg] + 1e-5)).sum() / (fg.sum() + 1e-5)
    lneg = -(torch.log(1 + 1e-5 - aff[neg])).sum() / (neg.sum() + 1e-5)
    assert bg.sum() != fg.sum() != neg.sum()
    torch.testing.assert_close(total, (lbg / 2 + lfg / 2 + lneg) / 2)
    torch.testing.assert_close(terms["neg"], lneg)
    irn_total, irn_terms = balanced_pair_loss(aff, bg, fg, neg)  # psa's and irn's balance are the same
    torch.testing.assert_close(irn_total, total)
    # with the processes' mean counts (here: twice this batch's), each term is divided by those instead
    half, half_terms = balanced_pair_loss(aff, bg, fg, neg, mean_counts=lambda c: 2 * c)
    torch.testing.assert_close(half, total / 2, rtol=1e-4, atol=1e-6)


def _dense_transition(aff: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """T = column-normalised A^β, A symmetric with 1 on the diagonal and a_ij for in-map pairs within radius."""
    _, h, w = aff.shape
    n = h * w
    a = torch.eye(n, dtype=aff.dtype)
    for p, (dy, dx) in enumerate(affinity_offsets(radius)):
        for y, x in itertools.product(range(h), range(w)):
            ty, tx = y + dy, x + dx
            if 0 <= ty < h and 0 <= tx < w:
                a[y * w + x, ty * w + tx] = a[ty * w + tx, y * w + x] = aff[p, y, x]
    t = a.pow(beta)
    return t / t.sum(0, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h, w, radius, logt", [(6, 7, 3, 4), (5, 9, 5, 8), (2, 3, 5, 3)])
def test_walk_on_given_affinities_equals_dense_transition(backend, h, w, radius, logt):
    g = torch.Generator().manual_seed(h * w)
    aff = torch.rand(len(affinity_offsets(radius)), h, w, generator=g, dtype=torch.float64)
    scores = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    scores[1] = 0
    t = _dense_transition(aff, radius, 10.0)
    ref = (scores.reshape(3, -1) @ torch.linalg.matrix_power(t, 2**logt)).reshape(3, h, w)
    out = random_walk_affinity(scores, aff, radius=radius, beta=10.0, logt=logt, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    assert out[1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_irn_fills_the_region_a_boundary_encloses(backend):
    """A square boundary: the CAM peak inside spreads to the whole square and stops at the boundary."""
    H = W = 48
    b = torch.zeros(12, 12)
    b[2, 2:10] = b[9, 2:10] = b[2:10, 2] = b[2:10, 9] = 1.0
    cams = torch.zeros(1, H, W)
    cams[0, 20:28, 20:28] = 1.0
    label = propagate_irn(cams, torch.tensor([4]), b, beta=10, logt=8, radius=5, bg_threshold=0.25, backend=backend)
    assert label.shape == (H, W)
    assert (label[14:34, 14:34] == 4).float().mean() > 0.95  # the inside of the square (cells 3..8)
    assert (label[:6] == 0).all() and (label[:, 42:] == 0).all()  # outside stays background
    assert set(label.unique().tolist()) <= {0, 4}


def test_propagate_irn_without_classes_is_background():
    label = propagate_irn(torch.zeros(0, 10, 13), torch.zeros(0, dtype=torch.long), torch.rand(3, 4))
    assert label.shape == (10, 13) and label.max() == 0


def test_irn_keys_enter_the_fingerprints_only_with_refine_irn():
    from wsss_dist.config import make_config
    from wsss_dist.fingerprints import stage_settings

    psa, irn = make_config([]), make_config(["refine=irn", "irn.beta=12"])
    for stage in ("aff", "pseudo"):
        assert not any(k == "refine" or k.startswith("irn.") for k in stage_settings(psa, stage))  # as before IRN
        assert stage_settings(irn, stage)["refine"] == "irn"
    assert stage_settings(irn, "pseudo")["irn.beta"] == 12 and "irn.beta" not in stage_settings(irn, "aff")
    assert "irn.train.steps" in stage_settings(irn, "aff") and "irn.train.steps" not in stage_settings(irn, "pseudo")
    assert "eval.crf" not in stage_settings(psa, "eval")
    crf = stage_settings(make_config(["eval.crf=true", "eval.crf_workers=3"]), "eval")
    assert crf["eval.crf"] is True and crf["eval.crf_bi_xy_std"] == 67 and "eval.crf_workers" not in crf  # operational
    assert "irn" in irn.run  # the default run name tells the refinement apart
    from wsss_dist.config.sweeps import sweep_points

    _, points = sweep_points(["refine=[psa,irn]", "stage=all"])  # a sweep axis
    assert [p.name for p in points] == ["psa", "irn"]


@pytest.mark.slow
def test_toy_chain_with_irn_and_crf(shards, tmp_path):
    """stage cls → eval with refine=irn (and eval.crf where pydensecrf2 is installed): IRN's boundary network trains
    on a frozen backbone, its pseudo labels hold only the image's classes, eval scores both numbers."""
    import importlib.util
    import numpy as np

    from wsss_dist import pipeline, runs
    from wsss_dist.config import make_config
    from wsss_dist.data.shards import read_shard
    from wsss_dist.models.build import load_trained

    crf = importlib.util.find_spec("pydensecrf") is not None
    cfg = make_config(shards + [f"run={tmp_path / 'run'}", "stage=[cls,cam,aff,pseudo,seg,eval]", "refine=irn",
                                "irn.train.steps=6", "irn.train.batch_size=4", "irn.train.crop=48", "irn.radius=5",
                                f"eval.crf={str(crf).lower()}", "eval.crf_workers=2", f"pseudo.crf={str(crf).lower()}"])
    out = pipeline.run(cfg)
    assert runs.read_json(cfg.run_dir / "aff" / "model.json")["kind"] == "irn"
    model, cls = load_trained(cfg, "aff", "test"), load_trained(cfg, "cls", "test")
    trained = cls.backbone.state_dict()  # toy: irn.init=cls, and the backbone stays frozen while the branch learns
    assert all(torch.equal(v, trained[k]) for k, v in model.backbone.state_dict().items())
    assert 0 <= out["pseudo"]["miou"] <= 1 and out["pseudo"]["samples"] == 48
    done = {st: runs.read_json(cfg.run_dir / st / "DONE") for st in ("cam", "pseudo")}
    assert done["pseudo"]["miou"] > done["cam"]["miou"], (done["pseudo"]["miou"], done["cam"]["miou"])  # IRN refines
    if crf:  # pseudo.crf: the CRF labels are written, both numbers in DONE
        assert 0 <= done["pseudo"]["crf_miou"] <= 1 and done["pseudo"]["crf_image"] == "rgb"
    for url in sorted((cfg.run_dir / "pseudo").glob("*.tar")):  # labels ⊂ {background} ∪ the image's classes
        cams = {s["__key__"]: s for s in read_shard(str(cfg.run_dir / "cam" / url.name), ("cam.json",))}
        for s in read_shard(str(url), ("png",)):
            label = np.asarray(s["png"])
            assert set(np.unique(label).tolist()) <= {0, *cams[s["__key__"]]["cam.json"]["classes"]}
    ev = out["eval"]
    assert 0 <= ev["miou"] <= 1 and ev["samples"] == 12
    if crf:
        assert 0 <= ev["crf_miou"] <= 1 and ev["crf_image"] == "rgb" and len(ev["crf_iou"]) == 21
        assert runs.read_json(cfg.run_dir / "eval" / "metrics.json")["crf_miou"] == ev["crf_miou"]
