"""Stage eval: DeepLab-v2 predictions on val (multi-scale max fusion, optional flip) and their mIoU.

Outputs: prediction shards ``eval/val-*.tar`` (png), ``eval/metrics.json`` and ``eval/DONE``
(mIoU, per-class IoU, confusion matrix).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.voc import write_mask_png
from .common import check_skips, dist, gt_confusion, image_tensor, miou_metrics, shard_map
from .seg import load_trained


def run(cfg: Config) -> dict:
    """Predict every val image and score the predictions."""
    d = dist()
    model = load_trained(cfg).to(d.device)
    s = cfg.seg

    @torch.no_grad()
    def process(sample: dict) -> dict:
        logits = model.predict(image_tensor(sample, d.device), scales=s.eval_scales, flip=s.eval_flip)
        sample["_pred"] = pred = logits[0].argmax(0).cpu().numpy().astype(np.uint8)
        return {"__key__": sample["__key__"], "png": write_mask_png(None, pred)}

    result = shard_map(cfg, "val", runs.stage_dir(cfg.run_dir, "eval"), ("jpg", "seg.png?"), process,
                       lambda sample, out: gt_confusion(sample["_pred"], sample), desc="eval")
    check_skips(result, cfg, "eval")
    metrics = {"samples": result["samples"], "skipped": result["skipped"], "split": "val", **miou_metrics(result["cm"])}
    if d.main:
        runs.write_json(cfg.run_dir / "eval" / "metrics.json", metrics)
    return metrics
