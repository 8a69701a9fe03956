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
    # refine=irn: the boundary branch on the trained classifier's frozen backbone (no ImageNet ResNet-50 on a CPU box);
    # toy images are ~80 px: a 20×20 boundary map at stride 4, IRN's radius 10 fits a crop of 80.
    "irn.backbone": "resnet18",
    "irn.init": "cls",
    "irn.train.steps": 120,
    "irn.train.batch_size": 8,
    "irn.train.crop": 80,
    "irn.scale_range": (0.75, 1.25),
    "irn.optim.name": "adamw",
    "irn.optim.lr": 2e-3,
    "irn.optim.weight_decay": 1e-4,
    # IRN's walk on the toy data (docs/methods.md, "IRN on the toy data"; measured on the toy chain's method=cam CAMs,
    # 300 train images: CAM 53.7 % at cam.bg_threshold 0.15, 57.3 % at its best threshold 0.05). irn's own walk
    # (β 10, 2^8 steps, bg 0.25) gave 32.7 %: 120 steps leave the boundary map soft (mean B 0.43, max 0.66, never
    # near irn's ~1 on edges), and 2^8 steps on a 20×20 grid leak across such boundaries.
    "irn.beta": 40.0,  # a = 1 − B ≥ 0.34 even on edges: β 40 separates 0.34 from interior ~0.6 as β 10 does 0.1 from 0.6 (β 10 → 20 → 40: 54.0 → 56.1 → 57.7 %)
    "irn.logt": 3,  # 2^3 steps at radius 5 spread over about as much of a 20×20 grid as irn's 2^8 over VOC's 125×94 (logt 8/6/4/3: 32.7/56.6/57.4/57.7 % at β 40 or 10)
    "irn.bg_threshold": 0.10,  # the toy CAMs' best threshold is 0.05–0.10 (stage cam's sweep), irn's VOC CAMs ~0.15–0.25 (0.05/0.10/0.15: 57.4/57.7/55.7 %)
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
    # refine=irn: irn's run_sample.py and step/train_irn.py (notes §5.3, §13). IR labels: aff.conf_fg / aff.conf_bg.
    "aff.conf_fg": 0.30,  # irn conf_fg_thres
    "aff.conf_bg": 0.05,  # irn conf_bg_thres
    "irn.backbone": "resnet50",  # irn net/resnet50_irn.py: torchvision ImageNet ResNet-50, strides (2,2,2,1), frozen
    "irn.init": "imagenet",  # irn.weights: the ImageNet ResNet-50 (timm resnet50 here; irn used torchvision's)
    "irn.radius": 10,  # train_irn.py: path radius 10 at stride 4
    "irn.walk_radius": 5,  # make_sem_seg_labels.py: radius 5
    "irn.beta": 10.0,  # run_sample.py beta
    "irn.logt": 8,  # run_sample.py exp_times (T^256)
    "irn.bg_threshold": 0.25,  # run_sample.py sem_seg_bg_thres
    "irn.flip": True,  # EdgeDisplacement: image + flip
    "irn.scale_range": (0.5, 1.5),  # voc12/dataloader.py: random scale U(0.5, 1.5), flip, crop 512
    "irn.train.steps": 990,  # irn: 3 epochs · ⌊10,582 / 32⌋
    "irn.train.batch_size": 32,  # run_sample.py irn_batch_size
    "irn.train.crop": 512,  # run_sample.py irn_crop_size
    "irn.train.resize_long": (0, 0),  # no resize-long: irn.scale_range instead
    "irn.optim.name": "sgd",
    "irn.optim.lr": 0.1 * (1 - 0.9) / (1 - 1e-4),  # irn's 0.1 at effective momentum 1e-4 (its PolyOptimizer bug)
    "irn.optim.momentum": 0.9,
    "irn.optim.weight_decay": 1e-4,  # run_sample.py irn_weight_decay
    "irn.optim.poly_power": 0.9,
    "irn.optim.legacy_momentum_bug": False,
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


# COCO preset: the references' COCO recipes (../shared/notes/reference-implementations.md §16), on top of the VOC
# preset (the same networks; only what the references change on COCO is set here). Steps = ⌊82,081 / batch⌋ · epochs.
COCO_PRESET: dict[str, Any] = {
    **VOC_PRESET,
    "data.pack_workers": 8,  # 122,218 images to pack: 8 packing processes (the shards stage's SLURM job has 8 CPUs; docs/performance.md "Packing COCO")
    "cls.split": "train",  # COCO has no train_aug: train2014 minus its 702 unannotated images (82,081)
    "cls.train.steps": 25650,  # ReCAM/irn-COCO: 5 epochs · ⌊82,081 / 16⌋
    "cls.train.batch_size": 16,  # ReCAM run_sample_coco.py
    "cls.train.crop": 512,  # ReCAM: crop 512
    "cls.train.resize_long": (320, 640),  # ReCAM: resize-long (320, 640)
    "cls.optim.weight_decay": 1e-4,  # ReCAM: wd 1e-4
    "cam.split": "train",  # pseudo labels for the training set (no train_aug)
    "cam.eval_split": "train",  # the forks score pseudo masks on the full COCO train set (§16.4)
    "cam.bg_threshold": 0.15,  # ReCAM's CAM eval threshold on COCO
    "aff.label_mode": "threshold",  # the COCO references are irn forks: affinity labels from two CAM thresholds
    "aff.conf_fg": 0.30,  # ReCAM: conf_fg 0.30
    "aff.conf_bg": 0.05,  # ReCAM: conf_bg 0.05
    "aff.train.steps": 30780,  # 3 epochs · ⌊82,081 / 8⌋ (ReCAM's IRN: 3 epochs)
    "seg.train.steps": 100000,  # ReCAM/LPCAM author (LPCAM#3): 100,000 iterations
    "seg.train.batch_size": 20,  # global batch: batch 10 × ITER_SIZE 2 (LPCAM#3)
    "seg.train.grad_accum": 2,  # ITER_SIZE 2
    "seg.train.crop": 321,  # crop 321 (LPCAM#3)
    "seg.optim.lr": 2e-4,  # lr 2e-4 (LPCAM#3); ASPP ×10/×20 as on VOC
    "seg.eval_scales": (1.0,),  # single scale at test (multi-scale {0.5..1.5} in LPCAM#3: seg.eval_scales=[...])
}


# Folder preset: the user's own data starts from the toy data's CPU recipe (small, quick to check the setup); use
# config=FILE.yaml or key=value words (e.g. the voc preset's values) for a real training run.
FOLDER_PRESET: dict[str, Any] = {
    **TOY_PRESET,
    "cls.split": "train",  # a folder has train (all labelled images unless split lists say otherwise), val, train_aug = train
    "cam.split": "train",
    "cam.eval_split": "train",
}


PRESETS: dict[str, dict[str, Any]] = {"toy": TOY_PRESET, "voc": VOC_PRESET, "coco": COCO_PRESET, "folder": FOLDER_PRESET}
