"""Backbones shared by every head: ResNet-38d (our own) and timm ResNets, frozen BN, local weights.

Design of the stage-wise forward (used by manifold mixup): a backbone is a chain of
``num_stages`` stages. ``forward(x, mix_at=k, mix_fn=f)`` applies ``f`` to the input when
``k == 0`` and to the output of stage ``k`` when ``1 <= k <= num_stages - 1`` (never after the
last stage: its output is the feature map the heads see). Without ``mix_at`` it is a plain forward.

* ResNet-38d: 6 stages cut as mva-wsss does — k = 0 input, 1 after b2, 2 after b3, 3 after b4,
  4 after b5, 5 after b6 (mixing happens before b7).
* timm ResNets: 4 stages — stem + layer1, layer2, layer3, layer4; k = 0 input, 1..3 after layer1..3.

Weights (``model.weights``, ``seg.weights``; :func:`wsss_dist.config.parse_weights` reads the value): a local
file through :func:`load_weights` (safetensors or a torch state dict; psa's MXNet ``.params`` for ResNet-38d;
deeplab-pytorch's Caffe-converted ResNet-101), or timm's pretrained weights through timm's own loading
(:func:`create_timm_model`: its cache, the hub, or a local copy of the tag's file). A model asked for weights never
silently keeps its random initialisation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_dist.config import parse_weights
from wsss_dist.errors import WeightsError
from wsss_dist.registry import HEAD_PREFIXES

logger = logging.getLogger(__name__)

# Classifier heads a backbone never has (deeplab-pytorch's ASPP ``aspp.*`` too: DeepLabV2 loads it itself): dropped
# when loading; the registry holds the one list, which the config's header check reads too.


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights file that does not exist."""


class WeightsMismatchError(WeightsError, ValueError):
    """A weights file whose tensors do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a local weights file as a state dict in our names (:func:`read_weights` without the format)."""
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read a local weights file as a state dict in our names, and the format it was in
    (``mxnet``, ``deeplab-pytorch`` or ``state dict``).

    ``.safetensors``; psa's MXNet ``.params`` (ResNet-38d, renamed by
    :func:`~wsss_dist.models.mxnet_params.resnet38d_from_mxnet`); else a torch file (weights_only;
    'state_dict'/'model' nesting, ``module.`` prefixes). deeplab-pytorch's names (``layer1.conv1.conv.weight``,
    ``base.`` …) are mapped onto timm's ResNet names (:mod:`wsss_dist.models.deeplab_pytorch`).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".params":
        from wsss_dist.models.mxnet_params import read_params, resnet38d_from_mxnet

        try:
            return resnet38d_from_mxnet(read_params(p)), "mxnet"
        except WeightsError as e:
            raise WeightsMismatchError(f"{p}: {e}" if str(p) not in str(e) else str(e)) from None
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled objects, ...
        raise WeightsMismatchError(f"{p}: cannot be read as a state dict ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and len(obj) <= 4:  # unwrap {'state_dict': ...} / {'model': ...} checkpoints
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{p}: not a state dict of tensors")
    sd: dict[str, Tensor] = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # DataParallel / DDP checkpoints
        sd = {k[len("module."):]: v for k, v in sd.items()}
    from wsss_dist.models.deeplab_pytorch import deeplab_pytorch_to_timm, is_deeplab_pytorch

    if is_deeplab_pytorch(sd):
        try:
            sd = deeplab_pytorch_to_timm(sd)
        except ValueError as e:
            raise WeightsMismatchError(f"{p}: {e}") from None
        logger.info("%s: deeplab-pytorch (Caffe ResNet-101) names mapped onto timm's ResNet names", p)
        return sd, "deeplab-pytorch"
    return sd, "state dict"


def weights_mismatch(own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]],
                     drop_prefixes: Sequence[str] = HEAD_PREFIXES) -> str | None:
    """What keeps tensors of shapes ``given`` from loading into a model of shapes ``own`` (None: they fit).

    Keys starting with ``drop_prefixes`` (classifier heads) are optional; so is ``num_batches_tracked``."""
    prefixes = tuple(drop_prefixes)
    unexpected = [k for k in given if k not in own and not k.startswith(prefixes)]
    bad_shape = [k for k in given if k in own and tuple(given[k]) != tuple(own[k]) and not k.startswith(prefixes)]
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")
               and not k.startswith(prefixes)]
    if not (unexpected or missing or bad_shape):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if bad_shape:
        parts.append(f"{len(bad_shape)} of another shape (e.g. " + ", ".join(
            f"{k}: file {tuple(given[k])} vs model {tuple(own[k])}" for k in bad_shape[:3]) + ")")
    return "; ".join(parts)


def load_weights(module: nn.Module, path: str | Path | Mapping[str, Tensor],
                 drop_prefixes: Sequence[str] = HEAD_PREFIXES, source: str | None = None) -> dict[str, int]:
    """Load a local weights file (or a state dict read from ``source``) into ``module``; every model tensor must be
    found with its shape.

    Classifier heads (keys starting with ``drop_prefixes``, e.g. timm's ``fc.*``) are optional: loaded
    when the model has them with the same shape, else dropped (a model head of another size keeps its
    initialisation). A missing ``num_batches_tracked`` buffer is tolerated. Raises
    :class:`WeightsNotFoundError` (a ``FileNotFoundError``) or :class:`WeightsMismatchError`
    (a ``ValueError``) naming the file and a few offending keys. Returns counts ``{'loaded', 'dropped'}``.
    """
    if isinstance(path, Mapping):
        sd, name = dict(path), source or "state dict"
    else:
        sd, name = read_state_dict(path), str(path)
    own = module.state_dict()
    prefixes = tuple(drop_prefixes)

    def fits(k: str) -> bool:
        return k in own and tuple(sd[k].shape) == tuple(own[k].shape)

    problem = weights_mismatch({k: tuple(v.shape) for k, v in own.items()},
                               {k: tuple(v.shape) for k, v in sd.items()}, prefixes)
    if problem:
        raise WeightsMismatchError(f"{name}: weights do not fit {type(module).__name__}: {problem}")
    dropped = [k for k in sd if k.startswith(prefixes) and not fits(k)]
    loaded = {k: v for k, v in sd.items() if fits(k)}
    module.load_state_dict(loaded, strict=False)
    logger.info("loaded %d tensors from %s into %s (dropped %d head tensors%s)", len(loaded), name,
                type(module).__name__, len(dropped), f": {', '.join(dropped[:4])}" if dropped else "")
    return {"loaded": len(loaded), "dropped": len(dropped)}


def create_timm_model(arch: str, name: str | None = None, file: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with timm's pretrained weights for ``arch``: ``name`` a tagged name
    (``resnet18.a1_in1k``; None: the architecture's default tag) or ``hf-hub:ID``; ``file`` a local copy of those
    weights (``pretrained_cfg_overlay=dict(file=...)``; ``.npz``: timm's custom loader). Without ``file`` timm
    reads its cache (``HF_HUB_OFFLINE=1``: only the cache) or downloads. Raises :class:`WeightsError` (one line)
    when timm knows no such weights, cannot load them, or would fall back to a random initialisation, and when the
    weights are of another architecture."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = name or arch
    label = name + (f"@{file}" if file else "")
    if not name.startswith("hf-hub:"):
        named_arch = split_model_name_tag(name)[0]
        if named_arch != arch:
            raise WeightsError(f"timm weights {label} are of {named_arch}, not {arch}")
        try:
            pcfg = get_pretrained_cfg(name)
        except RuntimeError as e:  # an unknown tag
            raise WeightsError(f"timm weights {label}: {e}") from None
        if pcfg is None:
            raise WeightsError(f"timm has no pretrained weights {name}")
        if not file and not (pcfg.url or pcfg.hf_hub_id or pcfg.file):
            raise WeightsError(f"timm weights {name} have no download source; give a local copy: timm:{name}@FILE")
    overlay: dict = {}
    if file:
        if not Path(file).is_file():
            raise WeightsNotFoundError(f"weights file not found: {file}")
        overlay = {"file": str(file), "custom_load": str(file).endswith(".npz")}
    fallback = _RandomInitWarnings()
    timm_logger = logging.getLogger("timm")
    timm_logger.addHandler(fallback)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as e:  # download / cache miss / a file that does not fit
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        hint = "" if file else "; offline, timm reads only its cache (HF_HUB_OFFLINE=1): fill it, or give timm:NAME@FILE"
        raise WeightsError(f"timm could not load the weights {label} ({type(e).__name__}: "
                           f"{(lines[0] if lines else '')[:300]}){hint}") from None
    finally:
        timm_logger.removeHandler(fallback)
    if fallback.seen:
        raise WeightsError(f"timm weights {label}: timm fell back to a random initialisation ({fallback.seen[0]})")
    got = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if got and got != arch:
        raise WeightsError(f"timm weights {label} are of {got}, not {arch}")
    logger.info("timm weights %s loaded into %s", label, arch)
    return model


class _RandomInitWarnings(logging.Handler):
    """Collects timm's warnings that it keeps a random initialisation (older timm warns instead of raising)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "random init" in msg.lower() or "no pretrained weights" in msg.lower():
            self.seen.append(msg)


class Backbone(nn.Module):
    """A feature extractor run as ``num_stages`` stages (see the module docstring for ``mix_at``).

    Attributes: ``out_channels`` (final map), ``level_channels`` (the three levels AffinityNet
    uses), ``low_channels`` (the stride-4 level), ``num_stages``, ``output_stride``, ``frozen_bn``; the network itself is ``self.body``
    (weights files load into it, so their keys carry no prefix).
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

    def forward(self, x: Tensor, mix_at: int | None = None,
                mix_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Final feature map at stride ``output_stride``; optionally mix (``mix_fn``) at stage boundary ``mix_at``."""
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
        return self.body.forward_levels(x, low=low)


class TimmBackbone(Backbone):
    """A timm ResNet-family model (``features_only``), dilated to ``output_stride``; with ``pretrained`` =
    ``(name, file)``, timm's pretrained weights (:func:`create_timm_model`), else a random initialisation."""

    def __init__(self, name: str, output_stride: int = 8, frozen_bn: bool = True,
                 pretrained: tuple[str | None, str | None] | None = None) -> None:
        import timm

        kwargs = dict(features_only=True, output_stride=output_stride, out_indices=(1, 2, 3, 4))
        if pretrained is None:
            body = timm.create_model(name, pretrained=False, **kwargs)
        else:
            body = create_timm_model(name, *pretrained, **kwargs)
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

    def forward_levels(self, x: Tensor, low: bool = False) -> list[Tensor]:
        """Outputs of the last three stages, resized (bilinear) to the last one's size; with ``low``, preceded by
        the first stage's output (stride 4)."""
        outs = []
        for k in range(self.num_stages):
            x = self.forward_stage(k, x)
            outs.append(x)
        levels = outs[-3:]
        size = levels[-1].shape[-2:]
        levels = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                  for f in levels]
        return [outs[0]] + levels if low else levels


def create_backbone(name: str, weights: str | Mapping[str, Tensor] | None = None, output_stride: int = 8,
                    frozen_bn: bool = True) -> Backbone:
    """Build ``resnet38d`` or a timm ResNet (``resnet18``, ``resnet50``, ``resnet101``, …) with ImageNet weights.

    ``weights``: a ``*.weights`` value (docs/usage.md#weights: a local file, ``timm``, ``timm:NAME[@FILE]``,
    ``hf-hub:ID``; ``""``/``none``: none) or a state dict already read (:func:`read_state_dict`)."""
    form = ("file", None, None) if isinstance(weights, Mapping) else parse_weights(weights or "")
    if name == "resnet38d":
        if output_stride != 8:
            raise ValueError(f"resnet38d has a fixed output stride of 8, got output_stride={output_stride}")
        if form[0] == "timm":
            raise WeightsError(f"timm has no weights of our resnet38d (got {weights!r}); give psa's .params or a "
                               "converted file")
        backbone: Backbone = ResNet38dBackbone(frozen_bn=frozen_bn)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: use 'resnet38d' or a timm ResNet name (resnet18, resnet50, ...)")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        backbone = TimmBackbone(name, output_stride=output_stride, frozen_bn=frozen_bn,
                                pretrained=form[1:] if form[0] == "timm" else None)
    if isinstance(weights, Mapping):
        backbone.load_weights(weights)
    elif form[0] == "file":
        backbone.load_weights(form[2])  # type: ignore[arg-type]
    return backbone


def convert_weights(src: str | Path, dst: str | Path, backbone: str | None = None) -> dict[str, object]:
    """Write the local weights file ``src`` in our names (:func:`read_state_dict`: psa's MXNet ``.params``,
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


__all__ = ["Backbone", "ResNet38dBackbone", "TimmBackbone", "create_backbone", "create_timm_model", "load_weights",
           "read_state_dict", "read_weights", "weights_mismatch", "convert_weights", "param_groups_by_decay", "head_param_groups", "merge_param_groups", "WeightsNotFoundError",
           "WeightsMismatchError", "HEAD_PREFIXES"]
