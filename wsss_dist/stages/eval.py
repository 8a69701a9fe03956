"""Stage eval: DeepLab-v2 predictions on val (multi-scale max fusion, optional flip) and their mIoU.

Inputs: the trained DeepLab (stage seg) and the val shards. Outputs: prediction shards ``eval/val-*.tar`` (png),
``eval/metrics.json`` and ``eval/DONE`` (mIoU, per-class IoU, confusion matrix).

``eval.crf=true`` (deeplab-pytorch's post-processing, :func:`wsss_dist.methods.crf.crf_predictions`): each image's
softmax of the fused logits goes with its RGB image to a pool of CRF worker processes (``eval.crf_workers``) while
the next images are predicted; the CRF labels are scored too (``crf_miou``, ``crf_iou``, ``crf_confusion``) next to
the plain ones, which stay the stored predictions.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
from typing import Callable

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.datasets import num_labels
from ..data.records import encode_label
from ..data.stream import image_tensor, prepare_image
from ..engine import dist, map_shards
from ..methods.crf import CrfParams, crf_predictions
from ..metrics import gt_confusion, miou_metrics
from ..models.build import load_trained


def crf_params(cfg: Config) -> CrfParams:
    """The CRF settings of ``eval.crf_*``."""
    e = cfg.eval
    return CrfParams(iters=e.crf_iters, pos_w=e.crf_pos_w, pos_xy_std=e.crf_pos_xy_std, bi_w=e.crf_bi_w,
                     bi_xy_std=e.crf_bi_xy_std, bi_rgb_std=e.crf_bi_rgb_std, image=e.crf_image)


def crf_workers(cfg: Config) -> int:
    """CRF processes of this rank: ``eval.crf_workers``, or the CPUs it may use."""
    return cfg.eval.crf_workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run(cfg: Config) -> dict:
    """Predict every val image and score the predictions (and, with ``eval.crf``, their CRF-refined labels)."""
    d = dist()
    model = load_trained(cfg, "seg", "eval").to(d.device)
    s = cfg.seg
    labels_count = num_labels(cfg)  # background + the dataset's classes (the confusion matrix's size)
    pool = None
    if cfg.eval.crf:
        workers = crf_workers(cfg)
        # forked (like the reader workers) and started now, before map_shards starts its threads; they use no torch
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        pool.submit(int).result()
        in_flight = threading.BoundedSemaphore(2 * workers)  # bounds the probabilities waiting for a worker
        params = crf_params(cfg)

    @torch.no_grad()
    def process(sample: dict) -> tuple[Callable[[], dict], tuple]:
        logits = model.predict(image_tensor(sample, d.device), scales=s.eval_scales, flip=s.eval_flip)
        pred = logits[0].max(0).indices.to(torch.uint8)  # argmax (first maximum, ~4× faster on CPU); to the host in the writer thread
        crf = None
        if pool is not None:
            probs = torch.softmax(logits[0].float(), 0).cpu().numpy()
            in_flight.acquire()
            crf = pool.submit(crf_predictions, np.asarray(sample["jpg"]), probs, params)
            crf.add_done_callback(lambda _: in_flight.release())
        return lambda: encode_label(sample["__key__"], pred.cpu().numpy()), (pred, crf)

    def evaluate(sample: dict, out: tuple) -> np.ndarray | None:
        pred, crf = out
        cm = gt_confusion(pred.cpu().numpy(), sample, labels_count)
        if crf is None or cm is None:
            return cm
        return np.stack([cm, gt_confusion(crf.result(), sample, labels_count)])  # [2, C, C]: without, with CRF

    try:
        result = map_shards(cfg, "val", runs.stage_dir(cfg.run_dir, "eval"), ("jpg", "seg.png?"), process, evaluate,
                            desc="eval", prepare=prepare_image)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    cm = result["cm"]
    metrics = {"samples": result["samples"], "skipped": result["skipped"], "split": "val"}
    if cfg.eval.crf:
        plain, refined = (None, None) if cm is None else (cm[0], cm[1])
        metrics.update(miou_metrics(plain), **{f"crf_{k}": v for k, v in miou_metrics(refined).items()},
                       crf_image=cfg.eval.crf_image)
    else:
        metrics.update(miou_metrics(cm))
    if d.main:
        runs.write_json(cfg.run_dir / "eval" / "metrics.json", metrics)
    return metrics
