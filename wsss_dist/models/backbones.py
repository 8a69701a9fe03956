"""Backbones shared by every head: ResNet-38d (our own) and timm ResNets, frozen BN, local weights.

Design of the stage-wise forward (used by manifold mixup): a backbone is a chain of
``num_stages`` stages. ``forward(x, mix_at=k, mix_fn=f)`` applies ``f`` to the input when
``k == 0`` and to the output of stage ``k`` when ``1 <= k <= num_stages - 1`` (never after the
last stage: its output is the feature map the heads see). Without ``mix_at`` it is a plain forward.

* ResNet-38d: 6 stages cut as mva-wsss does — k = 0 input, 1 after b2, 2 after b3, 3 after b4,
  4 after b5, 5 after b6 (mixing happens before b7).
* timm ResNets: 4 stages — stem + layer1, layer2, layer3, layer4; k = 0 input, 1..3 after layer1..3.

Weights (``model.weights``, ``seg.weights``; :mod:`wsss_dist.models.pretrained` parses and reads them): a local
file (safetensors or a torch state dict; psa's MXNet ``.params`` for ResNet-38d; deeplab-pytorch's Caffe-converted
ResNet-101), or timm's pretrained weights through timm's own loading (its cache, the hub, or a local copy of the
tag's file). A model asked for weights never silently keeps its random initialisation. A backbone normalises its
input to the mean/std its weights expect (``normalization``; the data arrive normalised with ImageNet's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.data.stream import IMAGENET_MEAN, IMAGENET_STD, renormalize
from wsss_dist.errors import WeightsError
from wsss_dist.models.pretrained import (Weights, WeightsMismatchError, load_pretrained, load_weights, read_weights,
                                         weights_mismatch)


class Backbone(nn.Module):
    """A feature extractor run as ``num_stages`` stages (see the module docstring for ``mix_at``).

    Attributes: ``out_channels`` (final map), ``level_channels`` (the three levels AffinityNet
    uses), ``low_channels`` (the stride-4 level), ``num_stages``, ``output_stride``, ``frozen_bn``; the network itself is ``self.body``
    (weights files load into it, so their keys carry no prefix); ``normalization`` (mean, std) its weights expect:
    the input, normalised with ImageNet's, is renormalised to it first (:func:`~wsss_dist.models.pretrained.normalization`).
    """

    out_channels: int
    level_channels: tuple[int, int, int]
    low_channels: int
    num_stages: int
    output_stride: int

    def __init__(self, body: nn.Module, frozen_bn: bool, frozen_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.body = body
        self.frozen_bn = frozen_bn
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
        if frozen_bn:
            for name in frozen_modules:
                getattr(body, name).requires_grad_(False)
            for m in body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
                    m.eval()

    def train(self, mode: bool = True) -> "Backbone":
        """Set training mode; with ``frozen_bn`` every BatchNorm stays in eval mode (running statistics)."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Run stage ``k`` (0-based)."""
        raise NotImplementedError

    def renormalize(self, x: Tensor) -> Tensor:
        """An ImageNet-normalised input normalised with ``normalization`` (the same tensor for ImageNet's)."""
        return renormalize(x, *self.normalization)

    def forward(self, x: Tensor, mix_at: int | None = None,
                mix_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Final feature map at stride ``output_stride``; optionally mix (``mix_fn``) at stage boundary ``mix_at``."""
        x = self.renormalize(x)
        if mix_at is not None:
            if mix_fn is None:
                raise ValueError("mix_at given without mix_fn")
            if not 0 <= mix_at < self.num_stages:
                raise ValueError(f"mix_at={mix_at} out of range: 0 (input) .. {self.num_stages - 1} "
                                 f"(after stage {self.num_stages - 1}); never after the last stage")
            if mix_at == 0:
                x = mix_fn(x)
        for k in range(self.num_stages):
            x = self.forward_stage(k, x)
            if mix_at is not None and mix_at == k + 1:
                x = mix_fn(x)  # type: ignore[misc]
        return x

    def forward_levels(self, x: Tensor, low: bool = False) -> list[Tensor]:
        """The three levels of ``level_channels``, all resized to the last one's size; with ``low``, preceded
        by the stride-4 level (``low_channels``, not resized)."""
        raise NotImplementedError

    def load_weights(self, path: str | Path | Mapping[str, Tensor], source: str | None = None) -> dict[str, int]:
        """Load local ImageNet weights (a file, or a state dict read from ``source``) into the body (:func:`load_weights`)."""
        return load_weights(self.body, path, source=source)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Trainable backbone parameters: conv weights (with wd) and BN/bias (no wd), both ``lr_mult`` 1."""
        return param_groups_by_decay(self.named_parameters(), lr, weight_decay, lr_mult=1.0)


def param_groups_by_decay(named: Iterator[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                          lr_mult: float, bias_lr_mult: float | None = None) -> list[dict]:
    """Split trainable parameters into weights (wd) and 1-d params (BN, biases: no wd); drop empty groups."""
    weights, others = [], []
    for _, p in named:
        if p.requires_grad:
            (weights if p.ndim > 1 else others).append(p)
    bias_mult = lr_mult if bias_lr_mult is None else bias_lr_mult
    groups = [
        {"params": weights, "lr": lr * lr_mult, "weight_decay": weight_decay, "lr_mult": lr_mult},
        {"params": others, "lr": lr * bias_mult, "weight_decay": 0.0, "lr_mult": bias_mult},
    ]
    return [g for g in groups if g["params"]]


def head_param_groups(backbone: "Backbone", heads: Sequence[nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """Backbone lr×1 (weights wd, BN/bias no wd) and new ``heads`` lr×10 (with wd), merged; each group has ``lr_mult``."""
    groups = backbone.param_groups(lr, weight_decay)
    for m in heads:
        groups += param_groups_by_decay(m.named_parameters(), lr, weight_decay, lr_mult=10.0)
    return merge_param_groups(groups)


def merge_param_groups(groups: list[dict]) -> list[dict]:
    """Merge groups with the same (lr_mult, weight_decay) so an optimiser sees few groups."""
    merged: dict[tuple[float, float], dict] = {}
    for g in groups:
        key = (g["lr_mult"], g["weight_decay"])
        if key in merged:
            merged[key]["params"] = merged[key]["params"] + g["params"]
        else:
            merged[key] = dict(g)
    return list(merged.values())


class ResNet38dBackbone(Backbone):
    """ResNet-38d (psa), OS 8, 4096 channels; ``frozen_bn`` also freezes the stem conv1a, b2, b2_1, b2_2."""

    def __init__(self, frozen_bn: bool = True) -> None:
        from wsss_dist.models.resnet38d import NOT_TRAINING, STAGES, ResNet38d

        super().__init__(ResNet38d(), frozen_bn, frozen_modules=NOT_TRAINING)
        self.out_channels = ResNet38d.out_channels
        self.level_channels = ResNet38d.level_channels
        self.low_channels = ResNet38d.low_channels
        self.num_stages = len(STAGES)
        self.output_stride = 8

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Run stage ``k`` of ResNet-38d."""
        return self.body.forward_stage(k, x)

    def forward_levels(self, x: Tensor, low: bool = False) -> list[Tensor]:
        """[conv4, conv5, conv6] (512, 1024, 4096 channels, stride 8); with ``low``, preceded by conv3 (256, stride 4)."""
        return self.body.forward_levels(self.renormalize(x), low=low)


class TimmBackbone(Backbone):
    """A timm ResNet-family model (``features_only``), dilated to ``output_stride``, with ``weights``
    (:func:`~wsss_dist.models.pretrained.load_pretrained`; none: a random initialisation)."""

    def __init__(self, name: str, output_stride: int = 8, frozen_bn: bool = True,
                 weights: Weights | str | Mapping[str, Tensor] | None = None) -> None:
        import timm

        kwargs = dict(features_only=True, output_stride=output_stride, out_indices=(1, 2, 3, 4))
        body = load_pretrained(name, weights, lambda: timm.create_model(name, pretrained=False, **kwargs), **kwargs)
        super().__init__(body, frozen_bn)
        names = list(body.keys())
        cuts = [names.index(n) + 1 for n in body.return_layers]  # stage k ends at the k-th returned layer
        self._stage_names: tuple[tuple[str, ...], ...] = tuple(
            tuple(names[a:b]) for a, b in zip([0] + cuts[:-1], cuts))
        channels = body.feature_info.channels()
        self.out_channels = channels[-1]
        self.level_channels = tuple(channels[-3:])  # type: ignore[assignment]
        self.low_channels = channels[0]  # stem + layer1, stride 4
        self.num_stages = len(self._stage_names)
        self.output_stride = output_stride

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Run stage ``k`` (stem + layer1, layer2, …)."""
        for name in self._stage_names[k]:
            x = self.body[name](x)
        return x

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        """Channels of :meth:`forward_pyramid`'s five levels (stem, layer1..layer4)."""
        return (self.body[self._stage_names[0][-1]][0].conv1.in_channels, *self.body.feature_info.channels())

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """The stem's output (stride 4, before layer1) and each stage's output (IRN's five levels s1..s5)."""
        outs, x = [], self.renormalize(x)
        for k in range(self.num_stages):
            for name in self._stage_names[k]:
                if k == 0 and name == self._stage_names[0][-1]:
                    outs.append(x)
                x = self.body[name](x)
            outs.append(x)
        return outs

    def forward_levels(self, x: Tensor, low: bool = False) -> list[Tensor]:
        """Outputs of the last three stages, resized (bilinear) to the last one's size; with ``low``, preceded by
        the first stage's output (stride 4)."""
        outs, x = [], self.renormalize(x)
        for k in range(self.num_stages):
            x = self.forward_stage(k, x)
            outs.append(x)
        levels = outs[-3:]
        size = levels[-1].shape[-2:]
        levels = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                  for f in levels]
        return [outs[0]] + levels if low else levels


def create_backbone(name: str, weights: str | Weights | Mapping[str, Tensor] | None = None, output_stride: int = 8,
                    frozen_bn: bool = True) -> Backbone:
    """Build ``resnet38d`` or a timm ResNet (``resnet18``, ``resnet50``, ``resnet101``, …) with ImageNet weights.

    ``weights``: a ``*.weights`` value or :class:`~wsss_dist.models.pretrained.Weights` (docs/usage.md#weights: a
    local file, ``timm``, ``timm:NAME[@FILE]``, ``hf-hub:ID``; ``""``/``none``: none) or a state dict already read."""
    if name == "resnet38d":
        if output_stride != 8:
            raise ValueError(f"resnet38d has a fixed output stride of 8, got output_stride={output_stride}")
        return load_pretrained(name, weights, lambda: ResNet38dBackbone(frozen_bn=frozen_bn), into=lambda b: b.body)  # type: ignore[return-value]
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: use 'resnet38d' or a timm ResNet name (resnet18, resnet50, ...)")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return TimmBackbone(name, output_stride=output_stride, frozen_bn=frozen_bn, weights=weights)


def convert_weights(src: str | Path, dst: str | Path, backbone: str | None = None) -> dict[str, object]:
    """Write the local weights file ``src`` in our names (:func:`~wsss_dist.models.pretrained.read_weights`: psa's MXNet ``.params``,
    deeplab-pytorch's ``.pth``, any state dict) as safetensors ``dst``, atomically; when ``backbone`` is given (or
    implied: ``.params`` → resnet38d, deeplab-pytorch → resnet101) the tensors must fit it. Returns
    ``{'tensors', 'backbone', 'format', 'dst'}``."""
    from safetensors.torch import save_file

    from wsss_dist import runs

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: the converted weights are written as safetensors; name it *.safetensors")
    sd, fmt = read_weights(src)
    backbone = backbone or {"mxnet": "resnet38d", "deeplab-pytorch": "resnet101"}.get(fmt)
    if backbone is not None:
        with torch.device("meta"):
            own = create_backbone(backbone).body.state_dict()
        problem = weights_mismatch({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()})
        if problem:
            raise WeightsMismatchError(f"{src}: weights do not fit {backbone}: {problem}")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    with runs.atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"source": Path(src).name, "backbone": backbone or ""})
    return {"tensors": len(state), "backbone": backbone, "format": fmt, "dst": str(dst)}


__all__ = ["Backbone", "ResNet38dBackbone", "TimmBackbone", "convert_weights", "create_backbone", "head_param_groups",
           "merge_param_groups", "param_groups_by_decay"]
