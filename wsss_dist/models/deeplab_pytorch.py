"""deeplab-pytorch's (kazuto1011) Caffe-converted ResNet-101 weights, mapped onto timm's ResNet names.

Accepted: ``deeplabv1_resnet101-coco.pth`` (the DeepLab authors' MS-COCO ``init.caffemodel``, what deeplab-pytorch
and several WSSS papers start DeepLab-v2 from), the VOC-trained ``deeplabv2_resnet101_msc-vocaug.pth`` and the
checkpoints deeplab-pytorch trains (``base.`` prefix of its MSC wrapper). Their names: ``layer1.conv1.{conv,bn}``
(stem), ``layer{2..5}.block{j}.{reduce,conv3x3,increase,shortcut}.{conv,bn}``, ``aspp.c{i}`` (DeepLab-v2) and
``fc`` (the COCO DeepLab-v1 head, dropped).

Mapping: ``layer1.conv1.conv`` → ``conv1``, ``layer1.conv1.bn`` → ``bn1``; ``layer{k}.block{j}`` →
``layer{k-1}.{j-1}`` with ``reduce`` → ``conv1``/``bn1``, ``conv3x3`` → ``conv2``/``bn2``, ``increase`` →
``conv3``/``bn3``, ``shortcut`` → ``downsample.0``/``downsample.1``; ``aspp.c{i}`` → ``aspp.{i}`` (our
:class:`~wsss_dist.models.deeplab.DeepLabV2` loads it when the class count fits).

The Caffe network reads BGR images in 0..255 minus the mean (104.008, 116.669, 122.675); ours reads RGB normalised
with ImageNet mean/std. The stem conv is converted so that it sees the same image: channels reversed, scaled by
255·std, and the constant left over (the two means differ) moved into ``bn1.running_mean`` — exact away from the
image border. Two differences of the Caffe ResNet remain (an init, not a bit-exact port): its stride-2 blocks stride
in the first 1×1 conv (timm: in the 3×3), and its max-pool rounds up.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from wsss_dist.registry import IMAGENET_MEAN, IMAGENET_STD

CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
STEM_KEY = "layer1.conv1.conv.weight"
_BRANCH = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
           "shortcut": ("downsample.0", "downsample.1")}
_BLOCK = re.compile(r"^layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(\w+)$")


def _strip(keys: Iterable[str]) -> str:
    """The prefix (``''`` or ``'base.'``) under which a deeplab-pytorch stem key is found, else ``'-'``."""
    keys = set(keys)
    for prefix in ("", "base.", "module.base."):
        if prefix + STEM_KEY in keys:
            return prefix
    return "-"


def is_deeplab_pytorch(keys: Iterable[str]) -> bool:
    """Whether a state dict's names are deeplab-pytorch's (its stem ``[base.]layer1.conv1.conv.weight``)."""
    return _strip(keys) != "-"


def deeplab_pytorch_to_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A deeplab-pytorch state dict → timm ResNet names (``conv1``, ``bn1``, ``layer1.0.conv1``, …) + ``aspp.{i}.*``
    + ``fc.*``; the stem converted to RGB normalised input (module docstring). ValueError on a name it does not know."""
    prefix = _strip(sd)
    if prefix == "-":
        raise ValueError(f"not a deeplab-pytorch state dict (no {STEM_KEY})")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, v in sd.items():
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        k = key[len(prefix):]
        if k.startswith("layer1.conv1.conv."):
            out["conv1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layer1.conv1.bn."):
            out["bn1." + k.rsplit(".", 1)[1]] = v
        elif (m := _BLOCK.match(k)) is not None:
            layer, block, branch, kind, last = m.groups()
            conv, bn = _BRANCH[branch]
            out[f"layer{int(layer) - 1}.{int(block) - 1}.{conv if kind == 'conv' else bn}.{last}"] = v
        elif (m := re.match(r"^aspp\.c(\d+)\.(weight|bias)$", k)) is not None:
            out[f"aspp.{m.group(1)}.{m.group(2)}"] = v
        elif re.match(r"^fc\.(weight|bias)$", k):
            out[k] = v
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} names are not deeplab-pytorch's ResNet-101 (e.g. {', '.join(unknown[:3])})")
    return _stem_to_rgb(out)


def _stem_to_rgb(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """conv1 for RGB ImageNet-normalised input instead of BGR 0..255 minus the Caffe mean (module docstring)."""
    w = sd["conv1.weight"].float()[:, [2, 1, 0]]  # BGR → RGB input channels, still per 0..255 pixel unit
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    offset = 255 * torch.tensor(IMAGENET_MEAN) - torch.tensor(CAFFE_MEAN_BGR[::-1])  # caffe input − 255·std·ours
    out = dict(sd)
    out["conv1.weight"] = w * (255 * std)
    if "bn1.running_mean" in sd:
        shift = (w * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))  # what the offset adds to each conv1 channel
        out["bn1.running_mean"] = sd["bn1.running_mean"].float() - shift
    return out


__all__ = ["is_deeplab_pytorch", "deeplab_pytorch_to_timm", "STEM_KEY"]
