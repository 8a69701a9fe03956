"""AffinityNet (psa): pixel embeddings at stride 8 from three backbone levels.

Heads on the levels of ``backbone.level_channels`` (ResNet-38d: conv4 512, conv5 1024, conv6 4096):
1×1 convs to 64 / 128 / 256 channels, each followed by ELU; concatenated (448) → 1×1 448→448 → ELU.
All bias-free; Kaiming-normal init for the three level convs, Xavier-uniform with gain 4 for the last.

``stride=4`` (our extension, for small images where a stride-8 grid is too coarse to hold an object):
the 448 level features are upsampled ×2 (bilinear) and concatenated with a fourth head on the stride-4
level (``backbone.low_channels`` → 64, ELU) before the last 1×1 conv (512→448).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.models.backbones import Backbone, head_param_groups


class AffinityNet(nn.Module):
    """Backbone + psa's affinity heads; ``forward`` returns features [B, 448, h, w] at the backbone's stride."""

    def __init__(self, backbone: Backbone, dims: tuple[int, int, int] = (64, 128, 256), stride: int = 8,
                 low_dim: int = 64) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"AffinityNet stride must be 4 or 8, got {stride}")
        self.backbone = backbone
        self.stride = stride
        c3, c4, c5 = backbone.level_channels
        self.f8_3 = nn.Conv2d(c3, dims[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(c4, dims[1], 1, bias=False)
        self.f8_5 = nn.Conv2d(c5, dims[2], 1, bias=False)
        self.f4: nn.Conv2d | None = nn.Conv2d(backbone.low_channels, low_dim, 1, bias=False) if stride == 4 else None
        self.out_channels = sum(dims)
        cat = self.out_channels + (low_dim if stride == 4 else 0)
        self.f9 = nn.Conv2d(cat, self.out_channels, 1, bias=False)
        for m in (self.f8_3, self.f8_4, self.f8_5, self.f4):
            if m is not None:
                nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4.0)

    def forward(self, x: Tensor) -> Tensor:
        """Affinity features [B, 448, h, w] at ``stride``."""
        levels = self.backbone.forward_levels(x, low=self.f4 is not None)
        l3, l4, l5 = levels[-3:]
        f = torch.cat([F.elu(self.f8_3(l3)), F.elu(self.f8_4(l4)), F.elu(self.f8_5(l5))], dim=1)
        if self.f4 is not None:
            low = levels[0]
            f = F.interpolate(f, size=low.shape[-2:], mode="bilinear", align_corners=False)
            f = torch.cat([f, F.elu(self.f4(low))], dim=1)
        return F.elu(self.f9(f))

    def new_modules(self) -> list[nn.Module]:
        """Layers trained from scratch (10× lr)."""
        return [m for m in (self.f8_3, self.f8_4, self.f8_5, self.f4, self.f9) if m is not None]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Backbone lr×1 (weights wd, BN/bias no wd); heads lr×10 with wd; each group has ``lr_mult``."""
        return head_param_groups(self.backbone, self.new_modules(), lr, weight_decay)
