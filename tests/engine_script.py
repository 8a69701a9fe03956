"""A tiny training run with the engine, for tests/test_engine.py (in-process helpers and a subprocess script).

Usage: ``[accelerate launch ...] python tests/engine_script.py OUT STEPS [key=value ...]`` with keys
ckpt_every, grad_accum, signal_at (step at which rank ``signal_rank`` sends itself SIGUSR1), signal_rank,
kill_in_save (SIGKILL this process inside its n-th checkpoint write, after the state files and before COMPLETE).
Writes OUT/result-rank<r>.json: world, backend, rank, and the metrics or the interruption.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from wsss_dist.config import OptimCfg, TrainCfg

NUM_CLASSES = 4


class TinyNet(nn.Module):
    """conv-BN-ReLU-conv-ReLU-dropout-GAP-linear on 3×16×16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout2d(0.1))
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.features.parameters()), "lr_mult": 1.0},
                {"params": list(self.head.parameters()), "lr_mult": 10.0, "weight_decay": 0.0}]


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def synthetic_batch(index: int, rank: int = 0, batch_size: int = 8, seed: int = 0, skipped: int = 0) -> dict:
    """Batch ``index`` of rank ``rank``: the label's colour channel is brighter (learnable), deterministic."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + index)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    image = torch.randn(batch_size, 3, 16, 16, generator=g)
    image[:, :3] += 1.5 * F.one_hot(labels, NUM_CLASSES)[:, :3, None, None].float()
    return {"image": image, "label": labels, "skipped": skipped}


def make_loader(rank: int, world: int, start_batch: int) -> Iterator[dict]:
    """The engine's infinite deterministic stream, starting at ``start_batch``; "skips" one sample in five batches."""
    index = start_batch
    while True:
        yield synthetic_batch(index, rank, skipped=(index - start_batch) // 5)
        index += 1


def loss_fn(model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
    """Mixup-style CE: λ and the permutation come from the global torch RNG (seeded per step by the engine)."""
    x, y = batch["image"], batch["label"]
    lam = float(torch.rand(()))
    perm = torch.randperm(x.shape[0], device=x.device)
    logits = model(lam * x + (1 - lam) * x[perm])
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    return loss, {"lam": lam}


def configs(steps: int, ckpt_every: int = 4, grad_accum: int = 1, **train) -> tuple[TrainCfg, OptimCfg]:
    t = TrainCfg(**{"steps": steps, "batch_size": 8, "crop": 16, "ckpt_every": ckpt_every, "log_every": 3,
                    "grad_accum": grad_accum, "channels_last": True, "mixed_precision": "no", "seed": 0, **train})
    return t, OptimCfg(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


def main(argv: list[str]) -> int:
    from accelerate import Accelerator

    from wsss_dist.cli import setup_logging
    from wsss_dist.engine import Interrupted, fit

    out, steps, opts = Path(argv[0]), int(argv[1]), dict(a.split("=", 1) for a in argv[2:])
    setup_logging("INFO")
    rank = int(os.environ.get("RANK", "0"))
    signal_at, signal_rank = int(opts.get("signal_at", -1)), int(opts.get("signal_rank", 0))
    kill_in_save = int(opts.get("kill_in_save", 0))
    if kill_in_save:
        original, calls = Accelerator.save_state, []

        def save_state(self, output_dir=None, **kw):
            result = original(self, output_dir, **kw)
            calls.append(output_dir)
            if len(calls) == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        Accelerator.save_state = save_state

    def loss(model, batch, step):
        if step == signal_at and rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss_fn(model, batch, step)

    train, optim = configs(steps, int(opts.get("ckpt_every", 4)), int(opts.get("grad_accum", 1)))
    model = make_model()
    import torch.distributed as dist

    info: dict = {}
    try:
        info["metrics"] = fit(model=model, param_groups=model.param_groups(), loss_fn=loss, make_loader=make_loader,
                              out_dir=out / "train", train=train, optim=optim, log_name="tiny")
        code = 0
    except Interrupted as e:
        info["interrupted"] = {"signum": e.signum, "message": str(e)}
        code = 3
    info.update(world=dist.get_world_size() if dist.is_initialized() else 1,
                backend=dist.get_backend() if dist.is_initialized() else None, rank=rank)
    from wsss_dist.runs import write_json

    write_json(out / f"result-rank{rank}.json", info)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
