"""The models of a run: one factory (:func:`create_model`) that builds a model from its spec, the specs of a config,
the trainer stamp's ``model.json``, and trained models rebuilt from it.

Every trainer writes ``<stage>/model.json`` (the model's kind, architecture and the input normalisation of its
weights) *before* ``model.safetensors``, whose presence marks training done; :func:`load_trained` rebuilds the
architecture from that file, loads the weights and returns the model in eval mode, so a later stage never needs
the code (nor the config) of the stage that trained it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from torch import Tensor, nn

from .. import runs
from ..config import Config
from ..data.datasets import dataset_classes
from ..data.stream import IMAGENET_MEAN, IMAGENET_STD
from ..registry import DATASETS
from ..errors import ConfigError, WeightsError
from .affinity_net import AffinityNet
from .backbones import create_backbone
from .cam_net import CAMNet
from .deeplab import DeepLabV2
from .irn import BoundaryNet
from .pretrained import Weights, load_pretrained, normalization, parse_weights, read_state_dict
from .weights import MODEL_JSON, WEIGHTS, load_model_weights, redo_advice

logger = logging.getLogger(__name__)

MODELS = MappingProxyType({"cam": CAMNet, "affinity": AffinityNet, "deeplab": DeepLabV2, "irn": BoundaryNet})
# The head sizes of a model.json without ``num_classes`` (runs made before the dataset registry: VOC's); the specs of
# a config record the dataset's (wsss_dist.data.datasets.dataset_classes).
NUM_CLASSES = MappingProxyType({"cam": DATASETS["voc"].num_classes, "deeplab": DATASETS["voc"].num_labels,
                                "vit": DATASETS["voc"].num_classes})


def _normalization(weights: str | None, arch: str) -> dict[str, list[float]]:
    """The spec entries ``mean`` and ``std`` of the images a network of ``arch`` expects with ``weights``."""
    mean, std = normalization(weights, arch)
    return {"mean": list(mean), "std": list(std)}


def classifier_spec(cfg: Config, num_sub: int = 0) -> dict[str, Any]:
    """The architecture of the CAM classifier of ``cfg`` (what ``cls/model.json`` holds)."""
    m = cfg.model
    return {"kind": "cam", "backbone": m.backbone, "output_stride": m.output_stride, "frozen_bn": m.frozen_bn,
            "num_sub": num_sub, "method": cfg.method, "num_classes": len(dataset_classes(cfg)),
            **_normalization(m.weights, m.backbone)}


def affinity_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of AffinityNet (``aff/model.json``): ``model.weights``' normalisation, whether its backbone
    starts from them or from the classifier trained on them."""
    return {"kind": "affinity", "backbone": cfg.model.backbone, "frozen_bn": cfg.model.frozen_bn, "stride": cfg.aff.stride,
            **_normalization(cfg.model.weights, cfg.model.backbone)}


def irn_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of IRN's boundary network (``aff/model.json`` with ``refine=irn``): a frozen timm ResNet at
    output stride 16 (irn) with ``irn.weights``' normalisation (``irn.init=cls``: the classifier's)."""
    weights = cfg.irn.weights if cfg.irn.init == "imagenet" else cfg.model.weights
    return {"kind": "irn", "backbone": cfg.irn.backbone, "output_stride": 16, "frozen_bn": True,
            **_normalization(weights, cfg.irn.backbone)}


def deeplab_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of DeepLab-v2 (``seg/model.json``); ``seg.init=cls``: the classifier's normalisation."""
    weights = cfg.seg.weights if cfg.seg.init == "imagenet" else cfg.model.weights
    return {"kind": "deeplab", "backbone": cfg.seg.backbone, "frozen_bn": cfg.seg.frozen_bn,
            "num_classes": len(dataset_classes(cfg)) + 1, **_normalization(weights, cfg.seg.backbone)}


def teacher_spec(cfg: Config) -> dict[str, Any]:
    """The architecture of the ViT teacher (``teacher/model.json``)."""
    return {"kind": "vit", "arch": cfg.teacher.arch, "img_size": cfg.teacher.img_size,
            "num_classes": len(dataset_classes(cfg)), **_normalization(cfg.teacher.weights, cfg.teacher.arch)}


def spec_normalization(spec: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a spec's model expects (ImageNet's for a spec without them)."""
    return tuple(spec.get("mean", IMAGENET_MEAN)), tuple(spec.get("std", IMAGENET_STD))


def create_model(spec: Mapping[str, Any] | str, backbone: str | None = None, *, weights: str | Weights | None = None,
                 **arch: Any) -> nn.Module:
    """The one model factory: a model of the architecture ``spec`` (a ``model.json`` dict, or its ``kind`` — cam,
    affinity, deeplab, vit — with ``backbone`` and the other entries as keywords), heads randomly initialised;
    ``weights``: the backbone's (the ViT's) init (docs/usage.md#weights).

    >>> model = create_model("cam", "resnet18", frozen_bn=False, num_classes=3)   # doctest: +SKIP
    >>> model = create_model(runs.read_json(Path("runs/x/seg/model.json")))          # doctest: +SKIP
    """
    spec = dict(spec) if isinstance(spec, Mapping) else {"kind": spec, **({"backbone": backbone} if backbone else {}), **arch}
    kind = spec["kind"]
    w = parse_weights(weights)
    if kind == "vit":
        return _vit(spec, w)
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of vit, {', '.join(MODELS)}")
    sd = read_state_dict(w.path) if kind == "deeplab" and w.kind == "file" else None  # read once: backbone + ASPP
    bb = create_backbone(spec.get("backbone", "resnet38d"), weights=None if sd is not None else w,
                         output_stride=spec.get("output_stride", 8), frozen_bn=spec.get("frozen_bn", True))
    if sd is not None:
        bb.load_weights(sd, source=str(w.path))
    bb.normalization = spec_normalization(spec)
    num_classes = spec.get("num_classes", NUM_CLASSES.get(kind))
    heads = {"cam": lambda: CAMNet(bb, num_classes=num_classes, num_sub=spec.get("num_sub", 0)),
             "affinity": lambda: AffinityNet(bb, stride=spec.get("stride", 8)),
             "deeplab": lambda: DeepLabV2(bb, num_classes=num_classes),
             "irn": lambda: BoundaryNet(bb)}
    model = heads[kind]()
    if sd is not None:
        _load_aspp(model, sd, str(w.path))  # type: ignore[arg-type]
    return model


def _load_aspp(model: DeepLabV2, sd: dict[str, Tensor], source: str) -> None:
    """The ASPP of a DeepLab-v2 file (deeplab-pytorch's ``aspp.c{i}``, mapped to ``aspp.{i}``) when it fits."""
    aspp = {k[len("aspp."):]: v for k, v in sd.items() if k.startswith("aspp.")}
    if not aspp:
        return
    own = model.aspp.state_dict()
    if aspp.keys() == own.keys() and all(aspp[k].shape == own[k].shape for k in own):
        model.aspp.load_state_dict(aspp)
        logger.info("seg: ASPP loaded from %s", source)
    else:
        logger.info("seg: the ASPP of %s (%s) does not fit DeepLab-v2's (%d classes): it keeps its initialisation",
                    source, ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(aspp.items())[:1]), model.num_classes)


def _vit(spec: dict[str, Any], weights: Weights) -> nn.Module:
    """The ViT teacher (any timm classifier ``arch``): timm's pretrained weights through timm (which resamples the
    position embedding), or a local file with its position embedding resampled to ``img_size`` here."""
    import timm

    kwargs: dict[str, Any] = dict(num_classes=spec.get("num_classes", NUM_CLASSES["vit"]))
    if spec.get("img_size"):
        kwargs["img_size"] = spec["img_size"]
    return load_pretrained(spec["arch"], weights, lambda: timm.create_model(spec["arch"], pretrained=False, **kwargs),
                           adapt=resample_pos_embed, **kwargs)


def resample_pos_embed(model: nn.Module, sd: dict[str, Tensor], source: str = "weights") -> dict[str, Tensor]:
    """``sd`` with its ViT ``pos_embed`` resampled (timm's ``resample_abs_pos_embed``, bicubic) to ``model``'s patch
    grid when the weights were made at another image size; other tensors unchanged."""
    from timm.layers import resample_abs_pos_embed

    own = getattr(model, "pos_embed", None)
    pos = sd.get("pos_embed")
    if own is None or pos is None or pos.shape == own.shape:
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = list(model.patch_embed.grid_size)  # type: ignore[union-attr]
    side = int(round((pos.shape[1] - prefix) ** 0.5))
    if pos.ndim != 3 or pos.shape[-1] != own.shape[-1] or side * side != pos.shape[1] - prefix:
        raise WeightsError(f"{source}: pos_embed {tuple(pos.shape)} cannot be resampled to the model's "
                           f"{tuple(own.shape)}")
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=grid, old_size=[side, side],
                                              num_prefix_tokens=prefix)
    logger.info("teacher: pos_embed of %s resampled from a %dx%d to a %dx%d patch grid", source, side, side, *grid)
    return out


def write_spec(out_dir: Path, spec: dict[str, Any]) -> None:
    """Write ``out_dir/model.json`` (call on the main process)."""
    runs.write_json(Path(out_dir) / MODEL_JSON, spec)


def read_spec(out_dir: Path) -> dict[str, Any]:
    """``out_dir/model.json``; a one-line WeightsError naming it when it is missing (a run trained before trainers
    wrote it first: its architecture is not rebuilt from today's config)."""
    path = Path(out_dir) / MODEL_JSON
    if not path.is_file():
        raise WeightsError(f"{path}: no such file, so the architecture of the model in {Path(out_dir)} is unknown "
                           f"(trained by an older wsss-dist?); {redo_advice(out_dir)}")
    return runs.read_json(path)


def load_model(out_dir: Path) -> nn.Module:
    """The trained model in ``out_dir`` (``model.json`` + ``model.safetensors``), in eval mode."""
    model = create_model(read_spec(out_dir))
    load_model_weights(model, Path(out_dir) / WEIGHTS)
    return model.eval()


def load_trained(cfg: Config, stage: str, needed_by: str) -> nn.Module:
    """The trained model of ``stage`` (cls, aff, seg, teacher) of this run, in eval mode; a StageNotDone naming
    ``needed_by`` when that stage has not finished."""
    where = cfg.teacher_dir if stage == "teacher" else cfg.run_dir / stage  # teacher.dir: a sweep's shared teacher
    if stage == "teacher":
        runs.require_done_at(where, stage, needed_by)
    else:
        runs.require_done(cfg.run_dir, stage, needed_by)
    return load_model(where)


def imagenet_weights(value: str | None, key: str) -> Weights:
    """The ``*.weights`` value ``key``, parsed; ``none`` logged as a warning (the network starts from scratch)."""
    w = parse_weights(value)
    if w.kind == "none":
        logger.warning("%s=none: the network starts from random weights (from scratch)", key)
    return w


def build_classifier(cfg: Config, num_sub: int = 0) -> CAMNet:
    """The CAM classifier of ``cfg.model`` with ImageNet weights from ``model.weights`` when given."""
    return create_model(classifier_spec(cfg, num_sub), weights=imagenet_weights(cfg.model.weights, "model.weights"))  # type: ignore[return-value]


def build_affinity(cfg: Config, needed_by: str = "aff") -> AffinityNet:
    """AffinityNet on ``cfg.model``'s backbone, initialised per ``aff.init`` (ImageNet ``model.weights``, or the
    trained classifier's backbone)."""
    imagenet = imagenet_weights(cfg.model.weights, "model.weights") if cfg.aff.init == "imagenet" else None
    model = create_model(affinity_spec(cfg), weights=imagenet)
    if cfg.aff.init == "cls":
        init_from_classifier(cfg, model, cfg.model.backbone, "aff")
    return model  # type: ignore[return-value]


def build_irn(cfg: Config) -> BoundaryNet:
    """IRN's boundary network on ``irn.backbone``, its frozen backbone from ``irn.weights`` (irn: ImageNet) or, with
    ``irn.init=cls``, the trained classifier's backbone (the toy data: no ImageNet weights on a CPU box)."""
    imagenet = imagenet_weights(cfg.irn.weights, "irn.weights") if cfg.irn.init == "imagenet" else None
    model = create_model(irn_spec(cfg), weights=imagenet)
    if cfg.irn.init == "cls":
        init_from_classifier(cfg, model, cfg.irn.backbone, "irn")
    return model  # type: ignore[return-value]


def build_deeplab(cfg: Config) -> DeepLabV2:
    """DeepLab-v2 on ``seg.backbone``, initialised per ``seg.init`` (ImageNet ``seg.weights`` — also
    deeplab-pytorch's COCO init, whose ASPP loads when it fits —, or the trained classifier's backbone)."""
    imagenet = imagenet_weights(cfg.seg.weights, "seg.weights") if cfg.seg.init == "imagenet" else None
    model = create_model(deeplab_spec(cfg), weights=imagenet)
    if cfg.seg.init == "cls":
        init_from_classifier(cfg, model, cfg.seg.backbone, "seg")
    return model  # type: ignore[return-value]


def build_teacher(cfg: Config) -> nn.Module:
    """A timm ViT with a multi-label head over the dataset's classes at ``teacher.img_size``, initialised from ``teacher.weights``."""
    return create_model(teacher_spec(cfg), weights=imagenet_weights(cfg.teacher.weights, "teacher.weights"))


def init_from_classifier(cfg: Config, model: nn.Module, backbone_name: str, who: str) -> None:
    """Load the trained classifier's backbone weights into ``model.backbone`` (``aff.init=cls`` / ``seg.init=cls``)."""
    if backbone_name != cfg.model.backbone:
        raise ConfigError(f"{who}.init=cls needs {who}'s backbone to be the classifier's ({cfg.model.backbone}), "
                          f"got {backbone_name}; use {who}.init=imagenet")
    model.backbone.load_state_dict(load_trained(cfg, "cls", who).backbone.state_dict())
    logger.info("%s: backbone initialised from the trained classifier (%s.init=cls)", who, who)
