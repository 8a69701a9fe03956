"""Benchmark: the CAM stage (images/s) vs the references' per-image fp32 loop, and how often their labels agree.

    python -m bench.cam_stage                                    # toy: 96 images of ~80 px, resnet18, ~3 min
    python -m bench.cam_stage --size=400 --n_train=4 --n_sbd=4 --n_val=2 --shard_size=2 --backbone=resnet50
                                                                 # VOC-like sizes (300-500 px), 8 images
    python -m bench.cam_stage --repeats=5 --workdir=/tmp/cam-bench   # reuse the data and the trained model

Data: the toy dataset (``wsss_dist.data.toy``) at ``--size`` px, packed into shards (``--shard_size`` per shard);
model: ``--backbone`` trained by the cls stage for ``--cls_steps`` steps (method cam, toy preset), i.e. a barely
trained network: its CAMs are not good, but both sides run the same weights. CAMs of the train_aug split at
``--scales`` with flips (the toy preset: 1.0 and 0.5).

Timed, each in a fresh subprocess, rounds interleaved (A B C … A B C …), median of ``--repeats`` rounds:
  * ours:      ``pipeline.run_stage(cfg, "cam")``, exactly what ``python -m wsss_dist stage=cam`` runs: model load,
               shard reading + JPEG decode, ``multiscale_cam`` (channels_last, image + mirror in one batch),
               float16 CAM shards written, and the CAM mIoU with its 12-threshold sweep; 1 process × 2 threads,
               2 processes × 1 thread (torchrun, one shard in two per rank), and 1 × 2 with bf16 autocast.
  * reference: psa/irn's way on the same weights: one process, torch's default 2 threads, fp32, NCHW,
               ``torch.no_grad``; per image, per scale: resize, forward the image, forward the mirror (batch 1
               each), upsample all 20 maps to the image size, flip the mirror's back, sum; then keep the image's
               classes, max-normalise, ``np.save`` the float32 CAMs per image. It reads the same shards (same
               decode) and computes no mIoU (psa evaluates in a separate script).
Agreement: on every image, ``cam_labels`` (arg-max with background threshold 0.15) of ``multiscale_cam`` (fp32,
and bf16 autocast) and of the float16 CAMs our stage stored, against the reference's fp32 CAMs; % of pixels equal.
Prints the load average (the machine is shared) with the figures; writes them to ``bench/out/cam_stage.json`` (or
``--json PATH``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import common


def overrides(workdir: Path, size: int, n_train: int, n_val: int, n_sbd: int, shard_size: int, backbone: str,
              scales: tuple[float, ...], cls_steps: int) -> list[str]:
    """The config keys shared by every variant (toy preset, bench-sized)."""
    return [f"data.toy.root={workdir / 'src'}", f"data.shards_dir={workdir / 'shards'}", f"data.toy.size={size}",
            f"data.toy.n_train={n_train}", f"data.toy.n_val={n_val}", f"data.toy.n_sbd={n_sbd}",
            f"data.shard_size={shard_size}", f"model.backbone={backbone}", f"cls.train.steps={cls_steps}",
            "cls.train.ckpt_every=1000", f"cam.scales=[{','.join(map(str, scales))}]", "method=cam", "log_level=WARNING"]


def prepare(keys: list[str], workdir: Path) -> None:
    """Toy data, shards and a briefly trained classifier in ``workdir/train`` (skipped when already there)."""
    from wsss_dist import pipeline
    from wsss_dist.config import make_config

    cfg = make_config(keys + ["stage=[shards,cls]", f"run={workdir / 'train'}"])
    pipeline.setup_logging("WARNING")
    pipeline.run(cfg)


def run_dir(workdir: Path, name: str) -> Path:
    """A run directory for one variant: the trained ``cls`` linked in, no ``cam`` yet."""
    d = workdir / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "cls").exists():
        (d / "cls").symlink_to(workdir / "train" / "cls")
    shutil.rmtree(d / "cam", ignore_errors=True)
    return d


def _keys(keys: str | list) -> list[str]:
    """Config keys passed on a worker's command line (fire may already have parsed the JSON list)."""
    return list(keys) if isinstance(keys, (list, tuple)) else json.loads(keys)


def _keys_json(keys: list[str]) -> str:
    """Config keys as one command-line argument of a worker (JSON)."""
    return json.dumps(keys)


def worker_ours(keys: str, run: str, threads: int, precision: str = "no") -> None:
    """(subprocess, one rank) Time ``run_stage(cfg, 'cam')`` after a barrier; rank 0 prints a RESULT line."""
    from wsss_dist import pipeline
    from wsss_dist.config import make_config
    from wsss_dist.engine.dist import dist

    torch.set_num_threads(threads)
    cfg = make_config(_keys(keys) + [f"run={run}", "stage=cam", f"cam.mixed_precision={precision}"])
    pipeline.setup_logging("WARNING")
    d = dist()
    d.barrier()
    t0 = time.perf_counter()
    metrics = pipeline.run_stage(cfg, "cam")
    d.barrier()
    if d.main:
        common.print_result({"seconds": time.perf_counter() - t0, "images": metrics["samples"]})


@torch.no_grad()
def reference_cam(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """psa/irn: per scale, image and mirror one at a time, 20 maps upsampled, summed; then the classes, max-normalised."""
    H, W = x.shape[-2:]
    total = torch.zeros(20, H, W)
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(round(H * s), round(W * s)), mode="bilinear", align_corners=False)
        for flip in (False, True):
            cam = F.relu(F.conv2d(model.backbone(xs.flip(-1) if flip else xs), model.classifier.weight))
            cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)[0]
            total += cam.flip(-1) if flip else cam
    cams = total[labels > 0.5]
    return cams / (cams.amax(dim=(1, 2), keepdim=True) + 1e-5)


def worker_ref(keys: str, run: str, out: str) -> None:
    """(subprocess) Time the reference loop over the cam split, saving float32 CAMs per image; prints RESULT."""
    from wsss_dist.config import make_config
    from wsss_dist.data.shards import read_shard, split_urls
    from wsss_dist.data.stream import normalize
    from wsss_dist.models.build import load_trained

    torch.set_num_threads(2)
    cfg = make_config(_keys(keys) + [f"run={run}"])
    t0 = time.perf_counter()
    model = load_trained(cfg, "cls", "bench")  # fp32, NCHW, eval
    n = 0
    for url in split_urls(cfg.shards_dir, cfg.cam.split):
        for s in read_shard(url, ("jpg", "cls.npy")):
            cams = reference_cam(model, normalize(s["jpg"])[None], torch.as_tensor(s["cls.npy"]), cfg.cam.scales)
            np.save(Path(out) / f"{s['__key__']}.npy", cams.numpy())
            n += 1
    common.print_result({"seconds": time.perf_counter() - t0, "images": n})


def launch(args: list[str], ranks: int = 1) -> dict:
    """Run a worker of this module in a fresh interpreter (torchrun, 1 thread per rank, when ``ranks`` > 1); its
    RESULT dict."""
    env = common.child_env(**({"OMP_NUM_THREADS": "1"} if ranks > 1 else {}))
    return common.run_child("bench.cam_stage", args, ranks=ranks, env=env)


def agreement(keys: list[str], workdir: Path, stored_run: Path, ref_dir: Path) -> dict[str, float]:
    """% of pixels whose CAM label (bg threshold 0.15) equals the reference's: ours fp32, ours bf16, stored float16."""
    from wsss_dist.config import make_config
    from wsss_dist.data.shards import read_shard, split_urls
    from wsss_dist.data.stream import normalize
    from wsss_dist.engine.dist import autocast
    from wsss_dist.models.build import load_trained
    from wsss_dist.stages.cam import cam_labels, multiscale_cam

    torch.set_num_threads(2)
    cfg = make_config(keys + [f"run={workdir / 'train'}"])
    model = load_trained(cfg, "cls", "bench").to(memory_format=torch.channels_last)
    stored = {}
    for url in split_urls(cfg.shards_dir, cfg.cam.split):
        for s in read_shard(str(stored_run / "cam" / Path(url).name), ("cam.npy", "cam.json")):
            stored[s["__key__"]] = s
    equal = {"fp32": 0, "bf16": 0, "stored": 0}
    total = 0
    dev = torch.device("cpu")
    for url in split_urls(cfg.shards_dir, cfg.cam.split):
        for s in read_shard(url, ("jpg", "cls.npy")):
            labels = torch.as_tensor(s["cls.npy"])
            classes = torch.nonzero(labels > 0.5).flatten() + 1
            x = normalize(s["jpg"])[None]
            want = cam_labels(torch.from_numpy(np.load(ref_dir / f"{s['__key__']}.npy")), classes, 0.15)
            got = {"fp32": multiscale_cam(model, x, labels, cfg.cam.scales, cfg.cam.flip)}
            with autocast(dev, "bf16"):
                got["bf16"] = multiscale_cam(model, x, labels, cfg.cam.scales, cfg.cam.flip)
            got["stored"] = torch.from_numpy(stored[s["__key__"]]["cam.npy"].astype(np.float32))
            for k, cams in got.items():
                assert cams.shape[-2:] == want.shape, "stored CAMs at out_stride > 1: compare at full size only"
                equal[k] += int((cam_labels(cams, classes, 0.15) == want).sum())
            total += want.numel()
    return {k: 100.0 * v / total for k, v in equal.items()}


def main(size: int = 80, n_train: int = 48, n_val: int = 16, n_sbd: int = 48, shard_size: int = 24,
         backbone: str = "resnet18", scales: tuple = (1.0, 0.5), cls_steps: int = 30, repeats: int = 3,
         workdir: str | None = None, bf16: bool = True, json: str | None = None) -> None:
    """Prepare the data and model, time every variant interleaved, measure agreement, print a table (and write it as
    JSON to ``json``, default bench/out/cam_stage.json)."""
    scales = tuple(float(s) for s in (scales if isinstance(scales, (tuple, list)) else [scales]))
    fig = common.Figures("cam_stage", json, size=size, n_train=n_train, n_val=n_val, n_sbd=n_sbd, shard_size=shard_size,
                         backbone=backbone, scales=scales, cls_steps=cls_steps, repeats=repeats, bf16=bf16)
    with common.work_dir(workdir, "cam-bench") as work:
        keys = overrides(work, size, n_train, n_val, n_sbd, shard_size, backbone, scales, cls_steps)
        t0 = time.perf_counter()
        prepare(keys, work)
        fig.say(f"prepared data + model in {time.perf_counter() - t0:.0f} s ({work})")
        ref_dir = work / "ref-cams"
        keys_json = _keys_json(keys)

        def ours(name: str, threads: str, *precision: str, ranks: int = 1):
            return lambda: launch(["worker_ours", keys_json, str(run_dir(work, name)), threads, *precision], ranks=ranks)

        def reference() -> dict:
            shutil.rmtree(ref_dir, ignore_errors=True)
            ref_dir.mkdir()
            return launch(["worker_ref", keys_json, str(run_dir(work, "ref")), str(ref_dir)])

        variants = {"ours, 1 process x 2 threads": ours("ours1", "2"),
                    "ours, 2 processes x 1 thread": ours("ours2", "1", ranks=2),
                    "reference (fp32 NCHW loop)": reference}
        if bf16:
            variants["ours, bf16 autocast, 1 x 2"] = ours("oursbf16", "2", "bf16")
            variants["ours, bf16 autocast, 2 x 1"] = ours("oursbf16x2", "1", "bf16", ranks=2)

        def progress(r: int, results: dict[str, list]) -> None:
            fig.say(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{k.split(',')[0] if k.startswith('ref') else k}: {v[-1]['seconds']:.2f} s" for k, v in results.items()))

        results, loads = common.interleaved(variants, repeats, progress)
        times = {k: [r["seconds"] for r in v] for k, v in results.items()}
        images = results["reference (fp32 NCHW loop)"][-1]["images"]
        agree = agreement(keys, work, work / "runs" / "ours1", ref_dir)
    ref = common.median(times["reference (fp32 NCHW loop)"])
    fig.say(f"\nCAM stage, {images} images of ~{size} px, {backbone}, scales {scales} + flip, torch "
            f"{fig.data['machine']['torch']}, {time.strftime('%Y-%m-%d %H:%M')}, cpu capability "
            f"{fig.data['machine']['cpu_capability']}",
            f"load average during the runs: {min(loads):.2f}-{max(loads):.2f} (1-min), now {common.load_text()}",
            "| variant | median time | images/s | vs reference | all times (s) |\n|---|---|---|---|---|")
    rows = fig.put("variants", {})
    for name, ts in times.items():
        m = common.median(ts)
        rows[name] = {"median_s": m, "images": images, "images_per_s": images / m, "vs_reference": ref / m, "times_s": ts}
        fig.say(f"| {name} | {m:.2f} s | {images / m:.1f} | {ref / m:.2f}x | {' '.join(f'{t:.2f}' for t in ts)} |")
    fig.put("agreement_pct", agree)
    fig.put("load_during", [min(loads), max(loads)])
    fig.say(f"\nCAM labels (bg 0.15) equal to the reference's fp32 labels: multiscale_cam fp32 {agree['fp32']:.3f} %, "
            f"bf16 autocast {agree['bf16']:.3f} %, stored float16 CAMs of our stage {agree['stored']:.3f} %")
    fig.save()


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] in ("worker_ours", "worker_ref"):
        fire.Fire({"worker_ours": worker_ours, "worker_ref": worker_ref})
    else:
        fire.Fire(main)
