"""Trained weights: safetensors of a model's state dict, saved atomically and loaded strictly; DDP unwrapping."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import runs
from ..errors import WeightsError

WEIGHTS = "model.safetensors"  # a trainer's trained weights, written last: they mark its training done
MODEL_JSON = "model.json"  # a trainer's architecture (and input normalisation), written before the weights


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / DataParallel / torch.compile wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def save_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Atomic safetensors of the unwrapped model's state_dict (tensors sharing memory are stored as copies)."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for k, v in unwrap(model).state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    with runs.atomic_path(path) as tmp:
        save_file(state, str(tmp))
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; weights are meant to be shared


def redo_advice(out_dir: str | Path) -> str:
    """How to retrain the model of a trainer's folder (``<run>/<stage>`` or ``<run>/cls/round<r>``)."""
    out_dir = Path(out_dir)
    stage = out_dir.parent.name if out_dir.name.startswith("round") else out_dir.name
    return f"run stage {stage} again with redo={stage} (it trains from scratch; the stages after it follow)"


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights written by :func:`save_model_weights`; WeightsError when the file is missing or does not fit."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {redo_advice(path.parent)}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a truncated/corrupt file
        raise WeightsError(f"{path} is not a readable safetensors file ({str(e)[:200]}); {redo_advice(path.parent)}") from None
    try:
        unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise WeightsError(f"{path} does not fit the model: {' '.join(lines[:3])[:500]}") from None
