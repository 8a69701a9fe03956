"""Classification network with a CAM head (psa's resnet38_cls / SC-CAM's sub-category head).

Features f = backbone(x) → Dropout2d (training only) → global average pooling → bias-free 1×1
``classifier`` (logits) and optional bias-free 1×1 ``sub_classifier`` (sub-category logits).

CAMs are ReLU(conv(f, classifier.weight)) computed on the features **before** dropout, both in
``forward`` (for the concentration loss during training) and in ``cam`` (inference): the maps the
regulariser shapes are then the maps inference produces. Since pooling is linear, the logits equal
the spatial mean of the pre-ReLU CAM of the dropped-out features.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.models.backbones import Backbone, head_param_groups
from ..registry import DATASETS

VOC = DATASETS["voc"]  # the default head size (a spec without num_classes)


class CAMNet(nn.Module):
    """Backbone + GAP + bias-free 1×1 classifier(s); returns logits, sub-logits, CAMs and pooled features."""

    def __init__(self, backbone: Backbone, num_classes: int = VOC.num_classes, num_sub: int = 0, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_sub = num_sub
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.sub_classifier: nn.Conv2d | None = None
        if num_sub > 0:
            self.sub_classifier = nn.Conv2d(backbone.out_channels, num_sub, 1, bias=False)
            nn.init.xavier_uniform_(self.sub_classifier.weight)

    def forward(self, x: Tensor, mix_at: int | None = None,
                mix_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor | None]:
        """Dict: ``logits`` [B,C], ``sub_logits`` [B,K] or None, ``cams`` [B,C,h,w] (ReLU), ``pooled`` [B,D]."""
        f = self.backbone(x, mix_at=mix_at, mix_fn=mix_fn)
        cams = F.relu(F.conv2d(f, self.classifier.weight))
        pooled = F.adaptive_avg_pool2d(self.dropout(f), 1)
        logits = self.classifier(pooled).flatten(1)
        sub_logits = self.sub_classifier(pooled).flatten(1) if self.sub_classifier is not None else None
        return {"logits": logits, "sub_logits": sub_logits, "cams": cams, "pooled": pooled.flatten(1)}

    def cam(self, x: Tensor) -> Tensor:
        """ReLU class activation maps [B, C, H/os, W/os] (no dropout on the feature map)."""
        return F.relu(F.conv2d(self.backbone(x), self.classifier.weight))

    def new_modules(self) -> list[nn.Module]:
        """Layers trained from scratch (10× lr)."""
        return [m for m in (self.classifier, self.sub_classifier) if m is not None]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Backbone lr×1 (weights wd, BN/bias no wd); classifier(s) lr×10 with wd; each group has ``lr_mult``."""
        return head_param_groups(self.backbone, self.new_modules(), lr, weight_decay)

