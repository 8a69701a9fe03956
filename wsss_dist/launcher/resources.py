"""Per-stage SLURM resources: the stage registry's defaults, the dataset's, the user's; the submit-time time check."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config, SlurmCfg, get
from ..errors import UserError
from ..registry import DATASETS, STAGE_SPECS, trainer_section
from .options import LaunchCfg


# Stages that use no accelerator: one CPU task whatever slurm.gpus_per_node says.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {s.name: {"gpus_per_node": 0, "nodes": 1} for s in STAGE_SPECS.values()
                                             if not s.uses_gpu}


# Per-stage resources of a dataset's real runs (one modern GPU per job; docs/cluster.md#gpu-hours), under the user's
# own slurm.<key> and slurm.<stage>.<key>. time_min × (MAX_REQUEUES + 1) must cover a stage at STAGE_RATES.
DATASET_STAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"voc": {
    "shards": {"cpus_per_task": 8, "mem_gb": 16, "time_min": 120},
    "teacher": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "cls": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "cam": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 120},
    "aff": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "pseudo": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 120},
    "seg": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240},
    "eval": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 60},
    "report": {"cpus_per_task": 2, "mem_gb": 8, "time_min": 30},
}, "coco": {  # 82,081 train / 40,137 val images (the coco preset: cls 25,650 × 16, aff 30,780 × 8, seg 100,000 × 20)
    "shards": {"cpus_per_task": 8, "mem_gb": 32, "time_min": 360},  # the train instances JSON (~450 MB) in memory; masks rendered
    "teacher": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 480},
    "cls": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 480},  # ≈ 2.9 h at 40 img/s
    "cam": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 360},  # ≈ 2.5 h at 9 img/s
    "aff": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 360},  # ≈ 1.7 h at 40 img/s
    "pseudo": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 360},  # ≈ 2.3 h at 10 img/s
    "seg": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 480},  # ≈ 2.8 h at 200 img/s
    "eval": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 60},
    "report": {"cpus_per_task": 2, "mem_gb": 16, "time_min": 30},  # 81-column tables and heat maps
}}


# Images per second and GPU that the submit-time check assumes: about a quarter of bench/flops.py's rates at 40 %
# of an H100's bf16 peak (fp32 and older GPUs are slower): (images of the stage, rate).
STAGE_RATES: dict[str, float] = {s.name: s.images_per_gpu_s for s in STAGE_SPECS.values() if s.images_per_gpu_s}


MAX_REQUEUES = 3  # submitit's max_num_timeout: a job may time out and requeue this often


def stage_resources(cfg: Config, launch: LaunchCfg, stage: str) -> SlurmCfg:
    """The SLURM resources of ``stage``: ``slurm.*``, the dataset's per-stage defaults (where the user typed no
    ``slurm.<key>``), :data:`STAGE_DEFAULTS`, then ``slurm.<stage>.*``."""
    dataset = {k: v for k, v in DATASET_STAGE_DEFAULTS.get(cfg.data.name, {}).get(stage, {}).items()
               if f"slurm.{k}" not in launch.typed}
    return dataclasses.replace(cfg.slurm, **{**dataset, **STAGE_DEFAULTS.get(stage, {}), **launch.stage_slurm.get(stage, {})})


def stage_hours(cfg: Config, stage: str, gpus: int) -> float | None:
    """Hours ``stage`` needs on ``gpus`` GPUs at :data:`STAGE_RATES` (None for stages without a GPU estimate)."""
    if stage not in STAGE_RATES or gpus < 1:
        return None
    if STAGE_SPECS[stage].trains:
        t = get(cfg, f"{trainer_section(cfg, stage)}.train")
        images = t.steps * t.batch_size
    else:
        counts = dict(DATASETS[cfg.data.name].images)  # the full dataset's images per split (registry; none: unknown)
        images = counts.get("val" if stage == "eval" else cfg.cam.split, 0)
    return images / (STAGE_RATES[stage] * gpus) / 3600


def check_time(cfg: Config, stage: str, res: SlurmCfg) -> None:
    """UserError when ``slurm.time_min`` × (requeues + 1) cannot cover the stage at the stated rate (SLURM only)."""
    hours = stage_hours(cfg, stage, res.gpus_per_node * res.nodes)
    budget = res.time_min * (MAX_REQUEUES + 1) / 60
    if cfg.cluster == "slurm" and hours is not None and hours > budget:
        raise UserError(f"stage {stage} needs about {hours:.1f} h on {res.gpus_per_node * res.nodes} GPU(s) at "
                        f"{STAGE_RATES[stage]:g} images/s per GPU, but slurm time_min={res.time_min} × "
                        f"({MAX_REQUEUES} requeues + 1) allows {budget:.1f} h; raise slurm.{stage}.time_min or "
                        f"slurm.{stage}.gpus_per_node")
