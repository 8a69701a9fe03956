"""Stage pseudo: random walk with AffinityNet's affinities refines the CAMs into pseudo labels (psa).

Inputs: images, CAM shards (stage cam), the trained AffinityNet (stage aff). Per image: scores =
[(1 − max_c CAM)^α ; CAMs], average-pooled to AffinityNet's grid (stride 8, or 4 with ``aff.stride=4``);
transition T = D⁻¹ A^β over pixel pairs within ``pseudo.radius`` (a_ij = exp(−mean |f_i − f_j|), self-affinity 1);
scores · T^(2^logt) by sparse neighbourhood propagation; upsampled, argmax → label. Outputs: pseudo-label shards
(``png``, same keys) and ``pseudo/DONE`` with the pseudo-label mIoU on ``cam.eval_split``.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.records import CAM_KEYS, decode_cam, encode_label
from ..data.shards import load_manifest, manifest_classes, split_ids
from ..data.stream import image_tensor, prepare_image
from ..engine import dist, map_shards
from ..methods.random_walk import propagate_labels
from ..metrics import gt_confusion, miou_metrics
from ..models.build import load_trained

logger = logging.getLogger(__name__)


def prepare(sample: dict) -> dict:
    """In a reader worker: the normalised image and the CAMs decoded to the image size (``cams``: CAMs, classes)."""
    sample["cams"] = decode_cam(sample)
    return prepare_image(sample)


def run(cfg: Config) -> dict:
    """Pseudo labels for ``cam.split`` and their mIoU."""
    runs.require_done(cfg.run_dir, "cam", "pseudo")
    d = dist()
    model = load_trained(cfg, "aff", "pseudo").to(d.device)
    p = cfg.pseudo
    manifest = load_manifest(cfg.shards_dir, verify=False)
    ids = set(split_ids(manifest, cfg.cam.eval_split))
    labels_count = len(manifest_classes(manifest)) + 1  # background + the dataset's classes

    @torch.no_grad()
    def process(sample: dict) -> tuple[Callable[[], dict], torch.Tensor]:
        x = image_tensor(sample, d.device)
        H, W = x.shape[-2:]
        ph, pw = -H % 8, -W % 8
        s = model.stride
        feats = model(torch.nn.functional.pad(x, (0, pw, 0, ph)))[0, :, : -(-H // s), : -(-W // s)].float()
        cams, classes = (t.to(d.device, non_blocking=True) for t in sample["cams"])
        label = propagate_labels(cams, classes, feats, alpha=p.alpha, beta=p.beta, logt=p.logt, radius=p.radius,
                                 stride=s).to(torch.uint8)  # to the host in the writer thread
        return lambda: encode_label(sample["__key__"], label.cpu().numpy()), label

    def evaluate(sample: dict, label: torch.Tensor) -> np.ndarray | None:
        return gt_confusion(label.cpu().numpy(), sample, labels_count) if sample["__key__"] in ids else None

    result = map_shards(cfg, cfg.cam.split, runs.stage_dir(cfg.run_dir, "pseudo"), ("jpg", "seg.png?"), process,
                        evaluate, paired=[(cfg.run_dir / "cam", CAM_KEYS)], desc="pseudo", prepare=prepare)
    return {"samples": result["samples"], "skipped": result["skipped"], "eval_split": cfg.cam.eval_split,
            **miou_metrics(result["cm"])}
