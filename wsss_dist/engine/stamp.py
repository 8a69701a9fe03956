"""The trainer stamp every training stage (teacher, cls, aff, seg) calls: seed, build, ``model.json``, fit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import OptimCfg, TrainCfg
from ..models.build import read_spec, write_spec
from ..models.weights import MODEL_JSON, WEIGHTS
from .dist import dist
from .loop import fit


def train_model(out_dir: Path, spec: dict[str, Any], build: Callable[[], torch.nn.Module],
                param_groups: Callable[[torch.nn.Module], list[dict]], *, loss_fn: Callable,
                make_loader: Callable[[int, int, int], Iterator[dict]], train: TrainCfg, optim: OptimCfg,
                log_name: str, log_with: tuple[str, ...] = ()) -> tuple[dict, torch.nn.Module]:
    """Seed (``train.seed``: initial weights are a function of it), build the model, write ``out_dir/model.json``
    (``spec``) *before* the weights that mark training done, then :func:`fit`; returns (metrics, trained model).

    Trained weights without a ``model.json`` (a run of an older wsss-dist) are a one-line WeightsError naming the
    file: the architecture is never taken from today's config."""
    out_dir = Path(out_dir)
    torch.manual_seed(train.seed)
    model = build()
    if (out_dir / WEIGHTS).is_file() and not (out_dir / MODEL_JSON).is_file():
        read_spec(out_dir)  # raises, naming model.json
    if dist().main:
        write_spec(out_dir, spec)
    metrics = fit(model=model, param_groups=param_groups(model), loss_fn=loss_fn, make_loader=make_loader,
                  out_dir=out_dir, train=train, optim=optim, log_name=log_name, log_with=log_with)
    return metrics, model
