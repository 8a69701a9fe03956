"""The models of a run: built from its config for training, and rebuilt from ``model.json`` once trained.

Every trainer writes ``<stage>/model.json`` (the model's kind and architecture) beside ``model.safetensors``;
:func:`load_trained` rebuilds the architecture from that file, loads the weights and returns the model in eval mode,
so a later stage never needs the code of the stage that trained it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .. import runs
from ..config import Config, parse_weights
from ..errors import ConfigError, WeightsError
from .affinity_net import AffinityNet
from .backbones import create_backbone, create_timm_model, load_weights, read_state_dict
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
    """A model of the architecture ``spec`` (random heads); ``weights``: the backbone's (the ViT's) init, a
    ``*.weights`` value (docs/usage.md#weights)."""
    kind = spec["kind"]
    if kind == "vit":
        return _vit(spec, weights)
    heads = {"cam": lambda bb: CAMNet(bb, num_classes=20, num_sub=spec.get("num_sub", 0)),
             "affinity": lambda bb: AffinityNet(bb, stride=spec.get("stride", 8)),
             "deeplab": lambda bb: DeepLabV2(bb, num_classes=21)}
    if kind not in heads:
        raise ValueError(f"unknown model kind {kind!r} in a model.json; known: vit, {', '.join(heads)}")
    form = parse_weights(weights or "")
    sd = read_state_dict(form[2]) if kind == "deeplab" and form[0] == "file" else None  # read once: backbone + ASPP
    backbone = create_backbone(spec["backbone"], weights=None if sd is not None else weights,
                               output_stride=spec.get("output_stride", 8), frozen_bn=spec.get("frozen_bn", True))
    if sd is not None:
        backbone.load_weights(sd, source=str(form[2]))
    model = heads[kind](backbone)
    if sd is not None:
        _load_aspp(model, sd, str(form[2]))  # type: ignore[arg-type]
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


def _vit(spec: dict[str, Any], weights: str | None) -> nn.Module:
    """The ViT teacher: timm's pretrained weights through timm (which resamples the position embedding), or a
    local file with its position embedding resampled to ``img_size`` here."""
    import timm

    kind, name, file = parse_weights(weights or "")
    kwargs = dict(num_classes=20, img_size=spec["img_size"])
    if kind == "timm":
        return create_timm_model(spec["arch"], name, file, **kwargs)
    model = timm.create_model(spec["arch"], pretrained=False, **kwargs)
    if kind == "file":
        sd = resample_pos_embed(model, read_state_dict(file), source=str(file))  # type: ignore[arg-type]
        load_weights(model, sd, source=str(file))
    return model


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


def teacher_normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the teacher's weights expect, from timm's data config of the model they name: the tag of
    ``teacher.weights`` (``timm:NAME``, ``NAME@FILE``, ``hf-hub:ID``: its hub config), else ``teacher.arch``'s
    default pretrained tag (a local file is taken to be of that tag)."""
    import torch
    import timm
    from timm.data import resolve_data_config

    kind, name, _ = parse_weights(cfg.teacher.weights or "")
    model_name = name if kind == "timm" and name else cfg.teacher.arch
    try:
        with torch.device("meta"):  # no memory, no weights: only the pretrained cfg is wanted
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception as e:  # an hf-hub config that is neither cached nor reachable, an unknown tag
        raise WeightsError(f"teacher.weights={cfg.teacher.weights}: timm cannot resolve {model_name}'s data config "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    data = resolve_data_config({}, model=model)
    return tuple(float(x) for x in data["mean"]), tuple(float(x) for x in data["std"])


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
    where = cfg.teacher_dir if stage == "teacher" else cfg.run_dir / stage  # teacher.dir: a sweep's shared teacher
    if stage == "teacher":
        runs.require_done_at(where, stage, needed_by)
    else:
        runs.require_done(cfg.run_dir, stage, needed_by)
    fallback = {"cls": classifier_spec(cfg), "aff": affinity_spec(cfg), "seg": deeplab_spec(cfg),
                "teacher": teacher_spec(cfg)}[stage]
    return load_model(where, fallback)


def imagenet_weights(value: str | None, key: str) -> str | None:
    """The ``*.weights`` value ``key`` as :func:`from_spec` takes it: None when not given or ``none`` (the latter
    logged as a warning: the network starts from scratch)."""
    kind = parse_weights(value)[0]
    if kind == "none":
        logger.warning("%s=none: the network starts from random weights (from scratch)", key)
    return None if kind in ("none", "unset") else value


def build_classifier(cfg: Config, num_sub: int = 0) -> CAMNet:
    """The CAM classifier of ``cfg.model`` with ImageNet weights from ``model.weights`` when given."""
    weights = imagenet_weights(cfg.model.weights, "model.weights")
    return from_spec(classifier_spec(cfg, num_sub), weights=weights)  # type: ignore[return-value]


def build_affinity(cfg: Config, needed_by: str = "aff") -> AffinityNet:
    """AffinityNet on ``cfg.model``'s backbone, initialised per ``aff.init`` (ImageNet ``model.weights``, or the
    trained classifier's backbone)."""
    imagenet = imagenet_weights(cfg.model.weights, "model.weights") if cfg.aff.init == "imagenet" else None
    model = from_spec(affinity_spec(cfg), weights=imagenet)
    if cfg.aff.init == "cls":
        init_from_classifier(cfg, model, cfg.model.backbone, "aff")
    return model  # type: ignore[return-value]


def build_deeplab(cfg: Config) -> DeepLabV2:
    """DeepLab-v2 on ``seg.backbone``, initialised per ``seg.init`` (ImageNet ``seg.weights`` — also
    deeplab-pytorch's COCO init, whose ASPP loads when it fits —, or the trained classifier's backbone)."""
    imagenet = imagenet_weights(cfg.seg.weights, "seg.weights") if cfg.seg.init == "imagenet" else None
    model = from_spec(deeplab_spec(cfg), weights=imagenet)
    if cfg.seg.init == "cls":
        init_from_classifier(cfg, model, cfg.seg.backbone, "seg")
    return model  # type: ignore[return-value]


def build_teacher(cfg: Config) -> nn.Module:
    """A timm ViT with a 20-way multi-label head at ``teacher.img_size``, initialised from ``teacher.weights``."""
    return from_spec(teacher_spec(cfg), weights=imagenet_weights(cfg.teacher.weights, "teacher.weights"))


def init_from_classifier(cfg: Config, model: nn.Module, backbone_name: str, who: str) -> None:
    """Load the trained classifier's backbone weights into ``model.backbone`` (``aff.init=cls`` / ``seg.init=cls``)."""
    if backbone_name != cfg.model.backbone:
        raise ConfigError(f"{who}.init=cls needs {who}'s backbone to be the classifier's ({cfg.model.backbone}), "
                          f"got {backbone_name}; use {who}.init=imagenet")
    model.backbone.load_state_dict(load_trained(cfg, "cls", who).backbone.state_dict())
    logger.info("%s: backbone initialised from the trained classifier (%s.init=cls)", who, who)
