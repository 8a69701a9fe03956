"""Stage eval: DeepLab-v2 predictions on val (multi-scale max fusion, optional flip) and their mIoU.

Inputs: the trained DeepLab (stage seg) and the val shards. Outputs: prediction shards ``eval/val-*.tar`` (png),
``eval/metrics.json`` and ``eval/DONE`` (mIoU, per-class IoU, confusion matrix).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import runs
from ..config import Config
from ..data.datasets import num_labels
from ..data.records import encode_label
from ..data.stream import image_tensor, prepare_image
from ..engine import dist, map_shards
from ..metrics import gt_confusion, miou_metrics
from ..models.build import load_trained


def run(cfg: Config) -> dict:
    """Predict every val image and score the predictions."""
    d = dist()
    model = load_trained(cfg, "seg", "eval").to(d.device)
    s = cfg.seg
    labels_count = num_labels(cfg)  # background + the dataset's classes (the confusion matrix's size)

    @torch.no_grad()
    def process(sample: dict) -> tuple[Callable[[], dict], torch.Tensor]:
        logits = model.predict(image_tensor(sample, d.device), scales=s.eval_scales, flip=s.eval_flip)
        pred = logits[0].max(0).indices.to(torch.uint8)  # argmax (first maximum, ~4× faster on CPU); to the host in the writer thread
        return lambda: encode_label(sample["__key__"], pred.cpu().numpy()), pred

    result = map_shards(cfg, "val", runs.stage_dir(cfg.run_dir, "eval"), ("jpg", "seg.png?"), process,
                        lambda sample, pred: gt_confusion(pred.cpu().numpy(), sample, labels_count), desc="eval",
                        prepare=prepare_image)
    metrics = {"samples": result["samples"], "skipped": result["skipped"], "split": "val", **miou_metrics(result["cm"])}
    if d.main:
        runs.write_json(cfg.run_dir / "eval" / "metrics.json", metrics)
    return metrics
