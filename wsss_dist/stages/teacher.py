"""Stage teacher (method=teach): fine-tune a ViT multi-label teacher and write its image embeddings.

Inputs: the ``cls.split`` shards, normalised with the mean/std timm's data config gives for the teacher's weights
(ImageNet's when it trains from scratch). Model: timm ``teacher.arch`` (``teacher.weights``: docs/usage.md#weights)
with a multi-label head over the dataset's classes, position embedding resampled to ``teacher.img_size``. Objective: multilabel soft-margin loss. Engine: :func:`wsss_dist.engine.fit`. Outputs:
``teacher/model.safetensors``, ``teacher/model.json`` and ``teacher/embeddings.npz`` (keys, pooled pre-logit features, labels) from which
stage cls clusters sub-categories with FINCH (Sub-category Teaching).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config
from ..data.stream import renormalize, train_loader_for
from ..engine import dist, split_features, train_model
from ..methods.losses import multilabel_loss
from ..models.build import build_teacher, load_model, spec_normalization, teacher_spec

logger = logging.getLogger(__name__)


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


def run(cfg: Config) -> dict:
    """Fine-tune the teacher, then write its embeddings (or, with ``teacher.dir`` elsewhere, use that finished one)."""
    if cfg.teacher_dir.resolve() != (cfg.run_dir / "teacher").resolve():  # a sweep's shared teacher: trained once
        runs.require_done_at(cfg.teacher_dir, "teacher", "teacher")
        logger.info("teacher: using the finished teacher in %s (teacher.dir)", cfg.teacher_dir)
        return runs.read_json(cfg.teacher_dir / "DONE")
    out = runs.stage_dir(cfg.run_dir, "teacher")
    t, o = cfg.teacher.train, cfg.teacher.optim
    spec = teacher_spec(cfg)
    size = cfg.teacher.img_size
    mean, std = spec_normalization(spec)  # what its weights expect (ImageNet's from scratch)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return resize(renormalize(x, mean, std), size)

    def loss_fn(model, batch, step):
        return multilabel_loss(model(prepare(batch["image"])).float(), batch["labels"]), {}

    metrics, _ = train_model(out, spec, lambda: build_teacher(cfg), lambda model: param_groups(model, o.lr, o.weight_decay),
                             loss_fn=loss_fn, make_loader=train_loader_for(cfg, t, cfg.cls.split), train=t, optim=o,
                             log_name="teacher", log_with=cfg.log_with)
    d = dist()
    if d.main:  # not data-parallel: rank 0 writes the embeddings, the other ranks wait
        model = load_model(out).to(d.device)  # the trained weights, also when fit() found the stage already trained
        emb = split_features(cfg, cfg.cls.split,
                             lambda x: model.forward_head(model.forward_features(prepare(x)), pre_logits=True))
        runs.write_npz(out / "embeddings.npz", **emb)
    d.barrier()
    emb = runs.read_npz(out / "embeddings.npz", keys=("keys", "features", "labels"))
    return {**metrics, "embeddings": int(len(emb["keys"])), "dim": int(emb["features"].shape[1])}
