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

``refine=irn`` (IRN, :mod:`wsss_dist.methods.irn`): labels by irn's thresholds (``aff.conf_fg`` / ``aff.conf_bg``,
0.30 / 0.05); model: IRN's class-boundary branch on a frozen ResNet (``irn.backbone``), boundary map B at stride 4;
objective: for pairs within ``irn.radius`` (10) of the labels at stride 4, a_ij = 1 − max B on the path i→j and the
same balanced loss (bg/4 + fg/4 + neg/2); trained with ``irn.train`` / ``irn.optim``.
"""
from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.records import CAM_KEYS, decode_cam, encode_label
from ..data.stream import train_loader_for
from ..engine import map_shards, mean_over_processes, train_model
from ..methods.affinity import affinity_labels, affinity_loss, pair_labels, pairwise_affinity
from ..methods.crf import crf_for
from ..methods.irn import balanced_pair_loss, boundary_affinity
from ..models.build import affinity_spec, build_affinity, build_irn, irn_spec

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
    mode = "threshold" if cfg.refine == "irn" else a.label_mode  # IRN's IR labels are the threshold labels
    prepare = partial(label_record, crf=a.crf, mode=mode, conf_fg=a.conf_fg, conf_bg=a.conf_bg,
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


def make_irn_loss(radius: int):
    """IRN's boundary objective as an engine ``loss_fn``: the boundary map at stride 4, the labels resized to it
    (nearest), affinities 1 − path max of the boundary, irn's balanced pair loss with the processes' mean counts."""

    def loss_fn(model, batch, step):
        boundary = torch.sigmoid(model(batch["image"]).float())[:, 0]
        labels = F.interpolate(batch["mask"][:, None].float(), size=boundary.shape[-2:], mode="nearest")[:, 0].long()
        bg, fg, neg = pair_labels(labels, radius)
        loss, terms = balanced_pair_loss(boundary_affinity(boundary, radius), bg, fg, neg, mean_over_processes)
        return loss, {k: v.detach() for k, v in terms.items()}

    return loss_fn


def run(cfg: Config) -> dict:
    """Write affinity labels from CAMs, then train the refinement network on them (AffinityNet, or IRN's boundaries)."""
    runs.require_done(cfg.run_dir, "cam", "aff")
    result = write_labels(cfg)
    out = runs.stage_dir(cfg.run_dir, "aff")
    if cfg.refine == "irn":
        t, o, spec, build, loss = cfg.irn.train, cfg.irn.optim, irn_spec(cfg), build_irn, make_irn_loss(cfg.irn.radius)
        extra = {"scale_range": cfg.irn.scale_range}
    else:
        t, o, spec, build, loss = cfg.aff.train, cfg.aff.optim, affinity_spec(cfg), build_affinity, make_loss(cfg.aff.radius)
        extra = {}
    loader = train_loader_for(cfg, t, cfg.cam.split, mask_dir=out / "labels", **extra)
    metrics, _ = train_model(out, spec, lambda: build(cfg), lambda model: model.param_groups(o.lr, o.weight_decay),
                             loss_fn=loss, make_loader=loader, train=t, optim=o, log_name="aff", log_with=cfg.log_with)
    return {**metrics, "label_samples": result["samples"]}
