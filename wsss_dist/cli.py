"""Command line: ``python -m wsss_dist stage=cls method=fmix data=toy key=value ...``."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Any

from . import runs
from .config import Config, make_config, to_dict
from .errors import Interrupted, UserError

logger = logging.getLogger("wsss_dist")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3  # checkpointed on a signal; run the same command again to resume


def is_main_process() -> bool:
    """Rank 0 of the job (from the env:// variables Accelerate, torchrun and our SLURM glue set)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with rank and time; only rank 0 logs INFO."""
    rank = int(os.environ.get("RANK", "0"))
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s" if "WORLD_SIZE" in os.environ else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else "WARNING", format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("accelerate").setLevel("WARNING")  # its per-file checkpoint lines drown ours


def save_config(cfg: Config) -> None:
    """Write ``runs/<run>/config.yaml`` once (JSON is YAML); warn when a later call changes run-level keys."""
    path = cfg.run_dir / "config.yaml"
    new = to_dict(cfg)
    volatile = ("stage", "cluster", "log_level", "slurm", "report")
    if path.exists():
        old = runs.read_json(path)
        changed = [k for k in new if k not in volatile and old.get(k) != new[k]]
        if changed:
            logger.warning("config differs from the run's saved %s in: %s (the saved file is kept)", path, ", ".join(changed))
        return
    runs.write_json(path, new)


def run_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Run one stage unless its DONE marker exists; write DONE (rank 0) with the stage's metrics."""
    if runs.is_done(cfg.run_dir, stage) and stage != "report":
        logger.info("stage %s: already done (%s), skipping", stage, cfg.run_dir / stage / "DONE")
        return runs.read_done(cfg.run_dir, stage)
    module = importlib.import_module(f"wsss_dist.stages.{stage}")
    t0 = time.time()
    logger.info("stage %s: starting (run %s)", stage, cfg.run_dir)
    metrics = module.run(cfg) or {}
    metrics.setdefault("seconds", round(time.time() - t0, 1))
    if metrics.pop("partial", False):  # e.g. one round of method=sc: not finished yet
        logger.info("stage %s: part finished in %.1f s", stage, time.time() - t0)
        return metrics
    if is_main_process():
        runs.mark_done(cfg.run_dir, stage, metrics)
    logger.info("stage %s: done in %.1f s %s", stage, time.time() - t0, _summary(metrics))
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("miou", "best_miou", "best_threshold", "loss", "samples", "skipped") if k in metrics]
    return " ".join(f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run the config's stages in order, skipping finished ones."""
    if is_main_process():
        save_config(cfg)
    return {stage: run_stage(cfg, stage) for stage in cfg.stages()}


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse ``key=value`` words, run, and turn user errors into one-line messages."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.strip() + "\n\nKeys: see docs/usage.md; every key of wsss_dist/config.py as dotted key=value.")
        return
    try:
        cfg = make_config(argv)
        setup_logging(cfg.log_level)
        run(cfg)
        return
    except UserError as e:
        code, message = EXIT_USER_ERROR, f"error: {_one_line(e)}"
    except Interrupted as e:
        code, message = EXIT_INTERRUPTED, f"interrupted: {_one_line(e)}; run the same command again to resume"
    sys.stderr.flush()
    print(message, file=sys.stderr)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI's contract for user errors)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
