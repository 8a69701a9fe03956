"""The pre-flight check: what needs timm or the weights files, run before any job (the runner and the launcher call
:func:`preflight`; the config build itself imports neither timm, torch nor safetensors)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from wsss_dist.config import get
from wsss_dist.errors import ConfigError
from wsss_dist.models.pretrained import Weights, header_shapes, parse_weights, strip_module, weights_mismatch
from wsss_dist.registry import BACKBONES, STAGE_SPECS

if TYPE_CHECKING:
    from wsss_dist.config import Config


def preflight(cfg: Config) -> None:
    """Checks before any job that need timm or the weights files (ConfigError naming the key): the network of every
    asked stage (``StageSpec.network``: a backbone or ViT name, or CLIP's) and the weights it starts from
    (``StageSpec.pretrained``) — given with data=voc (or ``none``), existing, of the right architecture, a safetensors
    file's names and shapes (its header only) fitting the network."""
    uses: dict[str, tuple[str, str, str]] = {}  # weights key -> (network key, its name, the first stage loading it)
    for stage in cfg.stages():  # stage=shards alone builds no network: no timm to import
        spec = STAGE_SPECS[stage]
        net_key, weights_key = spec.network(cfg), spec.pretrained(cfg)
        if net_key == "clip.arch":
            check_clip(cfg.clip.arch, cfg.clip.weights)
        elif net_key is not None:
            check_backbone(net_key, get(cfg, net_key))
            if weights_key is not None and weights_key not in uses:
                uses[weights_key] = (net_key, get(cfg, net_key), stage)
    for key, (arch_key, arch, stage) in uses.items():
        value = get(cfg, key)
        w = parse_weights(value)
        if w.kind == "unset":
            if cfg.data.name == "voc":
                raise ConfigError(f"data=voc: stage {stage} needs {key} (ImageNet weights of {arch_key}={arch}: a "
                                  f"local file, timm, timm:NAME[@FILE] or hf-hub:ID; see docs/usage.md#weights), or "
                                  f"{key}=none to train from scratch")
            continue
        if w.kind == "none":
            continue
        if w.through_timm:
            _check_timm_weights(key, value, arch_key, arch, w)  # type: ignore[arg-type]
        if w.path is not None and not Path(w.path).is_file():
            raise ConfigError(f"{key}={value}: weights file not found: {w.path}")
        if w.kind == "file" and w.path.endswith(".params") and arch != "resnet38d":  # type: ignore[union-attr]
            raise ConfigError(f"{key}={value}: an MXNet .params file is psa's ResNet-38d; {arch_key}={arch}")
        if w.kind == "file" and w.path.endswith(".safetensors"):  # type: ignore[union-attr]
            _check_header(key, w.path, arch, cfg.teacher.img_size if key == "teacher.weights" else None)  # type: ignore[arg-type]


def check_clip(arch: str, weights: str) -> None:
    """ConfigError unless open_clip is installed, knows ``clip.arch`` and ``clip.weights`` names a local file
    (a tag found in the caches, a file, a folder) or ``random`` (never downloads). Without torch, unless the weights
    are a named tag (``openai``: open_clip's table says where they would be)."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        raise ConfigError("method=clip_es needs open_clip: pip install open_clip_torch (or the [clip] extra)")
    from wsss_dist.models.clip_weights import TINY, resolve_weights

    if arch != TINY and arch not in (names := clip_model_names()):
        import difflib

        close = difflib.get_close_matches(arch, sorted(names), n=3, cutoff=0.6)
        raise ConfigError(f"clip.arch={arch}: not an open_clip model (or tiny)"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))
    resolve_weights(arch, weights)


def check_backbone(key: str, name: str) -> None:
    """ConfigError unless ``name`` is one of our backbones or a timm model (with the closest names)."""
    if name in BACKBONES:
        return
    import difflib

    names = timm_model_names()
    if name.split(".", 1)[0] in names:  # a name with a pretrained tag (resnet50.a1_in1k) is its architecture's
        return
    close = difflib.get_close_matches(name, list(BACKBONES) + sorted(names), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"{key}={name}: unknown backbone (resnet38d or a timm model name){hint}")


def timm_model_names() -> frozenset[str]:
    """timm's model names (``timm.list_models()``), kept in ``$XDG_CACHE_HOME/wsss_dist/timm-<version>-models.json``
    after the first call: checking a name then needs no import of timm and torch (3 s of every launcher start)."""
    def names() -> list[str]:
        import timm

        return timm.list_models()

    return _cached_names("timm", names)


def clip_model_names() -> frozenset[str]:
    """open_clip's model names (``open_clip.list_models()``), cached per open_clip version as timm's are."""
    def names() -> list[str]:
        import open_clip

        return open_clip.list_models()

    return _cached_names("open_clip_torch", names)


def _cached_names(package: str, list_names: Callable[[], list[str]]) -> frozenset[str]:
    """``list_names()`` (which imports ``package``), kept in ``$XDG_CACHE_HOME/wsss_dist/<package>-<version>-models.json``
    after the first call; a damaged cache file is rebuilt, not believed."""
    import json
    import os
    from importlib import metadata

    from wsss_dist import runs

    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "unknown"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsss_dist" / f"{package}-{version}-models.json"
    try:
        names = json.loads(cache.read_text())
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return frozenset(names)
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: rebuilt below
    names = list_names()
    try:  # best effort: a read-only home only costs the import next time
        runs.atomic_write(cache, json.dumps(names))
    except OSError:
        pass
    return frozenset(names)


def _check_timm_weights(key: str, value: str, arch_key: str, arch: str, w: Weights) -> None:
    """A timm tag of ``arch`` that timm knows (a hub id: its config names the architecture, checked at build)."""
    if arch in BACKBONES:
        raise ConfigError(f"{key}={value}: timm has no weights of our {arch}; give a local file (psa's .params or "
                          f"its conversion)")
    if w.kind == "hf":
        return
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = w.name or arch
    named_arch, _ = split_model_name_tag(name)
    if named_arch != arch:
        raise ConfigError(f"{key}={value}: weights of {named_arch}, but {arch_key}={arch}")
    try:
        pcfg = get_pretrained_cfg(name)
    except RuntimeError:
        pcfg = None
    if pcfg is None:
        known = timm.list_pretrained(f"{arch}.*")
        raise ConfigError(f"{key}={value}: timm has no pretrained weights {name}"
                          + (f"; known: {', '.join(known[:6])}" if known else ""))
    if w.path is None and getattr(pcfg, "hf_hub_id", None):
        check_cached_or_reachable(key, value, pcfg.hf_hub_id.split("@")[0])


def check_cached_or_reachable(key: str, value: str, repo: str) -> None:
    """ConfigError when the Hugging Face repo of a timm tag is neither in the local cache nor downloadable from here
    (HF_HUB_OFFLINE set, or huggingface.co unreachable): a job would otherwise fail after timm's retries."""
    import os
    import socket

    from huggingface_hub import constants, try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return
    where = f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    advice = "fill the cache on a machine with internet (docs/data.md) or give timm:NAME@FILE"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{key}={value}: {where} and HF_HUB_OFFLINE is set; {advice}")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ConfigError(f"{key}={value}: {where} and huggingface.co cannot be reached from here; {advice}") from None


def _check_header(key: str, file: str, arch: str, img_size: int | None) -> None:
    """Header-only check of a safetensors file against ``arch``'s state dict (built on the meta device);
    deeplab-pytorch names are mapped at load."""
    import torch

    from wsss_dist.models.deeplab_pytorch import is_deeplab_pytorch

    try:
        shapes = strip_module(header_shapes(file))
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{key}={file}: not a readable safetensors file ({_first_line(e)})") from None
    if is_deeplab_pytorch(shapes):
        return
    with torch.device("meta"):
        if arch in BACKBONES:
            from wsss_dist.models.resnet38d import ResNet38d

            model = ResNet38d()
        else:
            import timm

            model = timm.create_model(arch, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = weights_mismatch(own, shapes, resampled=("pos_embed",) if img_size else ())
    if problem:
        raise ConfigError(f"{key}={file}: weights do not fit {arch}: {problem}")


def _first_line(e: BaseException) -> str:
    """An exception's first non-empty line (its type name when it has none)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


__all__ = ["check_backbone", "check_clip", "preflight"]
