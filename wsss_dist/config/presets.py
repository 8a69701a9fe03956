"""The dataset presets: the toy data's CPU recipe and the references' VOC recipes, key by key (docs/methods.md)."""
from __future__ import annotations

from typing import Any



# Toy preset: what a CPU learns from scratch in minutes (../shared/notes/toy-calibration.md). fp32: bf16
# autocast was ~10× slower than fp32 on a CPU without AVX-512 of this machine kind, ~2× faster on one with
# avx512_bf16 (docs/performance.md); fp32 gives the same results on both.
TOY_PRESET: dict[str, Any] = {
    "model.backbone": "resnet18",
    "model.frozen_bn": False,
    "cls.train.steps": 300,
    "cls.train.batch_size": 16,
    "cls.train.crop": 56,
    "cls.train.resize_long": (48, 88),
    "cls.train.ckpt_every": 100,
    "cls.optim.name": "adamw",
    "cls.optim.lr": 2e-3,
    "cls.optim.weight_decay": 1e-4,
    "cls.sc_rounds": 2,
    "teacher.arch": "vit_tiny_patch16_224",
    "teacher.img_size": 64,
    "teacher.train.steps": 150,
    "teacher.train.batch_size": 32,
    "teacher.train.crop": 64,
    "teacher.train.resize_long": (56, 96),
    "teacher.optim.name": "adamw",
    "teacher.optim.lr": 1e-3,
    "teacher.optim.warmup_steps": 20,
    "cam.scales": (1.0, 0.5),
    "cam.out_stride": 1,
    # method=clip_es on a CPU: a small randomly initialised CLIP of ViT-B/16's family (wsss_dist/models/clip.py)
    "clip.arch": "tiny",
    "clip.weights": "random",
    # No ImageNet weights on a CPU box: AffinityNet and DeepLab start from the trained classifier's backbone.
    # Toy objects span 3-5 cells of a stride-8 grid, too coarse for the walk: affinities at stride 4.
    "aff.stride": 4,
    "aff.init": "cls",
    "aff.train.steps": 120,
    "aff.train.batch_size": 8,
    "aff.train.crop": 80,  # AffinityNet pairs (radius 5 at stride 8) need a map ≥ 5×9
    "aff.train.resize_long": (64, 96),
    "aff.optim.name": "adamw",
    "aff.optim.lr": 2e-3,
    "aff.optim.weight_decay": 1e-4,
    # A short-trained AffinityNet has soft affinities: a sharper power, fewer steps; toy CAMs peak at bg ≈ 0.05-0.1.
    "pseudo.beta": 32.0,
    "pseudo.logt": 4,
    "pseudo.alpha": 32.0,
    "seg.backbone": "resnet18",
    "seg.init": "cls",
    "seg.frozen_bn": False,
    "seg.train.steps": 200,
    "seg.train.batch_size": 16,
    "seg.train.crop": 56,
    "seg.optim.name": "adamw",
    "seg.optim.lr": 1e-3,
    "seg.optim.weight_decay": 1e-4,
    "seg.scale_range": (0.75, 1.25),
    "slurm.time_min": 30,
}


# VOC preset: the references' recipes (docs/methods.md, "The voc preset"; ../shared/notes/reference-implementations.md).
# Steps = ⌊10,582 / batch⌋ · epochs (train_aug, drop_last). psa/irn/the seed ran SGD at effective momentum 5e-4 (their
# PolyOptimizer bug); here momentum is 0.9 and lr = lr_ref·(1 − 0.9)/(1 − 5e-4) gives the same steady-state step.
VOC_PRESET: dict[str, Any] = {
    "model.backbone": "resnet38d",
    "model.output_stride": 8,
    "model.frozen_bn": True,
    "cls.split": "train_aug",  # train: the seed's Tables 1-2 (1,464 images); train_aug: its Table 3
    "cls.train.steps": 9915,  # psa: 15 epochs · ⌊10,582 / 16⌋
    "cls.train.batch_size": 16,
    "cls.train.crop": 448,
    "cls.train.resize_long": (256, 512),
    "cls.optim.name": "sgd",
    "cls.optim.lr": 0.1 * (1 - 0.9) / (1 - 5e-4),  # psa's 0.1 at effective momentum 5e-4
    "cls.optim.momentum": 0.9,
    "cls.optim.weight_decay": 5e-4,
    "cls.optim.poly_power": 0.9,
    "cls.optim.grad_clip": 0.0,
    "cls.optim.legacy_momentum_bug": False,
    "cls.mixup_alpha": 0.2,
    "cls.fmix_alpha": 1.0,
    "cls.fmix_decay": 3.0,
    "cls.manifold_alpha": 0.2,
    "cls.ent_weight": 0.02,
    "cls.con_weight": 2e-4,
    "cls.sub_weight": 2.0,  # the seed's SCE; SC-CAM: 5 (table)
    "cls.sc_rounds": 2,  # the seed: one clustering round; SC-CAM: 4 (round 0 + 3)
    "cls.cluster": "finch",
    "cls.finch_partition": "last",
    "cls.kmeans_k": 10,
    "teacher.arch": "vit_base_patch16_224",
    "teacher.img_size": 224,
    "teacher.train.batch_size": 8,
    "teacher.train.crop": 224,
    "teacher.optim.weight_decay": 0.0,
    "teacher.optim.grad_clip": 1.0,
    "cam.split": "train_aug",
    "cam.eval_split": "train",
    "cam.scales": (1.0, 0.5, 1.5, 2.0),
    "cam.flip": True,
    "cam.bg_threshold": 0.15,
    "cam.out_stride": 4,
    "aff.label_mode": "psa",
    "aff.crf": False,  # psa and the seed used the CRF: aff.crf=true (needs the [crf] extra)
    "aff.alpha_low": 4.0,
    "aff.alpha_high": 32.0,
    "aff.radius": 5,
    "aff.stride": 8,
    "aff.init": "imagenet",
    "aff.train.steps": 10576,  # psa: 8 epochs · ⌊10,582 / 8⌋
    "aff.train.batch_size": 8,
    "aff.train.crop": 448,
    "aff.train.resize_long": (0, 0),  # psa's train_aff: random crop and flip, no rescaling
    "aff.optim.name": "sgd",
    "aff.optim.lr": 0.1 * (1 - 0.9) / (1 - 5e-4),
    "aff.optim.momentum": 0.9,
    "aff.optim.weight_decay": 5e-4,
    "aff.optim.poly_power": 0.9,
    "aff.optim.legacy_momentum_bug": False,
    "pseudo.alpha": 16.0,
    "pseudo.beta": 8.0,
    "pseudo.logt": 8,
    "pseudo.radius": 5,
    "seg.backbone": "resnet101",
    "seg.init": "imagenet",
    "seg.frozen_bn": True,
    "seg.train.steps": 20000,
    "seg.train.batch_size": 10,  # global batch: deeplab-pytorch's 5 × 2 accumulation
    "seg.train.grad_accum": 2,
    "seg.train.crop": 321,
    "seg.train.resize_long": (0, 0),
    "seg.optim.name": "sgd",
    "seg.optim.lr": 2.5e-4,  # deeplab-pytorch has real momentum 0.9: no conversion
    "seg.optim.momentum": 0.9,
    "seg.optim.weight_decay": 5e-4,
    "seg.optim.poly_power": 0.9,
    "seg.scale_range": (0.5, 1.5),
    "seg.eval_scales": (1.0, 0.75, 0.5),
    "seg.eval_flip": False,
}


PRESETS: dict[str, dict[str, Any]] = {"toy": TOY_PRESET, "voc": VOC_PRESET}
