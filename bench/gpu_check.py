"""GPU check: the toy chain in bf16 and the VOC-size rehearsal, per stage images/s and model FLOP utilisation.

    python -m bench.gpu_check                          # on CUDA: (a) toy chain, precision=bf16; (b) the rehearsal
    python -m bench.gpu_check --peak_tflops=989 --budget_s=420 --steps=20 --n_train=32
    python -m bench.gpu_check --cpu-smoke              # tiny and slow on a CPU: checks that the script works
    python -m bench.gpu_check --log_file=$OUT/gpu_check.md --json=$OUT/gpu_check.json 2>$OUT/stderr.txt
                                                       # the table also in a file as it goes; the figures as JSON

(a) the toy preset's whole chain (``stage=all``, method cam, ``precision=bf16``) into a temp dir; (b) the rehearsal
of bench.rehearsal (VOC2012 + SBD folder of 500×375 / 375×500 JPEGs, the voc preset) with the reference networks
(ResNet-38d classifier and AffinityNet, DeepLab-v2 R101; from scratch), ``--steps`` steps per trainer at the preset's
batches and crops (448, 448, 321), ``precision=bf16``. Stages run one after another in this process; after each one a
line is printed (so a timeout still leaves the figures of the finished stages): seconds, images, images/s, FLOPs per
image, achieved TFLOP/s and MFU = achieved / ``--peak_tflops`` (H200 dense bf16 ≈ 989), peak CUDA memory.

FLOPs per image are counted as bench.flops does (``torch.utils.flop_counter.FlopCounterMode``, forward; training
= 3 × forward) on the stage's model built from the config (``models.build``'s specs, as ``model.json`` holds), at its input size: the
training crop (cls, aff, seg), the image at every CAM scale × 2 (flip) (cam), the image padded to /8 (pseudo), every
evaluation scale (eval); a representative image size: 500×375 (rehearsal), ``data.toy.size``² (toy). Images per stage:
steps × global batch for trainers (their time: the training loop's own, from fit), samples for inference stages (their
time: the whole stage, model load included). Stops starting new stages after ``--budget_s`` seconds. The rows also go
to ``bench/out/gpu_check.json`` (or ``--json PATH``) at the end.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

TRAINERS = {"cls": "cls", "aff": "aff", "seg": "seg"}


class Table(common.Figures):
    """The bench's figures; every printed line also goes to ``log_file`` at once (the stages' progress bars go to
    stderr), so a timeout still leaves the rows of the finished stages."""

    def __init__(self, path: str | os.PathLike | None, log_file: str | None, **params: Any) -> None:
        super().__init__("gpu_check", path, **params)
        self.log_file = Path(log_file) if log_file else None

    def say(self, *lines: str) -> None:
        """Print ``lines`` now, keep them, and append them to the log file."""
        super().say(*lines)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write("".join(line + "\n" for line in lines))


def forward_flops(model: Any, h: int, w: int, device: Any, call: str = "forward") -> float:
    """FLOPs of one forward pass (batch 1, zero input of [3, h, w]) of ``model`` or of its method ``call``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fn = getattr(model, call) if call != "forward" else model
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(torch.zeros(1, 3, h, w, device=device))
    return float(fc.get_total_flops())


def stage_flops(cfg: Any, stage: str, size: tuple[int, int], device: Any) -> float:
    """FLOPs per image of ``stage``'s model at its input size (0 for stages without a network)."""
    from wsss_dist.models.build import (
        affinity_spec,
        classifier_spec,
        create_model,
        deeplab_spec,
    )

    H, W = size
    if stage in ("cls", "cam"):
        spec = classifier_spec(cfg)
    elif stage in ("aff", "pseudo"):
        spec = affinity_spec(cfg)
    elif stage in ("seg", "eval"):
        spec = deeplab_spec(cfg)
    else:
        return 0.0
    model = create_model(spec).to(device).eval()
    if stage in TRAINERS:
        crop = getattr(cfg, stage).train.crop
        out = 3 * forward_flops(model, crop, crop, device)
    elif stage == "cam":
        out = sum(2 * forward_flops(model, round(H * s), round(W * s), device, "cam") for s in cfg.cam.scales)
    elif stage == "pseudo":
        out = forward_flops(model, H + (-H % 8), W + (-W % 8), device)
    else:
        s = cfg.seg
        out = sum((2 if s.eval_flip else 1) * forward_flops(model, round(H * f), round(W * f), device) for f in s.eval_scales)
    del model
    return out


def stage_images(cfg: Any, stage: str, metrics: dict) -> int:
    """Images the stage processed: steps × global batch (trainers), samples (inference), all splits (shards)."""
    if stage in TRAINERS:
        return int(metrics.get("steps", 0)) * getattr(cfg, stage).train.batch_size
    if stage == "shards":
        return sum(int(metrics.get(k, 0)) for k in ("train", "val", "train_aug"))
    return int(metrics.get("samples", 0))


def run_chain(log: Table, name: str, words: list[str], size: tuple[int, int], peak_tflops: float,
              deadline: float) -> bool:
    """Run the chain's stages one by one in this process, printing a row after each; False when out of time."""
    import torch

    from wsss_dist import pipeline
    from wsss_dist.config import make_config
    from wsss_dist.engine import dist

    cfg = make_config(words + ["stage=all"])
    pipeline.save_config(cfg)
    device = dist().device
    rows = log.put(name, {})
    log.say(f"\n### {name}\n\nrun {cfg.run_dir}; image size for FLOPs {size[1]}x{size[0]}; precision "
        f"{cfg.cls.train.mixed_precision}; backbones {cfg.model.backbone} / {cfg.seg.backbone}\n")
    log.say("| stage | seconds (stage) | seconds (timed) | images | images/s | GFLOP/img | TFLOP/s | MFU % | CUDA peak GiB |",
            "|---|---|---|---|---|---|---|---|---|")
    for stage in cfg.stages():
        if time.monotonic() > deadline:
            log.say(f"| {stage} | skipped: past the time budget | | | | | | | |")
            return False
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = pipeline.run_stage(cfg, stage)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
        timed = float(metrics.get("seconds", wall)) if stage in TRAINERS else wall
        images = stage_images(cfg, stage, metrics)
        rate = images / max(timed, 1e-9)
        flops = stage_flops(cfg, stage, size, device)
        achieved = flops * rate / 1e12
        mfu = f"{100 * achieved / peak_tflops:.3g}" if flops else "-"
        gflop = f"{flops / 1e9:.3g}" if flops else "-"
        rows[stage] = {"seconds": wall, "timed_s": timed, "images": images, "images_per_s": rate, "flops_per_image": flops,
                       "tflops": achieved, "mfu": achieved / peak_tflops if flops else None,
                       "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                       **({"miou": metrics["miou"]} if "miou" in metrics else {})}
        log.say(f"| {stage} | {wall:.1f} | {timed:.1f} | {images} | {rate:.3g} | {gflop} | "
                f"{achieved:.3g} | {mfu} | {peak} |")
        if "miou" in metrics:
            log.say(f"|   {stage} mIoU | {metrics['miou']:.4f} | | | | | | | |")
    return True


def toy_words(tmp: Path, smoke: bool, precision: str, workers: int) -> list[str]:
    """The toy chain: the toy preset (tiny and short with ``smoke``)."""
    words = [f"data.toy.root={tmp / 'toy-src'}", f"data.shards_dir={tmp / 'toy-shards'}", f"run={tmp / 'toy-run'}",
             "method=cam", f"precision={precision}", f"data.num_workers={workers}", "log_level=WARNING"]
    if smoke:
        words += ["data.toy.n_train=8", "data.toy.n_val=4", "data.toy.n_sbd=4", "data.toy.size=40", "data.shard_size=4",
                  "cls.train.steps=2", "cls.train.batch_size=4", "aff.train.steps=2", "aff.train.batch_size=4",
                  "aff.train.crop=48", "aff.radius=3", "pseudo.radius=3", "seg.train.steps=2", "seg.train.batch_size=4",
                  "cam.scales=[1.0]", "seg.eval_scales=[1.0]"]
    return words


def rehearsal_words(tmp: Path, smoke: bool, precision: str, workers: int, steps: int, n: tuple[int, int, int]) -> list[str]:
    """The rehearsal (bench.rehearsal's data): the reference networks at the preset's batches and crops."""
    from bench import rehearsal

    voc, sbd = rehearsal.make_dataset(tmp / "voc-src", *n, scale=0.25 if smoke else 1.0)
    if smoke:  # a CPU: resnet18, batch 2, small crops, images at 1/4 size
        return rehearsal.chain_words(tmp, voc, sbd, steps=steps, batch=2, workers=workers, run="voc-run") + [
            f"precision={precision}", "cls.train.crop=128",
            "aff.train.crop=128", "seg.train.crop=96", "log_level=WARNING"]
    words = rehearsal.chain_words(tmp, voc, sbd, backbone="resnet38d", seg_backbone="resnet101", steps=steps,
                                  workers=workers, shard_size=8, run="voc-run")
    words = [w for w in words if ".train.batch_size=" not in w]  # the voc preset's batches: 16, 8, 10 (5 × 2)
    return words + [f"precision={precision}", "log_level=WARNING"]


def main(peak_tflops: float = 989.0, budget_s: float = 420.0, steps: int = 20, n_train: int = 32, n_val: int = 16,
         n_sbd: int = 16, workers: int = 8, precision: str = "bf16", toy: bool = True, voc: bool = True,
         cpu_smoke: bool = False, workdir: str | None = None, log_file: str | None = None, json: str | None = None) -> None:
    """Run (a) the toy chain and (b) the rehearsal, printing per stage images/s and MFU as they finish (and writing
    them as JSON to ``json``, default bench/out/gpu_check.json)."""
    import torch

    from wsss_dist import pipeline

    start = time.monotonic()
    deadline = start + budget_s
    if not torch.cuda.is_available() and not cpu_smoke:
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke for a tiny CPU run of this script")
    if cpu_smoke:
        steps, n_train, n_val, n_sbd, workers = min(steps, 1), 2, 1, 1, 0
    pipeline.setup_logging("WARNING")
    log = Table(json, log_file, peak_tflops=peak_tflops, budget_s=budget_s, steps=steps, n_train=n_train, n_val=n_val,
                n_sbd=n_sbd, workers=workers, precision=precision, toy=toy, voc=voc, cpu_smoke=cpu_smoke)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    log.say(f"## GPU check: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}, peak "
            f"{peak_tflops:g} TFLOP/s, budget {budget_s:g} s{' (cpu smoke: tiny)' if cpu_smoke else ''}")
    ok = True
    with common.work_dir(workdir, "gpu-check") as work:
        if toy:
            size = 40 if cpu_smoke else 80
            ok = run_chain(log, "(a) toy chain, precision=" + precision, toy_words(work, cpu_smoke, precision, workers),
                           (size, size), peak_tflops, deadline)
        if voc and ok:
            t0 = time.perf_counter()
            words = rehearsal_words(work, cpu_smoke, precision, workers, steps, (n_train, n_val, n_sbd))
            log.say(f"\nrehearsal data: {n_train} train, {n_val} val, {n_sbd} SBD-only images in "
                    f"{time.perf_counter() - t0:.1f} s")
            size = (94, 125) if cpu_smoke else (375, 500)
            ok = run_chain(log, f"(b) rehearsal, voc preset, {steps} steps per trainer, precision={precision}", words, size,
                           peak_tflops, deadline)
    log.put("total_s", time.monotonic() - start)
    log.put("within_budget", ok)
    log.say(f"\ntotal {time.monotonic() - start:.0f} s{'' if ok else ' (stopped at the time budget)'}")
    log.save()

if __name__ == "__main__":
    import fire

    sys.argv = [a.replace("--cpu-smoke", "--cpu_smoke") for a in sys.argv]
    fire.Fire(main)
