"""Models: backbones (ResNet-38d, timm ResNets) and the three heads (+ the ViT teacher), built by the one factory
:func:`create_model` from a spec (a ``model.json``) or a kind and keywords; pretrained weights: :mod:`.pretrained`.

>>> model = create_model("cam", "resnet18", frozen_bn=False, num_classes=3)   # doctest: +SKIP
>>> model = create_model("deeplab", "resnet101", weights="r101.safetensors")   # doctest: +SKIP
"""
from __future__ import annotations

from wsss_dist.models.affinity_net import AffinityNet
from wsss_dist.models.backbones import Backbone, create_backbone
from wsss_dist.models.build import MODELS, create_model
from wsss_dist.models.cam_net import CAMNet
from wsss_dist.models.deeplab import DeepLabV2
from wsss_dist.models.pretrained import load_weights

__all__ = ["AffinityNet", "Backbone", "CAMNet", "DeepLabV2", "MODELS", "create_backbone", "create_model",
           "load_weights"]
