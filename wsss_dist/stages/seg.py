"""Stage seg: DeepLab-v2 (ResNet + ASPP 6/12/18/24, output stride 8) trained on the pseudo labels.

Inputs: images and pseudo-label shards (stage pseudo). Augmentation: random scale in ``seg.scale_range``, flip,
crop ``seg.train.crop`` (labels padded with 255). Objective: per-pixel cross-entropy of the logits, upsampled to
the crop, ignoring 255. Init: ImageNet ``seg.weights`` (reference) or, ``seg.init=cls`` (toy: no ImageNet weights
on a CPU box), the trained classifier's backbone. Optimiser: poly SGD, backbone 1×, ASPP weights 10×, ASPP biases 20×
(deeplab-pytorch).
Engine: :func:`wsss_dist.engine.fit`. Outputs: ``seg/model.safetensors`` and ``seg/model.json``.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.stream import train_loader_for
from ..engine import train_model
from ..metrics import IGNORE
from ..models.build import build_deeplab, deeplab_spec


def loss_fn(model, batch, step):
    """Cross-entropy over pixels (IGNORE = 255 left out), logits upsampled to the label size."""
    logits = model(batch["image"]).float()
    logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE), {}


def run(cfg: Config) -> dict:
    """Train DeepLab-v2 on the pseudo labels of ``cam.split``."""
    runs.require_done(cfg.run_dir, "pseudo", "seg")
    out = runs.stage_dir(cfg.run_dir, "seg")
    t, o = cfg.seg.train, cfg.seg.optim
    make_loader = train_loader_for(cfg, t, cfg.cam.split, mask_dir=cfg.run_dir / "pseudo", scale_range=cfg.seg.scale_range)
    metrics, _ = train_model(out, deeplab_spec(cfg), lambda: build_deeplab(cfg),
                             lambda model: model.param_groups(o.lr, o.weight_decay), loss_fn=loss_fn,
                             make_loader=make_loader, train=t, optim=o, log_name="seg", log_with=cfg.log_with)
    return metrics
