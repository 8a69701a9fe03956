"""Stage pseudo: random walk with AffinityNet's affinities refines the CAMs into pseudo labels (psa).

Inputs: images, CAM shards (stage cam), the trained AffinityNet (stage aff). Per image: scores =
[(1 − max_c CAM)^α ; CAMs], average-pooled to AffinityNet's grid (stride 8, or 4 with ``aff.stride=4``);
transition T = D⁻¹ A^β over pixel pairs within ``pseudo.radius`` (a_ij = exp(−mean |f_i − f_j|), self-affinity 1); scores · T^(2^logt) by sparse neighbourhood
propagation; upsampled, argmax → label. Outputs: pseudo-label shards (``png``, same keys) and ``pseudo/DONE``
with the pseudo-label mIoU on ``cam.eval_split``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.voc import write_mask_png
from ..methods.random_walk import propagate_labels
from .aff import load_trained, read_cams
from .common import check_skips, dist, eval_ids, gt_confusion, image_tensor, miou_metrics, shard_map

logger = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Pseudo labels for ``cam.split`` and their mIoU."""
    runs.require_done(cfg.run_dir, "cam", "pseudo")
    d = dist()
    model = load_trained(cfg).to(d.device)
    p = cfg.pseudo
    ids = eval_ids(cfg, cfg.cam.eval_split)

    @torch.no_grad()
    def process(sample: dict) -> dict:
        x = image_tensor(sample, d.device)
        H, W = x.shape[-2:]
        ph, pw = -H % 8, -W % 8
        s = model.stride
        feats = model(torch.nn.functional.pad(x, (0, pw, 0, ph)))[0, :, : -(-H // s), : -(-W // s)].float()
        cams, classes = read_cams(sample)
        label = propagate_labels(cams.to(d.device), classes.to(d.device), feats, alpha=p.alpha, beta=p.beta,
                                 logt=p.logt, radius=p.radius, stride=s)
        sample["_label"] = label = label.cpu().numpy().astype(np.uint8)
        return {"__key__": sample["__key__"], "png": write_mask_png(None, label)}

    def evaluate(sample: dict, out: dict) -> np.ndarray | None:
        return gt_confusion(sample["_label"], sample) if sample["__key__"] in ids else None

    result = shard_map(cfg, cfg.cam.split, runs.stage_dir(cfg.run_dir, "pseudo"), ("jpg", "seg.png?"), process, evaluate,
                       paired=[(cfg.run_dir / "cam", ("cam.npy", "cam.json"))], desc="pseudo")
    check_skips(result, cfg, "pseudo")
    return {"samples": result["samples"], "skipped": result["skipped"], "eval_split": cfg.cam.eval_split,
            **miou_metrics(result["cm"])}
