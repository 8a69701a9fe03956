"""DeepLab-v2: dilated backbone (output stride 8) + ASPP of four parallel 3×3 dilated convs, summed.

``predict`` does multi-scale inference: for each scale the image is resized (bilinear), logits are
computed (with ``flip``, averaged with the flipped-back logits of the mirrored image, i.e. the flip
is averaged *before* the max), upsampled to the input size, and fused by a pixel-wise max over scales.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.models.backbones import Backbone, merge_param_groups
from ..registry import DATASETS

VOC = DATASETS["voc"]  # the default head size (a spec without num_classes)


class DeepLabV2(nn.Module):
    """Backbone + ASPP (rates 6/12/18/24, with bias, N(0, 0.01) init, outputs summed)."""

    def __init__(self, backbone: Backbone, num_classes: int = VOC.num_labels, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspp = nn.ModuleList(
            nn.Conv2d(backbone.out_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.aspp:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes, H/os, W/os]."""
        f = self.backbone(x)
        return torch.stack([conv(f) for conv in self.aspp]).sum(0)

    @torch.no_grad()
    def predict(self, x: Tensor, scales: Sequence[float] = (1.0, 0.75, 0.5), flip: bool = False) -> Tensor:
        """Logits at the input size [B, C, H, W]: max over scales (flip averaged within each scale)."""
        size = x.shape[-2:]
        fused: Tensor | None = None
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            logits = self(xs)
            if flip:
                logits = 0.5 * (logits + self(xs.flip(-1)).flip(-1))
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            fused = logits if fused is None else torch.maximum(fused, logits, out=fused)
        if fused is None:
            raise ValueError("predict needs at least one scale")
        return fused

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Backbone lr×1 (weights wd, BN/bias no wd); ASPP weights lr×10 (wd), ASPP biases lr×20 (no wd)."""
        groups = self.backbone.param_groups(lr, weight_decay)
        weights = [c.weight for c in self.aspp]
        biases = [c.bias for c in self.aspp]
        groups.append({"params": weights, "lr": lr * 10, "weight_decay": weight_decay, "lr_mult": 10.0})
        groups.append({"params": biases, "lr": lr * 20, "weight_decay": 0.0, "lr_mult": 20.0})
        return merge_param_groups(groups)
