"""The config's schema: one dataclass per section (OmegaConf structured configs), ``Config`` with its derived
paths (run, shards folder named by the data settings' hash, toy sources) and stage lists."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import ConfigError
from ..registry import DATASET_NAMES, METHODS, STAGE_NAMES, STAGE_SPECS, MethodName

DatasetName = Literal[DATASET_NAMES]  # type: ignore[valid-type]  # the registry's dataset names


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

    name: DatasetName = "toy"  # dataset (wsss_dist/registry.py DATASETS): toy (built in) | voc (VOC2012 + SBD) | coco (COCO-2014) | folder (your own images + labels file)
    voc_root: Optional[str] = None  # .../VOCdevkit/VOC2012 (holds JPEGImages)
    sbd_root: Optional[str] = None  # .../benchmark_RELEASE (holds dataset/)
    lists_dir: Optional[str] = None  # optional psa/irn list folder (train_aug.txt, cls_labels.npy)
    root: Optional[str] = None  # data=folder: the folder of images (ids = file names without extension; .jpg kept as is, other formats re-encoded as JPEG quality 95)
    labels: Optional[str] = None  # data=folder: labels file, CSV (image,class[,class...] per line) or JSON ({image: [classes]} or {"classes": [...], "images": {...}})
    classes: Optional[str] = None  # data=folder: the class names in label order, comma-separated or a text file with one per line; unset: the JSON's "classes", else the labels file's names sorted
    masks: Optional[str] = None  # data=folder: optional folder of ground-truth masks <id>.png (palette or greyscale index image: 0 bg, i = the i-th class, 255 ignore)
    split_lists: Optional[str] = None  # data=folder: optional folder with train.txt / val.txt (an image id or file name per line); unset: train = every labelled image, val = those with a mask (else train)
    coco_root: Optional[str] = None  # data=coco: folder holding train2014/, val2014/ and annotations/instances_{train,val}2014.json
    coco_masks: Optional[str] = None  # data=coco: optional folder of already-rendered semantic label PNGs (<split>2014/<image name>.png or <image name>.png; values 0..80, 255) used instead of rendering from the instances JSON
    coco_crowd: Literal["ignore", "background", "class"] = "ignore"  # data=coco: crowd regions in rendered masks: ignore (255, the default: notes §16.3), background (0, ReCAM's annToMask) or class (painted like other objects, coco2voc)
    shards_dir: Optional[str] = None  # where shards are written and read; default shards/<name>-<hash of the data settings> (runs share a folder only when their data settings are equal)
    shard_size: int = 200  # samples per shard
    pack_workers: int = 1  # processes packing shards at once in stage=shards (spawned; each writes whole shards, the manifest is written once after all); the tars are byte-identical whatever the number
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
class ClipCfg:
    """CLIP-ES (method=clip_es): the frozen CLIP and the CAM stage's formulas (reference-implementations.md §15)."""

    arch: str = "ViT-B-16-quickgelu"  # open_clip model name (OpenAI's ViT-B/16 = ViT-B-16-quickgelu); tiny: a small test CLIP of the same family
    weights: str = ""  # openai (an open_clip tag, found in the local HF / open_clip caches only) | FILE | FOLDER (an HF cache repo folder or one holding open_clip_model.safetensors) | random; unset: an error (docs/usage.md#clip-weights)
    template: str = "a clean origami {}."  # prompt template; {} = the class string (CLIP-ES)
    background: tuple[str, ...] = ()  # background words; [] = CLIP-ES's list for the dataset (VOC 25 words, COCO 23)
    scales: tuple[float, ...] = (1.0,)  # input scales, CAMs averaged (CLIP-ES: one scale, no flip)
    refine: bool = True  # class-aware attention affinity (CAA) refinement; false: the softmax-Grad-CAM alone
    box_threshold: float = 0.4  # box mask: regions above this × the CAM's max (CLIP-ES: VOC 0.4, COCO 0.7)
    attn_layers: int = 8  # CAA: attention of the last this many blocks averaged (CLIP-ES: 8)
    sinkhorn_rounds: int = 3  # CAA: (÷ column sums, ÷ row sums) rounds (CLIP-ES: 3)
    refine_steps: int = 1  # CAA: squarings of the symmetrised affinity (CLIP-ES: 1, R = S·S)
    legacy_box_edge: bool = False  # reproduce CLIP-ES's boxes clipped to w−1 / h−1 (a box at the right/bottom edge loses that column/row)


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
    crf: bool = False  # dense CRF on the pseudo labels (deeplab-pytorch's kernels, the image; needs the [crf] extra, pydensecrf2): the CRF labels are written, mIoU without and with it in DONE
    crf_gt_prob: float = 0.7  # the CRF's unary from the labels: this probability on a pixel's label, the rest spread over the image's other labels (irn's label CRF, gt_prob 0.7)
    crf_image: Literal["rgb", "deeplab_pytorch_wrap"] = "rgb"  # the CRF's image: RGB, or deeplab-pytorch/CLIP-ES's mean-subtracted BGR cast to uint8 (their wrap-around bug)


@dataclass
class IrnCfg:
    """IRN (refine=irn): class boundaries from IR labels, affinities from boundaries, random walk (irn's recipe)."""

    backbone: str = "resnet50"  # the frozen boundary backbone: a timm ResNet (irn: ImageNet ResNet-50 at output stride 16)
    weights: Optional[str] = ""  # its ImageNet init: FILE | timm | timm:NAME[@FILE] | hf-hub:ID | none; unset: required with data=voc and irn.init=imagenet
    init: Literal["imagenet", "cls"] = "imagenet"  # backbone from irn.weights (irn) or the trained classifier (same backbone name)
    radius: int = 10  # training pairs within this radius (stride-4 cells)
    walk_radius: int = 5  # random-walk pairs within this radius (stride-4 cells)
    beta: float = 10.0  # affinity power of the walk
    logt: int = 8  # the walk takes 2^logt steps
    bg_threshold: float = 0.25  # background plane after the walk (walked scores divided by their global max)
    flip: bool = True  # boundary map averaged with the mirrored image's (irn)
    scale_range: tuple[float, float] = (0.5, 1.5)  # random scale of training images (irn)
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=990, batch_size=32, crop=512, resize_long=(0, 0)))
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(lr=0.1, weight_decay=1e-4))


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
class EvalCfg:
    """Post-processing of the final predictions (stage eval)."""

    crf: bool = False  # also score the predictions after a dense CRF (deeplab-pytorch's; needs the [crf] extra, pydensecrf2)
    crf_iters: int = 10  # mean-field iterations (deeplab-pytorch: 10)
    crf_pos_w: float = 3.0  # Gaussian (smoothness) kernel weight (deeplab-pytorch POS_W)
    crf_pos_xy_std: float = 1.0  # Gaussian kernel's spatial std in px (POS_XY_STD)
    crf_bi_w: float = 4.0  # bilateral (appearance) kernel weight (BI_W)
    crf_bi_xy_std: float = 67.0  # bilateral kernel's spatial std in px (BI_XY_STD)
    crf_bi_rgb_std: float = 3.0  # bilateral kernel's colour std (BI_RGB_STD)
    crf_image: Literal["rgb", "deeplab_pytorch_wrap"] = "rgb"  # the CRF's image: the RGB image, or deeplab-pytorch's mean-subtracted BGR cast to uint8 (its wrap-around bug, to reproduce its numbers)
    crf_workers: int = 0  # CRF processes per rank (0: the CPUs this process may use)


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
    refine: Literal["psa", "irn"] = "psa"  # how stages aff and pseudo refine the CAMs: AffinityNet (psa) or IRN's class boundaries (irn)
    redo: str = ""  # stages to run again from scratch although done (one or a list [a,b]); later stages whose inputs change then rerun too
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    cls: ClsCfg = field(default_factory=ClsCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    cam: CamCfg = field(default_factory=CamCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    aff: AffCfg = field(default_factory=AffCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    irn: IrnCfg = field(default_factory=IrnCfg)
    seg: SegCfg = field(default_factory=SegCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
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


# The keys that shape the shards themselves (their hash names the default shards folder).
DATA_KEYS = STAGE_SPECS["shards"].settings


# Keys that belong to one dataset only (prefix, dataset): in the data settings only when that dataset is used.
DATASET_KEYS = (("data.toy.", "toy"), ("data.root", "folder"), ("data.labels", "folder"), ("data.classes", "folder"),
                ("data.masks", "folder"), ("data.split_lists", "folder"), ("data.coco_", "coco"))


def data_settings(cfg: Config) -> dict[str, Any]:
    """The data settings that shape the shards (``data.toy.*`` only for the toy data; roots made absolute)."""
    out = {}
    for key in DATA_KEYS:
        owner = next((name for prefix, name in DATASET_KEYS if key.startswith(prefix)), None)
        if owner is not None and owner != cfg.data.name:
            continue  # another dataset's key: not part of this data (the toy and VOC hashes stay as they were)
        value = functools.reduce(getattr, key.split("."), cfg)
        if key.endswith(("_root", "_dir", "_lists", "_masks", "data.root", "data.labels", "data.masks")) and value:
            value = str(Path(value).expanduser().resolve())
        out[key] = value
    return out


def data_hash(cfg: Config) -> str:
    """12 hex digits naming the data settings (the default shards folder is ``shards/<name>-<hash>``)."""
    import hashlib

    return hashlib.sha256(json.dumps(data_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]


def parse_stages(stage: str, method: str, key: str = "stage") -> list[str]:
    """Expand ``all`` / ``cam`` / ``[cam,aff]`` into an ordered list of stage names (``all``: the method's extra stages too)."""
    s = stage.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    names = [x.strip() for x in s.split(",") if x.strip()]
    extra = METHODS[method].extra_stages if method in METHODS else ()
    optional = {st.name for st in STAGE_SPECS.values() if st.optional}
    if names == ["all"]:
        names = [x for x in STAGES if x not in optional or x in extra]
    bad = [x for x in names if x not in STAGES]
    if bad or not names:
        raise ConfigError(f"{key}={stage!r}: unknown stage {bad[0] if bad else ''!r}; allowed: all, {', '.join(STAGES)} or a list [a,b]")
    # a stage the method does not have (clip_es: cls; every method but teach: teacher) is left out of a list, so that a
    # sweep over methods can name it once; asking for nothing else is an error
    skips = set(METHODS[method].skips if method in METHODS else ()) | (optional - set(extra))
    kept = [x for x in STAGES if x in names and x not in skips]
    if not kept:
        raise ConfigError(f"{key}={stage!r}: method={method} has no stage {', '.join(names)}"
                          f"{' (it trains no classifier)' if 'cls' in names else ''}")
    return kept
