"""The one training engine every trainer uses (Accelerate): :func:`fit` and checkpoint helpers."""
from ..errors import Interrupted
from .loop import build_optimizer, fit, load_model_weights, newest_checkpoint, poly_lr, save_model_weights

__all__ = ["Interrupted", "build_optimizer", "fit", "load_model_weights", "newest_checkpoint", "poly_lr", "save_model_weights"]
