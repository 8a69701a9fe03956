"""Pretrained weights: a ``*.weights`` value parsed once into :class:`Weights`, read through one mapping per foreign
format, loaded by one loader (:func:`load_pretrained`), and the input normalisation the weights expect
(:func:`normalization`).

The pre-flight check of these values is :mod:`wsss_dist.models.preflight`. Forms (docs/usage.md#weights): a local file (safetensors or a torch state dict in our names; psa's MXNet
``.params``; deeplab-pytorch's Caffe-converted ``.pth``), ``timm`` / ``timm:NAME`` / a bare tagged timm name
(timm's pretrained weights, read through timm), ``hf-hub:ID`` (a timm model on the Hugging Face hub), any timm form
with ``@FILE`` (a local copy of those weights), ``none`` (from scratch) or unset (``""``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from wsss_dist.errors import WeightsError
from wsss_dist.registry import BACKBONES, HEAD_PREFIXES, IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar", ".params", ".npz")


@dataclass(frozen=True)
class Weights:
    """A ``*.weights`` value, parsed: ``kind`` file | timm | hf | none | unset; ``name`` the timm tag (``None``: the
    architecture's default tag) or ``hf-hub:ID``; ``path`` the local file (also a timm tag's local copy)."""

    kind: Literal["file", "timm", "hf", "none", "unset"]
    name: str | None = None
    path: str | None = None
    text: str = ""  # the value as given, for messages

    @property
    def given(self) -> bool:
        """Whether the network starts from these weights (not ``none`` / unset)."""
        return self.kind in ("file", "timm", "hf")

    @property
    def through_timm(self) -> bool:
        """Whether timm loads them (a timm tag or a hub id, possibly from a local copy)."""
        return self.kind in ("timm", "hf")


def parse_weights(value: str | Weights | None) -> Weights:
    """A ``*.weights`` value → :class:`Weights`, the one parser of these values.

    ``""`` → unset; ``None`` / ``none`` / ``null`` → none; ``timm`` → timm (the architecture's default tag);
    ``timm:NAME`` or a bare tagged timm name (``resnet101.a1h_in1k``) → timm NAME; ``hf-hub:ID`` → hf; any of these
    with ``@FILE`` → the same with a local copy; anything else → a local file.
    """
    if isinstance(value, Weights):
        return value
    if value is None or value.strip().lower() in ("none", "null"):
        return Weights("none", text="none")
    v = value.strip()
    if not v:
        return Weights("unset")
    if v == "timm" or v.startswith("timm@"):
        body = v[4:]
    elif v.startswith("timm:"):
        body = v[5:]
    elif v.startswith("hf-hub:"):
        body = v
    else:
        base = v.split("@", 1)[0]
        bare = ("." in base and "/" not in base and not base.endswith(WEIGHTS_SUFFIXES) and not Path(v).exists())
        if not bare:
            return Weights("file", path=v, text=v)
        import timm

        if not timm.is_model(base):
            return Weights("file", path=v, text=v)
        body = v
    name, file = body, None
    at = body.rfind("@")
    if at >= 0:
        tail = body[at + 1:]
        if "/" in tail or tail.endswith(WEIGHTS_SUFFIXES) or Path(tail).is_file():
            name, file = body[:at], tail
    kind: Literal["timm", "hf"] = "hf" if name.startswith("hf-hub:") else "timm"
    return Weights(kind, name=name or None, path=file, text=v)


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights file that does not exist."""


class WeightsMismatchError(WeightsError, ValueError):
    """A weights file whose tensors do not fit the model."""


# ------------------------------------------------------------------------------------ reading local files
def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """A local weights file as a state dict in our names, and its format (``mxnet``, ``deeplab-pytorch`` or
    ``state dict``): one mapping function per foreign format (:func:`from_psa_mxnet`, :func:`from_deeplab_pytorch`;
    our own state dict as it is)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".params":
        return from_psa_mxnet(p), "mxnet"
    sd = read_tensors(p)
    from wsss_dist.models.deeplab_pytorch import is_deeplab_pytorch

    if is_deeplab_pytorch(sd):
        return from_deeplab_pytorch(sd, p), "deeplab-pytorch"
    return sd, "state dict"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local weights file as a state dict in our names (:func:`read_weights` without the format)."""
    return read_weights(path)[0]


def read_tensors(p: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or torch file (weights_only; ``state_dict``/``model`` nesting and ``module.``
    prefixes undone)."""
    import torch

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
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{p}: not a state dict of tensors")
    return strip_module(dict(obj))


def strip_module(sd: dict[str, Any]) -> dict[str, Any]:
    """Keys without DataParallel / DDP's ``module.`` prefix (when every key has it)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def from_psa_mxnet(path: Path) -> dict[str, Tensor]:
    """psa's MXNet ``.params`` (ResNet-38d) in our names (:mod:`wsss_dist.models.mxnet_params`, no mxnet needed)."""
    from wsss_dist.models.mxnet_params import read_params, resnet38d_from_mxnet

    try:
        return resnet38d_from_mxnet(read_params(path))
    except WeightsError as e:
        raise WeightsMismatchError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


def from_deeplab_pytorch(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """deeplab-pytorch's Caffe ResNet-101 names mapped onto timm's ResNet names (+ ``aspp.{i}``)."""
    from wsss_dist.models.deeplab_pytorch import deeplab_pytorch_to_timm

    try:
        out = deeplab_pytorch_to_timm(sd)
    except ValueError as e:
        raise WeightsMismatchError(f"{path}: {e}") from None
    logger.info("%s: deeplab-pytorch (Caffe ResNet-101) names mapped onto timm's ResNet names", path)
    return out


# ------------------------------------------------------------------------------------ fitting and loading
def weights_mismatch(own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]],
                     drop_prefixes: Sequence[str] = HEAD_PREFIXES, resampled: Sequence[str] = ()) -> str | None:
    """What keeps tensors of shapes ``given`` from loading into a model of shapes ``own`` (None: they fit).

    Keys starting with ``drop_prefixes`` (classifier heads) are optional; so is ``num_batches_tracked``; keys in
    ``resampled`` (a ViT's ``pos_embed``) need only their last dimension to agree."""
    prefixes = tuple(drop_prefixes)

    def same(k: str) -> bool:
        a, b = tuple(given[k]), tuple(own[k])
        return a == b or (k in resampled and a[-1:] == b[-1:])

    unexpected = [k for k in given if k not in own and not k.startswith(prefixes)]
    bad_shape = [k for k in given if k in own and not same(k) and not k.startswith(prefixes)]
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


def load_pretrained(arch: str, weights: Weights | str | Mapping[str, Tensor] | None, random: Callable[[], nn.Module],
                    into: Callable[[nn.Module], nn.Module] = lambda m: m,
                    adapt: Callable[[nn.Module, dict, str], dict] | None = None, **timm_kwargs: Any) -> nn.Module:
    """The one loader: network ``arch`` initialised from ``weights`` — a timm tag or hub id through timm
    (:func:`create_timm_model` with ``timm_kwargs``), a local file (:func:`read_weights`: one mapping per foreign
    format) or a state dict already read, loaded into ``into(model)`` (``adapt(model, sd, source)`` first: e.g. a
    ViT's position embedding resampled), else (none, unset) ``random()`` as it is."""
    if isinstance(weights, Mapping):
        sd, source = dict(weights), "state dict"
    else:
        w = parse_weights(weights)
        if w.through_timm:
            if arch in BACKBONES:
                raise WeightsError(f"timm has no weights of our {arch} (got {w.text!r}); give psa's .params or a "
                                   "converted file")
            return create_timm_model(arch, w, **timm_kwargs)
        sd, source = (read_state_dict(w.path), str(w.path)) if w.kind == "file" else (None, "")  # type: ignore[arg-type]
    model = random()
    if sd is not None:
        load_weights(into(model), adapt(model, sd, source) if adapt else sd, source=source)
    return model


def create_timm_model(arch: str, weights: Weights | str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with timm's pretrained weights for ``arch`` (a timm tag, ``None``: the architecture's
    default tag, or ``hf-hub:ID``; ``weights.path`` a local copy: ``pretrained_cfg_overlay=dict(file=...)``,
    ``.npz``: timm's custom loader). Without a local copy timm reads its cache (``HF_HUB_OFFLINE=1``: only the
    cache) or downloads. Raises :class:`WeightsError` (one line) when timm knows no such weights, cannot load them,
    or would fall back to a random initialisation, and when the weights are of another architecture."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    w = parse_weights(weights) if weights is not None else Weights("timm")
    name, file = w.name or arch, w.path
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


# ------------------------------------------------------------------------------------ normalisation
def normalization(weights: Weights | str | None, arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the images the network of ``arch`` expects with ``weights``: timm's pretrained config of the
    tag (``timm:NAME``, ``hf-hub:ID``: its hub config; ``timm``: ``arch``'s default tag); a plain state dict on a
    timm architecture: that architecture's default tag's; ImageNet's for psa's and deeplab-pytorch's files, our
    own backbones and from-scratch runs."""
    w = parse_weights(weights)
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    if not w.given or arch in BACKBONES:
        return imagenet
    if w.kind == "file" and (w.path.endswith(".params") or _is_deeplab_pytorch_file(w.path)):  # type: ignore[union-attr]
        return imagenet
    name = w.name if w.through_timm and w.name else arch
    cfg = _pretrained_data_cfg(name, w.text)
    return tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"])


def _pretrained_data_cfg(name: str, text: str) -> dict[str, Any]:
    """timm's data config (mean, std, ...) of the tag or hub id ``name``, without reading any weights."""
    import timm
    import torch
    from timm.data import resolve_data_config

    try:
        with torch.device("meta"):  # no memory, no weights: only the pretrained cfg is wanted
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as e:  # an hf-hub config that is neither cached nor reachable, an unknown tag
        raise WeightsError(f"weights {text or name}: timm cannot resolve {name}'s data config "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return resolve_data_config({}, model=model)


def _is_deeplab_pytorch_file(path: str) -> bool:
    """Whether a local file holds deeplab-pytorch's names (a safetensors header, else the file read)."""
    from wsss_dist.models.deeplab_pytorch import is_deeplab_pytorch

    try:
        keys = list(header_shapes(path)) if path.endswith(".safetensors") else list(read_tensors(Path(path)))
    except Exception:  # unreadable: the loader names the problem
        return False
    return is_deeplab_pytorch(keys)


def header_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Weights", "WeightsMismatchError", "WeightsNotFoundError",
           "create_timm_model", "header_shapes", "load_pretrained", "load_weights", "normalization", "parse_weights",
           "read_state_dict", "read_weights", "strip_module", "weights_mismatch"]
