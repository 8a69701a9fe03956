"""Stage pseudo: random walk with AffinityNet's affinities refines the CAMs into pseudo labels (psa).

Inputs: images, CAM shards (stage cam), the trained AffinityNet (stage aff). Per image: scores =
[(1 − max_c CAM)^α ; CAMs], average-pooled to AffinityNet's grid (stride 8, or 4 with ``aff.stride=4``);
transition T = D⁻¹ A^β over pixel pairs within ``pseudo.radius`` (a_ij = exp(−mean |f_i − f_j|), self-affinity 1);
scores · T^(2^logt) by sparse neighbourhood propagation; upsampled, argmax → label. Outputs: pseudo-label shards
(``png``, same keys) and ``pseudo/DONE`` with the pseudo-label mIoU on ``cam.eval_split``.

``refine=irn`` (IRN, :func:`wsss_dist.methods.irn.propagate_irn`): the boundary map B at stride 4 (sigmoid of the
logits, averaged with the mirrored image's with ``irn.flip``); seeds CAM · (1 − B) (no background row); transition
from a = 1 − max B on each pair's path within ``irn.walk_radius`` (5), A^β (``irn.beta`` 10), 2^``irn.logt`` steps;
upsampled, divided by the global max, background plane ``irn.bg_threshold`` (0.25), argmax.

``pseudo.crf=true`` (:func:`wsss_dist.methods.crf.crf_labels`): the refinement's labels go through a dense CRF with
the image (deeplab-pytorch's kernels; unary ``pseudo.crf_gt_prob`` on each label, labels limited to background and
the image's classes); the CRF labels are written, and DONE holds the mIoU without (``miou``) and with (``crf_miou``).
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
from ..methods.crf import CrfParams, crf_labels
from ..methods.irn import propagate_irn
from ..methods.random_walk import propagate_labels
from ..metrics import gt_confusion, miou_metrics
from ..models.build import load_trained

logger = logging.getLogger(__name__)


def prepare(sample: dict) -> dict:
    """In a reader worker: the normalised image and the CAMs decoded to the image size (``cams``: CAMs, classes)."""
    sample["cams"] = decode_cam(sample)
    return prepare_image(sample)


def boundary_map(model: torch.nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """IRN's boundary probabilities [⌈H/4⌉, ⌈W/4⌉] of one image [1, 3, H, W] (padded to a multiple of 16; with
    ``flip`` the logits are averaged with the mirrored image's, un-mirrored)."""
    H, W = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, -W % 16, 0, -H % 16))
    logits = model(torch.cat([x, x.flip(-1)]) if flip else x).float()
    logit = (logits[0] + logits[1].flip(-1)) / 2 if flip else logits[0]
    return torch.sigmoid(logit[0, : -(-H // 4), : -(-W // 4)])


def run(cfg: Config) -> dict:
    """Pseudo labels for ``cam.split`` and their mIoU."""
    runs.require_done(cfg.run_dir, "cam", "pseudo")
    d = dist()
    model = load_trained(cfg, "aff", "pseudo").to(d.device)
    p = cfg.pseudo
    manifest = load_manifest(cfg.shards_dir, verify=False)
    ids = set(split_ids(manifest, cfg.cam.eval_split))
    labels_count = len(manifest_classes(manifest)) + 1  # background + the dataset's classes
    crf = CrfParams(image=p.crf_image)  # deeplab-pytorch's kernels (notes §14.1), as CLIP-ES on its pseudo masks

    @torch.no_grad()
    def process(sample: dict) -> tuple[Callable[[], dict], torch.Tensor]:
        x = image_tensor(sample, d.device)
        cams, classes = (t.to(d.device, non_blocking=True) for t in sample["cams"])
        if cfg.refine == "irn":
            label = propagate_irn(cams, classes, boundary_map(model, x, cfg.irn.flip), beta=cfg.irn.beta,
                                  logt=cfg.irn.logt, radius=cfg.irn.walk_radius, bg_threshold=cfg.irn.bg_threshold)
        else:
            H, W = x.shape[-2:]
            s = model.stride
            feats = model(torch.nn.functional.pad(x, (0, -W % 8, 0, -H % 8)))[0, :, : -(-H // s), : -(-W // s)].float()
            label = propagate_labels(cams, classes, feats, alpha=p.alpha, beta=p.beta, logt=p.logt, radius=p.radius,
                                     stride=s)
        label = label.to(torch.uint8)  # to the host in the writer thread
        if not p.crf:
            return lambda: encode_label(sample["__key__"], label.cpu().numpy()), label
        values = np.concatenate([[0], classes.cpu().numpy()]).astype(np.int64)
        refined = crf_labels(np.asarray(sample["jpg"]), label.cpu().numpy(), values, crf, p.crf_gt_prob)
        return lambda: encode_label(sample["__key__"], refined), (label, refined)

    def evaluate(sample: dict, out) -> np.ndarray | None:
        if sample["__key__"] not in ids:
            return None
        if not p.crf:
            return gt_confusion(out.cpu().numpy(), sample, labels_count)
        cm = gt_confusion(out[0].cpu().numpy(), sample, labels_count)
        return None if cm is None else np.stack([cm, gt_confusion(out[1], sample, labels_count)])  # without, with

    result = map_shards(cfg, cfg.cam.split, runs.stage_dir(cfg.run_dir, "pseudo"), ("jpg", "seg.png?"), process,
                        evaluate, paired=[(cfg.run_dir / "cam", CAM_KEYS)], desc="pseudo", prepare=prepare)
    out = {"samples": result["samples"], "skipped": result["skipped"], "eval_split": cfg.cam.eval_split}
    if p.crf:
        cm = result["cm"]
        plain, refined = (None, None) if cm is None else (cm[0], cm[1])
        return {**out, **miou_metrics(plain), **{f"crf_{k}": v for k, v in miou_metrics(refined).items()},
                "crf_image": p.crf_image}
    return {**out, **miou_metrics(result["cm"])}
