"""Stage aff: AffinityNet trained on affinity labels derived from the CAMs (psa).

Inputs: CAM shards (stage cam) and the images. Labels: per pixel, confident foreground (its class),
confident background (0) or unsure (255) — irn's thresholds (``aff.label_mode=threshold``: max CAM > conf_fg /
< conf_bg) or psa's background powers (``psa``: (1 − max CAM)^α with α = alpha_low / alpha_high), optionally through psa's
dense CRF (``aff.crf=true``, the ``[crf]`` extra). They are written
as label shards (``aff/labels/*.tar``, png) next to the images, so the standard joint-augmentation stream serves them.
Model: three backbone levels → 1×1 convs → 448-d features f at stride 8 (``aff.stride=4``: plus the stride-4
level, for small images), backbone from ImageNet weights or, ``aff.init=cls``, the trained classifier. Objective: for pixel pairs i, j within
``aff.radius``, a_ij = exp(−mean |f_i − f_j|), L = L_bg+/4 + L_fg+/4 + L_neg/2 with L+ = −log a, L− = −log(1 − a).
Engine: :func:`wsss_dist.engine.fit`. Outputs: ``aff/model.safetensors``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.voc import write_mask_png
from ..engine import fit, load_model_weights
from ..methods.crf import crf_for
from ..methods.affinity import affinity_labels, affinity_loss, pair_labels, pairwise_affinity
from ..models.affinity_net import AffinityNet
from ..models.backbones import create_backbone
from .cls import init_from_classifier
from .common import check_skips, loader_factory, shard_map

logger = logging.getLogger(__name__)


def build_model(cfg: Config, weights: bool = True) -> AffinityNet:
    """AffinityNet on ``cfg.model``'s backbone, initialised per ``aff.init`` (ImageNet ``model.weights`` or the
    trained classifier's backbone) when ``weights``."""
    m = cfg.model
    imagenet = m.weights if weights and cfg.aff.init == "imagenet" else None
    model = AffinityNet(create_backbone(m.backbone, weights=imagenet, output_stride=8, frozen_bn=m.frozen_bn),
                        stride=cfg.aff.stride)
    if weights and cfg.aff.init == "cls":
        init_from_classifier(cfg, model.backbone, m.backbone, "aff")
    return model


def load_trained(cfg: Config) -> AffinityNet:
    """The trained AffinityNet of this run, in eval mode."""
    runs.require_done(cfg.run_dir, "aff", "pseudo")
    model = build_model(cfg, weights=False)
    load_model_weights(model, cfg.run_dir / "aff" / "model.safetensors")
    return model.eval()


def read_cams(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A CAM-shard sample's CAMs [K, H, W] (float32, image size) and class ids [K]."""
    meta = sample["cam.json"]
    cams = torch.from_numpy(sample["cam.npy"].astype(np.float32))
    H, W = meta["size"]
    if cams.shape[-2:] != (H, W) and len(cams):
        cams = F.interpolate(cams[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return cams, torch.as_tensor(meta["classes"], dtype=torch.long)


def write_labels(cfg: Config) -> dict:
    """Affinity label shards from the CAM shards (one per CAM shard, resumable)."""
    a = cfg.aff
    cam_dir = cfg.run_dir / "cam"

    def process(sample: dict) -> dict:
        cams, classes = read_cams(sample)
        label = affinity_labels(cams, classes, mode=a.label_mode, conf_fg=a.conf_fg, conf_bg=a.conf_bg,
                                alpha_low=a.alpha_low, alpha_high=a.alpha_high,
                                crf=crf_for(sample["jpg"]) if a.crf else None)
        return {"__key__": sample["__key__"], "png": write_mask_png(None, label.numpy())}

    keys = ("cls.npy", "jpg") if a.crf else ("cls.npy",)
    return shard_map(cfg, cfg.cam.split, cfg.run_dir / "aff" / "labels", keys, process,
                     paired=[(cam_dir, ("cam.npy", "cam.json"))], desc="aff labels")


def make_loss(radius: int):
    """The AffinityNet objective as an engine ``loss_fn``."""

    def loss_fn(model, batch, step):
        feats = model(batch["image"]).float()
        labels = F.interpolate(batch["mask"][:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
        aff = pairwise_affinity(feats, radius)
        bg, fg, neg = pair_labels(labels, radius)
        loss, terms = affinity_loss(aff, bg, fg, neg)
        return loss, {k: v.detach() for k, v in terms.items()}

    return loss_fn


def run(cfg: Config) -> dict:
    """Write affinity labels from CAMs, then train AffinityNet on them."""
    runs.require_done(cfg.run_dir, "cam", "aff")
    result = write_labels(cfg)
    check_skips(result, cfg, "aff labels")
    out = runs.stage_dir(cfg.run_dir, "aff")
    label_dir = out / "labels"
    t = cfg.aff.train
    torch.manual_seed(t.seed)  # initial weights are a function of the seed
    model = build_model(cfg)
    make_loader = loader_factory(cfg, t, cfg.cam.split, mask_dir=label_dir)

    metrics = fit(model=model, param_groups=model.param_groups(cfg.aff.optim.lr, cfg.aff.optim.weight_decay),
                  loss_fn=make_loss(cfg.aff.radius), make_loader=make_loader, out_dir=out, train=t, optim=cfg.aff.optim,
                  log_name="aff")
    return {**metrics, "label_samples": result["samples"]}
