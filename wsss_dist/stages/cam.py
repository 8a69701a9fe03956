"""Stage cam: multi-scale + flip class activation maps, and their mIoU.

Inputs: the trained classifier (stage cls) and the ``cam.split`` shards. For each image and scale s in
``cam.scales``: CAM(s) = ReLU(conv(f(resize(x, s)), W)) for the image and its mirror (one batch of two; up to
``cam.batch_images`` consecutive same-size images of a shard share it),
upsampled to the image size, the mirror flipped back; CAM = Σ_s CAM(s) restricted to the image's classes,
then divided by its per-class spatial maximum (psa/irn). Outputs: one CAM shard per input shard
(``cam.npy`` float16 [K, ⌈H/out_stride⌉, ⌈W/out_stride⌉], ``cam.json`` {classes, size}) and ``cam/DONE`` with
the CAM mIoU of the ``cam.eval_split`` ids at background ``cam.bg_threshold`` plus a threshold sweep.

``method=clip_es`` (no classifier): the CAMs of a frozen CLIP (:mod:`wsss_dist.methods.clip_es`, ``clip.*`` keys),
CLIP-normalised images at ``clip.scales``; the prompts' text embeddings are computed once per run (rank 0) and
stored in ``cam/clip_text.npy`` + ``cam/clip_text.json`` (the prompts, arch and weights they were made from).
Same outputs.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..errors import ConfigError
from ..data.records import encode_cam
from ..data.shards import load_manifest, manifest_classes, split_ids
from ..data.stream import image_tensor, prepare_image
from ..engine import autocast, dist, map_shards
from ..metrics import miou_metrics, sweep_confusion
from ..models.build import load_trained
from ..registry import METHODS

logger = logging.getLogger(__name__)


@torch.inference_mode()
def multiscale_cam(model: torch.nn.Module, image: torch.Tensor, labels: torch.Tensor,
                   scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True) -> torch.Tensor:
    """Normalised CAMs [K, H, W] of the image's K classes (``labels``: multi-hot over the dataset's classes), summed over scales and flips."""
    x = image if image.dim() == 4 else image.unsqueeze(0)
    return multiscale_cams(model, x, [labels], scales, flip)[0]


@torch.inference_mode()
def multiscale_cams(model: torch.nn.Module, images: torch.Tensor, labels: Sequence[torch.Tensor],
                    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True) -> list[torch.Tensor]:
    """:func:`multiscale_cam` of N same-size images [N, 3, H, W] in one forward per scale (``labels``: N multi-hot)."""
    H, W = images.shape[-2:]
    classes = [torch.nonzero(torch.as_tensor(y).flatten() > 0.5).flatten().to(images.device) for y in labels]
    totals = [images.new_zeros((len(c), H, W), dtype=torch.float32) for c in classes]
    views = 2 if flip else 1
    for s in scales:
        xs = images if s == 1.0 else F.interpolate(images, size=(round(H * s), round(W * s)), mode="bilinear",
                                                   align_corners=False)
        batch = torch.stack([xs, xs.flip(-1)], 1).flatten(0, 1) if flip else xs  # each image, then its mirror
        out = model.cam(batch.contiguous(memory_format=torch.channels_last))
        for i, (c, total) in enumerate(zip(classes, totals)):
            cams = out[i * views:(i + 1) * views, c].float()
            # bilinear resizing commutes with the mirror: fold the flipped map back before upsampling (one resize)
            small = cams[0] + cams[1].flip(-1) if flip else cams[0]
            total += F.interpolate(small[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return [t / (t.amax(dim=(1, 2), keepdim=True) + 1e-5) for t in totals]


def cam_labels(cams: torch.Tensor, classes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label map [H, W]: argmax over [background plane = threshold, CAMs] mapped to class ids 0..K."""
    if len(classes) == 0:
        return torch.zeros(cams.shape[-2:], dtype=torch.long, device=cams.device)
    value, idx = cams.max(0)
    return torch.where(value > threshold, classes[idx], torch.zeros_like(idx))


def thresholds(cfg: Config) -> list[float]:
    """The reported threshold first, then the sweep."""
    return [cfg.cam.bg_threshold] + [t for t in cfg.cam.sweep if t != cfg.cam.bg_threshold]


def clip_text(cfg: Config, model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, background) text embeddings of the run's prompts: computed once by rank 0 into ``cam/clip_text.npy``
    (its ``.json`` written last names the prompts, arch and weights), read by every rank and every resume."""
    from ..data.datasets import dataset_classes
    from ..methods.clip_es import background_prompts, class_prompts
    from ..models.clip import text_embeddings

    k = cfg.clip
    names = dataset_classes(cfg)
    prompts = class_prompts(cfg.data.name, names, k.template) + background_prompts(cfg.data.name, k.background, k.template)
    made = {"prompts": prompts, "classes": len(names), "arch": k.arch, "weights": k.weights}
    folder = runs.stage_dir(cfg.run_dir, "cam")
    npy, meta = folder / "clip_text.npy", folder / "clip_text.json"
    d = dist()
    if d.main and not (meta.exists() and runs.read_json(meta) == made):
        emb = text_embeddings(model, k.arch, prompts, device).cpu().numpy()
        runs.write_npy(npy, emb)
        runs.write_json(meta, made)
        logger.info("clip_es: %d class + %d background prompt embeddings → %s", len(names), len(prompts) - len(names), npy)
    d.barrier()
    emb = torch.as_tensor(runs.read_npy(npy), device=device)
    return emb[:len(names)], emb[len(names):]


def cam_function(cfg: Config, device: torch.device) -> Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]:
    """``cams(x, labels)``: the method's CAMs [K_b, H, W] of same-size ImageNet-normalised images ``x`` [N, 3, H, W]
    (``labels``: N multi-hot): the trained classifier's multi-scale CAMs, or CLIP-ES's for method=clip_es."""
    c = cfg.cam
    if METHODS[cfg.method].trains_classifier:
        model = load_trained(cfg, "cls", "cam").to(device).to(memory_format=torch.channels_last)
        return lambda x, labels: multiscale_cams(model, x, labels, c.scales, c.flip)
    from ..data.transforms import renormalize
    from ..methods.clip_es import clip_es_cams
    from ..models.clip import CLIP_MEAN, CLIP_STD, build_clip

    k = cfg.clip
    clip = build_clip(k.arch, k.weights).to(device)
    class_emb, bg_emb = clip_text(cfg, clip, device)

    def cams(x: torch.Tensor, labels: list[torch.Tensor]) -> list[torch.Tensor]:
        classes = [torch.nonzero(torch.as_tensor(y).flatten() > 0.5).flatten().to(device) for y in labels]
        return clip_es_cams(clip, renormalize(x, CLIP_MEAN, CLIP_STD), classes, class_emb, bg_emb, k.scales,
                            refine_cams=k.refine, box_threshold=k.box_threshold, legacy_edge=k.legacy_box_edge,
                            attn_layers=k.attn_layers, rounds=k.sinkhorn_rounds, steps=k.refine_steps)

    return cams


def run(cfg: Config) -> dict:
    """Compute CAM shards for ``cam.split`` and the CAM mIoU (threshold sweep) on ``cam.eval_split``."""
    if cfg.cam.batch_images < 1:
        raise ConfigError(f"cam.batch_images={cfg.cam.batch_images}: images per CAM forward must be at least 1")
    d = dist()
    compute = cam_function(cfg, d.device)
    manifest = load_manifest(cfg.shards_dir, verify=False)
    ids = set(split_ids(manifest, cfg.cam.eval_split))
    labels_count = len(manifest_classes(manifest)) + 1  # background + the dataset's classes
    ths = thresholds(cfg)
    c = cfg.cam

    def process(samples: list[dict]) -> list[tuple[Callable[[], dict], tuple[torch.Tensor, torch.Tensor]]]:
        x = torch.cat([image_tensor(sample, d.device) for sample in samples])  # same-size images (map_shards' batch)
        labels = [torch.as_tensor(sample["cls.npy"]) for sample in samples]
        with autocast(d.device, c.mixed_precision):
            cams = compute(x, labels)
        H, W = x.shape[-2:]
        out = []
        for sample, y, cam in zip(samples, labels, cams):
            classes = (torch.nonzero(y > 0.5).flatten() + 1).to(d.device)
            small = F.interpolate(cam[None], size=(math.ceil(H / c.out_stride), math.ceil(W / c.out_stride)),
                                  mode="bilinear", align_corners=False)[0] if c.out_stride > 1 else cam
            record = partial(encode_cam, sample["__key__"], small, classes, (H, W))  # encoded by the writer thread
            out.append((record, (cam, classes)))
        return out

    def evaluate(sample: dict, prediction: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray | None:
        gt = sample.get("seg.png")
        if gt is None or sample["__key__"] not in ids:
            return None
        return sweep_confusion(*prediction, gt, ths, num_classes=labels_count)

    result = map_shards(cfg, c.split, runs.stage_dir(cfg.run_dir, "cam"), ("jpg", "cls.npy", "seg.png?"), process,
                        evaluate, desc="cam", prepare=prepare_image, batch=c.batch_images)
    cm = result["cm"]
    metrics = {"samples": result["samples"], "skipped": result["skipped"], "split": c.split,
               "eval_split": c.eval_split, "threshold": c.bg_threshold}
    metrics.update(miou_metrics(None if cm is None else cm[0]))
    if cm is not None:
        sweep = {f"{t:.2f}": miou_metrics(cm[i])["miou"] for i, t in enumerate(ths)}
        best = max(sweep, key=sweep.get)
        metrics.update(sweep=sweep, best_miou=sweep[best], best_threshold=float(best))
    return metrics
