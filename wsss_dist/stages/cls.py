"""Stage cls: train the CAM classifier with one of six methods.

Inputs: train shards (image + image-level labels over the dataset's K classes). Model: backbone → GAP → bias-free 1×1 classifier
(+ a sub-category head for ``sc``/``teach``). Objective per method (its entry in :mod:`wsss_dist.registry`):

- ``cam``:      L = MLSM(ŷ, y)
- ``mixup``:    input mixup x̃ = λx + (1−λ)x[π], λ ~ Beta(α, α);   L = λ·MLSM(ŷ, y) + (1−λ)·MLSM(ŷ, y[π])
                + w_ent · H(σ(ŷ)) + w_con · (λ·C(M, y) + (1−λ)·C(M, y[π]))   (Mixup-CAM)
- ``fmix``:     as mixup with an FMix mask: x̃ = m⊙x + (1−m)⊙x[π], λ = mean(m)
- ``manifold``: as mixup, mixing the features after a stage drawn uniformly from {input, stage 1..S−1}
- ``sc``:       rounds: train → pooled features → per-class clustering → train again with
                L = MLSM(ŷ, y) + w_sub · MLSM(ŷ_sub, y_sub) (Sub-category Exploration)
- ``teach``:    sub-categories from FINCH on a fine-tuned ViT teacher's embeddings (stage teacher), same loss.

Engine: :func:`wsss_dist.engine.fit`. Outputs: ``cls/model.safetensors`` and ``cls/model.json`` (architecture);
``sc``: one ``cls/round<r>/`` per round, the last one copied up.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import runs
from ..config import ClsCfg, Config
from ..data.stream import train_loader_for
from ..engine import dist, split_features, train_model
from ..methods import losses, mixing
from ..methods.subcategory import cluster_subcategories
from ..models.build import build_classifier, classifier_spec, load_model
from ..models.weights import MODEL_JSON, WEIGHTS, unwrap
from ..registry import METHODS, Method

logger = logging.getLogger(__name__)


def forward_mixed(method: Method, c: ClsCfg, model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, mixing.MixResult | None, dict]:
    """The model's outputs on the method's (mixed) batch: (outputs, the mix or None, logs)."""
    if method.mix == "manifold":
        mix, layer, mix_fn = mixing.manifold_mixup(x, unwrap(model).backbone.num_stages, alpha=c.manifold_alpha)
        return model(x, mix_at=layer, mix_fn=mix_fn), mix, {"layer": float(layer)}
    mix = None
    if method.mix == "mixup":
        mix = mixing.mixup(x, alpha=c.mixup_alpha)
    elif method.mix == "fmix":
        mix = mixing.fmix(x, alpha=c.fmix_alpha, decay_power=c.fmix_decay)
    return model(x if mix is None else mix.x), mix, {}


def make_loss(cfg: Config, sub_labels: dict[str, np.ndarray] | None = None):
    """The training objective of ``cfg.method`` as an engine ``loss_fn(model, batch, step)``."""
    c, method = cfg.cls, METHODS[cfg.method]

    def loss_fn(model, batch, step):
        y = batch["labels"]
        out, mix, logs = forward_mixed(method, c, model, batch["image"])
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
            sub_logits = out["sub_logits"].float()
            sub = (losses.multilabel_loss(sub_logits, ys) if mix is None
                   else losses.mixed_loss(losses.multilabel_loss, sub_logits, ys, mix))
            loss = loss + c.sub_weight * sub
            logs["sub"] = sub.detach()
        return loss, logs

    return loss_fn


def train_classifier(cfg: Config, out_dir: Path, sub_labels: dict[str, np.ndarray] | None = None, num_sub: int = 0) -> dict:
    """Train one classifier into ``out_dir`` (resumable); returns the engine's metrics."""
    t, o = cfg.cls.train, cfg.cls.optim
    metrics, _ = train_model(out_dir, classifier_spec(cfg, num_sub), lambda: build_classifier(cfg, num_sub=num_sub),
                             lambda model: model.param_groups(o.lr, o.weight_decay), loss_fn=make_loss(cfg, sub_labels),
                             make_loader=train_loader_for(cfg, t, cfg.cls.split), train=t, optim=o,
                             log_name=f"cls/{cfg.method}", log_with=cfg.log_with)
    return metrics


def subcategories(cfg: Config, feats: Callable[[], dict[str, np.ndarray]], out: Path) -> tuple[dict[str, np.ndarray], int]:
    """Cluster ``feats()`` (keys, features, labels) per parent class into ``out`` (npz: keys, sub_labels, parent);
    returns (key → sub-labels, K). Not data-parallel: rank 0 computes and writes, the other ranks wait and read."""
    c = cfg.cls
    d = dist()
    if d.main:
        f = feats()
        partition = int(c.finch_partition) if c.finch_partition.lstrip("-").isdigit() else c.finch_partition
        sub = cluster_subcategories(f["features"], f["labels"], method=c.cluster, partition=partition,
                                    k=c.kmeans_k, seed=c.train.seed)
        runs.write_npz(out, keys=np.array(list(f["keys"])), sub_labels=sub.sub_labels, parent=sub.parent)
        logger.info("sub-categories: K=%d (%s) over %d images", sub.num_sub, c.cluster, len(f["keys"]))
    d.barrier()
    saved = runs.read_npz(out, keys=("keys", "sub_labels", "parent"))
    return dict(zip(list(saved["keys"]), saved["sub_labels"])), int(saved["parent"].shape[0])


def pooled_features(cfg: Config, model_dir: Path) -> dict[str, np.ndarray]:
    """GAP features of every training image at scale 1, unflipped (SC-CAM), of the classifier in ``model_dir``."""
    model = load_model(model_dir).to(dist().device)
    return split_features(cfg, cfg.cls.split, lambda x: model(x)["pooled"])


def run(cfg: Config) -> dict:
    """Train the classifier of ``cfg.method``; a method with rounds trains one round after another, each resumable."""
    out = runs.stage_dir(cfg.run_dir, "cls")
    method = METHODS[cfg.method]
    if method.subcategories == "teacher":
        runs.require_done_at(cfg.teacher_dir, "teacher", "cls")  # teacher.dir: a sweep's shared teacher
        sub, k = subcategories(cfg, lambda: runs.read_npz(cfg.teacher_dir / "embeddings.npz", keys=("keys", "features", "labels")),
                               out / "subcategories.npz")
        return {**train_classifier(cfg, out, sub, k), "num_sub": k}
    if not method.rounds:
        return train_classifier(cfg, out)
    rounds = cfg.cls_rounds()
    sub, k, metrics = None, 0, {}
    for r in rounds:
        rdir = runs.round_dir(cfg.run_dir, r)
        if (rdir / "DONE").exists():
            metrics = runs.read_json(rdir / "DONE")
            continue
        if r > 0:
            sub, k = subcategories(cfg, lambda: pooled_features(cfg, runs.round_dir(cfg.run_dir, r - 1)),
                                   rdir / "subcategories.npz")
        metrics = {**train_classifier(cfg, rdir, sub, k), "round": r, "num_sub": k}  # each round from ImageNet init, as SC-CAM
        if dist().main:
            runs.write_json(rdir / "DONE", metrics)
    if rounds[-1] < cfg.cls.sc_rounds - 1:
        return {**metrics, "partial": True}  # a per-round job (cls.round=r): the stage is done after the last round
    if dist().main:
        for name in (MODEL_JSON, WEIGHTS):  # the architecture first: the weights mark training done
            with runs.atomic_path(out / name) as tmp:
                shutil.copyfile(runs.round_dir(cfg.run_dir, rounds[-1]) / name, tmp)
    return metrics
