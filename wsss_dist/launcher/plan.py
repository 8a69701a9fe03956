"""The jobs of one run's chain, in order, each marked done when its stage is done with the same fingerprint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import runs
from ..config import Config, SlurmCfg, check_batches
from ..pipeline import stage_action
from ..registry import METHODS
from .options import LaunchCfg
from .resources import DATASET_STAGE_DEFAULTS, check_time, stage_resources


@dataclass
class Step:
    """One job of the chain: a stage (or one round of method=sc's classifier) with its resources."""

    stage: str
    overrides: list[str]
    resources: SlurmCfg
    done: bool
    round: Optional[int] = None

    @property
    def name(self) -> str:
        """``cls`` or ``cls.round1``."""
        return self.stage if self.round is None else f"{self.stage}.round{self.round}"


def plan(cfg: Config, launch: LaunchCfg, words: list[str]) -> list[Step]:
    """The jobs of the chain in order, each marked done when it is done with the same fingerprint (and no earlier
    step runs: a stage after one that runs decides in its job); a method with rounds gets one cls job per round
    (the last one also finishes the stage)."""
    steps: list[Step] = []
    for stage in cfg.stages():
        base = [*words, f"stage={stage}"]
        res = stage_resources(cfg, launch, stage)
        check_batches(cfg, max(1, res.gpus_per_node) * res.nodes, [stage])  # the job's processes, before any job
        check_time(cfg, stage, res)
        if cfg.data.name in DATASET_STAGE_DEFAULTS and "data.num_workers" not in launch.typed and cfg.cluster == "slurm":
            base.append(f"data.num_workers={max(0, res.cpus_per_task - 1)}")  # the job's CPUs feed its GPU
        runs_before = any(not st.done for st in steps)
        action = "run" if stage == "report" else stage_action(cfg, stage)[0]
        done = not runs_before and (runs.is_done(cfg.run_dir, stage) if stage == "report" else action == "skip")
        if stage == "cls" and METHODS[cfg.method].rounds and not done:
            for r in cfg.cls_rounds():
                rdone = (not runs_before and action == "run" and (runs.round_dir(cfg.run_dir, r) / "DONE").is_file()
                         and r < cfg.cls.sc_rounds - 1)
                steps.append(Step(stage, [*base, f"cls.round={r}"], res, rdone, round=r))
            continue
        steps.append(Step(stage, base, res, done))
    return steps
