"""The one training loop on Accelerate: poly schedule, mixed precision, exact resume, signal-safe checkpoints.

See docs/engine.md ("Training engine") for the contract with the stages.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .. import runs
from ..compat import close_loader, reset_accelerate_precision
from ..config import OptimCfg, TrainCfg
from ..data.stream import augment_on_device
from ..errors import Interrupted, TrainingDiverged
from ..models.weights import WEIGHTS, load_model_weights, save_model_weights
from .checkpoint import checkpoint_step, complete_checkpoints, read_train_state, remove_partial, save_checkpoint
from .dist import on_cpu
from .optim import build_optimizer, poly_lr
from .scalars import open_scalars

logger = logging.getLogger(__name__)

METRICS = "metrics.json"
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
NO_STEP = 2**62  # "no non-finite loss" in the divergence check

__all__ = ["StopSignals", "fit", "step_seed"]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one step of one rank: randomness is a function of (seed, step, rank), so resume is exact."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's (CPU and initialised CUDA devices), numpy's and Python's global RNGs for one step.

    Not ``torch.manual_seed``: while CUDA is not initialised it records a stack trace for a lazy call (~0.3 ms).
    """
    s = step_seed(seed, step, rank)
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class TrainState:
    """What the loop itself checkpoints (as JSON next to accelerate's state): step, last logged loss, skipped samples."""

    def __init__(self) -> None:
        self.step, self.loss, self.skipped = 0, float("nan"), 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "skipped": self.skipped}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.loss, self.skipped = int(d["step"]), float(d.get("loss", "nan")), int(d.get("skipped", 0))


class StopSignals:
    """USR1/USR2/TERM/INT set a flag (handlers only in the main thread; the previous handlers come back on exit).

    A second SIGINT while the first is pending aborts at once: the previous SIGINT handler comes back and
    KeyboardInterrupt is raised (Ctrl-C twice: no checkpoint). DataLoader workers forked meanwhile inherit the
    handlers and ignore these signals (a terminal's Ctrl-C reaches them too); the trainer stops them.
    """

    def __init__(self, action: str = "writing a checkpoint at the end of this step") -> None:
        self.signum = 0
        self.action = action  # what the log line says happens next
        self._old: dict[int, Any] = {}
        self._sigint = False
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: the trainer acts, not it
            return
        if signum == signal.SIGINT:
            if self._sigint:
                previous = self._old.pop(signal.SIGINT)
                signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
                logger.warning("received SIGINT again: aborting without a checkpoint")
                raise KeyboardInterrupt
            self._sigint = True
        self.signum = signum
        logger.warning("received %s: %s%s", signal.Signals(signum).name, self.action,
                       " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else "")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class StopAgreement:
    """All ranks agree on a stop signal: an all-reduce (max) of one CPU float per step, overlapped with the next step.

    The all-reduce of step k is started at its end and waited for at the end of step k+1, so its latency (~0.5 ms
    for two CPU processes on gloo) hides behind the computation; all ranks then stop after the same step, one step
    after the signal. The tensor is on the CPU and goes through gloo (the default group on CPU, a side group under
    NCCL), so the check never waits for the GPU. On one process it is a plain flag test. Returns the signal number
    (the largest over ranks), 0 for none.
    """

    def __init__(self, world: int) -> None:
        import torch.distributed as dist

        self.dist = dist if world > 1 and dist.is_available() and dist.is_initialized() else None
        self.group = None
        if self.dist is not None and self.dist.get_backend() != "gloo":
            self.group = self.dist.new_group(backend="gloo")
        self.pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, signum: int) -> int:
        if self.dist is None:
            return signum
        agreed = self.wait()
        if agreed:
            return agreed
        buf = torch.tensor([float(signum)])
        self.pending = (self.dist.all_reduce(buf, op=self.dist.ReduceOp.MAX, group=self.group, async_op=True), buf)
        return 0

    def wait(self) -> int:
        """Finish the all-reduce in flight (collective: every rank calls it at the same point); its result."""
        if self.pending is None:
            return 0
        work, buf = self.pending
        self.pending = None
        work.wait()
        return int(buf.item())


def _make_accelerator(train: TrainCfg):
    """An Accelerator for this fit; drops accelerate's shared state when another precision was used before.

    The process group (PartialState) is kept: stages run one after another in one process.
    """
    from accelerate import Accelerator

    reset_accelerate_precision(train.mixed_precision)
    return Accelerator(mixed_precision=train.mixed_precision, gradient_accumulation_steps=train.grad_accum,
                       cpu=on_cpu())


def _finished(out_dir: Path, steps: int, log_name: str) -> dict | None:
    """The metrics of a finished training of ``steps`` steps in ``out_dir``, or None when it must (continue to) train."""
    if not (out_dir / WEIGHTS).is_file():
        return None
    done = runs.read_json(out_dir / METRICS, expect=dict) if (out_dir / METRICS).is_file() else {"steps": steps}
    if done.get("steps") == steps:
        return done
    if done.get("steps", 0) > steps:
        logger.warning("%s: %s holds %s steps of training, more than the %d asked; keeping it (delete %s to retrain)",
                       log_name, out_dir / WEIGHTS, done.get("steps"), steps, out_dir)
        return done
    logger.info("%s: trained for %s steps, now asked for %d: continuing from the newest checkpoint",
                log_name, done.get("steps"), steps)
    return None


def _resume(accelerator, out_dir: Path, state: TrainState, log_name: str) -> int | None:
    """Load the newest loadable complete checkpoint (older ones if it fails); its step, or None on a fresh start."""
    candidates = complete_checkpoints(out_dir)[::-1]
    errors = []
    for ckpt in candidates:
        try:
            accelerator.load_state(str(ckpt))  # model (safetensors), optimiser and RNG states: all read weights_only
            state.load_state_dict(read_train_state(ckpt))
        except Exception as e:  # a corrupt file or a model that changed: try the previous checkpoint
            logger.warning("%s: checkpoint %s could not be loaded (%s: %s)", log_name, ckpt, type(e).__name__, str(e)[:300])
            errors.append(e)
            continue
        if state.step != checkpoint_step(ckpt):
            logger.warning("%s: %s holds step %d", log_name, ckpt, state.step)
        logger.info("%s: resuming from %s at step %d", log_name, ckpt, state.step)
        break
    else:
        if candidates:
            from ..errors import WeightsError

            raise WeightsError(f"{log_name}: no checkpoint in {out_dir / 'ckpt'} could be loaded (newest error: "
                               f"{str(errors[0])[:300]}); if the model changed, delete {out_dir} or use another run dir")
        return None
    if accelerator.num_processes > 1:
        steps = accelerator.gather(torch.tensor([state.step], device=accelerator.device))
        if steps.min() != steps.max():
            raise RuntimeError(f"{log_name}: ranks resumed at different steps {steps.tolist()}; check {out_dir / 'ckpt'}")
    return state.step


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    if "jpeg" in batch:  # left encoded by the stream (data.augment_on=device): decoded and augmented on the device
        batch = augment_on_device(batch, device)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _batch_size(batch: dict) -> int:
    x = batch.get("image")
    if x is None:
        x = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return int(x.shape[0]) if x is not None else 0


class _Window:
    """Losses since the last check; the check is one collective (gather) at log / checkpoint / stop / end steps."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.first_step = 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)

    def check(self, accelerator, skipped: int, log_name: str) -> tuple[float, int]:
        """(mean loss over all ranks or nan if the window is empty, skipped samples summed over ranks).

        Raises TrainingDiverged on every rank when any rank saw a non-finite loss.
        """
        dev = accelerator.device
        if self.losses:
            losses = torch.stack([x.detach().float().reshape(()) for x in self.losses]).double()
            finite = torch.isfinite(losses)
            steps = torch.arange(self.first_step, self.first_step + len(losses), device=losses.device, dtype=torch.float64)
            bad = torch.where(finite, torch.full_like(steps, NO_STEP), steps)
            i = int(bad.argmin())
            row = torch.stack([losses.mean(), bad[i], torch.isnan(losses[i]).double(), losses.new_tensor(1.0)])
        else:
            row = torch.tensor([0.0, NO_STEP, 0.0, 0.0], dtype=torch.float64)
        row = torch.cat([row.to(dev), torch.tensor([float(skipped)], dtype=torch.float64, device=dev)])
        rows = accelerator.gather(row[None]).cpu() if accelerator.num_processes > 1 else row[None].cpu()
        self.losses = []
        first_bad = rows[:, 1].min()
        if first_bad < NO_STEP:
            r = int(rows[:, 1].argmin())
            kind = "nan" if rows[r, 2] > 0 else "inf"
            raise TrainingDiverged(f"loss is {kind} at step {int(first_bad) + 1} of {log_name}; lower the learning rate "
                                   f"(optim.lr), set optim.grad_clip, or use mixed_precision=no")
        counted = rows[rows[:, 3] > 0]
        loss = float(counted[:, 0].mean()) if len(counted) else float("nan")
        return loss, int(rows[:, 4].sum())


def fit(*, model: torch.nn.Module, param_groups: list[dict], loss_fn: Callable, make_loader: Callable[[int, int, int], Iterator[dict]],
        out_dir: Path, train: TrainCfg, optim: OptimCfg, log_name: str = "train", log_with: tuple[str, ...] = ()) -> dict:
    """Train ``model`` for ``train.steps`` optimiser steps into ``out_dir``; resume from its newest checkpoint.

    ``loss_fn(model, batch, step) -> (loss, logs)`` gets the prepared (DDP-wrapped) model and a batch on the device;
    ``make_loader(rank, world, start_batch)`` returns an infinite deterministic stream starting at batch
    ``start_batch``. Returns ``{"steps", "loss", "seconds", "images_per_s", "skipped"}``; ``model`` holds the
    trained weights afterwards. Raises Interrupted after a signal-triggered checkpoint, TrainingDiverged on a
    non-finite loss.
    """
    out_dir = Path(out_dir)
    done = _finished(out_dir, train.steps, log_name)
    if done is not None:
        logger.info("%s: already trained (%s)", log_name, out_dir / WEIGHTS)
        load_model_weights(model, out_dir / WEIGHTS)
        return done
    with StopSignals() as stop:
        return _train(model, param_groups, loss_fn, make_loader, out_dir, train, optim, log_name, stop, log_with)


def _train(model: torch.nn.Module, param_groups: list[dict], loss_fn: Callable, make_loader: Callable, out_dir: Path,
           train: TrainCfg, optim: OptimCfg, log_name: str, stop: StopSignals, log_with: tuple[str, ...] = ()) -> dict:
    """The loop: per step seed, lr, (accumulated) forward/backward/step; log, stop on a signal, checkpoint."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    accelerator = _make_accelerator(train)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if main:
        remove_partial(out_dir)
    accelerator.wait_for_everyone()
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(param_groups, optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    resumed_at = _resume(accelerator, out_dir, state, log_name)
    agree = StopAgreement(world)
    total, window, skips = train.steps, _Window(), {}
    log_every = train.log_every if train.log_every > 0 else max(1, total)  # 0: only at the end
    ckpt_every = train.ckpt_every if train.ckpt_every > 0 else max(1, total)
    skipped_before = state.skipped
    base_lrs = [optim.lr * g.get("lr_mult", 1.0) for g in optimizer.param_groups]
    step_optimizer = _optimizer_step(accelerator, optimizer)
    batches = make_loader(rank, world, state.step * train.grad_accum)
    writer = open_scalars(out_dir / "tb", log_with, f"{out_dir.parent.name}/{log_name}") if main else None
    tty = sys.stderr.isatty()
    images, t0, first = 0, time.time(), state.step

    def sync() -> float:
        """The window's mean loss over all ranks (one collective; raises on a non-finite loss); counts skips."""
        loss, skipped = window.check(accelerator, sum(skips.values()), log_name)
        state.skipped = skipped_before + skipped
        return loss

    def checkpoint() -> None:
        save_checkpoint(accelerator, out_dir, state.step, state=state.state_dict())

    with contextlib.ExitStack() as stack:
        if main:
            stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(tqdm(total=total, initial=min(state.step, total), desc=log_name, unit="step",
                                       disable=not main, dynamic_ncols=True, mininterval=0.5 if tty else 30))
        stack.callback(_close, batches, writer)
        model.train()
        while state.step < total:
            step = state.step
            seed_step(train.seed, step, rank)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = poly_lr(step, total, base, optim.poly_power, optim.warmup_steps)
            loss, logs, n = _accumulated_step(accelerator, model, loss_fn, batches, step, train, optim, step_optimizer, skips)
            images += n
            window.add(step, loss)
            state.step += 1
            bar.update(1)
            if state.step % log_every == 0 or state.step == total:
                state.loss = sync()
                elapsed = max(time.time() - t0, 1e-9)
                eta = (total - state.step) * elapsed / max(state.step - first, 1)
                _log(bar, writer, log_name, state, total, optimizer, logs, images * world / elapsed, eta)
            signum = agree(stop.signum) if state.step < total else 0
            if signum:
                sync()
                checkpoint()
                logger.warning("%s: stopped at step %d by %s; checkpoint written, rerun to resume", log_name, state.step,
                               signal.Signals(signum).name)
                raise Interrupted(signum, f"{log_name}: stopped by {signal.Signals(signum).name} at step {state.step} "
                                          f"of {total}, checkpoint written in {out_dir / 'ckpt'}")
            if state.step % ckpt_every == 0 and state.step < total:
                sync()
                checkpoint()
        agree.wait()
        seconds = time.time() - t0
        sync()
        if resumed_at != state.step:  # the final state (kept for continuing with more steps later)
            checkpoint()
    metrics = {"steps": state.step, "loss": state.loss, "seconds": round(seconds, 3),
               "images_per_s": round(images * world / max(seconds, 1e-9), 2), "skipped": state.skipped}
    if main:
        runs.write_json(out_dir / METRICS, metrics)
        save_model_weights(accelerator.unwrap_model(model), out_dir / WEIGHTS)  # last: it marks training as done
        logger.info("%s: done, %d steps, loss %.4f, %.1f images/s", log_name, state.step, state.loss, metrics["images_per_s"])
    # not accelerator.end_training(): it destroys the process group that later stages in this process still use
    accelerator.wait_for_everyone()
    return metrics


def _accumulated_step(accelerator, model, loss_fn: Callable, batches: Iterator[dict], step: int, train: TrainCfg,
                      optim: OptimCfg, step_optimizer: Callable[[], None], skips: dict) -> tuple[torch.Tensor, dict, int]:
    """One optimiser step over ``train.grad_accum`` micro-batches: (mean loss, the last logs, images seen)."""
    loss_sum, images, logs = None, 0, {}
    for _ in range(train.grad_accum):
        batch = _to_device(next(batches), accelerator.device, train.channels_last)
        if "skipped" in batch:
            _note_skips(skips, batch)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, logs = loss_fn(model, batch, step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
                step_optimizer()
        loss = loss.detach()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        images += _batch_size(batch)
    return (loss_sum / train.grad_accum if train.grad_accum > 1 else loss_sum), logs, images


def _optimizer_step(accelerator, optimizer) -> Callable[[], None]:
    """step + zero_grad. Without a grad scaler the bare optimiser is called: accelerate's wrapper spends ~0.7 ms per
    step on package look-ups and signature inspection, which is most of the loop's overhead on small models."""
    from accelerate.utils import DistributedType

    raw = getattr(optimizer, "optimizer", optimizer)
    if accelerator.scaler is not None or accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                                               DistributedType.MULTI_GPU):
        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def step() -> None:
            raw.step()
            raw.zero_grad(set_to_none=True)
    return step


def _note_skips(skips: dict, batch: dict) -> None:
    """Broken samples skipped so far, per data worker (``worker`` key if the batch has one): latest, never decreasing."""
    value = batch["skipped"]
    value = int(value.max()) if isinstance(value, torch.Tensor) else int(value)
    key = batch.get("worker", 0)
    key = int(key) if not isinstance(key, torch.Tensor) else int(key.reshape(-1)[0])
    skips[key] = max(skips.get(key, 0), value)


def _log(bar, writer, log_name: str, state: TrainState, total: int, optimizer, logs: dict, images_per_s: float,
         eta_s: float = 0.0) -> None:
    lr = optimizer.param_groups[0]["lr"]
    extra = {k: float(v) for k, v in (logs or {}).items()}
    bar.set_postfix(loss=f"{state.loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    memory = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    logger.info("%s: step %d/%d loss %.4f lr %.3g %.1f img/s eta %s%s %s", log_name, state.step, total, state.loss, lr,
                images_per_s, _clock(eta_s), memory, " ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    if writer is not None:
        writer.add_scalar(f"{log_name}/loss", state.loss, state.step)
        for i, g in enumerate(optimizer.param_groups):
            writer.add_scalar(f"{log_name}/lr{'' if i == 0 else i}", g["lr"], state.step)
        writer.add_scalar(f"{log_name}/images_per_s", images_per_s, state.step)
        for k, v in extra.items():
            writer.add_scalar(f"{log_name}/{k}", v, state.step)


def _clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _close(batches: Any, writer: Any) -> None:
    close_loader(batches)
    if writer is not None:
        writer.close()

