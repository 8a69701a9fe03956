"""IRN's class-boundary network (jiwoon-ahn/irn ``net/resnet50_irn.py``, notes §13.2), semantic part only.

A frozen ResNet (timm, output stride 16: irn's strides 2, 2, 2, 1) gives five levels: s1 = stem (conv1 + bn + act +
maxpool, stride 4), s2..s5 = layer1..layer4 (strides 4, 8, 16, 16); all are detached and the backbone always runs in
eval mode, so only the boundary branch learns. Branch: per level a bias-free 1×1 conv to 32 channels → GroupNorm(4)
→ (bilinear upsampling ×1, ×1, ×2, ×4, ×4 to stride 4) → ReLU; cropped to s2's size, concatenated (160 channels)
→ 1×1 conv 160→1 with bias = the boundary logit at stride 4 (B = sigmoid). irn's displacement branch (instances)
is not built: it shares no parameter with this branch (notes §13.6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.models.backbones import Backbone, param_groups_by_decay

UPSAMPLE = (1, 1, 2, 4, 4)  # per level, to stride 4 (irn)


class BoundaryNet(nn.Module):
    """Frozen backbone + IRN's boundary branch; ``forward`` returns boundary logits [B, 1, h, w] at stride 4."""

    stride = 4

    def __init__(self, backbone: Backbone, width: int = 32, groups: int = 4) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_pyramid"):
            raise ValueError("IRN's boundary network needs a timm ResNet backbone (resnet50, resnet18, ...)")
        self.backbone = backbone
        backbone.requires_grad_(False)
        backbone.eval()
        self.edges = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.GroupNorm(groups, width))
            for c in backbone.pyramid_channels)
        self.classifier = nn.Conv2d(width * len(UPSAMPLE), 1, 1, bias=True)

    def train(self, mode: bool = True) -> "BoundaryNet":
        """Training mode for the branch; the backbone stays in eval mode (frozen, irn)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Boundary logits [B, 1, ⌈H/16⌉·4, ⌈W/16⌉·4] (the input is padded to a multiple of 16 by the caller)."""
        with torch.no_grad():
            levels = [f.detach() for f in self.backbone.forward_pyramid(x)]
        size = levels[1].shape[-2:]
        maps = []
        for f, edge, up in zip(levels, self.edges, UPSAMPLE):
            e = edge(f)
            if up > 1:
                e = F.interpolate(e, scale_factor=up, mode="bilinear", align_corners=False)
            maps.append(F.relu(e[..., : size[0], : size[1]]))
        return self.classifier(torch.cat(maps, 1))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The branch only (lr×1, irn's edge group): conv weights with weight decay, GroupNorm/bias without."""
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return param_groups_by_decay(iter(named), lr, weight_decay, lr_mult=1.0)
