"""The one training loop on Accelerate: poly schedule, mixed precision, exact resume, signal-safe checkpoints."""
from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import runs
from ..config import OptimCfg, TrainCfg
from ..errors import Interrupted, TrainingDiverged, WeightsError

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # marker written into a checkpoint dir after everything else
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


def build_optimizer(param_groups: list[dict], optim: OptimCfg) -> torch.optim.Optimizer:
    """SGD (real momentum) or AdamW over groups carrying ``lr_mult``; ``legacy_momentum_bug`` puts wd in momentum."""
    groups = []
    for g in param_groups:
        g = dict(g)
        g.setdefault("lr_mult", 1.0)
        g.setdefault("weight_decay", optim.weight_decay)
        g["lr"] = optim.lr * g["lr_mult"]
        groups.append(g)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    momentum = optim.weight_decay if optim.legacy_momentum_bug else optim.momentum
    return torch.optim.SGD(groups, lr=optim.lr, momentum=momentum, weight_decay=optim.weight_decay)


def poly_lr(step: int, total: int, base_lr: float, power: float = 0.9, warmup: int = 0) -> float:
    """Poly decay base_lr·(1 − step/total)^power after a linear warm-up of ``warmup`` steps."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, 1.0 - step / max(1, total)) ** power


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one step of one rank: randomness is a function of the step, so resume is exact."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def newest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/ckpt`` (dirs without their COMPLETE marker are ignored)."""
    ckpt = Path(out_dir) / "ckpt"
    done = sorted(p for p in ckpt.glob("step-*") if (p / COMPLETE).is_file()) if ckpt.is_dir() else []
    return done[-1] if done else None


def save_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Atomic safetensors of the model's state dict."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with runs.atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict saved by :func:`save_model_weights`; WeightsError when missing or not fitting."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; train the stage that writes it first")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit the model: {str(e).splitlines()[0]} ...") from None


class _Counter:
    """Step counter registered for checkpointing."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])


class _StopFlag:
    """Stop signals set a flag; the loop checks it at step boundaries. Handlers restored on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self.old: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        logger.warning("received signal %d: checkpointing at the end of this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def _save(accelerator, out_dir: Path, step: int, keep: int = 2) -> None:
    """accelerator.save_state into ckpt/step-N via a temp dir; COMPLETE last; keep the newest ``keep``."""
    ckpt = out_dir / "ckpt"
    final = ckpt / f"step-{step:08d}"
    tmp = ckpt / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.write_json(tmp / COMPLETE, {"step": step, "time": time.time()})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in ckpt.glob("step-*") if p != final)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def fit(*, model: torch.nn.Module, param_groups: list[dict], loss_fn: Callable, make_loader: Callable[[int, int, int], Iterator[dict]],
        out_dir: Path, train: TrainCfg, optim: OptimCfg, log_name: str = "train") -> dict:
    """Train ``model`` for ``train.steps`` optimiser steps; resume from the newest checkpoint in ``out_dir``.

    ``loss_fn(model, batch, step) -> (loss, logs)``; ``make_loader(rank, world, start_batch)`` an infinite,
    deterministic batch stream. Returns metrics (steps, loss, seconds, images_per_s, skipped).
    """
    from accelerate import Accelerator
    from tqdm import tqdm

    out_dir = Path(out_dir)
    final = out_dir / "model.safetensors"
    if final.is_file() and (out_dir / "metrics.json").is_file():
        done = runs.read_json(out_dir / "metrics.json")
        if done.get("steps") == train.steps:
            logger.info("%s: already trained (%s)", log_name, final)
            load_model_weights(model, final)
            return done
        logger.info("%s: trained for %s steps, now asked for %d: continuing from the last checkpoint", log_name, done.get("steps"), train.steps)
    accelerator = Accelerator(mixed_precision=train.mixed_precision, gradient_accumulation_steps=train.grad_accum,
                              cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(param_groups, optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    resume = newest_checkpoint(out_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("%s: resuming from %s at step %d", log_name, resume, counter.step)
    writer = _tensorboard(out_dir / "tb") if accelerator.is_main_process else None
    batches = make_loader(rank, world, counter.step * train.grad_accum)
    total, window, skipped = train.steps, [], 0
    bar = tqdm(total=total, initial=counter.step, desc=log_name, disable=not accelerator.is_main_process, unit="step")
    t0, images, loss_value = time.time(), 0, float("nan")
    model.train()
    with _StopFlag() as stop:
        while counter.step < total:
            step = counter.step
            torch.manual_seed(step_seed(train.seed, step, rank))
            for g in optimizer.param_groups:
                g["lr"] = poly_lr(step, total, optim.lr * g.get("lr_mult", 1.0), optim.poly_power, optim.warmup_steps)
            for _ in range(train.grad_accum):
                batch = _to_device(next(batches), accelerator.device, train.channels_last)
                skipped = max(skipped, int(batch.get("skipped", 0)))
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, logs = loss_fn(model, batch, step)
                    accelerator.backward(loss)
                    if optim.grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                images += batch["image"].shape[0]
            counter.step += 1
            if not math.isfinite(float(loss.detach())):
                raise TrainingDiverged(f"loss is {float(loss.detach())} at step {counter.step} of {log_name}; "
                                       f"lower the learning rate or use mixed_precision=no")
            window.append(loss.detach())
            if counter.step % train.log_every == 0 or counter.step == total:
                loss_value = float(accelerator.reduce(torch.stack(window).mean(), reduction="mean"))
                window = []
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if writer is not None:
                    writer.add_scalar(f"{log_name}/loss", loss_value, counter.step)
                    writer.add_scalar(f"{log_name}/lr", optimizer.param_groups[0]["lr"], counter.step)
                    for k, v in logs.items():
                        writer.add_scalar(f"{log_name}/{k}", float(v), counter.step)
            bar.update(1)
            if _agree(accelerator, stop.signum):
                _save(accelerator, out_dir, counter.step)
                bar.close()
                raise Interrupted(stop.signum or signal.SIGTERM, f"{log_name}: stopped by a signal at step {counter.step}, checkpoint written")
            if counter.step % train.ckpt_every == 0 and counter.step < total:
                _save(accelerator, out_dir, counter.step)
    bar.close()
    seconds = time.time() - t0
    _save(accelerator, out_dir, counter.step)
    skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), reduction="sum"))
    metrics = {"steps": counter.step, "loss": loss_value, "seconds": round(seconds, 2),
               "images_per_s": round(images * world / max(seconds, 1e-9), 2), "skipped": skipped}
    if accelerator.is_main_process:
        save_model_weights(accelerator.unwrap_model(model), final)
        runs.write_json(out_dir / "metrics.json", metrics)
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    return metrics


def _agree(accelerator, signum: int) -> bool:
    """Whether any rank got a stop signal (one tiny all-reduce per step under DDP; none on one process)."""
    if accelerator.num_processes == 1:
        return bool(signum)
    flag = torch.tensor([1.0 if signum else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard scalars (metrics.json is still written)")
        return None
    return SummaryWriter(str(path))


def read_metrics(out_dir: str | Path) -> dict:
    """A finished trainer's metrics.json."""
    return json.loads((Path(out_dir) / "metrics.json").read_text())
