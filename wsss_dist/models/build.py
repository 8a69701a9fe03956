"""The models of a run: built from its config for training, and rebuilt from ``model.json`` once trained.

Every trainer writes ``<stage>/model.json`` (the model's kind and architecture) beside ``model.safetensors``;
:func:`load_trained` rebuilds the architecture from that file, loads the weights and returns the model in eval mode,
so a later stage never needs the code of the stage that trained it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .. import runs
from ..config import Config
from ..errors import ConfigError
from .affinity_net import AffinityNet
from .backbones import create_backbone, load_weights
from .cam_net import CAMNet
from .deeplab import DeepLabV2
from .weights import load_model_weights

logger = logging.getLogger(__name__)

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"


def classifier_spec(cfg: Config, num_sub: int = 0) -> dict[str, Any]:
    """The architecture of the CAM classifier of ``cfg`` (what ``cls/model.json`` holds)."""
    m = cfg.model
    return {"kind": "cam", "backbone": m.backbone, "output_stride": m.output_stride, "frozen_bn": m.frozen_bn,
            "num_sub": num_sub, "method": cfg.method}


def affinity_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of AffinityNet (``aff/model.json``)."""
    return {"kind": "affinity", "backbone": cfg.model.backbone, "frozen_bn": cfg.model.frozen_bn, "stride": cfg.aff.stride}


def deeplab_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of DeepLab-v2 (``seg/model.json``)."""
    return {"kind": "deeplab", "backbone": cfg.seg.backbone, "frozen_bn": cfg.seg.frozen_bn}


def teacher_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of the ViT teacher (``teacher/model.json``)."""
    return {"kind": "vit", "arch": cfg.teacher.arch, "img_size": cfg.teacher.img_size}


def from_spec(spec: dict[str, Any], weights: str | None = None) -> nn.Module:
    """A model of the architecture ``spec`` (random heads; ``weights``: local ImageNet weights of the backbone)."""
    kind = spec["kind"]
    if kind == "vit":
        import timm

        model = timm.create_model(spec["arch"], pretrained=False, num_classes=20, img_size=spec["img_size"])
        if weights:
            load_weights(model, weights)
        return model
    heads = {"cam": lambda bb: CAMNet(bb, num_classes=20, num_sub=spec.get("num_sub", 0)),
             "affinity": lambda bb: AffinityNet(bb, stride=spec.get("stride", 8)),
             "deeplab": lambda bb: DeepLabV2(bb, num_classes=21)}
    if kind not in heads:
        raise ValueError(f"unknown model kind {kind!r} in a model.json; known: vit, {', '.join(heads)}")
    backbone = create_backbone(spec["backbone"], weights=weights, output_stride=spec.get("output_stride", 8),
                               frozen_bn=spec.get("frozen_bn", True))
    return heads[kind](backbone)


def write_spec(out_dir: Path, spec: dict[str, Any]) -> None:
    """Write ``out_dir/model.json`` (call on the main process)."""
    runs.write_json(Path(out_dir) / MODEL_JSON, spec)


def load_model(out_dir: Path, fallback: dict[str, Any] | None = None) -> nn.Module:
    """The trained model in ``out_dir`` (``model.json`` + ``model.safetensors``), in eval mode.

    ``fallback``: the architecture to assume when an older run has no ``model.json``.
    """
    out_dir = Path(out_dir)
    path = out_dir / MODEL_JSON
    spec = runs.read_json(path) if path.is_file() else fallback
    if spec is None:
        raise FileNotFoundError(f"{path}: no such file; rerun the stage that trained {out_dir}")
    if fallback is not None:
        spec = {**fallback, **spec}  # keys an older model.json did not hold
    model = from_spec(spec)
    load_model_weights(model, out_dir / WEIGHTS)
    return model.eval()


def load_trained(cfg: Config, stage: str, needed_by: str) -> nn.Module:
    """The trained model of ``stage`` (cls, aff, seg, teacher) of this run, in eval mode; a StageNotDone naming
    ``needed_by`` when that stage has not finished."""
    runs.require_done(cfg.run_dir, stage, needed_by)
    fallback = {"cls": classifier_spec(cfg), "aff": affinity_spec(cfg), "seg": deeplab_spec(cfg),
                "teacher": teacher_spec(cfg)}[stage]
    return load_model(cfg.run_dir / stage, fallback)


def build_classifier(cfg: Config, num_sub: int = 0) -> CAMNet:
    """The CAM classifier of ``cfg.model`` with ImageNet weights from ``model.weights`` when given."""
    return from_spec(classifier_spec(cfg, num_sub), weights=cfg.model.weights)  # type: ignore[return-value]


def build_affinity(cfg: Config, needed_by: str = "aff") -> AffinityNet:
    """AffinityNet on ``cfg.model``'s backbone, initialised per ``aff.init`` (ImageNet ``model.weights``, or the
    trained classifier's backbone)."""
    imagenet = cfg.model.weights if cfg.aff.init == "imagenet" else None
    model = from_spec(affinity_spec(cfg), weights=imagenet)
    if cfg.aff.init == "cls":
        init_from_classifier(cfg, model, cfg.model.backbone, "aff")
    return model  # type: ignore[return-value]


def build_deeplab(cfg: Config) -> DeepLabV2:
    """DeepLab-v2 on ``seg.backbone``, initialised per ``seg.init`` (ImageNet ``seg.weights``, or the trained
    classifier's backbone)."""
    imagenet = cfg.seg.weights if cfg.seg.init == "imagenet" else None
    model = from_spec(deeplab_spec(cfg), weights=imagenet)
    if cfg.seg.init == "cls":
        init_from_classifier(cfg, model, cfg.seg.backbone, "seg")
    return model  # type: ignore[return-value]


def build_teacher(cfg: Config) -> nn.Module:
    """A timm ViT with a 20-way multi-label head at ``teacher.img_size`` (local ``teacher.weights`` when given)."""
    return from_spec(teacher_spec(cfg), weights=cfg.teacher.weights)


def init_from_classifier(cfg: Config, model: nn.Module, backbone_name: str, who: str) -> None:
    """Load the trained classifier's backbone weights into ``model.backbone`` (``aff.init=cls`` / ``seg.init=cls``)."""
    if backbone_name != cfg.model.backbone:
        raise ConfigError(f"{who}.init=cls needs {who}'s backbone to be the classifier's ({cfg.model.backbone}), "
                          f"got {backbone_name}; use {who}.init=imagenet")
    model.backbone.load_state_dict(load_trained(cfg, "cls", who).backbone.state_dict())
    logger.info("%s: backbone initialised from the trained classifier (%s.init=cls)", who, who)
