"""Stage cls: train the CAM classifier with one of six methods.

Inputs: train shards (image + 20 image-level labels). Model: backbone → GAP → bias-free 1×1 classifier
(+ a sub-category head for ``sc``/``teach``). Objective per method:

- ``cam``:      L = MLSM(ŷ, y)
- ``mixup``:    input mixup x̃ = λx + (1−λ)x[π], λ ~ Beta(α, α);   L = λ·MLSM(ŷ, y) + (1−λ)·MLSM(ŷ, y[π])
                + w_ent · H(σ(ŷ)) + w_con · (λ·C(M, y) + (1−λ)·C(M, y[π]))   (Mixup-CAM)
- ``fmix``:     as mixup with an FMix mask: x̃ = m⊙x + (1−m)⊙x[π], λ = mean(m)
- ``manifold``: as mixup, mixing the features after a stage drawn uniformly from {input, stage 1..S−1}
- ``sc``:       rounds: train → pooled features → per-class clustering → train again with
                L = MLSM(ŷ, y) + w_sub · MLSM(ŷ_sub, y_sub) (Sub-category Exploration)
- ``teach``:    sub-categories from FINCH on a fine-tuned ViT teacher's embeddings (stage teacher), same loss.

Engine: :func:`wsss_dist.engine.fit`. Outputs: ``cls/model.safetensors`` and ``cls/model.json`` (architecture).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..errors import ConfigError
from ..data.shards import load_manifest, split_urls
from ..data.stream import infer_samples
from ..engine import fit, load_model_weights
from ..methods import losses, mixing
from ..methods.subcategory import cluster_subcategories
from ..models.backbones import create_backbone
from ..models.cam_net import CAMNet
from .common import dist, image_tensor, loader_factory

logger = logging.getLogger(__name__)


def build_model(cfg: Config, num_sub: int = 0, weights: bool = True) -> CAMNet:
    """The classifier of ``cfg.model`` (ImageNet weights from ``model.weights`` when given)."""
    m = cfg.model
    backbone = create_backbone(m.backbone, weights=m.weights if weights else None, output_stride=m.output_stride, frozen_bn=m.frozen_bn)
    return CAMNet(backbone, num_classes=20, num_sub=num_sub)


def load_trained(cfg: Config) -> CAMNet:
    """The trained classifier of this run (``cls/model.safetensors``), in eval mode."""
    runs.require_done(cfg.run_dir, "cls", "cam")
    meta = runs.read_json(cfg.run_dir / "cls" / "model.json")
    model = build_model(cfg, num_sub=meta["num_sub"], weights=False)
    load_model_weights(model, cfg.run_dir / "cls" / "model.safetensors")
    return model.eval()


def init_from_classifier(cfg: Config, backbone: torch.nn.Module, backbone_name: str, who: str) -> None:
    """Load the trained classifier's backbone weights into ``backbone`` (``aff.init=cls`` / ``seg.init=cls``)."""
    if backbone_name != cfg.model.backbone:
        raise ConfigError(f"{who}.init=cls needs {who}'s backbone to be the classifier's ({cfg.model.backbone}), "
                          f"got {backbone_name}; use {who}.init=imagenet")
    backbone.load_state_dict(load_trained(cfg).backbone.state_dict())
    logger.info("%s: backbone initialised from the trained classifier (%s.init=cls)", who, who)


def make_loss(cfg: Config, sub_labels: dict[str, np.ndarray] | None = None):
    """The training objective of ``cfg.method`` as an engine ``loss_fn(model, batch, step)``."""
    c, method = cfg.cls, cfg.method

    def loss_fn(model, batch, step):
        x, y = batch["image"], batch["labels"]
        logs = {}
        mix = None
        if method == "mixup":
            mix = mixing.mixup(x, alpha=c.mixup_alpha)
            x = mix.x
        elif method == "fmix":
            mix = mixing.fmix(x, alpha=c.fmix_alpha, decay_power=c.fmix_decay)
            x = mix.x
        if method == "manifold":
            inner = model.module if hasattr(model, "module") else model
            mix, layer, mix_fn = mixing.manifold_mixup(x, inner.backbone.num_stages, alpha=c.manifold_alpha)
            out = model(x, mix_at=layer, mix_fn=mix_fn)
            logs["layer"] = float(layer)
        else:
            out = model(x)
        logits = out["logits"].float()
        if mix is None:
            loss = losses.multilabel_loss(logits, y)
        else:
            loss = losses.mixed_loss(losses.multilabel_loss, logits, y, mix)
            ent = losses.entropy_loss(y if c.entropy_on_labels else logits)  # the seed's bug: on labels
            con = losses.mixed_loss(losses.concentration_loss, out["cams"].float(), y, mix)
            loss = loss + c.ent_weight * ent + c.con_weight * con
            logs.update(ent=ent.detach(), con=con.detach(), lam=mix.lam)
        if sub_labels is not None:
            ys = torch.as_tensor(np.stack([sub_labels[k] for k in batch["key"]]), device=logits.device)
            if mix is not None:
                sub = losses.mixed_loss(losses.multilabel_loss, out["sub_logits"].float(), ys, mix)
            else:
                sub = losses.multilabel_loss(out["sub_logits"].float(), ys)
            loss = loss + c.sub_weight * sub
            logs["sub"] = sub.detach()
        return loss, logs

    return loss_fn


def train_classifier(cfg: Config, out_dir: Path, sub_labels: dict[str, np.ndarray] | None = None, num_sub: int = 0) -> dict:
    """Train one classifier into ``out_dir`` (resumable); returns the engine's metrics."""
    t = cfg.cls.train
    torch.manual_seed(t.seed)  # initial weights are a function of the seed
    model = build_model(cfg, num_sub=num_sub)
    make_loader = loader_factory(cfg, t, cfg.cls.split)
    metrics = fit(model=model, param_groups=model.param_groups(cfg.cls.optim.lr, cfg.cls.optim.weight_decay),
                  loss_fn=make_loss(cfg, sub_labels), make_loader=make_loader, out_dir=out_dir, train=t,
                  optim=cfg.cls.optim, log_name=f"cls/{cfg.method}")
    if dist().main:
        runs.write_json(out_dir / "model.json", {"backbone": cfg.model.backbone, "num_sub": num_sub, "method": cfg.method})
    return metrics


@torch.no_grad()
def pooled_features(model: CAMNet, cfg: Config) -> tuple[list[str], np.ndarray, np.ndarray]:
    """GAP features of every training image at scale 1, unflipped (SC-CAM): keys, features [N, C], labels [N, 20]."""
    d = dist()
    model = model.to(d.device).eval()
    keys, feats, labels = [], [], []
    for url in split_urls(cfg.shards_dir, cfg.cls.split, load_manifest(cfg.shards_dir, verify=False)):
        for s in infer_samples(url, keys=("jpg", "cls.npy")):
            keys.append(s["__key__"])
            feats.append(model(image_tensor(s, d.device))["pooled"][0].float().cpu().numpy())
            labels.append(s["cls.npy"])
    return keys, np.stack(feats), np.stack(labels).astype(np.float32)


def subcategories(cfg: Config, keys: list[str], feats: np.ndarray, labels: np.ndarray, out: Path) -> tuple[dict[str, np.ndarray], int]:
    """Cluster per parent class; save ``out`` (npz: keys, sub_labels, parent) and return (key → sub-labels, K)."""
    c = cfg.cls
    partition = int(c.finch_partition) if c.finch_partition.lstrip("-").isdigit() else c.finch_partition
    sub = cluster_subcategories(feats, labels, method=c.cluster, partition=partition, k=c.kmeans_k, seed=cfg.cls.train.seed)
    if dist().main:
        with runs.atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(keys), sub_labels=sub.sub_labels, parent=sub.parent)
    logger.info("sub-categories: K=%d (%s) over %d images", sub.num_sub, c.cluster, len(keys))
    return dict(zip(keys, sub.sub_labels)), sub.num_sub


def run(cfg: Config) -> dict:
    """Train the classifier of ``cfg.method``; for ``sc`` one round after another, each resumable."""
    out = runs.stage_dir(cfg.run_dir, "cls")
    if cfg.method == "teach":
        runs.require_done(cfg.run_dir, "teacher", "cls")
        emb = np.load(cfg.run_dir / "teacher" / "embeddings.npz", allow_pickle=False)
        sub, k = subcategories(cfg, list(emb["keys"]), emb["features"], emb["labels"], out / "subcategories.npz")
        metrics = train_classifier(cfg, out, sub, k)
        return {**metrics, "num_sub": k}
    if cfg.method != "sc":
        return train_classifier(cfg, out)
    last = cfg.cls.sc_rounds - 1 if cfg.cls.round < 0 else min(cfg.cls.round, cfg.cls.sc_rounds - 1)
    sub, k, metrics = None, 0, {}
    for r in range(last + 1):
        rdir = out / f"round{r}"
        if (rdir / "DONE").exists():
            metrics = runs.read_json(rdir / "DONE")
            continue
        if r > 0:
            prev = out / f"round{r - 1}"
            meta = runs.read_json(prev / "model.json")
            model = build_model(cfg, num_sub=meta["num_sub"], weights=False)
            load_model_weights(model, prev / "model.safetensors")
            sub, k = subcategories(cfg, *pooled_features(model, cfg), rdir / "subcategories.npz")
        metrics = {**train_classifier(cfg, rdir, sub, k), "round": r, "num_sub": k}  # each round from ImageNet init, as SC-CAM
        if dist().main:
            runs.write_json(rdir / "DONE", metrics)
    if last < cfg.cls.sc_rounds - 1:
        return {**metrics, "partial": True}  # a per-round job (cls.round=r): the stage is done after the last round
    if dist().main:
        for name in ("model.safetensors", "model.json"):
            with runs.atomic_path(out / name) as tmp:
                shutil.copyfile(out / f"round{last}" / name, tmp)
    return metrics

