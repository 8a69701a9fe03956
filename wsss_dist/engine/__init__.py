"""The one training engine every trainer uses (Accelerate): :func:`fit`, optimiser, schedule, weights, checkpoints."""
from ..errors import Interrupted
from .checkpoint import load_model_weights, newest_checkpoint, save_model_weights
from .loop import fit, read_metrics, step_seed
from .optim import build_optimizer, poly_lr

__all__ = ["Interrupted", "build_optimizer", "fit", "load_model_weights", "newest_checkpoint", "poly_lr",
           "read_metrics", "save_model_weights", "step_seed"]
