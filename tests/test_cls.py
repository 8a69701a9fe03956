"""Each CAM method's objective falls when trained on toy shards; batched TTA equals a per-scale loop."""
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_dist.config import make_config
from wsss_dist.data.shards import split_urls
from wsss_dist.data.stream import train_loader
from wsss_dist.engine import fit
from wsss_dist.stages import cam as cam_stage
from wsss_dist.stages import cls as cls_stage
from wsss_dist.data.stream import train_loader_for
from wsss_dist.models.build import build_classifier

pytestmark = pytest.mark.slow  # each method trained until its loss falls


@pytest.mark.parametrize("method", ["cam", "mixup", "fmix", "manifold", "sc"])
def test_method_loss_falls(shards, tmp_path, method):
    """20 steps bring each objective below 0.9 of its start. Seeded as the stage seeds (train.seed before the build)
    and with fixed sub-labels, the test does not depend on what ran before it in the process: with unseeded initial
    weights, sc's ratio after 20 steps ranged 0.52-0.87 over 14 inits and once, in a full run, 0.99 (measured
    2026-12-06, seed 0: 0.48-0.52 for cam, mixup, fmix and manifold, 0.73 for sc)."""
    cfg = make_config(shards + [f"run={tmp_path}", f"method={method}", "cls.train.steps=20", "cls.optim.lr=3e-3",
                                "cls.train.mixed_precision=no", "cls.train.ckpt_every=1000"])
    num_sub = 7 if method == "sc" else 0
    urls = split_urls(cfg.shards_dir, "train_aug")
    batch = next(train_loader(urls, batch_size=16, crop=48, resize_long=(40, 56), seed=5))
    sub = None
    if method == "sc":  # synthetic sub-labels: one of 7 sub-categories per image, from its key
        keys = [s for u in urls for s in _keys(u)]
        sub = {k: np.eye(num_sub, dtype=np.float32)[zlib.crc32(k.encode()) % num_sub] for k in keys}
    loss_fn = cls_stage.make_loss(cfg, sub)

    def objective(model):
        torch.manual_seed(0)
        model.train()
        with torch.no_grad():
            return float(loss_fn(model, batch, 0)[0])

    torch.manual_seed(cfg.cls.train.seed)  # as the stage's trainer stamp: the initial weights are a function of the seed
    model = build_classifier(cfg, num_sub=num_sub)
    before = objective(model)
    fit(model=model, param_groups=model.param_groups(cfg.cls.optim.lr, 0.0), loss_fn=loss_fn,
        make_loader=train_loader_for(cfg, cfg.cls.train, "train_aug"), out_dir=tmp_path / "cls",
        train=cfg.cls.train, optim=cfg.cls.optim)
    after = objective(model)
    assert after < 0.9 * before, (before, after)


def _keys(url):
    from wsss_dist.data.shards import read_shard
    return [s["__key__"] for s in read_shard(url, ("cls.npy",))]


def test_batched_tta_equals_per_scale_loop():
    from wsss_dist.models.backbones import create_backbone
    from wsss_dist.models.cam_net import CAMNet

    torch.manual_seed(0)
    model = CAMNet(create_backbone("resnet18", frozen_bn=False)).eval()
    x = torch.randn(1, 3, 40, 56)
    labels = torch.zeros(20)
    labels[[3, 11]] = 1
    got = cam_stage.multiscale_cam(model, x, labels, scales=(1.0, 0.5, 1.5), flip=True)
    total = torch.zeros(2, 40, 56)
    with torch.no_grad():
        for s in (1.0, 0.5, 1.5):
            for flip in (False, True):
                xs = F.interpolate(x, size=(round(40 * s), round(56 * s)), mode="bilinear", align_corners=False) if s != 1 else x
                xs = xs.flip(-1) if flip else xs
                c = F.relu(F.conv2d(model.backbone(xs), model.classifier.weight))[0, [3, 11]]
                c = F.interpolate(c[None], size=(40, 56), mode="bilinear", align_corners=False)[0]
                total += c.flip(-1) if flip else c
    want = total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)
    assert got.shape == (2, 40, 56)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
