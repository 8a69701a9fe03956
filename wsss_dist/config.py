"""Typed configuration for every stage: dataclasses as OmegaConf structured configs, presets, YAML files, overrides.

A config is built as: the dataclass defaults, then the dataset's preset (:data:`PRESETS`), then the YAML files
given with ``config=FILE.yaml`` (in order; may repeat), then the other ``key=value`` words. ``run/<x>/config.yaml``
is such a file, so ``config=runs/x/config.yaml`` reruns a run. Unknown keys and bad values raise
:class:`ConfigError` naming the key and what is allowed, before any work starts; every field's trailing comment
is its one-line doc (``wsss-dist keys``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

from .errors import ConfigError
from .registry import METHOD_NAMES, METHODS, STAGE_NAMES, STAGE_SPECS, TRAINERS, MethodName

STAGES = STAGE_NAMES
Precision = Literal["no", "fp16", "bf16"]


@dataclass
class ToyCfg:
    """The built-in synthetic dataset (VOC layout on disk, deterministic from ``seed``)."""

    root: Optional[str] = None  # where the VOC/SBD-layout toy files are written; default <shards dir>/src
    seed: int = 0  # seed of the toy generator
    n_train: int = 300  # VOC seg train images
    n_val: int = 200  # VOC seg val images
    n_sbd: int = 900  # SBD-only images (train_aug = train ∪ sbd − val)
    size: int = 80  # mean image side in px (sizes vary ±25 %); at least 24


@dataclass
class DataCfg:
    """Where the data lives and how it is sharded and streamed."""

    name: Literal["toy", "voc"] = "toy"  # dataset: the built-in toy data or the user's VOC2012 (+ SBD)
    voc_root: Optional[str] = None  # .../VOCdevkit/VOC2012 (holds JPEGImages)
    sbd_root: Optional[str] = None  # .../benchmark_RELEASE (holds dataset/)
    lists_dir: Optional[str] = None  # optional psa/irn list folder (train_aug.txt, cls_labels.npy)
    shards_dir: Optional[str] = None  # where shards are written and read; default shards/<name>-<hash of the data settings> (runs share a folder only when their data settings are equal)
    shard_size: int = 200  # samples per shard
    num_workers: int = 2  # DataLoader workers per process
    augment_on: Literal["auto", "host", "device"] = "auto"  # training stream: decode + augment in the DataLoader workers (host) or on the training device (device); auto: device where CUDA is
    shuffle_buffer: int = 500  # samples in the training stream's shuffle buffer
    max_skip_fraction: float = 0.01  # a stream that skips more broken samples than this fails the stage
    max_pixels: int = 25_000_000  # images with more pixels are skipped (counted, with a warning) before decoding; 0 = no cap (PIL's own decompression-bomb cap still holds)
    toy: ToyCfg = field(default_factory=ToyCfg)


@dataclass
class ModelCfg:
    """Backbone of the classifier (and AffinityNet)."""

    backbone: str = "resnet38d"  # resnet38d | any timm resnet (resnet18, resnet50, resnet101, ...)
    weights: Optional[str] = ""  # ImageNet init: FILE (.safetensors/.pth; resnet38d: psa's .params) | timm | timm:NAME[@FILE] | hf-hub:ID | none (from scratch); unset: required with data=voc
    output_stride: int = 8  # the classifier's output stride (8, 16 or 32; resnet38d: 8)
    frozen_bn: bool = True  # BatchNorm in eval mode with frozen affine parameters


@dataclass
class OptimCfg:
    """Optimiser and schedule shared by every trainer (poly decay, 1×/10× parameter groups)."""

    name: Literal["sgd", "adamw"] = "sgd"  # optimiser
    lr: float = 0.1  # base learning rate (new layers get 10×)
    momentum: float = 0.9  # real momentum (psa's PolyOptimizer put weight decay in this slot: see legacy_momentum_bug)
    weight_decay: float = 5e-4  # weight decay of conv weights (none on BN and biases)
    poly_power: float = 0.9  # lr = base · (1 − step/steps)^power
    warmup_steps: int = 0  # linear warm-up steps
    grad_clip: float = 0.0  # gradient norm clip; 0 = off (the seed clips at 1)
    legacy_momentum_bug: bool = False  # reproduce psa/irn/seed: momentum = weight_decay


@dataclass
class TrainCfg:
    """Loop settings for a trainer."""

    steps: int = 2000  # optimiser steps
    batch_size: int = 16  # the global batch: images per optimiser step over all processes (each takes batch_size / (processes × grad_accum))
    crop: int = 448  # square training crop in px
    resize_long: tuple[int, int] = (256, 512)  # random resize of the long side in [lo, hi]; [0,0] = off
    mixed_precision: Precision = "no"  # autocast precision of the training step
    channels_last: bool = True  # channels-last memory format for model and input
    grad_accum: int = 1  # micro-batches accumulated per optimiser step (they split batch_size, never add to it)
    ckpt_every: int = 200  # steps between checkpoints (0 = only at the end)
    log_every: int = 20  # steps between log lines (0 = only at the end)
    seed: int = 0  # seed of initial weights, data order and augmentation


@dataclass
class ClsCfg:
    """Classifier training (stage cls) and the six CAM methods' hyper-parameters (seed defaults)."""

    split: str = "train_aug"  # the shards it trains on
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    mixup_alpha: float = 0.2  # mixup: λ ~ Beta(α, α)
    fmix_alpha: float = 1.0  # fmix: λ ~ Beta(α, α)
    fmix_decay: float = 3.0  # fmix: decay power of the Fourier spectrum
    manifold_alpha: float = 0.2  # manifold mixup: λ ~ Beta(α, α)
    ent_weight: float = 0.02  # weight of the entropy loss (mixing methods)
    con_weight: float = 2e-4  # weight of the concentration loss (mixing methods)
    entropy_on_labels: bool = False  # reproduce the seed's bug (entropy of the labels: zero gradient)
    sub_weight: float = 2.0  # L = L_cls + sub_weight · L_sub (SC-CAM used 5)
    sc_rounds: int = 3  # method=sc: training rounds (round 0 without sub-categories)
    cluster: Literal["finch", "kmeans"] = "finch"  # sub-category clustering
    finch_partition: str = "last"  # FINCH partition: last | first | <int column>
    kmeans_k: int = 10  # k-means: clusters per class
    round: int = -1  # method=sc: run rounds up to this one (-1 = all); the launcher submits one job per round


@dataclass
class TeacherCfg:
    """ViT teacher for method=teach (fine-tuned multi-label, then embeddings for FINCH)."""

    arch: str = "vit_base_patch16_224"  # a timm ViT name
    weights: Optional[str] = ""  # the ViT's init: FILE (pos-embed resampled to img_size) | timm | timm:NAME[@FILE] | hf-hub:ID | none; unset: required with data=voc
    img_size: int = 224  # ViT input size
    dir: str = ""  # where the teacher stage's outputs live (a sweep shares one per split and seed); "" = <run>/teacher
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=1000, batch_size=16, crop=224))
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(lr=0.01, warmup_steps=100))


@dataclass
class CamCfg:
    """CAM inference and evaluation."""

    split: str = "train_aug"  # shards to compute CAMs for (pseudo labels need train_aug)
    eval_split: str = "train"  # ids whose ground truth scores CAM mIoU
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)  # inference scales
    flip: bool = True  # add the mirrored image at every scale
    bg_threshold: float = 0.15  # background score of the reported CAM mIoU
    sweep: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)  # thresholds swept
    out_stride: int = 4  # CAMs are stored at 1/out_stride of the image size (float16)
    mixed_precision: Precision = "no"  # autocast precision of the CAM forwards
    batch_images: int = 1  # images per CAM forward when consecutive images of a shard have the same size (VOC: many 500×375); >1 may change CAM floats in the last bits (the conv algorithm can depend on the batch size)


@dataclass
class AffCfg:
    """AffinityNet: labels from CAMs, training."""

    label_mode: Literal["threshold", "psa"] = "threshold"  # irn's thresholds or psa's background powers
    conf_fg: float = 0.30  # threshold mode: max CAM above this is foreground
    conf_bg: float = 0.05  # threshold mode: max CAM below this is background
    alpha_low: float = 4.0  # psa mode: background power of the confident-foreground map
    alpha_high: float = 32.0  # psa mode: background power of the confident-background map
    crf: bool = False  # psa: dense CRF on the label score stacks (needs the [crf] extra, pydensecrf2)
    radius: int = 5  # pixel pairs within this radius (feature-grid cells)
    stride: Literal[8, 4] = 8  # feature grid of the affinities and the random walk (4: small images)
    init: Literal["imagenet", "cls"] = "imagenet"  # backbone init: model.weights (psa) or the trained classifier
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=3000, batch_size=8))
    optim: OptimCfg = field(default_factory=OptimCfg)


@dataclass
class PseudoCfg:
    """Random walk on AffinityNet affinities → pseudo labels."""

    alpha: float = 16.0  # background score (1 − max CAM)^alpha
    beta: float = 8.0  # affinity power
    logt: int = 8  # the walk takes 2^logt steps
    radius: int = 5  # neighbourhood of the transition matrix (feature-grid cells)


@dataclass
class SegCfg:
    """DeepLab-v2 on pseudo labels, and its evaluation."""

    backbone: str = "resnet101"  # DeepLab's backbone: resnet38d or a timm resnet
    weights: Optional[str] = ""  # DeepLab's init: FILE (also deeplab-pytorch's COCO .pth) | timm | timm:NAME[@FILE] | hf-hub:ID | none; unset: required with data=voc
    init: Literal["imagenet", "cls"] = "imagenet"  # seg.weights, or the trained classifier (same backbone name)
    frozen_bn: bool = True  # BatchNorm in eval mode with frozen affine parameters
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=20000, batch_size=10, crop=321, resize_long=(0, 0)))
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(lr=2.5e-4))
    scale_range: tuple[float, float] = (0.5, 1.5)  # random scale of training images
    eval_scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # evaluation scales, max-fused
    eval_flip: bool = False  # evaluation: average with the mirrored image at every scale


@dataclass
class ReportCfg:
    """Report over one or several runs."""

    runs: tuple[str, ...] = ()  # run dirs to compare; default: this run
    num_images: int = 6  # images per figure grid


@dataclass
class SweepCfg:
    """A sweep: any key given a list ``key=[a,b]`` makes one point per value (see :func:`sweep_points`)."""

    name: Optional[str] = None  # the sweep directory runs/<name>; default from the swept keys
    mode: Literal["product", "zip"] = "product"  # product of the lists, or zip of lists of equal length


@dataclass
class SlurmCfg:
    """Resources of a SLURM job (per stage overrides: slurm.<stage>.<key>, see docs/cluster.md)."""

    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    constraint: Optional[str] = None  # sbatch --constraint
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # GPUs per node (one task per GPU)
    cpus_per_task: int = 2  # CPUs per task
    mem_gb: int = 8  # memory per node in GB
    time_min: int = 60  # time limit per job in minutes (a job that hits it checkpoints and requeues)
    signal_delay_s: int = 120  # seconds before the time limit that the job is warned
    extra: tuple[str, ...] = ()  # extra sbatch flags, "key=value"
    array_parallelism: int = 0  # a sweep's job arrays: at most this many tasks of one array run at once (0 = no limit)


@dataclass
class Config:
    """The whole configuration of a run."""

    stage: str = "all"  # all | one stage | a list [a,b] (shards, teacher, cls, cam, aff, pseudo, seg, eval, report)
    method: MethodName = "cam"  # CAM method (the registry, wsss_dist/registry.py)
    run: Optional[str] = None  # run directory; default runs/<method>-<data>[-<values of the result-changing keys typed>]
    cluster: Literal["local", "slurm", "debug"] = "local"  # where launch/submit.py runs the jobs
    log_level: str = "INFO"  # logging level
    log_with: tuple[str, ...] = ()  # experiment trackers besides TensorBoard: wandb, mlflow (accelerate's trackers; the package must be installed; their env vars apply, e.g. WANDB_MODE=offline, MLFLOW_TRACKING_URI)
    device: Literal["auto", "cpu"] = "auto"  # auto: CUDA where present, and a multi-process run that finds none stops; cpu: run on the CPU on purpose (also a multi-process gloo rehearsal)
    redo: str = ""  # stages to run again from scratch although done (one or a list [a,b]); later stages whose inputs change then rerun too
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    cls: ClsCfg = field(default_factory=ClsCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    cam: CamCfg = field(default_factory=CamCfg)
    aff: AffCfg = field(default_factory=AffCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    seg: SegCfg = field(default_factory=SegCfg)
    report: ReportCfg = field(default_factory=ReportCfg)
    sweep: SweepCfg = field(default_factory=SweepCfg)
    slurm: SlurmCfg = field(default_factory=SlurmCfg)

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.run or f"runs/{self.method}-{self.data.name}")

    @property
    def shards_dir(self) -> Path:
        """Where shards are written and read: ``data.shards_dir``, or ``shards/<name>-<hash of the data settings>``."""
        return Path(self.data.shards_dir or f"shards/{self.data.name}-{data_hash(self)}")

    @property
    def toy_root(self) -> Path:
        """Where the toy generator writes its VOC-layout files: ``data.toy.root`` or ``<shards dir>/src``."""
        return Path(self.data.toy.root) if self.data.toy.root else self.shards_dir / "src"

    def redo_stages(self) -> list[str]:
        """The stages ``redo=`` names (run again from scratch, whatever their DONE says)."""
        return parse_stages(self.redo, self.method, key="redo") if self.redo else []

    @property
    def teacher_dir(self) -> Path:
        """Where the teacher stage's outputs (model, embeddings, DONE) live: ``teacher.dir`` or ``<run>/teacher``."""
        return Path(self.teacher.dir) if self.teacher.dir else self.run_dir / "teacher"

    def stages(self) -> list[str]:
        """The stages this config asks for, in pipeline order."""
        return parse_stages(self.stage, self.method)

    def cls_rounds(self) -> list[int]:
        """The rounds of stage cls this config trains: ``[0]`` for a method without rounds; for one with rounds
        0 .. ``cls.sc_rounds`` − 1, or up to ``cls.round`` (one job per round)."""
        if not METHODS[self.method].rounds:
            return [0]
        last = self.cls.sc_rounds - 1 if self.cls.round < 0 else min(self.cls.round, self.cls.sc_rounds - 1)
        return list(range(last + 1))


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
# The keys that shape the shards themselves (their hash names the default shards folder).
DATA_KEYS = STAGE_SPECS["shards"].settings


def data_settings(cfg: Config) -> dict[str, Any]:
    """The data settings that shape the shards (``data.toy.*`` only for the toy data; roots made absolute)."""
    out = {}
    for key in DATA_KEYS:
        if key.startswith("data.toy.") and cfg.data.name != "toy":
            continue
        value = get(cfg, key)
        if key.endswith(("_root", "_dir")) and value:
            value = str(Path(value).expanduser().resolve())
        out[key] = value
    return out


def data_hash(cfg: Config) -> str:
    """12 hex digits naming the data settings (the default shards folder is ``shards/<name>-<hash>``)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(data_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]


# words that set several keys at once: data=NAME, train.seed=N (the seed of every trainer)
PRECISION_KEYS = tuple(s.precision_key for s in STAGE_SPECS.values() if s.precision_key)
ALIASES: dict[str, tuple[str, ...]] = {"data": ("data.name",),
                                       "train.seed": tuple(f"{t}.train.seed" for t in TRAINERS),
                                       "precision": PRECISION_KEYS}  # one precision for every trainer and the CAMs


def parse_stages(stage: str, method: str, key: str = "stage") -> list[str]:
    """Expand ``all`` / ``cam`` / ``[cam,aff]`` into an ordered list of stage names (``all``: the method's extra stages too)."""
    s = stage.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    names = [x.strip() for x in s.split(",") if x.strip()]
    if names == ["all"]:
        extra = METHODS[method].extra_stages if method in METHODS else ()
        optional = {st.name for st in STAGE_SPECS.values() if st.optional}
        names = [x for x in STAGES if x not in optional or x in extra]
    bad = [x for x in names if x not in STAGES]
    if bad or not names:
        raise ConfigError(f"{key}={stage!r}: unknown stage {bad[0] if bad else ''!r}; allowed: all, {', '.join(STAGES)} or a list [a,b]")
    return [x for x in STAGES if x in names]


# ------------------------------------------------------------------------------------------ building a config
def parse_words(words: Iterable[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` words into (key, value) pairs, in order; a word without ``=`` is an error."""
    out = []
    for a in words:
        if "=" not in a:
            raise ConfigError(f"{a!r}: arguments are key=value (e.g. stage=cls method=fmix data=toy)")
        k, v = a.split("=", 1)
        out.append((k.strip().lstrip("-"), v.strip()))
    return out


def make_config(overrides: dict[str, Any] | list[str] | None = None, check: bool = True) -> Config:
    """Build a Config: defaults, the dataset preset, ``config=`` YAML files, then the other overrides; ``check``:
    also the value checks of :func:`validate` (names, ranges, extras)."""
    from omegaconf import OmegaConf

    pairs = parse_words(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    files = [v for k, v in pairs if k == "config"]
    pairs = [(k2, v) for k, v in pairs if k != "config" for k2 in ALIASES.get(k, (k,))]
    layers = [load_yaml(f) for f in files]
    name = next((v for k, v in reversed(pairs) if k == "data.name"), None)
    for layer in reversed(layers):
        name = name or OmegaConf.select(layer, "data.name", default=None)
    name = str(name or DataCfg.name)
    if name not in PRESETS:
        raise ConfigError(f"data={name!r}: allowed values are {', '.join(PRESETS)}")
    cfg = OmegaConf.structured(Config)
    _merge(cfg, _nested(PRESETS[name].items()), "the preset")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch --mixed_precision / accelerate config
    if launched:
        for key in PRECISION_KEYS:
            _set(cfg, key, launched, "accelerate's --mixed_precision (ACCELERATE_MIXED_PRECISION)")
    for f, layer in zip(files, layers):
        _merge(cfg, layer, f)
    for key, value in pairs:
        _set(cfg, key, value)
    obj = OmegaConf.to_object(cfg)
    if obj.run is None:
        obj.run = default_run(obj, [(k, v) for k, v in (parse_words(overrides) if isinstance(overrides, list)
                                                         else list((overrides or {}).items()))])
    if check:
        validate(obj)
    return obj


# Keys that never change a result: where things live, how they are run and logged (every other key does).
OPERATIONAL = ("config", "stage", "run", "redo", "cluster", "log_level", "device", "log_with", "report", "sweep", "slurm", "teacher.dir",
               "data.shards_dir", "data.toy.root", "data.num_workers", "data.augment_on", "data.max_skip_fraction",
               "cls.round", "cam.batch_images")
OPERATIONAL_LEAVES = ("ckpt_every", "log_every", "channels_last")


def is_operational(key: str) -> bool:
    """Whether a dotted key only says where or how a run runs (never what it computes)."""
    return any(key == o or key.startswith(o + ".") for o in OPERATIONAL) or key.rsplit(".", 1)[-1] in OPERATIONAL_LEAVES


def default_run(cfg: Config, typed: list[tuple[str, Any]]) -> str:
    """``runs/<method>-<data>``, plus the typed values of the keys that change results (named as sweep points are:
    ``runs/fmix-toy-steps600``); a hash of them when that gets long. Other settings never land in the same run."""
    import hashlib

    shown = [(k, str(v)) for k, v in typed if k not in ("method", "data", "data.name") and not is_operational(k)]
    base = f"runs/{cfg.method}-{cfg.data.name}"
    if not shown:
        return base
    suffix = "-".join(_short(k, v) for k, v in shown)
    if len(suffix) > 60 or not re.fullmatch(r"[A-Za-z0-9_.+-]+", suffix):
        suffix = hashlib.sha256(json.dumps(shown).encode()).hexdigest()[:10]
    return f"{base}-{suffix}"


def typed_value(key: str, text: str, schema: type = None) -> Any:  # type: ignore[assignment]
    """One command-line value converted and checked as the dotted ``key`` of ``schema`` (default: the Config) takes it."""
    from omegaconf import OmegaConf

    if schema is not None and schema is not Config:
        node = OmegaConf.structured(schema)
        name = key.split(".")[-1]
        try:
            OmegaConf.update(node, name, OmegaConf.from_dotlist([f"v={text}"])["v"], merge=False)
        except Exception as e:
            raise ConfigError(f"{key}={text}: {_first_line(e)}") from None
        return getattr(OmegaConf.to_object(node), name)
    cfg = OmegaConf.structured(Config)
    _set(cfg, key, text)
    value = get(OmegaConf.to_object(cfg), key)
    check_value(key, value)
    return value


def load_yaml(path: str | Path) -> Any:
    """A YAML (or JSON) config file as an OmegaConf container (ConfigError when missing or not a mapping)."""
    from omegaconf import DictConfig, OmegaConf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config={path}: no such file")
    try:
        layer = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"config={path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config={path}: must hold a mapping of keys (like a saved runs/<run>/config.yaml)")
    return layer


def to_yaml(cfg: Config) -> str:
    """The config as YAML (what ``runs/<run>/config.yaml`` holds; :func:`make_config` reads it back)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, as its YAML reads back (lists for tuples)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))  # type: ignore[return-value]


def _nested(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    return out


def _merge(cfg: Any, layer: Any, where: str) -> None:
    """Merge a nested mapping into ``cfg``, key by key, so that errors name the key and where it came from."""
    from omegaconf import DictConfig, OmegaConf

    def walk(prefix: str, node: Any) -> None:
        items = node.items() if isinstance(node, (dict, DictConfig)) else ()
        for k, v in items:
            key = f"{prefix}{k}"
            if isinstance(v, (dict, DictConfig)) and _is_group(key):
                walk(key + ".", v)
            else:
                _set(cfg, key, OmegaConf.to_container(v) if OmegaConf.is_config(v) else v, where, parse=False)

    walk("", layer)


def _set(cfg: Any, key: str, value: Any, where: str = "", parse: bool = True) -> None:
    """Set one dotted key on the structured config (``parse``: ``value`` is command-line text); OmegaConf's errors
    become one-line ConfigErrors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    suffix = f" (in {where})" if where else ""
    if key not in _all_keys():
        if _is_group(key):
            raise ConfigError(f"{key} is a group; set one of its keys: {', '.join(k for k in _all_keys() if k.startswith(key + '.'))[:200]}, ...")
        raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key)}{suffix}")
    if key == "stage" and isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    elif parse and isinstance(value, str):
        value = _parse_value(key, value)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except (ConfigKeyError, OmegaConfBaseException) as e:
        raise ConfigError(_explain(key, value, e) + suffix) from None


def _parse_value(key: str, text: str) -> Any:
    """A command-line value: text for string keys (``null``/``none`` for an optional one), else YAML-like scalars and
    ``[a,b]`` lists, as OmegaConf's dot-list parser reads them."""
    from omegaconf import OmegaConf

    typ = _field_types()[key]
    args = getattr(typ, "__args__", ())
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    if typ is str or (optional and str in args) or (getattr(typ, "__origin__", None) is Literal and all(isinstance(a, str) for a in args)):
        return text
    try:
        return OmegaConf.from_dotlist([f"v={text}"])["v"]
    except Exception:
        return text


def _explain(key: str, value: Any, e: Exception) -> str:
    """One line for an OmegaConf validation error, in this project's words."""
    from omegaconf import ListConfig, OmegaConf

    shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    shown = f"[{','.join(map(str, shown))}]" if isinstance(shown, (list, tuple)) else shown
    typ = _field_types().get(key)
    msg = _first_line(e)
    if isinstance(shown, str) and shown.startswith("[") and getattr(typ, "__origin__", None) is not tuple:
        return (f"{key}={shown}: a list makes a sweep, which launch/submit.py (wsss-dist submit) runs; "
                f"here {key} takes one value")
    if typ is not None and getattr(typ, "__origin__", None) is Literal:
        return f"{key}={shown}: allowed values are {', '.join(map(str, typ.__args__))}"
    if typ is int:
        return f"{key}={shown}: expected an integer"
    if typ is float:
        return f"{key}={shown}: expected a finite number"
    if typ is bool:
        return f"{key}={shown}: expected a boolean (true/false)"
    if "length" in msg and "does not match" in msg:
        return f"{key}={shown}: expected {msg.split('length')[-1].split()[-1]} values, like {key}=[a,b]"
    return f"{key}={shown}: {msg}"


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _did_you_mean(key: str) -> str:
    keys = _all_keys()
    last = key.split(".")[-1]
    close = [k for k in keys if k.split(".")[-1] == last and k != key]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if close:
        return f"; did you mean {', '.join(close[:3])}?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    under = [k[len(parent) + 1:] if parent else k for k in keys if (k.startswith(parent + ".") if parent else "." not in k)]
    return f"; keys under {parent or 'the top level'}: {', '.join(under)}"


# ------------------------------------------------------------------------------------------ sweeps
@dataclass(frozen=True)
class Point:
    """One point of a sweep: its name (its values), its ``key=value`` words (with ``run=``) and the swept values."""

    name: str
    words: tuple[str, ...]
    values: tuple[tuple[str, str], ...]


def sweep_axes(words: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The swept keys of ``words`` in order: a key that takes one value given a list ``[a,b,...]``."""
    axes = []
    for key, value in parse_words(words):
        v = value.strip()
        if key in ("stage", "config") or not (v.startswith("[") and v.endswith("]")):
            continue
        targets = ALIASES.get(key, (key,))
        typ = _field_types().get(targets[0])
        if typ is None or getattr(typ, "__origin__", None) is tuple:
            continue  # unknown (make_config names it) or a list-valued key such as cam.scales
        items = [x.strip() for x in v[1:-1].split(",") if x.strip()]
        if not items:
            raise ConfigError(f"{key}={value}: an empty list sweeps nothing")
        axes.append((key, items))
    return axes


def _short(key: str, value: str) -> str:
    """How a swept value appears in a point's name: ``s0`` for seeds, ``fmix``, ``train_aug``, ``lr0.01``."""
    last = key.split(".")[-1]
    if last == "seed":
        return f"s{value}"
    if key in ("method", "cls.split", "data.name", "data", "model.backbone") or not re.fullmatch(r"[-+.\deE]+", value):
        return value
    return f"{last}{value}"


def sweep_points(words: list[str]) -> tuple[str, list[Point]]:
    """The sweep of ``words``: (sweep directory, its points); no swept key → ("", []).

    Every swept key's list is expanded (``sweep.mode=product``: all combinations, ``zip``: element by element);
    each point gets ``run=<sweep dir>/<values joined by ->`` (e.g. ``runs/grid/fmix-train_aug-s2``).
    """
    import itertools

    axes = sweep_axes(words)
    if not axes:
        return "", []
    opts = dict(parse_words([w for w in words if w.startswith("sweep.")]))
    mode = opts.get("sweep.mode", SweepCfg.mode)
    if mode not in ("product", "zip"):
        raise ConfigError(f"sweep.mode={mode}: allowed values are product, zip")
    if mode == "zip":
        sizes = {len(v) for _, v in axes}
        if len(sizes) != 1:
            raise ConfigError("sweep.mode=zip needs lists of equal length: " + ", ".join(f"{k} has {len(v)}" for k, v in axes))
        combos = list(zip(*(v for _, v in axes)))
    else:
        combos = list(itertools.product(*(v for _, v in axes)))
    name = opts.get("sweep.name") or "-".join(k.split(".")[-1] for k, _ in axes)
    base = dict(parse_words(words)).get("run")
    check_value("sweep.name", name)
    root = str(Path(base) if base else Path("runs") / name)
    swept = {k for k, _ in axes}
    fixed = [w for w in words if w.split("=", 1)[0].strip().lstrip("-") not in swept | {"run"}]
    points = []
    for combo in combos:
        values = tuple((k, v) for (k, _), v in zip(axes, combo))
        pname = "-".join(_short(k, v) for k, v in values)
        if not _safe_path(f"{root}/{pname}"):  # checked before anything is written or submitted
            raise ConfigError(f"run={root}/{pname} (a point of the sweep): must be {PATH_RULE}; choose sweep.name "
                              "or run=, or sweep values that make shorter names")
        points.append(Point(pname, tuple(fixed + [f"{k}={v}" for k, v in values] + [f"run={root}/{pname}"]), values))
    if len({p.name for p in points}) != len(points):
        raise ConfigError("two points of the sweep get the same name; sweep distinct values")
    return root, points


# ------------------------------------------------------------------------------------------ the list of keys
@functools.cache
def _schema() -> dict[str, tuple[Any, Any, str]]:
    """Dotted key → (type, default, one-line doc) of every leaf field, from the dataclasses and their comments."""
    import typing

    out: dict[str, tuple[Any, Any, str]] = {}

    def walk(obj: Any, prefix: str) -> None:
        hints, docs = typing.get_type_hints(type(obj)), _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                out[prefix + f.name] = (hints[f.name], value, docs.get(f.name, ""))

    walk(Config(), "")
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Field name → its trailing ``# comment`` in the class source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s+(\w+): [^#]*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _all_keys() -> list[str]:
    return list(_schema())


def _is_group(key: str) -> bool:
    return any(k.startswith(key + ".") for k in _schema())


def _field_types() -> dict[str, Any]:
    return {k: t for k, (t, _, _) in _schema().items()}


def type_name(typ: Any) -> str:
    """A short readable name of a field type (``int``, ``str | None``, ``one of sgd, adamw``, ``list of float``)."""
    origin, args = getattr(typ, "__origin__", None), getattr(typ, "__args__", ())
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if args and type(None) in args:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + " | null"
    return getattr(typ, "__name__", str(typ))


def keys(prefix: str = "", cfg: Config | None = None) -> list[tuple[str, str, Any, str]]:
    """Every config key under ``prefix``: (key, type, value in ``cfg`` (default: the toy defaults), doc)."""
    cfg = cfg or make_config([])
    out = []
    for key, (typ, _, doc) in _schema().items():
        if key.startswith(prefix):
            out.append((key, type_name(typ), get(cfg, key), doc))
    return out


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key."""
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


# ------------------------------------------------------------------------------------------ validation
def _ranges() -> list[tuple[str, Callable[[Any], bool], str]]:
    """(key, check, what is allowed) for every value whose type alone does not make it valid."""
    at_least = lambda n: (lambda v: v >= n, f"≥ {n}")  # noqa: E731
    positive = (lambda v: v > 0, "> 0")
    unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
    out: list[tuple[str, Callable[[Any], bool], str]] = []

    def add(key: str, rule: tuple[Callable[[Any], bool], str]) -> None:
        out.append((key, rule[0], rule[1]))

    for k in ("cls", "aff", "seg", "teacher"):
        for name, rule in (("steps", at_least(1)), ("batch_size", at_least(1)), ("crop", at_least(8)),
                           ("grad_accum", at_least(1)), ("ckpt_every", at_least(0)), ("log_every", at_least(0))):
            add(f"{k}.train.{name}", rule)
        out.append((f"{k}.train.resize_long", lambda v: v == (0, 0) or 0 < v[0] <= v[1], "[lo,hi] with 0 < lo ≤ hi, or [0,0] (off)"))
        add(f"{k}.optim.lr", positive)
        for name in ("weight_decay", "poly_power", "warmup_steps", "grad_clip"):
            add(f"{k}.optim.{name}", at_least(0))
        out.append((f"{k}.optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"))
    for key in ("data.shard_size", "data.toy.n_train", "data.toy.n_val", "cam.out_stride", "cam.batch_images",
                "aff.radius", "pseudo.radius", "teacher.img_size", "report.num_images", "slurm.nodes",
                "slurm.cpus_per_task", "slurm.mem_gb", "slurm.time_min"):
        add(key, at_least(1))
    add("model.output_stride", (lambda v: v in OUTPUT_STRIDES, "one of " + ", ".join(map(str, OUTPUT_STRIDES))))
    add("log_level", (lambda v: v in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)))
    for key in ("cls.split", "cam.split", "cam.eval_split"):
        add(key, (lambda v: v in SPLITS, "one of " + ", ".join(SPLITS)))
    for key in ("data.toy.seed", *(f"{k}.train.seed" for k in ("cls", "aff", "seg", "teacher"))):
        add(key, at_least(0))
    for key in ("slurm.gpus_per_node", "slurm.signal_delay_s", "cls.ent_weight", "cls.con_weight", "cls.sub_weight"):
        add(key, at_least(0))
    for key in ("cls.mixup_alpha", "cls.fmix_alpha", "cls.fmix_decay", "cls.manifold_alpha"):
        add(key, positive)
    add("cls.round", at_least(-1))
    add("cam.sweep", (lambda v: len(v) > 0, "a non-empty list"))
    add("data.toy.size", at_least(24))
    add("cls.sc_rounds", at_least(1))
    for key in ("data.num_workers", "data.shuffle_buffer", "data.toy.n_sbd", "pseudo.logt", "slurm.array_parallelism",
                "data.max_pixels"):
        add(key, at_least(0))
    for key in ("data.max_skip_fraction", "cam.bg_threshold", "aff.conf_fg", "aff.conf_bg"):
        add(key, unit)
    for key in ("cam.scales", "seg.eval_scales"):
        out.append((key, lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0"))
    out.append(("cam.sweep", lambda v: all(0 <= x <= 1 for x in v), "numbers in [0, 1]"))
    out.append(("seg.scale_range", lambda v: 0 < v[0] <= v[1], "[lo,hi] with 0 < lo ≤ hi"))
    for key in ("pseudo.alpha", "pseudo.beta", "aff.alpha_low", "aff.alpha_high", "cls.kmeans_k"):
        add(key, positive)
    out.append(("cls.finch_partition", lambda v: v in ("last", "first") or re.fullmatch(r"-?\d+", v) is not None,
                "last, first or an integer column"))
    # names that reach the file system and SLURM's batch script: no newline, no shell syntax, bounded length
    add("run", (lambda v: v is None or _safe_path(v), PATH_RULE))
    add("sweep.name", (lambda v: v is None or _safe_path(v), PATH_RULE))
    for key in ("slurm.partition", "slurm.account", "slurm.qos"):
        add(key, (lambda v: v is None or re.fullmatch(rf"[{SLURM_NAME}]{{1,100}}", v) is not None,
                  f"1-100 of the characters {SLURM_NAME} (a SLURM name or a comma-separated list of them)"))
    add("slurm.constraint", (lambda v: v is None or re.fullmatch(rf"[{SLURM_FEATURES}]{{1,200}}", v) is not None,
                             "1-200 of the characters A-Za-z0-9_.,:&|!*()[]- (a SLURM feature expression)"))
    add("slurm.extra", (lambda v: all(re.fullmatch(SLURM_FLAG, x) is not None for x in v),
                        "sbatch flags key=value: key of letters, digits, - and _; value of the characters "
                        "A-Za-z0-9_.,:@%+=/[]()*&|!~- (no space, quote, $, ;, newline), at most 200 in all"))
    return out


OUTPUT_STRIDES = (8, 16, 32)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SPLITS = ("train", "val", "train_aug")  # the splits stage=shards writes
PATH_CHARS = "A-Za-z0-9_.+@=,:~/-"  # run and sweep names: no space, quote, %, $, ;, newline (they reach sbatch scripts)
PATH_RULE = (f"a path of the characters {PATH_CHARS}, not starting with -, at most 200 characters and 100 per "
             "directory name")
SLURM_NAME = "A-Za-z0-9_.,-"
SLURM_FEATURES = "A-Za-z0-9_.,:&|!*()\\[\\]-"
SLURM_FLAG = r"(?=.{1,200}$)-{0,2}[A-Za-z][A-Za-z0-9_-]*(=[A-Za-z0-9_.,:@%+=/\[\]()*&|!~-]*)?"


def _safe_path(value: str) -> bool:
    """A run or sweep path that is safe in a file name and an sbatch script (:data:`PATH_RULE`)."""
    return (re.fullmatch(f"[{PATH_CHARS}]{{1,200}}", value) is not None and not value.startswith("-")
            and all(len(part) <= 100 for part in value.split("/")))


def _control_free(value: Any) -> bool:
    """No control characters (newline, NUL, escape ...) in a string value or a list of them."""
    items = value if isinstance(value, tuple) else (value,)
    return not any(isinstance(x, str) and re.search(r"[\x00-\x1f\x7f]", x) for x in items)


@functools.cache
def _rules() -> dict[str, list[tuple[Callable[[Any], bool], str]]]:
    out: dict[str, list[tuple[Callable[[Any], bool], str]]] = {}
    for key, ok, allowed in _ranges():
        out.setdefault(key, []).append((ok, allowed))
    return out


def check_value(key: str, value: Any) -> None:
    """ConfigError naming ``key`` unless ``value`` is finite, free of control characters and within the key's
    range or choices (:func:`_ranges`); run for every key when a config is built and for ``slurm.<stage>.<key>``."""
    shown = f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else value
    if not _finite(value):
        raise ConfigError(f"{key}={shown}: expected a finite number")
    if not _control_free(value):
        raise ConfigError(f"{key}={shown!r}: must not hold a newline or other control character")
    for ok, allowed in _rules().get(key, ()):
        if not ok(value):
            raise ConfigError(f"{key}={shown}: must be {allowed}")


def _finite(value: Any) -> bool:
    items = value if isinstance(value, tuple) else (value,)
    return all(math.isfinite(x) for x in items if isinstance(x, float))


def validate(cfg: Config) -> None:
    """Value ranges and cross-field checks that a key's type cannot express (ConfigError naming the key); pure: the
    checks that need timm or the weights files (backbone names, ``*.weights``) are
    :func:`wsss_dist.models.preflight.preflight`, run before any job."""
    stages = cfg.stages()
    extra = [s for s in cfg.redo_stages() if s not in stages]
    if extra:
        raise ConfigError(f"redo={cfg.redo}: names stage {extra[0]!r}, which this call does not run (stage={cfg.stage})")
    if cfg.data.name == "voc" and not cfg.data.voc_root and "shards" in stages:
        raise ConfigError("data=voc needs data.voc_root=PATH/VOCdevkit/VOC2012 (the folder that holds JPEGImages)")
    for key in _schema():  # finite, no control characters, within its range or choices
        check_value(key, get(cfg, key))
    if cfg.model.backbone == "resnet38d" and cfg.model.output_stride != 8:
        raise ConfigError(f"model.output_stride={cfg.model.output_stride}: resnet38d has a fixed output stride of 8")
    for key in _schema():
        value = get(cfg, key)
        if not _finite(value):
            raise ConfigError(f"{key}={value}: expected a finite number")
    for key, ok, allowed in _ranges():
        value = get(cfg, key)
        if not ok(value):
            shown = f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else value
            raise ConfigError(f"{key}={shown}: must be {allowed}")
    for name in cfg.log_with:
        if name not in ("wandb", "mlflow"):
            raise ConfigError(f"log_with={name}: allowed trackers are wandb, mlflow (TensorBoard is always written)")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log_with={name} needs its package: pip install {'mlflow-skinny' if name == 'mlflow' else name}")
    if cfg.aff.crf and importlib.util.find_spec("pydensecrf") is None:
        raise ConfigError("aff.crf=true needs the optional CRF package: pip install 'wsss-dist[crf]' (pydensecrf2)")
    check_batches(cfg, int(os.environ.get("WORLD_SIZE", "1")))


def check_batches(cfg: Config, world: int, stages: Iterable[str] | None = None) -> None:
    """Every trainer's global ``batch_size`` divides over ``world`` processes × its ``grad_accum`` (ConfigError)."""
    for stage in [s for s in (stages or cfg.stages()) if s in TRAINERS]:
        t = get(cfg, f"{stage}.train")
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError(f"{stage}.train.batch_size={t.batch_size} is the global batch and must divide over "
                              f"{world} process(es) × {stage}.train.grad_accum={t.grad_accum}; choose a multiple of "
                              f"{world * t.grad_accum}")


__all__ = ["Config", "METHOD_NAMES", "PRESETS", "STAGES", "ConfigError", "keys", "load_yaml", "make_config",
           "parse_stages", "parse_words", "to_dict", "to_yaml", "validate"]
