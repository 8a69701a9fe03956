"""Models: backbones (ResNet-38d, timm ResNets) and the three heads, built by name with :func:`create_model`.

>>> model = create_model("cam", "resnet18", frozen_bn=False, num_classes=20)   # doctest: +SKIP
>>> model = create_model("deeplab", "resnet101", weights="r101.safetensors")   # doctest: +SKIP
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import nn

from wsss_dist.models.affinity_net import AffinityNet
from wsss_dist.models.backbones import Backbone, create_backbone, load_weights
from wsss_dist.models.cam_net import CAMNet
from wsss_dist.models.deeplab import DeepLabV2

MODELS = MappingProxyType({"cam": CAMNet, "affinity": AffinityNet, "deeplab": DeepLabV2})


def create_model(kind: str, backbone: str = "resnet38d", *, weights: str | None = None, output_stride: int = 8,
                 frozen_bn: bool = True, **head_kwargs: Any) -> nn.Module:
    """Build a ``kind`` model ("cam", "affinity", "deeplab") on a named backbone; extra kwargs go to the head.

    ``weights``: the backbone's ImageNet init, a ``*.weights`` value (a local file, psa's ``.params``, ``timm``,
    ``timm:NAME[@FILE]``, ``hf-hub:ID``; docs/usage.md#weights).
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")
    bb = create_backbone(backbone, weights=weights, output_stride=output_stride, frozen_bn=frozen_bn)
    return MODELS[kind](bb, **head_kwargs)


__all__ = ["AffinityNet", "Backbone", "CAMNet", "DeepLabV2", "MODELS", "create_backbone", "create_model",
           "load_weights"]
