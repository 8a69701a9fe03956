"""The frozen CLIP of CLIP-ES (open_clip): one ``clip.weights`` value resolved to a local file, the model built from
it, the prompts' text embeddings, and the image tower's forward at any input size that returns the attention maps
of every block and the last block's LayerNorm-ed input tokens (the Grad-CAM target), with gradients only through
that last block (reference-implementations.md §15.1).

No download ever happens here: :mod:`.clip_weights` resolves ``clip.weights`` from the local caches only;
docs/usage.md says how to pre-fetch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .clip_weights import RANDOM, TINY, resolve_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (§15.1)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_config() -> dict[str, Any]:
    """open_clip CLIP arguments of the tiny test model: ViT blocks as ViT-B/16's (12 blocks, QuickGELU, CLS token,
    LayerNorm before/after), only narrower, with 8-px patches so that toy images give a usable token grid."""
    return dict(embed_dim=32, quick_gelu=True,
                vision_cfg=dict(image_size=64, layers=12, width=32, head_width=16, patch_size=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's released ``ViT-B-16.pt``)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def build_clip(arch: str, weights: str) -> torch.nn.Module:
    """The frozen CLIP (eval mode, no parameter requires grad) of ``clip.arch`` with ``clip.weights``."""
    import open_clip

    path = resolve_weights(arch, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init: the same model on every rank and after a resume
        config = tiny_config() if arch == TINY else open_clip.get_model_config(arch)
        model = (open_clip.model.CLIP(**config) if config and not config.get("custom_text")
                 else open_clip.create_model(arch, pretrained=None, load_weights=False))  # (it logs "random init")
    if path is not None:
        # OpenAI's JIT archive cannot be read with weights_only (torch refuses TorchScript there): torch.jit.load
        bad = open_clip.load_checkpoint(model, path, strict=False, weights_only=not is_torchscript(path))
        unexpected = [k for k in bad.unexpected_keys if k != "attn_mask"]  # a scripted model's text-mask buffer
        if bad.missing_keys or unexpected:
            raise ConfigError(f"clip.weights={weights}: not a {arch} CLIP checkpoint ({len(bad.missing_keys)} missing, "
                              f"{len(unexpected)} unexpected names, e.g. {(bad.missing_keys + unexpected)[0]})")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def text_embeddings(model: torch.nn.Module, arch: str, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """L2-normalised text features [P, D] of ``prompts`` (float32)."""
    import open_clip

    tokens = (open_clip.tokenize(list(prompts)) if arch == TINY else open_clip.get_tokenizer(arch)(list(prompts)))
    feats = model.to(device).encode_text(tokens.to(device)).float()
    return F.normalize(feats, dim=-1)


def patch_size(model: torch.nn.Module) -> int:
    """The image tower's patch size in px."""
    return int(model.visual.conv1.kernel_size[0])


def _block(blk: torch.nn.Module, x: torch.Tensor, a: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual block of open_clip's ViT, returning its head-averaged attention [B, L, L] (``a``: its ln_1
    output, given when the caller needs it as a leaf)."""
    a = blk.ln_1(x) if a is None else a
    q = a if blk.attn.batch_first else a.transpose(0, 1)
    out, w = blk.attn(q, q, q, need_weights=True, average_attn_weights=True)
    out = out if blk.attn.batch_first else out.transpose(0, 1)
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, w


@dataclass
class ClipPass:
    """One image-tower pass: ``tokens`` the last block's ln_1 output [B, 1+N, C] (a leaf that requires grad: the
    Grad-CAM target), ``features`` the L2-normalised image embeddings [B, D] (a function of ``tokens``),
    ``attn`` the head-averaged attention of every block [B, blocks, 1+N, 1+N], ``grid`` (h, w)."""

    tokens: torch.Tensor
    features: torch.Tensor
    attn: torch.Tensor
    grid: tuple[int, int]


def image_pass(model: torch.nn.Module, x: torch.Tensor) -> ClipPass:
    """The image tower on CLIP-normalised ``x`` [B, 3, H, W] (H, W multiples of the patch size): positional grid
    resized bilinearly to (H/p, W/p) (CLS position kept), blocks 1..L−1 without grad, block L with grad; the
    embedding is ln_post → mean of the patch tokens (CLS excluded) → projection → L2-normalised (§15.1)."""
    v = model.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        t = v.conv1(x.to(v.conv1.weight.dtype))
        B, C, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        pos = v.positional_embedding.to(t.dtype)
        g = int(math.isqrt(pos.shape[0] - 1))
        grid = pos[1:].reshape(1, g, g, C).permute(0, 3, 1, 2)
        if (h, w) != (g, g):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, C)])
        t = torch.cat([v.class_embedding.to(t.dtype).expand(B, 1, C), t], 1) + pos
        t = v.ln_pre(t)
        maps = []
        for blk in blocks[:-1]:
            t, a = _block(blk, t)
            maps.append(a)
    with torch.enable_grad():
        tokens = blocks[-1].ln_1(t).detach().requires_grad_(True)
        t, a = _block(blocks[-1], t, tokens)
        maps.append(a.detach())
        f = v.ln_post(t)[:, 1:].mean(1) @ v.proj
        features = F.normalize(f.float(), dim=-1)
    return ClipPass(tokens, features, torch.stack(maps, 1).float(), (h, w))


__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipPass", "RANDOM", "TINY", "build_clip", "image_pass", "patch_size",
           "text_embeddings", "tiny_config"]
