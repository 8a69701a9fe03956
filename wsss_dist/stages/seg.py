"""Stage seg: DeepLab-v2 (ResNet + ASPP 6/12/18/24, output stride 8) trained on the pseudo labels.

Inputs: images and pseudo-label shards (stage pseudo). Augmentation: random scale in ``seg.scale_range``, flip,
crop ``seg.train.crop`` (labels padded with 255). Objective: per-pixel cross-entropy of the logits, upsampled to
the crop, ignoring 255. Init: ImageNet ``seg.weights`` (reference) or, ``seg.init=cls`` (toy: no ImageNet weights
on a CPU box), the trained classifier's backbone. Optimiser: poly SGD, backbone 1×, ASPP weights 10×, ASPP biases 20×
(deeplab-pytorch).
Engine: :func:`wsss_dist.engine.fit`. Outputs: ``seg/model.safetensors``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..engine import fit, load_model_weights
from ..models.backbones import create_backbone
from ..models.deeplab import DeepLabV2
from .cls import init_from_classifier
from .common import loader_factory


def build_model(cfg: Config, weights: bool = True) -> DeepLabV2:
    """DeepLab-v2 on ``seg.backbone``, initialised per ``seg.init`` (ImageNet ``seg.weights``, or the trained
    classifier's backbone) when ``weights``."""
    s = cfg.seg
    imagenet = s.weights if weights and s.init == "imagenet" else None
    model = DeepLabV2(create_backbone(s.backbone, weights=imagenet, output_stride=8, frozen_bn=s.frozen_bn), num_classes=21)
    if weights and s.init == "cls":
        init_from_classifier(cfg, model.backbone, s.backbone, "seg")
    return model


def load_trained(cfg: Config) -> DeepLabV2:
    """The trained segmentation network of this run, in eval mode."""
    runs.require_done(cfg.run_dir, "seg", "eval")
    model = build_model(cfg, weights=False)
    load_model_weights(model, cfg.run_dir / "seg" / "model.safetensors")
    return model.eval()


def loss_fn(model, batch, step):
    """Cross-entropy over pixels (255 ignored), logits upsampled to the label size."""
    logits = model(batch["image"]).float()
    logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, batch["mask"], ignore_index=255), {}


def run(cfg: Config) -> dict:
    """Train DeepLab-v2 on the pseudo labels of ``cam.split``."""
    runs.require_done(cfg.run_dir, "pseudo", "seg")
    t = cfg.seg.train
    torch.manual_seed(t.seed)  # initial weights are a function of the seed
    model = build_model(cfg)
    make_loader = loader_factory(cfg, t, cfg.cam.split, mask_dir=cfg.run_dir / "pseudo", scale_range=cfg.seg.scale_range)

    return fit(model=model, param_groups=model.param_groups(cfg.seg.optim.lr, cfg.seg.optim.weight_decay), loss_fn=loss_fn,
               make_loader=make_loader, out_dir=runs.stage_dir(cfg.run_dir, "seg"), train=t, optim=cfg.seg.optim, log_name="seg")
