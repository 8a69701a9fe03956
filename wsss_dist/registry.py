"""The registries: one :class:`StageSpec` per pipeline stage and one :class:`Method` per CAM method.

A stage is declared once, here: its name, what it reads, whether it trains, whether it is data-parallel, whether a
sweep shares it, whether it uses a GPU and at what rate, its precision key, the config keys that shape it, its
report columns, the network it builds and the weights it starts from. The config, the runner, the launcher, the
report, the fingerprints and the pre-flight check derive their tables from :data:`STAGE_SPECS`; adding a stage is
one entry here plus one ``stages/<name>.py``.

A dataset entry (:data:`DATASETS`) says what a dataset is: its class names and their number, its label PNG palette,
its ignore value, its split names, where its image-level labels come from. Every stage, model head, metric, check
and report table takes the number of classes and the names from it (``classes=()``: read from the data, the folder
dataset's labels file, recorded in the shards' manifest).

A method entry says how the method mixes its inputs, where its sub-categories come from, whether it trains in
rounds and which extra stages it needs. Adding a method is one entry in :data:`METHODS` plus its mixing function
or loss in :mod:`wsss_dist.methods`. This module imports nothing of the package (the config, at the bottom
layer, reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

Mix = Optional[Literal["mixup", "fmix", "manifold"]]
SubSource = Optional[Literal["rounds", "teacher"]]
CamSource = Literal["classifier", "clip_es"]


@dataclass(frozen=True)
class Method:
    """One CAM method: its mixing, its sub-category source, its extra stages."""

    name: str
    doc: str
    mix: Mix = None  # None: plain batches; mixup/fmix: input mixing; manifold: feature mixing inside the backbone
    subcategories: SubSource = None  # rounds: clustered features of the previous round (SC-CAM); teacher: ViT embeddings
    extra_stages: tuple[str, ...] = ()  # stages that only this method runs (before cls)
    cam_source: CamSource = "classifier"  # classifier: stage cam reads the method's trained classifier; clip_es: a frozen CLIP (no stage cls)
    preset: tuple[tuple[str, Any], ...] = ()  # config values the method sets over the dataset preset (the user's words win)

    @property
    def trains_classifier(self) -> bool:
        """Whether the method trains a classifier (stage cls); methods that do not skip it."""
        return self.cam_source == "classifier"

    @property
    def skips(self) -> tuple[str, ...]:
        """The stages this method never runs."""
        return () if self.trains_classifier else ("cls",)

    @property
    def rounds(self) -> bool:
        """Whether cls trains in rounds (``cls.sc_rounds``), one job per round."""
        return self.subcategories == "rounds"

    @property
    def mixes(self) -> bool:
        """Whether the loss is the mixed (λ-weighted) objective with entropy and concentration terms."""
        return self.mix is not None


def _table(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _table(
    Method("cam", "plain CAM: multi-label soft-margin loss"),
    Method("mixup", "Mixup-CAM: input mixup + entropy and concentration losses", mix="mixup"),
    Method("fmix", "FMix-CAM: an FMix mask mixes the inputs + entropy and concentration losses", mix="fmix"),
    Method("manifold", "manifold mixup: features mixed after a random backbone stage", mix="manifold"),
    Method("sc", "Sub-category Exploration: rounds of train → cluster pooled features → train", subcategories="rounds"),
    Method("teach", "Sub-category Teaching: FINCH on a fine-tuned ViT teacher's embeddings", subcategories="teacher",
           extra_stages=("teacher",)),
    Method("clip_es", "CLIP-ES: softmax-Grad-CAM of a frozen CLIP + class-aware attention affinity; no classifier",
           cam_source="clip_es",
           # no classifier to start AffinityNet / IRN / DeepLab from: their own init (model/irn/seg.weights)
           preset=(("aff.init", "imagenet"), ("irn.init", "imagenet"), ("seg.init", "imagenet"))),
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the config's type of ``method``: the registry's names


BACKBONES: tuple[str, ...] = ("resnet38d",)
# The image normalisation of ImageNet-pretrained weights, of psa/deeplab-pytorch files and of from-scratch runs
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Classifier heads of ImageNet/psa/deeplab-pytorch checkpoints that a backbone never has: optional when loading
HEAD_PREFIXES: tuple[str, ...] = ("fc.", "fc8.", "linear1000.", "head.", "classifier.", "aspp.")  # our own backbones (wsss_dist/models); any other name is a timm model


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline, declared once (see the module docstring for who reads which field)."""

    name: str
    doc: str
    reads: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # the stages whose outputs it reads, for a config
    trains: bool = False  # a trainer: ``<name>.train`` / ``<name>.optim``, model.json + model.safetensors
    data_parallel: bool = True  # False: under several processes rank 0 runs it while the others wait
    uses_gpu: bool = True  # False: one CPU task whatever slurm.gpus_per_node says
    images_per_gpu_s: Optional[float] = None  # rate the submit-time time check assumes (images/s per GPU)
    shared_by_sweep: bool = False  # a sweep runs it once for all points with the same data settings
    always_runs: bool = False  # rebuilt on every call (its DONE does not make it skip)
    repairs_when_asked: bool = False  # done, but ``stage=<it>`` alone runs it: it verifies and redoes damaged outputs
    optional: bool = False  # in ``stage=all`` only for the methods whose ``extra_stages`` name it
    precision_key: Optional[str] = None  # the config key of its autocast precision
    settings: tuple[str, ...] = ()  # config keys (or sections) that shape it; upstream effects come through ``reads``
    settings_when: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # keys that shape it only in some configs (refine=irn, eval.crf=true); out of the fingerprint otherwise, so the default's fingerprints stay as they were
    not_settings: tuple[str, ...] = ()  # keys inside ``settings`` sections that belong to another stage
    report: tuple[tuple[str, str], ...] = ()  # (DONE metric, column title) in the report's tables
    network: Callable[[Any], Optional[str]] = lambda cfg: None  # the config key naming the network it builds (checked before any job, named in its first log line)
    pretrained: Callable[[Any], Optional[str]] = lambda cfg: None  # the key of the weights it starts ``network`` from (None: the trained classifier's backbone, or, for an inference stage, its run's trained model)


def _uses_teacher(cfg: Any) -> bool:
    return METHODS[cfg.method].subcategories == "teacher"


IRN_WALK_KEYS = ("irn.walk_radius", "irn.beta", "irn.logt", "irn.bg_threshold", "irn.flip")  # stage pseudo's


def _irn_aff(cfg: Any) -> tuple[str, ...]:
    """refine=irn: the refinement and IRN's network and training keys shape stage aff."""
    return ("refine", "irn.backbone", "irn.weights", "irn.init", "irn.radius", "irn.scale_range", "irn.train",
            "irn.optim") if cfg.refine == "irn" else ()


PSEUDO_CRF_KEYS = ("pseudo.crf", "pseudo.crf_gt_prob", "pseudo.crf_image")  # stage pseudo's only with pseudo.crf=true


def _irn_pseudo(cfg: Any) -> tuple[str, ...]:
    """refine=irn: the refinement and IRN's walk keys shape stage pseudo; pseudo.crf=true: the CRF's keys."""
    return (("refine", *IRN_WALK_KEYS) if cfg.refine == "irn" else ()) + (PSEUDO_CRF_KEYS if cfg.pseudo.crf else ())


def _aff_reads(cfg: Any) -> tuple[str, ...]:
    init = cfg.irn.init if cfg.refine == "irn" else cfg.aff.init
    return ("cam", "cls") if init == "cls" else ("cam",)


def _cam_reads(cfg: Any) -> tuple[str, ...]:
    return ("cls",) if METHODS[cfg.method].trains_classifier else ()


def _cam_network(cfg: Any) -> str:
    return "model.backbone" if METHODS[cfg.method].trains_classifier else "clip.arch"


def _refine_network(cfg: Any) -> str:
    """Stages aff and pseudo: IRN's boundary network with ``refine=irn``, AffinityNet on the classifier's backbone
    otherwise."""
    return "irn.backbone" if cfg.refine == "irn" else "model.backbone"


def _aff_pretrained(cfg: Any) -> Optional[str]:
    init, key = (cfg.irn.init, "irn.weights") if cfg.refine == "irn" else (cfg.aff.init, "model.weights")
    return key if init == "imagenet" else None


STAGE_SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("shards", "the dataset packed into WebDataset tar shards + manifest", data_parallel=False,
              uses_gpu=False, shared_by_sweep=True, repairs_when_asked=True,
              settings=("data.name", "data.voc_root", "data.sbd_root", "data.lists_dir", "data.shard_size",
                        "data.toy.seed", "data.toy.n_train", "data.toy.n_val", "data.toy.n_sbd", "data.toy.size",
                        "data.root", "data.labels", "data.classes", "data.masks", "data.split_lists",
                        "data.coco_root", "data.coco_masks", "data.coco_crowd")),
    StageSpec("teacher", "a ViT fine-tuned multi-label; its embeddings for FINCH", trains=True, optional=True,
              images_per_gpu_s=400.0, precision_key="teacher.train.mixed_precision",
              settings=("teacher", "cls.split", "data.shuffle_buffer"),
              network=lambda cfg: "teacher.arch", pretrained=lambda cfg: "teacher.weights"),
    StageSpec("cls", "the classifier with a CAM head (the method)",
              reads=lambda cfg: ("teacher",) if _uses_teacher(cfg) else (), trains=True, images_per_gpu_s=40.0,
              precision_key="cls.train.mixed_precision", settings=("method", "model", "cls", "data.shuffle_buffer"),
              network=lambda cfg: "model.backbone", pretrained=lambda cfg: "model.weights"),
    StageSpec("cam", "multi-scale + flip CAMs (or CLIP-ES's) and the CAM mIoU", reads=_cam_reads, images_per_gpu_s=9.0,
              repairs_when_asked=True, precision_key="cam.mixed_precision", settings=("cam",),
              settings_when=lambda cfg: () if METHODS[cfg.method].trains_classifier else ("method", "clip"),
              report=(("miou", "CAM (train)"), ("best_miou", "CAM best thr (train)")), network=_cam_network,
              pretrained=lambda cfg: None if METHODS[cfg.method].trains_classifier else "clip.weights"),
    StageSpec("aff", "affinity labels from the CAMs and AffinityNet",
              reads=_aff_reads, trains=True,
              images_per_gpu_s=40.0, repairs_when_asked=True, precision_key="aff.train.mixed_precision",
              settings=("aff", "model", "data.shuffle_buffer"), settings_when=_irn_aff, network=_refine_network,
              pretrained=_aff_pretrained),
    StageSpec("pseudo", "the random walk: pseudo labels and their mIoU", reads=lambda cfg: ("cam", "aff"),
              images_per_gpu_s=10.0, repairs_when_asked=True, settings=("pseudo",), settings_when=_irn_pseudo,
              not_settings=PSEUDO_CRF_KEYS, report=(("miou", "after RW (train)"), ("crf_miou", "after RW + CRF (train)")),
              network=_refine_network),
    StageSpec("seg", "DeepLab-v2 trained on the pseudo labels",
              reads=lambda cfg: ("pseudo", "cls") if cfg.seg.init == "cls" else ("pseudo",), trains=True,
              images_per_gpu_s=200.0, precision_key="seg.train.mixed_precision", settings=("seg", "data.shuffle_buffer"),
              not_settings=("seg.eval_scales", "seg.eval_flip"), network=lambda cfg: "seg.backbone",
              pretrained=lambda cfg: "seg.weights" if cfg.seg.init == "imagenet" else None),
    StageSpec("eval", "val predictions, mIoU and per-class IoU", reads=lambda cfg: ("seg",), images_per_gpu_s=200.0,
              repairs_when_asked=True, settings=("seg.eval_scales", "seg.eval_flip"),
              settings_when=lambda cfg: ("eval",) if cfg.eval.crf else (),
              report=(("miou", "DeepLab (val)"), ("crf_miou", "DeepLab + CRF (val)")), network=lambda cfg: "seg.backbone"),
    StageSpec("report", "tables and figures over runs", data_parallel=False, uses_gpu=False, always_runs=True),
)}
STAGE_NAMES: tuple[str, ...] = tuple(STAGE_SPECS)


def trainer_section(cfg: Any, stage: str) -> str:
    """The config section whose ``train`` / ``optim`` a training stage uses: its own name, but ``irn`` for stage aff
    with ``refine=irn``."""
    return "irn" if stage == "aff" and cfg.refine == "irn" else stage


TRAINERS: tuple[str, ...] = tuple(s.name for s in STAGE_SPECS.values() if s.trains)


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (KeyError naming the allowed methods)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(METHOD_NAMES)}") from None


VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# COCO-2014's 80 categories in the order of their ids (1..90 with gaps): contiguous label = rank + 1 (notes §16.2)
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Dataset:
    """One dataset: its classes, label PNGs, ignore value, splits and where its image-level labels come from."""

    name: str
    doc: str
    classes: tuple[str, ...] = ()  # foreground class names (label i+1); () = read from the data (recorded in the manifest)
    palette: Literal["voc"] = "voc"  # the colour map of label PNGs (voc: label bits spread over R, G, B)
    ignore: int = 255  # the label value never scored nor trained on
    splits: tuple[str, ...] = ("train", "val", "train_aug")  # the shards' splits
    seg_splits: tuple[str, ...] = ("train", "val")  # splits whose every image must have a ground-truth mask
    labels_from: str = ""  # where the image-level labels come from
    images: tuple[tuple[str, int], ...] = ()  # (split, images) of the full dataset: the launcher's time checks

    @property
    def num_classes(self) -> int:
        """The number of foreground classes (the classifier's outputs); 0 when read from the data."""
        return len(self.classes)

    @property
    def num_labels(self) -> int:
        """Background + the foreground classes (DeepLab's outputs, the confusion matrix's size)."""
        return len(self.classes) + 1


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("toy", "the built-in toy data (generated, VOC layout and classes)", classes=VOC_CLASSES,
            labels_from="the generator's VOC annotation XMLs"),
    Dataset("voc", "Pascal VOC 2012 (+ SBD for train_aug)", classes=VOC_CLASSES,
            labels_from="VOC annotation XMLs, else data.lists_dir/cls_labels.npy, else the mask",
            images=(("train", 1464), ("val", 1449), ("train_aug", 10582))),
    Dataset("coco", "MS COCO 2014 (train2014/val2014 + instances JSON, or rendered label PNGs)", classes=COCO_CLASSES,
            splits=("train", "val"), labels_from="the categories of each image's instance annotations (crowd included)",
            images=(("train", 82081), ("val", 40137))),
    Dataset("folder", "the user's own folder of images + a labels file (CSV or JSON)", splits=("train", "val", "train_aug"),
            seg_splits=(), labels_from="data.labels: one line per image naming its classes"),
)}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
VOC_LABELS: int = DATASETS["voc"].num_labels  # the default size of the public API's confusion matrices (VOC: 21)


def get_dataset(name: str) -> Dataset:
    """The registry entry of ``name`` (KeyError naming the allowed datasets)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}") from None
