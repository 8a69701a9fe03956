"""Typed configuration for every stage: dataclasses, presets per dataset, ``key=value`` overrides.

Users type dotted overrides (``cls.steps=200 data.voc_root=/data/VOC2012``). Unknown keys and bad values
raise :class:`ConfigError` naming the key and what is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args, get_origin

from .errors import ConfigError

STAGES = ("shards", "teacher", "cls", "cam", "aff", "pseudo", "seg", "eval", "report")
METHODS = ("cam", "mixup", "fmix", "manifold", "sc", "teach")


@dataclass
class ToyCfg:
    """The built-in synthetic dataset (VOC layout on disk, deterministic from ``seed``)."""

    root: str = "shards/toy-src"  # where the VOC/SBD-layout toy files are written
    seed: int = 0
    n_train: int = 300  # VOC seg train
    n_val: int = 200  # VOC seg val
    n_sbd: int = 900  # SBD-only images (train_aug = train ∪ sbd − val)
    size: int = 80  # mean image side in px (sizes vary ±25 %)


@dataclass
class DataCfg:
    """Where the data lives and how it is sharded and streamed."""

    name: Literal["toy", "voc"] = "toy"
    voc_root: Optional[str] = None  # .../VOCdevkit/VOC2012 (holds JPEGImages)
    sbd_root: Optional[str] = None  # .../benchmark_RELEASE (holds dataset/)
    lists_dir: Optional[str] = None  # optional psa/irn list folder (train_aug.txt, cls_labels.npy)
    shards_dir: Optional[str] = None  # default shards/<name>
    shard_size: int = 200  # samples per shard
    num_workers: int = 2  # DataLoader workers per process
    shuffle_buffer: int = 500
    max_skip_fraction: float = 0.01  # a stream that skips more broken samples than this fails the stage
    toy: ToyCfg = field(default_factory=ToyCfg)


@dataclass
class ModelCfg:
    """Backbone of the classifier (and AffinityNet)."""

    backbone: str = "resnet38d"  # resnet38d | any timm resnet (resnet18, resnet50, resnet101, ...)
    weights: Optional[str] = None  # local ImageNet weights (safetensors or state dict); never downloaded
    output_stride: int = 8
    frozen_bn: bool = True


@dataclass
class OptimCfg:
    """Optimiser and schedule shared by every trainer (poly decay, 1×/10× parameter groups)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # real momentum (psa's PolyOptimizer put weight decay in this slot: see legacy_momentum_bug)
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off; the seed clips at 1
    legacy_momentum_bug: bool = False  # reproduce psa/irn/seed: momentum = weight_decay


@dataclass
class TrainCfg:
    """Loop settings for a trainer."""

    steps: int = 2000
    batch_size: int = 16
    crop: int = 448
    resize_long: tuple[int, int] = (256, 512)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    channels_last: bool = True
    grad_accum: int = 1
    ckpt_every: int = 200
    log_every: int = 20
    seed: int = 0


@dataclass
class ClsCfg:
    """Classifier training (stage cls) and the six CAM methods' hyper-parameters (seed defaults)."""

    split: str = "train_aug"  # the shards it trains on
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    mixup_alpha: float = 0.2
    fmix_alpha: float = 1.0
    fmix_decay: float = 3.0
    manifold_alpha: float = 0.2
    ent_weight: float = 0.02
    con_weight: float = 2e-4
    entropy_on_labels: bool = False  # reproduce the seed's bug (entropy of the labels: zero gradient)
    sub_weight: float = 2.0  # L = L_cls + sub_weight * L_sub (SC-CAM used 5)
    sc_rounds: int = 3
    cluster: Literal["finch", "kmeans"] = "finch"
    finch_partition: str = "last"  # last | first | <int column>
    kmeans_k: int = 10
    round: int = -1  # method=sc: run rounds up to this one (-1 = all); the launcher submits one job per round


@dataclass
class TeacherCfg:
    """ViT teacher for method=teach (fine-tuned multi-label, then embeddings for FINCH)."""

    arch: str = "vit_base_patch16_224"
    weights: Optional[str] = None
    img_size: int = 224
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=1000, batch_size=16, crop=224))
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(lr=0.01, warmup_steps=100))


@dataclass
class CamCfg:
    """CAM inference and evaluation."""

    split: str = "train_aug"  # shards to compute CAMs for (pseudo labels need train_aug)
    eval_split: str = "train"  # ids whose ground truth scores CAM mIoU
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    bg_threshold: float = 0.15
    sweep: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
    out_stride: int = 4  # CAMs are stored at 1/out_stride of the image size (float16)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


@dataclass
class AffCfg:
    """AffinityNet: labels from CAMs, training."""

    label_mode: Literal["threshold", "psa"] = "threshold"
    conf_fg: float = 0.30
    conf_bg: float = 0.05
    alpha_low: float = 4.0
    alpha_high: float = 32.0
    crf: bool = False  # psa: dense CRF on the label score stacks (needs the [crf] extra, pydensecrf2)
    radius: int = 5
    stride: Literal[8, 4] = 8  # feature grid of the affinities and the random walk (4: small images)
    init: Literal["imagenet", "cls"] = "imagenet"  # backbone init: model.weights (psa) or the trained classifier
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=3000, batch_size=8))
    optim: OptimCfg = field(default_factory=OptimCfg)


@dataclass
class PseudoCfg:
    """Random walk on AffinityNet affinities → pseudo labels."""

    alpha: float = 16.0
    beta: float = 8.0
    logt: int = 8
    radius: int = 5


@dataclass
class SegCfg:
    """DeepLab-v2 on pseudo labels, and its evaluation."""

    backbone: str = "resnet101"
    weights: Optional[str] = None
    init: Literal["imagenet", "cls"] = "imagenet"  # seg.weights, or the trained classifier (same backbone name)
    frozen_bn: bool = True
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=20000, batch_size=10, crop=321, resize_long=(0, 0)))
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(lr=2.5e-4))
    scale_range: tuple[float, float] = (0.5, 1.5)
    eval_scales: tuple[float, ...] = (1.0, 0.75, 0.5)
    eval_flip: bool = False


@dataclass
class ReportCfg:
    """Report over one or several runs."""

    runs: tuple[str, ...] = ()  # run dirs to compare; default: this run
    num_images: int = 6


@dataclass
class SlurmCfg:
    """Resources of a SLURM job (per stage overrides: see launch/submit.py)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 8
    time_min: int = 60
    signal_delay_s: int = 120
    extra: tuple[str, ...] = ()  # extra sbatch flags, "key=value"


@dataclass
class Config:
    """The whole configuration of a run."""

    stage: str = "all"
    method: Literal["cam", "mixup", "fmix", "manifold", "sc", "teach"] = "cam"
    run: Optional[str] = None  # default runs/<method>-<data>
    cluster: Literal["local", "slurm", "debug"] = "local"
    log_level: str = "INFO"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    cls: ClsCfg = field(default_factory=ClsCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    cam: CamCfg = field(default_factory=CamCfg)
    aff: AffCfg = field(default_factory=AffCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    seg: SegCfg = field(default_factory=SegCfg)
    report: ReportCfg = field(default_factory=ReportCfg)
    slurm: SlurmCfg = field(default_factory=SlurmCfg)

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.run or f"runs/{self.method}-{self.data.name}")

    @property
    def shards_dir(self) -> Path:
        """Where shards are written and read."""
        return Path(self.data.shards_dir or f"shards/{self.data.name}")

    def stages(self) -> list[str]:
        """The stages this config asks for, in pipeline order."""
        return parse_stages(self.stage, self.method)


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
PRESETS: dict[str, dict[str, Any]] = {"toy": TOY_PRESET, "voc": {}}


def parse_stages(stage: str, method: str) -> list[str]:
    """Expand ``all`` / ``cam`` / ``[cam,aff]`` into an ordered list of stage names."""
    s = stage.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    names = [x.strip() for x in s.split(",") if x.strip()]
    if names == ["all"]:
        names = [x for x in STAGES if x != "teacher" or method == "teach"]
    bad = [x for x in names if x not in STAGES]
    if bad or not names:
        raise ConfigError(f"stage={stage!r}: unknown stage {bad[0] if bad else ''!r}; allowed: all, {', '.join(STAGES)} or a list [a,b]")
    return [x for x in STAGES if x in names]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(key: str, text: Any, typ: Any) -> Any:
    """Convert ``text`` (str from the command line, or a Python value) to ``typ``; ConfigError naming ``key``."""
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
            return None
        return _convert(key, text, inner[0])
    if origin is Literal:
        for allowed in args:
            if str(text) == str(allowed):
                return allowed
        raise ConfigError(f"{key}={text!r}: allowed values are {', '.join(map(str, args))}")
    if origin is tuple:
        items = text
        if isinstance(text, str):
            t = text.strip()
            if t.startswith(("[", "(")) and t.endswith(("]", ")")):
                t = t[1:-1]
            items = [x.strip() for x in t.split(",") if x.strip()]
        elem = args[0]
        if len(args) == 2 and args[1] is not Ellipsis:
            if len(items) != 2:
                raise ConfigError(f"{key}={text!r}: expected two values, like {key}=[a,b]")
            return tuple(_convert(key, x, a) for x, a in zip(items, args))
        return tuple(_convert(key, x, elem) for x in items)
    if typ is bool:
        if isinstance(text, bool):
            return text
        t = str(text).lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ in (int, float):
        try:
            if isinstance(text, bool):
                raise ValueError
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            if typ is int:
                if value != int(value):
                    raise ValueError
                value = int(value)
            return value
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}={text!r}: expected {'an integer' if typ is int else 'a finite number'}") from None
    if typ is str:
        return str(text)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _keys(v, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted ``key`` on ``cfg``, converting and validating ``value``."""
    parts = key.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if p not in names:
            here = ".".join(parts[:i])
            close = [k for k in _keys(cfg) if k.split(".")[-1] == p or k.startswith(key)]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else f"; keys under {here or 'the top level'}: {', '.join(names)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            typ = _field_types(type(obj))[p]
            current = getattr(obj, p)
            if dataclasses.is_dataclass(current):
                if key == "data" and isinstance(value, str):  # data=toy is a shorthand for data.name=toy
                    set_key(cfg, "data.name", value)
                    return
                raise ConfigError(f"{key} is a group; set one of its keys: {', '.join(_keys(current, key + '.')[:6])}, ...")
            setattr(obj, p, _convert(key, value, typ))
        else:
            obj = getattr(obj, p)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Split ``key=value`` words into a dict; a word without ``=`` is an error."""
    out: dict[str, str] = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"{a!r}: arguments are key=value (e.g. stage=cls method=fmix data=toy)")
        k, v = a.split("=", 1)
        out[k.strip().lstrip("-")] = v.strip()
    return out


def make_config(overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Build a validated Config: defaults, then the dataset preset, then the user's overrides."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    if "data" in overrides:
        overrides["data.name"] = overrides.pop("data")
    cfg = Config()
    name = overrides.get("data.name", cfg.data.name)
    set_key(cfg, "data.name", name)
    for k, v in PRESETS[cfg.data.name].items():
        set_key(cfg, k, v)
    for k, v in overrides.items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


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
    for key in ("data.shard_size", "data.toy.n_train", "data.toy.n_val", "data.toy.size", "model.output_stride",
                "cam.out_stride", "aff.radius", "pseudo.radius", "teacher.img_size", "report.num_images"):
        add(key, at_least(1))
    for key in ("data.num_workers", "data.shuffle_buffer", "data.toy.n_sbd", "pseudo.logt", "cls.sc_rounds"):
        add(key, at_least(0))
    for key in ("data.max_skip_fraction", "cam.bg_threshold", "aff.conf_fg", "aff.conf_bg"):
        add(key, unit)
    for key in ("cam.scales", "seg.eval_scales"):
        out.append((key, lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0"))
    out.append(("cam.sweep", lambda v: all(0 <= x <= 1 for x in v), "numbers in [0, 1]"))
    out.append(("seg.scale_range", lambda v: 0 < v[0] <= v[1], "[lo,hi] with 0 < lo ≤ hi"))
    for key in ("pseudo.alpha", "pseudo.beta", "aff.alpha_low", "aff.alpha_high", "cls.kmeans_k"):
        add(key, positive)
    return out


def validate(cfg: Config) -> None:
    """Value ranges and cross-field checks that a single key's type cannot express (ConfigError naming the key)."""
    cfg.stages()
    if cfg.data.name == "voc" and not cfg.data.voc_root and "shards" in cfg.stages():
        raise ConfigError("data=voc needs data.voc_root=PATH/VOCdevkit/VOC2012 (the folder that holds JPEGImages)")
    for key, ok, allowed in _ranges():
        value = _get(cfg, key)
        if not ok(value):
            shown = f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else value
            raise ConfigError(f"{key}={shown}: must be {allowed}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (validating every value)."""
    cfg = Config()

    def walk(prefix: str, sub: dict[str, Any]) -> None:
        for k, v in sub.items():
            if isinstance(v, dict):
                walk(prefix + k + ".", v)
            else:
                set_key(cfg, prefix + k, v)

    walk("", d)
    return cfg
