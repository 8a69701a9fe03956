"""Stage teacher (method=teach): fine-tune a ViT multi-label teacher and write its image embeddings.

Inputs: the ``cls.split`` shards. Model: timm ``teacher.arch`` (local ``teacher.weights`` only) with a 20-way
head. Objective: multilabel soft-margin loss. Engine: :func:`wsss_dist.engine.fit`. Outputs:
``teacher/model.safetensors`` and ``teacher/embeddings.npz`` (keys, pooled pre-logit features, labels) from which
stage cls clusters sub-categories with FINCH (Sub-category Teaching).
"""
from __future__ import annotations

import logging

import numpy as np
import timm
import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.shards import load_manifest, split_urls
from ..data.stream import infer_samples
from ..engine import fit, load_model_weights
from ..methods.losses import multilabel_loss
from ..models.backbones import load_weights
from .common import dist, image_tensor, loader_factory

logger = logging.getLogger(__name__)


def build_teacher(cfg: Config) -> torch.nn.Module:
    """A timm ViT with a 20-way multi-label head at ``teacher.img_size``; never downloads weights."""
    t = cfg.teacher
    model = timm.create_model(t.arch, pretrained=False, num_classes=20, img_size=t.img_size)
    if t.weights:
        load_weights(model, t.weights)
    return model


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Backbone 1×, the new head 10×; no weight decay on norms and biases."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        head = name.startswith("head")
        groups.setdefault((head, p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": lr * (10 if head else 1), "lr_mult": 10.0 if head else 1.0,
             "weight_decay": 0.0 if no_wd else weight_decay} for (head, no_wd), ps in groups.items()]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Squash a batch to size × size (ViT input)."""
    return x if x.shape[-2:] == (size, size) else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def embeddings(model: torch.nn.Module, cfg: Config) -> dict[str, np.ndarray]:
    """Pooled pre-logit features of every ``cls.split`` image."""
    d = dist()
    model = model.to(d.device).eval()
    keys, feats, labels = [], [], []
    for url in split_urls(cfg.shards_dir, cfg.cls.split, load_manifest(cfg.shards_dir, verify=False)):
        for s in infer_samples(url, keys=("jpg", "cls.npy")):
            x = resize(image_tensor(s, d.device), cfg.teacher.img_size)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True)[0].float().cpu().numpy())
            keys.append(s["__key__"])
            labels.append(s["cls.npy"])
    return {"keys": np.array(keys), "features": np.stack(feats), "labels": np.stack(labels).astype(np.float32)}


def run(cfg: Config) -> dict:
    """Fine-tune the teacher, then write its embeddings."""
    out = runs.stage_dir(cfg.run_dir, "teacher")
    t = cfg.teacher.train
    torch.manual_seed(t.seed)  # initial weights are a function of the seed
    model = build_teacher(cfg)
    size = cfg.teacher.img_size
    make_loader = loader_factory(cfg, t, cfg.cls.split)

    def loss_fn(model, batch, step):
        return multilabel_loss(model(resize(batch["image"], size)).float(), batch["labels"]), {}

    metrics = fit(model=model, param_groups=param_groups(model, cfg.teacher.optim.lr, cfg.teacher.optim.weight_decay),
                  loss_fn=loss_fn, make_loader=make_loader, out_dir=out, train=t, optim=cfg.teacher.optim, log_name="teacher")
    load_model_weights(model, out / "model.safetensors")  # also when fit() found the stage already trained
    emb = embeddings(model, cfg)
    if dist().main:
        with runs.atomic_path(out / "embeddings.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **emb)
    return {**metrics, "embeddings": int(len(emb["keys"])), "dim": int(emb["features"].shape[1])}
