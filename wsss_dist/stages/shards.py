"""Stage shards: the dataset (toy generator, the user's VOC2012 + SBD, COCO-2014 or own folder) packed into WebDataset
tar shards.

Inputs: ``data=toy`` (generated under ``data.toy.root``, default ``<shards dir>/src``, deterministic from ``data.toy.seed``), ``data=voc``
(``data.voc_root``, optional ``data.sbd_root`` and ``data.lists_dir``), ``data=coco`` (``data.coco_root``) or
``data=folder`` (``data.root``, ``data.labels``): :func:`wsss_dist.data.datasets.open_source`. Outputs: ``{split}-{index:06d}.tar`` for
train, val and train_aug plus ``manifest.json`` in ``data.shards_dir``. Unchanged inputs: every tar is verified against
the manifest (size, sha256) and only missing or different tars are rebuilt; an intact set is not rewritten.
"""
from __future__ import annotations

import logging
from ..config import Config, data_settings
from ..data.datasets import open_source
from ..data.shards import update_shards

logger = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Build, or verify and repair, the shards; ``{split: samples, shards, verified, rebuilt, verify_seconds, ...}``."""
    source = open_source(cfg)  # the dataset registry's source: toy (generated), voc, coco, folder
    report = update_shards(source, cfg.shards_dir, splits=source.splits, shard_size=cfg.data.shard_size,
                           settings=data_settings(cfg), workers=cfg.data.pack_workers)
    manifest = report.manifest
    metrics: dict = {split: info["total"] for split, info in manifest["splits"].items()}
    metrics["shards"] = sum(len(info["shards"]) for info in manifest["splits"].values())
    metrics["verified"] = report.verified
    metrics["rebuilt"] = len(report.rebuilt)
    metrics["verify_seconds"] = report.verify_seconds
    metrics["shards_dir"] = str(cfg.shards_dir)
    return metrics
