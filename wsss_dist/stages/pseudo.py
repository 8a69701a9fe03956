"""Stage pseudo: random walk with AffinityNet's affinities refines the CAMs into pseudo labels (psa).

Inputs: images, CAM shards (stage cam), the trained AffinityNet (stage aff). Per image: scores =
[(1 − max_c CAM)^α ; CAMs], average-pooled to AffinityNet's grid (stride 8, or 4 with ``aff.stride=4``);
transition T = D⁻¹ A^β over pixel pairs within ``pseudo.radius`` (a_ij = exp(−mean |f_i − f_j|), self-affinity 1);
scores · T^(2^logt) by sparse neighbourhood propagation; upsampled, argmax → label. Outputs: pseudo-label shards
(``png``, same keys) and ``pseudo/DONE`` with the pseudo-label mIoU on ``cam.eval_split``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.records import CAM_KEYS, decode_cam, encode_label
from ..data.shards import load_manifest, split_ids
from ..data.stream import image_tensor
from ..engine import dist, map_shards
from ..methods.random_walk import propagate_labels
from ..metrics import gt_confusion, miou_metrics
from ..models.build import load_trained

logger = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Pseudo labels for ``cam.split`` and their mIoU."""
    runs.require_done(cfg.run_dir, "cam", "pseudo")
    d = dist()
    model = load_trained(cfg, "aff", "pseudo").to(d.device)
    p = cfg.pseudo
    ids = set(split_ids(load_manifest(cfg.shards_dir, verify=False), cfg.cam.eval_split))

    @torch.no_grad()
    def process(sample: dict) -> tuple[dict, np.ndarray]:
        x = image_tensor(sample, d.device)
        H, W = x.shape[-2:]
        ph, pw = -H % 8, -W % 8
        s = model.stride
        feats = model(torch.nn.functional.pad(x, (0, pw, 0, ph)))[0, :, : -(-H // s), : -(-W // s)].float()
        cams, classes = decode_cam(sample)
        label = propagate_labels(cams.to(d.device), classes.to(d.device), feats, alpha=p.alpha, beta=p.beta,
                                 logt=p.logt, radius=p.radius, stride=s)
        label = label.cpu().numpy().astype(np.uint8)
        return encode_label(sample["__key__"], label), label

    def evaluate(sample: dict, label: np.ndarray) -> np.ndarray | None:
        return gt_confusion(label, sample) if sample["__key__"] in ids else None

    result = map_shards(cfg, cfg.cam.split, runs.stage_dir(cfg.run_dir, "pseudo"), ("jpg", "seg.png?"), process,
                        evaluate, paired=[(cfg.run_dir / "cam", CAM_KEYS)], desc="pseudo")
    return {"samples": result["samples"], "skipped": result["skipped"], "eval_split": cfg.cam.eval_split,
            **miou_metrics(result["cm"])}
