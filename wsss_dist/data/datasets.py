"""The data layer of the dataset registry (:data:`wsss_dist.registry.DATASETS`): a run's class names and label count,
and the source the shards stage packs (VOC/SBD, the toy generator's VOC layout, COCO-2014, a user's folder).

A dataset whose registry entry names no classes (``folder``) reads them from its labels file; once the shards exist
every stage reads them from the manifest (``classes``), so a run's heads, metrics and report always agree with its
shards.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..registry import Dataset, get_dataset

logger = logging.getLogger(__name__)


def dataset_of(cfg: Any) -> Dataset:
    """The registry entry of ``cfg.data.name``."""
    return get_dataset(cfg.data.name)


def dataset_classes(cfg: Any) -> tuple[str, ...]:
    """The foreground class names of ``cfg``'s data (label i+1 = name i): the registry's, else the shards'
    manifest's, else (before the shards exist) the folder dataset's labels file."""
    entry = dataset_of(cfg)
    if entry.classes:
        return entry.classes
    from .shards import MANIFEST, load_manifest, manifest_classes

    if (Path(cfg.shards_dir) / MANIFEST).is_file():
        manifest = load_manifest(cfg.shards_dir, verify=False)
        if manifest.get("classes"):
            return manifest_classes(manifest)
    return open_source(cfg).classes


def num_labels(cfg: Any) -> int:
    """Background + the foreground classes: DeepLab's outputs, the confusion matrix's size, the label PNG values."""
    return len(dataset_classes(cfg)) + 1


def open_source(cfg: Any) -> Any:
    """The source the shards stage packs for ``cfg`` (it reads the data's index files; the toy data is generated)."""
    d = cfg.data
    if d.name == "toy":
        from .toy import generate
        from .voc import VOCSource

        voc_root, sbd_root = generate(cfg.toy_root, d.toy)
        return VOCSource(voc_root, sbd_root)
    if d.name == "voc":
        from .voc import VOCSource

        return VOCSource(d.voc_root, d.sbd_root, d.lists_dir)
    if d.name == "folder":
        from .folder import FolderSource

        return FolderSource(d.root, d.labels, classes=d.classes, masks=d.masks, split_lists=d.split_lists)
    if d.name == "coco":
        from .coco import COCOSource

        return COCOSource(d.coco_root, masks=d.coco_masks, crowd=d.coco_crowd)
    raise ValueError(f"no source for dataset {d.name!r}")
