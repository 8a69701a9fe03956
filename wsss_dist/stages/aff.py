"""Stage aff: AffinityNet trained on affinity labels derived from the CAMs (psa).

Inputs: CAM shards (stage cam) and the images. Labels: per pixel, confident foreground (its class),
confident background (0) or unsure (255) — irn's thresholds (``aff.label_mode=threshold``: max CAM > conf_fg /
< conf_bg) or psa's background powers (``psa``: (1 − max CAM)^α with α = alpha_low / alpha_high), optionally through psa's
dense CRF (``aff.crf=true``, the ``[crf]`` extra). They are written
as label shards (``aff/labels/*.tar``, png) next to the images, so the standard joint-augmentation stream serves them.
Model: three backbone levels → 1×1 convs → 448-d features f at stride 8 (``aff.stride=4``: plus the stride-4
level, for small images), backbone from ImageNet weights or, ``aff.init=cls``, the trained classifier. Objective: for pixel pairs i, j within
``aff.radius``, a_ij = exp(−mean |f_i − f_j|), L = L_bg+/4 + L_fg+/4 + L_neg/2 with L+ = −log a, L− = −log(1 − a).
Engine: :func:`wsss_dist.engine.fit`. Outputs: ``aff/model.safetensors`` and ``aff/model.json``.
"""
from __future__ import annotations

import logging
from functools import partial

import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.records import CAM_KEYS, decode_cam, encode_label
from ..data.stream import train_loader_for
from ..engine import map_shards, train_model
from ..methods.affinity import affinity_labels, affinity_loss, pair_labels, pairwise_affinity
from ..methods.crf import crf_for
from ..models.build import affinity_spec, build_affinity

logger = logging.getLogger(__name__)


def label_record(sample: dict, crf: bool, **options: float | str) -> dict:
    """In a reader worker: the sample's affinity label record (``label``) from its CAM record (``options``: of
    :func:`~wsss_dist.methods.affinity.affinity_labels`)."""
    cams, classes = decode_cam(sample)
    label = affinity_labels(cams, classes, crf=crf_for(sample["jpg"]) if crf else None, **options)
    return {"__key__": sample["__key__"], "label": encode_label(sample["__key__"], label.numpy())}


def write_labels(cfg: Config) -> dict:
    """Affinity label shards from the CAM shards (one per CAM shard, resumable; labels made in the reader workers)."""
    a = cfg.aff
    prepare = partial(label_record, crf=a.crf, mode=a.label_mode, conf_fg=a.conf_fg, conf_bg=a.conf_bg,
                      alpha_low=a.alpha_low, alpha_high=a.alpha_high)
    keys = ("cls.npy", "jpg") if a.crf else ("cls.npy",)
    return map_shards(cfg, cfg.cam.split, cfg.run_dir / "aff" / "labels", keys, lambda sample: (sample["label"], None),
                      paired=[(cfg.run_dir / "cam", CAM_KEYS)], desc="aff labels", stage="aff", prepare=prepare)


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
    out = runs.stage_dir(cfg.run_dir, "aff")
    t, o = cfg.aff.train, cfg.aff.optim
    metrics, _ = train_model(out, affinity_spec(cfg), lambda: build_affinity(cfg),
                             lambda model: model.param_groups(o.lr, o.weight_decay), loss_fn=make_loss(cfg.aff.radius),
                             make_loader=train_loader_for(cfg, t, cfg.cam.split, mask_dir=out / "labels"), train=t,
                             optim=o, log_name="aff", log_with=cfg.log_with)
    return {**metrics, "label_samples": result["samples"]}
