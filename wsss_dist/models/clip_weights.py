"""Where ``clip.weights`` is: one value resolved to a local weights file (or random init), never downloading — a tag
(``openai``) is looked up in the Hugging Face cache and in open_clip's own cache (``~/.cache/clip``) only.

Without torch: the launcher's pre-flight check resolves the weights before any job; open_clip (and so torch) is
imported only to look up a named tag.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError

TINY = "tiny"  # clip.arch=tiny: a small randomly initialised CLIP of the same family (tests, the toy chain)
RANDOM = "random"  # clip.weights=random: random init (seeded: every rank and every resume builds the same model)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names in an HF repo
PREFETCH = ("pre-fetch on a machine with internet: python -c \"import open_clip; open_clip.create_model("
            "'ViT-B-16-quickgelu', pretrained='openai')\" (fills the Hugging Face cache; copy it or set HF_HOME), "
            "or give clip.weights=FILE (docs/usage.md#clip-weights)")


def _hf_cached(repo: str, names: Sequence[str]) -> Optional[str]:
    """A file of ``repo`` already in the Hugging Face cache (None when absent or huggingface_hub is missing)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return hit
    return None


def _in_dir(path: Path) -> Optional[str]:
    """The open_clip weights file in a folder: the folder itself, or an HF cache repo folder's snapshots."""
    for folder in [path, *sorted((path / "snapshots").glob("*"))]:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return str(folder / name)
    return None


def resolve_weights(arch: str, value: str) -> Optional[str]:
    """The local weights file that ``clip.weights=value`` names for ``clip.arch=arch`` (None: random init);
    ConfigError in one line when there is none here (never downloads)."""
    key = f"clip.weights={value}"
    if not value:
        raise ConfigError(f"clip.weights is unset: method=clip_es needs CLIP weights (openai, a file, an HF cache "
                          f"folder) or clip.weights={RANDOM}; {PREFETCH}")
    if value == RANDOM:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        found = _in_dir(path)
        if found is None:
            raise ConfigError(f"{key}: no {' or '.join(WEIGHT_FILES)} in that folder (or its snapshots/*)")
        return found
    if "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ConfigError(f"{key}: weights file not found")
    if arch == TINY:
        raise ConfigError(f"{key}: clip.arch=tiny has no pretrained weights; use clip.weights={RANDOM} or a file")
    try:
        import open_clip
    except ImportError as e:  # installed but not importable (find_spec found it): say so before any job
        raise ConfigError(f"{key}: open_clip cannot be imported ({e}); pip install open_clip_torch") from None

    cfg = open_clip.get_pretrained_cfg(arch, value)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(f"{key}: open_clip has no weights {value!r} of clip.arch={arch}"
                          + (f"; known: {', '.join(known)}" if known else ""))
    hit = None
    if cfg.get("hf_hub"):
        repo, name = os.path.split(cfg["hf_hub"].rstrip("/")) if not cfg["hf_hub"].endswith("/") \
            else (cfg["hf_hub"].rstrip("/"), "")
        hit = _hf_cached(repo, [name] if name else WEIGHT_FILES)
    if hit is None and cfg.get("url"):
        f = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        hit = str(f) if f.is_file() else None
    if hit is None:
        raise ConfigError(f"{key}: the {arch} weights are not in the local caches (Hugging Face "
                          f"{cfg.get('hf_hub') or '-'}, ~/.cache/clip) and nothing is downloaded at run time; {PREFETCH}")
    return hit
