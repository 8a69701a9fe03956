"""ResNet-38d ("wide ResNet-38", Wu et al.) as used by psa / SC-CAM / mva-wsss, output stride 8.

Pre-activation residual blocks (BN → ReLU → conv), all convolutions bias-free. Layout:
conv1a 3→64; b2 ×3 (128, stride 2); b3 ×3 (256, stride 2); b4 ×6 (512, stride 2) → OS 8;
b5 ×3 (1024, dilation 2); b6 bottleneck 1024→2048 (dilation 4, dropout 0.3);
b7 bottleneck 2048→4096 (dilation 4, dropout 0.5); bn7 + ReLU → "conv6" (4096 ch).

Attribute names follow psa's converted ImageNet weights (``conv1a``, ``b2``, ``b2_1``, …, ``bn7``;
inside a block ``bn_branch2a``, ``conv_branch2a``, ``bn_branch2b1``, ``conv_branch2b1``,
``bn_branch2b2``, ``conv_branch2b2``, ``conv_branch1``), so such a ``.pth`` (or its safetensors
conversion) loads with :func:`wsss_dist.models.backbones.load_weights`; so does psa's original MXNet ``.params``
(read without mxnet, :mod:`wsss_dist.models.mxnet_params`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Stage k (0-based) runs these children in order; manifold mixup may mix after any but the last.
# Same cut points as mva-wsss: input | after b2 | after b3 | after b4 | after b5 | after b6 | (b7).
STAGES: tuple[tuple[str, ...], ...] = (
    ("conv1a", "b2", "b2_1", "b2_2"),
    ("b3", "b3_1", "b3_2"),
    ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"),
    ("b5", "b5_1", "b5_2"),
    ("b6",),
    ("b7", "bn7"),
)
# Layers psa never trains (besides every BatchNorm): the stem.
NOT_TRAINING: tuple[str, ...] = ("conv1a", "b2", "b2_1", "b2_2")


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3-BN-ReLU-conv3×3, projection shortcut on shape change."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (block output, BN-ReLU'd input) — the latter is psa's conv4/conv5 level."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        h = self.conv_branch2a(pre)
        h = self.conv_branch2b1(F.relu(self.bn_branch2b1(h)))
        return shortcut + h, pre

    def forward(self, x: Tensor) -> Tensor:
        """Block output."""
        return self.forward_with_preact(x)[0]


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck: 1×1 (out/4) → 3×3 dilated (out/2) → 1×1 (out), Dropout2d before the last two convs."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (block output, BN-ReLU'd input)."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre)
        h = self.conv_branch2a(pre)
        h = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(h))))
        h = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(h))))
        return shortcut + h, pre

    def forward(self, x: Tensor) -> Tensor:
        """Block output."""
        return self.forward_with_preact(x)[0]


class ResNet38d(nn.Module):
    """ResNet-38d trunk (output stride 8, 4096 channels); see the module docstring."""

    out_channels = 4096
    level_channels = (512, 1024, 4096)
    low_channels = 256  # conv3, stride 4

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)
        self.b5 = ResBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = ResBlockBot(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = ResBlockBot(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Run stage ``k`` (0-based, see ``STAGES``); the last stage ends with bn7 + ReLU (conv6)."""
        for name in STAGES[k]:
            x = getattr(self, name)(x)
        return F.relu(x) if k == len(STAGES) - 1 else x

    def forward(self, x: Tensor) -> Tensor:
        """conv6: [B, 4096, H/8, W/8]."""
        for k in range(len(STAGES)):
            x = self.forward_stage(k, x)
        return x

    def forward_levels(self, x: Tensor, low: bool = False) -> list[Tensor]:
        """[conv4 (512), conv5 (1024), conv6 (4096)], all at stride 8 (psa's ``forward_as_dict``); with ``low``,
        preceded by conv3 (256, stride 4)."""
        x = self.forward_stage(1, self.forward_stage(0, x))
        conv3 = x
        x = self.forward_stage(2, x)
        x, conv4 = self.b5.forward_with_preact(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_preact(x)
        conv6 = F.relu(self.bn7(self.b7(x)))
        return [conv3, conv4, conv5, conv6] if low else [conv4, conv5, conv6]


__all__ = ["ResNet38d", "ResBlock", "ResBlockBot", "STAGES", "NOT_TRAINING"]
