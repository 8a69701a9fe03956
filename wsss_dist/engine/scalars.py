"""Where training curves and scores go: TensorBoard in the stage folder, and the experiment trackers ``log_with``
names (W&B, MLflow) through accelerate's tracker classes; rank 0 only."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

TRACKERS = ("wandb", "mlflow")  # the log_with names (accelerate's tracker classes)


class Scalars:
    """One ``add_scalar`` for TensorBoard and every tracker; ``close`` finishes them all."""

    def __init__(self, writer: Any, trackers: list[Any]) -> None:
        self.writer, self.trackers = writer, trackers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record ``tag = value`` at ``step`` everywhere."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        for tracker in self.trackers:
            tracker.log({tag: float(value)}, step=step)

    def close(self) -> None:
        """Flush and finish TensorBoard and the trackers."""
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.finish()


def open_scalars(tb_dir: Path, log_with: Sequence[str] = (), run_name: str = "", config: dict | None = None) -> Scalars:
    """TensorBoard in ``tb_dir`` plus a run named ``run_name`` in each tracker of ``log_with`` (project
    ``wsss-dist``: W&B's project, MLflow's experiment; their usual environment variables apply)."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard scalars (metrics.json is still written)")
        writer = None
    trackers = []
    for name in log_with:
        from accelerate.tracking import MLflowTracker, WandBTracker

        if name == "wandb":
            tracker = WandBTracker("wsss-dist", name=run_name, dir=str(tb_dir))
        elif name == "mlflow":
            tracker = MLflowTracker(experiment_name="wsss-dist", run_name=run_name)
        else:
            raise ValueError(f"log_with: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        tracker.start()
        if config:
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    return Scalars(writer, trackers)
