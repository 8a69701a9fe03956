"""The two engines every stage uses: training (:func:`fit`, on Accelerate) and shard-parallel inference
(:func:`map_shards`); the process state (:func:`dist`), optimiser, schedule and checkpoints."""
from ..errors import Interrupted
from ..models.weights import load_model_weights, save_model_weights
from .checkpoint import newest_checkpoint
from .dist import Dist, autocast, dist, mean_over_processes
from .infer import map_shards, split_features
from .loop import fit, step_seed
from .optim import build_optimizer, poly_lr
from .stamp import train_model

__all__ = ["Dist", "Interrupted", "autocast", "build_optimizer", "dist", "fit", "load_model_weights", "map_shards", "mean_over_processes",
           "newest_checkpoint", "poly_lr", "save_model_weights", "split_features", "step_seed", "train_model"]
