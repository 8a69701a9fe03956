"""Models: backbones (ResNet-38d, timm ResNets) and the three heads (+ the ViT teacher), built by the one factory
:func:`create_model` from a spec (a ``model.json``) or a kind and keywords; pretrained weights: :mod:`.pretrained`.

>>> model = create_model("cam", "resnet18", frozen_bn=False, num_classes=3)   # doctest: +SKIP
>>> model = create_model("deeplab", "resnet101", weights="r101.safetensors")   # doctest: +SKIP

The names below are imported on first use (PEP 562): importing a torch-free submodule such as
:mod:`.preflight` or :mod:`.pretrained` (the checks before any job) does not import torch or timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"AffinityNet": "affinity_net", "Backbone": "backbones", "CAMNet": "cam_net", "DeepLabV2": "deeplab",
          "MODELS": "build", "create_backbone": "backbones", "create_model": "build", "load_weights": "pretrained"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """The public names, imported from their module when first asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
