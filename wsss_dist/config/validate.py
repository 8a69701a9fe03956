"""Every value checked when the config is built (ranges, choices, names, characters), and the batch rule."""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from ..registry import DATASETS, METHODS, TRAINERS, trainer_section
from .keys import _schema, get
from .schema import Config


def _ranges() -> list[tuple[str, Callable[[Any], bool], str]]:
    """(key, check, what is allowed) for every value whose type alone does not make it valid."""
    at_least = lambda n: (lambda v: v >= n, f"≥ {n}")  # noqa: E731
    positive = (lambda v: v > 0, "> 0")
    unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
    out: list[tuple[str, Callable[[Any], bool], str]] = []

    def add(key: str, rule: tuple[Callable[[Any], bool], str]) -> None:
        out.append((key, rule[0], rule[1]))

    for k in ("cls", "aff", "irn", "seg", "teacher"):
        for name, rule in (("steps", at_least(1)), ("batch_size", at_least(1)), ("crop", at_least(8)),
                           ("grad_accum", at_least(1)), ("ckpt_every", at_least(0)), ("log_every", at_least(0))):
            add(f"{k}.train.{name}", rule)
        out.append((f"{k}.train.resize_long", lambda v: v == (0, 0) or 0 < v[0] <= v[1], "[lo,hi] with 0 < lo ≤ hi, or [0,0] (off)"))
        add(f"{k}.optim.lr", positive)
        for name in ("weight_decay", "poly_power", "warmup_steps", "grad_clip"):
            add(f"{k}.optim.{name}", at_least(0))
        out.append((f"{k}.optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"))
    for key in ("data.shard_size", "data.pack_workers", "data.toy.n_train", "data.toy.n_val", "cam.out_stride", "cam.batch_images",
                "aff.radius", "pseudo.radius", "teacher.img_size", "report.num_images", "slurm.nodes",
                "slurm.cpus_per_task", "slurm.mem_gb", "slurm.time_min"):
        add(key, at_least(1))
    add("model.output_stride", (lambda v: v in OUTPUT_STRIDES, "one of " + ", ".join(map(str, OUTPUT_STRIDES))))
    add("log_level", (lambda v: v in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)))
    for key in ("cls.split", "cam.split", "cam.eval_split"):
        add(key, (lambda v: v in SPLITS, "one of " + ", ".join(SPLITS)))
    for key in ("data.toy.seed", *(f"{k}.train.seed" for k in ("cls", "aff", "irn", "seg", "teacher"))):
        add(key, at_least(0))
    for key in ("slurm.gpus_per_node", "slurm.signal_delay_s", "cls.ent_weight", "cls.con_weight", "cls.sub_weight"):
        add(key, at_least(0))
    for key in ("cls.mixup_alpha", "cls.fmix_alpha", "cls.fmix_decay", "cls.manifold_alpha"):
        add(key, positive)
    add("cls.round", at_least(-1))
    add("irn.radius", at_least(2))
    add("irn.walk_radius", at_least(2))
    add("irn.logt", at_least(0))
    add("irn.beta", positive)
    add("irn.bg_threshold", unit)
    add("irn.backbone", (lambda v: v != "resnet38d" and bool(v), "a timm ResNet name (resnet50, resnet18, ...)"))
    add("pseudo.crf_gt_prob", (lambda v: 0 < v < 1, "a probability in (0, 1)"))
    add("eval.crf_iters", at_least(1))
    add("eval.crf_workers", at_least(0))
    for key in ("eval.crf_pos_w", "eval.crf_bi_w"):
        add(key, at_least(0))
    for key in ("eval.crf_pos_xy_std", "eval.crf_bi_xy_std", "eval.crf_bi_rgb_std"):
        add(key, positive)
    for key in ("clip.attn_layers", "clip.sinkhorn_rounds"):
        add(key, at_least(1))
    add("clip.refine_steps", at_least(0))
    add("clip.box_threshold", unit)
    out.append(("clip.scales", lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0"))
    out.append(("clip.template", lambda v: v.count("{}") == 1, "a text with one {} (the class string)"))
    out.append(("clip.background", lambda v: all(x.strip() for x in v), "non-empty words"))
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
    for key in ("seg.scale_range", "irn.scale_range"):
        out.append((key, lambda v: 0 < v[0] <= v[1], "[lo,hi] with 0 < lo ≤ hi"))
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
    if cfg.data.name == "folder" and not (cfg.data.root and cfg.data.labels) and "shards" in stages:
        raise ConfigError("data=folder needs data.root=FOLDER (the images) and data.labels=FILE (CSV or JSON: image → "
                          "class names)")
    if cfg.data.name == "coco" and not cfg.data.coco_root and "shards" in stages:
        raise ConfigError("data=coco needs data.coco_root=PATH (holding train2014/, val2014/ and annotations/)")
    for key in _schema():  # finite, no control characters, within its range or choices
        check_value(key, get(cfg, key))
    if not METHODS[cfg.method].trains_classifier:
        for key in ("aff.init", "irn.init", "seg.init"):
            if get(cfg, key) == "cls":
                raise ConfigError(f"{key}=cls: method={cfg.method} trains no classifier to start from; use {key}=imagenet")
    if cfg.model.backbone == "resnet38d" and cfg.model.output_stride != 8:
        raise ConfigError(f"model.output_stride={cfg.model.output_stride}: resnet38d has a fixed output stride of 8")
    for name in cfg.log_with:
        if name not in ("wandb", "mlflow"):
            raise ConfigError(f"log_with={name}: allowed trackers are wandb, mlflow (TensorBoard is always written)")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log_with={name} needs its package: pip install {'mlflow-skinny' if name == 'mlflow' else name}")
    for key in ("aff.crf", "pseudo.crf", "eval.crf"):
        if get(cfg, key) and importlib.util.find_spec("pydensecrf") is None:
            raise ConfigError(f"{key}=true needs the optional CRF package: pip install 'wsss-dist[crf]' (pydensecrf2)")
    splits = DATASETS[cfg.data.name].splits
    for key, value in (("cls.split", cfg.cls.split), ("cam.split", cfg.cam.split), ("cam.eval_split", cfg.cam.eval_split)):
        if value not in splits:
            raise ConfigError(f"{key}={value}: data={cfg.data.name} has the splits {', '.join(splits)}")
    check_batches(cfg, int(os.environ.get("WORLD_SIZE", "1")))


def check_batches(cfg: Config, world: int, stages: Iterable[str] | None = None) -> None:
    """Every trainer's global ``batch_size`` divides over ``world`` processes × its ``grad_accum`` (ConfigError)."""
    for stage in [s for s in (stages or cfg.stages()) if s in TRAINERS]:
        stage = trainer_section(cfg, stage)  # refine=irn: aff trains IRN on irn.train
        t = get(cfg, f"{stage}.train")
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError(f"{stage}.train.batch_size={t.batch_size} is the global batch and must divide over "
                              f"{world} process(es) × {stage}.train.grad_accum={t.grad_accum}; choose a multiple of "
                              f"{world * t.grad_accum}")
