"""Losses of the CAM methods: multi-label classification, mixed targets, self-entropy, concentration.

Log / entropy / softmax terms are computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_dist.methods.mixing import MixResult


def multilabel_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Multi-label soft-margin loss (mean over classes and batch), as psa / mva-wsss."""
    return F.multilabel_soft_margin_loss(logits.float(), targets.float())


def mixed_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, y: Tensor, mix: MixResult) -> Tensor:
    """``λ·L(pred, y) + (1−λ)·L(pred, y[index])`` for a mixed batch."""
    return mix.lam * loss_fn(pred, y) + (1.0 - mix.lam) * loss_fn(pred, y[mix.index.to(y.device)])


def entropy_loss(logits_or_labels: Tensor, from_probs: bool = False, eps: float = 1e-5) -> Tensor:
    """Mean binary entropy of ``sigmoid(logits)`` (or of the given probabilities when ``from_probs``).

    The Mixup-CAM self-entropy term is meant for the predictions: pass logits. The seed (mva-wsss)
    passed the *labels* in its mixed branches — ``entropy_loss(labels)`` reproduces that bug exactly
    (sigmoid of 0/1 labels: a constant with zero gradient); the cls stage does so when
    ``entropy_on_labels=True``.
    """
    p = logits_or_labels.float()
    if not from_probs:
        p = torch.sigmoid(p)
    ent = -(p * torch.log(p + eps) + (1.0 - p) * torch.log(1.0 - p + eps))
    return ent.mean()


def concentration_loss(cams: Tensor, labels: Tensor) -> Tensor:
    """Spatial variance of each present class's CAM around its centroid, summed, divided by the batch size.

    cams [B, C, h, w] are ReLU CAMs; P = softmax over the C class channels; for each (b, c) with
    labels[b, c] > 0.5, p̂ = (P + 1e-3) / Σ_hw (P + 1e-3) and the loss adds
    Σ_hw p̂ · ((x − μx)² + (y − μy)²) with x = 2j/w − 1, y = 2i/h − 1 and the (non-detached)
    centroid μ = Σ_hw p̂ · (x, y). Correct for h ≠ w (the SCOPS/mva grid was only right for squares).
    """
    b, _, h, w = cams.shape
    p = torch.softmax(cams.float(), dim=1) + 1e-3
    p = p / p.sum(dim=(2, 3), keepdim=True)
    xs = 2.0 * torch.arange(w, device=cams.device, dtype=p.dtype) / w - 1.0
    ys = 2.0 * torch.arange(h, device=cams.device, dtype=p.dtype) / h - 1.0
    px = p.sum(dim=2)  # marginal over rows: [B, C, w]
    py = p.sum(dim=3)  # marginal over columns: [B, C, h]
    mu_x = (px * xs).sum(-1, keepdim=True)
    mu_y = (py * ys).sum(-1, keepdim=True)
    var = (px * (xs - mu_x) ** 2).sum(-1) + (py * (ys - mu_y) ** 2).sum(-1)  # [B, C]
    present = (labels > 0.5).to(var.dtype)
    return (var * present).sum() / b


__all__ = ["multilabel_loss", "mixed_loss", "entropy_loss", "concentration_loss"]
