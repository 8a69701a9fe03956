"""The registries: one :class:`StageSpec` per pipeline stage and one :class:`Method` per CAM method.

A stage is declared once, here: its name, what it reads, whether it trains, whether it is data-parallel, whether a
sweep shares it, whether it uses a GPU and at what rate, its precision key, the config keys that shape it and its
report columns. The config, the runner, the launcher, the report and the fingerprints derive their tables from
:data:`STAGE_SPECS`; adding a stage is one entry here plus one ``stages/<name>.py``.

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
           # no classifier to start AffinityNet / DeepLab from: their own init (model.weights, seg.weights)
           preset=(("aff.init", "imagenet"), ("seg.init", "imagenet"))),
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the config's type of ``method``: the registry's names


BACKBONES: tuple[str, ...] = ("resnet38d",)
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
    method_settings: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # more such keys for a config's method
    not_settings: tuple[str, ...] = ()  # keys inside ``settings`` sections that belong to another stage
    report: tuple[tuple[str, str], ...] = ()  # (DONE metric, column title) in the report's tables


def _uses_teacher(cfg: Any) -> bool:
    return METHODS[cfg.method].subcategories == "teacher"


def _cam_reads(cfg: Any) -> tuple[str, ...]:
    return ("cls",) if METHODS[cfg.method].trains_classifier else ()


STAGE_SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("shards", "the dataset packed into WebDataset tar shards + manifest", data_parallel=False,
              uses_gpu=False, shared_by_sweep=True, repairs_when_asked=True,
              settings=("data.name", "data.voc_root", "data.sbd_root", "data.lists_dir", "data.shard_size",
                        "data.toy.seed", "data.toy.n_train", "data.toy.n_val", "data.toy.n_sbd", "data.toy.size")),
    StageSpec("teacher", "a ViT fine-tuned multi-label; its embeddings for FINCH", trains=True, optional=True,
              images_per_gpu_s=400.0, precision_key="teacher.train.mixed_precision",
              settings=("teacher", "cls.split", "data.shuffle_buffer")),
    StageSpec("cls", "the classifier with a CAM head (the method)",
              reads=lambda cfg: ("teacher",) if _uses_teacher(cfg) else (), trains=True, images_per_gpu_s=40.0,
              precision_key="cls.train.mixed_precision", settings=("method", "model", "cls", "data.shuffle_buffer")),
    StageSpec("cam", "multi-scale + flip CAMs (or CLIP-ES's) and the CAM mIoU", reads=_cam_reads, images_per_gpu_s=9.0,
              repairs_when_asked=True, precision_key="cam.mixed_precision", settings=("cam",),
              method_settings=lambda cfg: () if METHODS[cfg.method].trains_classifier else ("method", "clip"),
              report=(("miou", "CAM (train)"), ("best_miou", "CAM best thr (train)"))),
    StageSpec("aff", "affinity labels from the CAMs and AffinityNet",
              reads=lambda cfg: ("cam", "cls") if cfg.aff.init == "cls" else ("cam",), trains=True,
              images_per_gpu_s=40.0, repairs_when_asked=True, precision_key="aff.train.mixed_precision",
              settings=("aff", "model", "data.shuffle_buffer")),
    StageSpec("pseudo", "the random walk: pseudo labels and their mIoU", reads=lambda cfg: ("cam", "aff"),
              images_per_gpu_s=10.0, repairs_when_asked=True, settings=("pseudo",),
              report=(("miou", "after RW (train)"),)),
    StageSpec("seg", "DeepLab-v2 trained on the pseudo labels",
              reads=lambda cfg: ("pseudo", "cls") if cfg.seg.init == "cls" else ("pseudo",), trains=True,
              images_per_gpu_s=200.0, precision_key="seg.train.mixed_precision", settings=("seg", "data.shuffle_buffer"),
              not_settings=("seg.eval_scales", "seg.eval_flip")),
    StageSpec("eval", "val predictions, mIoU and per-class IoU", reads=lambda cfg: ("seg",), images_per_gpu_s=200.0,
              repairs_when_asked=True, settings=("seg.eval_scales", "seg.eval_flip"),
              report=(("miou", "DeepLab (val)"),)),
    StageSpec("report", "tables and figures over runs", data_parallel=False, uses_gpu=False, always_runs=True),
)}
STAGE_NAMES: tuple[str, ...] = tuple(STAGE_SPECS)
TRAINERS: tuple[str, ...] = tuple(s.name for s in STAGE_SPECS.values() if s.trains)


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (KeyError naming the allowed methods)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(METHOD_NAMES)}") from None
