"""Stage shards: the dataset (toy generator, or the user's VOC2012 + SBD) packed into WebDataset tar shards.

Inputs: ``data=toy`` (generated under ``data.toy.root``, default ``<shards dir>/src``, deterministic from ``data.toy.seed``) or ``data=voc``
(``data.voc_root``, optional ``data.sbd_root`` and ``data.lists_dir``). Outputs: ``{split}-{index:06d}.tar`` for
train, val and train_aug plus ``manifest.json`` in ``data.shards_dir``. Unchanged inputs: every tar is verified against
the manifest (size, sha256) and only missing or different tars are rebuilt; an intact set is not rewritten.
"""
from __future__ import annotations

import logging
from ..config import Config, data_settings
from ..data.shards import update_shards
from ..data.toy import generate
from ..data.voc import VOCSource

logger = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Build, or verify and repair, the shards; ``{split: samples, shards, verified, rebuilt, verify_seconds, ...}``."""
    d = cfg.data
    if d.name == "toy":
        voc_root, sbd_root = generate(cfg.toy_root, d.toy)
        source = VOCSource(voc_root, sbd_root)
    else:
        source = VOCSource(d.voc_root, d.sbd_root, d.lists_dir)
    report = update_shards(source, cfg.shards_dir, shard_size=d.shard_size, settings=data_settings(cfg))
    manifest = report.manifest
    metrics: dict = {split: info["total"] for split, info in manifest["splits"].items()}
    metrics["shards"] = sum(len(info["shards"]) for info in manifest["splits"].values())
    metrics["verified"] = report.verified
    metrics["rebuilt"] = len(report.rebuilt)
    metrics["verify_seconds"] = report.verify_seconds
    metrics["shards_dir"] = str(cfg.shards_dir)
    return metrics
