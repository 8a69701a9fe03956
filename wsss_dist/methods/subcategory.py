"""Sub-category labels: cluster the images of each class (FINCH as mva-wsss, or K-means as SC-CAM).

For every parent class c, the feature rows of the images that have c are clustered; each cluster is a
sub-category with parent c. An image gets one sub-label per parent class it has (multi-hot over all
K sub-categories). A class with 0 or 1 images, or one FINCH puts in a single cluster, gets one
sub-category, so every parent owns at least one column and K ≥ number of classes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubCategories:
    """Sub-category multi-hot labels ``sub_labels`` [N, K] float32, ``num_sub`` K, ``parent`` [K] int64."""

    sub_labels: np.ndarray
    num_sub: int
    parent: np.ndarray


def _finch_labels(feats: np.ndarray, partition: str | int, seed: int) -> np.ndarray:
    """Cluster ids of one class's images with FINCH (cosine, exact first neighbours)."""
    from finch import FINCH

    c, num_clust, _ = FINCH(feats, distance="cosine", ensure_early_exit=True, verbose=False,
                            ann_threshold=max(20_000, len(feats) + 1), random_state=seed)
    if partition == "last":
        col = c.shape[1] - 1
    elif partition == "first":
        col = 0
    else:
        col = int(partition)
        if not -c.shape[1] <= col < c.shape[1]:
            logger.info("FINCH gave %d partitions (%s clusters); partition %d → using the coarsest",
                        c.shape[1], num_clust, col)
            col = c.shape[1] - 1
    return c[:, col]


def _kmeans_labels(feats: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids of one class's images with K-means (k clusters at most)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # fewer distinct points than clusters: fine, empty ids are compacted
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=min(k, len(feats)), random_state=seed, n_init=10).fit_predict(feats)


def cluster_subcategories(features: np.ndarray, labels: np.ndarray, method: str = "finch",
                          partition: str | int = "last", k: int = 10, seed: int = 0) -> SubCategories:
    """Cluster each class's images into sub-categories (``method`` "finch" or "kmeans")."""
    if method not in ("finch", "kmeans"):
        raise ValueError(f"unknown clustering method {method!r}; choose finch or kmeans")
    if isinstance(partition, str) and partition not in ("last", "first"):
        try:
            partition = int(partition)
        except ValueError:
            raise ValueError(f"partition must be 'last', 'first' or an int, got {partition!r}") from None
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features [N, D] and labels [N, C] must agree, got {features.shape} and {labels.shape}")
    n, num_classes = labels.shape
    columns: list[np.ndarray] = []  # one [N] 0/1 column per sub-category
    parent: list[int] = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels[:, c] > 0.5)
        if len(rows) < 2:  # 0 or 1 image: one sub-category (nothing to split)
            ids = np.zeros(len(rows), dtype=np.int64)
        elif method == "finch":
            ids = _finch_labels(features[rows], partition, seed)
        else:
            ids = _kmeans_labels(features[rows], k, seed)
        _, ids = np.unique(ids, return_inverse=True)  # compact ids 0..m-1
        m = int(ids.max()) + 1 if len(ids) else 1
        for j in range(m):
            col = np.zeros(n, dtype=np.float32)
            col[rows[ids == j]] = 1.0
            columns.append(col)
            parent.append(c)
        logger.debug("class %d: %d images → %d sub-categories", c, len(rows), m)
    sub_labels = np.stack(columns, axis=1) if columns else np.zeros((n, 0), np.float32)
    logger.info("%s: %d sub-categories over %d classes", method, len(parent), num_classes)
    return SubCategories(sub_labels=sub_labels, num_sub=len(parent), parent=np.asarray(parent, dtype=np.int64))


__all__ = ["SubCategories", "cluster_subcategories"]
