"""Benchmarks at VOC size: each inference stage against the model compute it needs, its CPU side alone, and the
training step at a 448-px crop against the bare forward/backward/step.

    python -m bench.voc_size                               # all three parts, resnet18 (CPU-sized), ~15 min on 2 cores
    python -m bench.voc_size --parts=b --noop_images=96    # only the CPU side (no-op models)
    python -m bench.voc_size --backbone=resnet50 --images_a=6 --rounds=3
    python -m bench.voc_size --parts=a --images_a=4,24 --scales_a=1   # part (a) per extra image (fixed costs apart)

Data: the toy generator at ``data.toy.size=437`` (sides 328-546 px, mean ≈ a VOC image of 500×375), packed into
WebDataset shards of ``--shard_size`` images; VOC-preset inference settings (CAM scales 1, 0.5, 1.5, 2 + flip,
AffinityNet at stride 8, random walk β 8, logt 8, α 16, DeepLab evaluation at 1, 0.75, 0.5) and fp32.
Models: the chain's own, trained one step each (their weights do not matter for speed).

(a) Each inference stage (``stages/<name>.run``, ``data.num_workers=--workers``) vs the pure model forwards it
    needs on the same images, pre-decoded, pre-resized and already on the device: ``model.cam`` per scale on the
    image and its mirror (cam), ``AffinityNet`` on the padded image (pseudo; the random walk is timed apart, on
    CPU it is part of the stage's compute), ``DeepLab`` per scale (eval). Goal: stage ≤ 1.10× forwards.
(b) The same stages and the training stream (crop 448, batch 16, VOC augmentation) with the model replaced by a
    no-op of the same interface (and the walk by an argmax): images per CPU-second (this process and its
    DataLoader workers), and the cores one GPU needs at the rates of issue 13 (one H100 at 40 % of bf16 peak:
    CAMs 35/s ResNet-38d, 180/s ResNet-50; training 180/s ResNet-38d, 870/s ResNet-50). Goal: ≤ 2 cores per GPU
    for ResNet-38d.
(c) The engine's full training step (``engine.fit`` through the cls stage, ``method=cam``) at crop 448 vs the
    bare step on a preloaded batch (bench/train_step.py's two sides). Goal: ≤ 1.05×.

Rounds are interleaved (stage, forwards, stage, forwards, ...); figures are medians. Prints the load average; writes
the figures to ``bench/out/voc_size.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import common
from wsss_dist.pipeline import cpu_seconds

# per-GPU rates the CPU side must keep up with (issue 13: one H100 at 40 % of its bf16 peak)
GPU_RATES = {"cam": {"resnet38d": 35.0, "resnet50": 180.0}, "train": {"resnet38d": 180.0, "resnet50": 870.0}}


def make_cfg(work: Path, backbone: str, seg_backbone: str, n: int, workers: int, shard_size: int, *extra: str):
    """A toy-data config at VOC image size with the VOC preset's inference settings."""
    from wsss_dist.config import make_config

    return make_config([
        f"data.toy.root={work / 'src'}", f"data.shards_dir={work / 'shards'}", "data.toy.size=437",
        f"data.toy.n_train={n}", f"data.toy.n_val={n}", "data.toy.n_sbd=0", f"data.shard_size={shard_size}",
        f"data.num_workers={workers}", "method=cam", f"run={work / 'run'}", "log_level=WARNING",
        f"model.backbone={backbone}", f"seg.backbone={seg_backbone}", "cam.split=train", "cam.eval_split=train",
        "cam.scales=[1.0,0.5,1.5,2.0]", "cam.flip=true", "aff.stride=8", "pseudo.beta=8", "pseudo.logt=8",
        "pseudo.alpha=16", "seg.eval_scales=[1.0,0.75,0.5]", "aff.init=imagenet", "seg.init=imagenet",
        *[f"{t}.train.{k}" for t in ("cls", "aff", "seg") for k in ("steps=1", "batch_size=2", "ckpt_every=100")],
        "cls.train.crop=448", "aff.train.crop=448", "seg.train.crop=321", *extra])


def run_stage_fresh(cfg, stage: str) -> tuple[float, float]:
    """Wall and CPU seconds of one stage's ``run`` after removing its outputs."""
    import importlib

    shutil.rmtree(cfg.run_dir / stage, ignore_errors=True)
    module = importlib.import_module(f"wsss_dist.stages.{stage}")
    t0, c0 = time.perf_counter(), cpu_seconds()
    module.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    from wsss_dist import runs

    runs.mark_done(cfg.run_dir, stage, {})
    return wall, cpu


def images(cfg, split: str, device: torch.device) -> list[dict]:
    """Decoded samples of ``split`` with their image tensor on ``device``."""
    from wsss_dist.data.shards import load_manifest, read_shard, split_urls
    from wsss_dist.data.stream import image_tensor

    out = []
    for url in split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir, verify=False)):
        for s in read_shard(url, ("jpg", "cls.npy")):
            out.append({"x": image_tensor(s, device), "labels": s["cls.npy"]})
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` under inference mode (the forwards' inputs are inference tensors)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def forwards(cfg, stage: str, device: torch.device) -> Callable[[], None]:
    """The pure model forwards ``stage`` needs on its images, inputs prepared beforehand."""
    from wsss_dist.methods.random_walk import propagate_labels
    from wsss_dist.models.build import load_trained

    if stage == "cam":
        model = load_trained(cfg, "cls", "bench").to(device).to(memory_format=torch.channels_last).eval()
        batches = []
        for s in images(cfg, cfg.cam.split, device):
            x = s["x"]
            H, W = x.shape[-2:]
            for sc in cfg.cam.scales:
                xs = x if sc == 1.0 else F.interpolate(x, size=(round(H * sc), round(W * sc)), mode="bilinear", align_corners=False)
                batches.append(torch.cat([xs, xs.flip(-1)]).contiguous(memory_format=torch.channels_last))
        return lambda: [model.cam(b) for b in batches] and None
    if stage == "pseudo":
        model = load_trained(cfg, "aff", "bench").to(device).eval()
        xs = [F.pad(s["x"], (0, -s["x"].shape[-1] % 8, 0, -s["x"].shape[-2] % 8)) for s in images(cfg, cfg.cam.split, device)]
        return lambda: [model(x) for x in xs] and None
    if stage == "walk":  # the random walk alone, on the features the AffinityNet gives, CAM-like scores
        model = load_trained(cfg, "aff", "bench").to(device).eval()
        inputs = []
        for s in images(cfg, cfg.cam.split, device):
            x = s["x"]
            H, W = x.shape[-2:]
            f = model(F.pad(x, (0, -W % 8, 0, -H % 8)))[0, :, : math.ceil(H / 8), : math.ceil(W / 8)].float()
            classes = torch.nonzero(torch.as_tensor(s["labels"]) > 0.5).flatten() + 1
            cams = torch.rand(len(classes), H, W, generator=torch.Generator().manual_seed(0)).to(device)
            inputs.append((cams, classes.to(device), f))
        p = cfg.pseudo
        return lambda: [propagate_labels(c, k, f, alpha=p.alpha, beta=p.beta, logt=p.logt, radius=p.radius, stride=8)
                        for c, k, f in inputs] and None
    if stage == "eval":
        model = load_trained(cfg, "seg", "bench").to(device).eval()
        batches = []
        for s in images(cfg, "val", device):
            for sc in cfg.seg.eval_scales:
                batches.append(s["x"] if sc == 1.0 else F.interpolate(s["x"], scale_factor=sc, mode="bilinear", align_corners=False))
        return lambda: [model(b) for b in batches] and None
    raise ValueError(stage)


class NoOpCam(torch.nn.Module):
    """The CAM network's interface at no cost: ``cam(x)`` → a constant map at stride 8."""

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], 20, math.ceil(x.shape[-2] / 8), math.ceil(x.shape[-1] / 8)), 0.5)


class NoOpAff(torch.nn.Module):
    """AffinityNet's interface at no cost: zero features at stride 8."""

    stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 448, x.shape[-2] // 8, x.shape[-1] // 8))


class NoOpSeg(torch.nn.Module):
    """DeepLab's interface at no cost: zero logits."""

    def predict(self, x: torch.Tensor, scales: Any = (), flip: bool = False) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 21) + tuple(x.shape[-2:]))


def noop_walk(cams: torch.Tensor, classes: torch.Tensor, features: torch.Tensor, **_: Any) -> torch.Tensor:
    """The random walk's interface at no cost: the CAM argmax."""
    return torch.zeros(cams.shape[-2:], dtype=torch.long, device=cams.device)


def patch_noop() -> None:
    """Replace the stages' trained models (and the walk) by no-ops."""
    from wsss_dist.stages import cam, pseudo
    from wsss_dist.stages import eval as eval_stage

    models = {"cls": NoOpCam(), "aff": NoOpAff(), "seg": NoOpSeg()}
    for module in (cam, pseudo, eval_stage):
        module.load_trained = lambda cfg, stage, needed_by: models[stage]  # type: ignore[attr-defined]
    pseudo.propagate_labels = noop_walk  # type: ignore[attr-defined]


def stream_rate(cfg, batches: int, on_device: bool = False) -> tuple[float, float, float]:
    """Training stream at crop 448, batch 16 (VOC augmentation), no model: (images per wall second, per CPU second,
    seconds per image of :func:`augment_on_device` on this process's device). ``on_device``: the stream of
    ``data.augment_on=device``, whose host side only reads the samples and their JPEG headers."""
    from wsss_dist.data.shards import load_manifest, split_urls
    from wsss_dist.data.stream import augment_on_device, train_loader

    urls = split_urls(cfg.shards_dir, "train", load_manifest(cfg.shards_dir, verify=False))
    t0, c0 = time.perf_counter(), cpu_seconds()
    it = train_loader(urls, batch_size=16, crop=448, resize_long=(448, 768), seed=0, num_workers=cfg.data.num_workers,
                      on_device=on_device)
    n, kept = 0, []
    for _ in range(batches):
        b = next(it)
        n += len(b["labels"])
        if on_device and len(kept) < 2:
            kept.append(b)
    del it
    import gc

    gc.collect()
    time.sleep(0.5)  # let the workers exit so their CPU time is counted
    rate = n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)
    device_s = 0.0
    if kept:
        t0 = time.perf_counter()
        for b in kept:
            augment_on_device(b, torch.device("cpu"))
        device_s = (time.perf_counter() - t0) / sum(len(b["labels"]) for b in kept)
    return rate[0], rate[1], device_s


def host_work(cfg) -> dict[str, float]:
    """Seconds per image of what the host must do for one CAM image when the GPU does all tensor work: read and
    decode the JPEG, convert it to the normalised tensor (input side); encode the float16 CAM record, tar it and hash
    it (output side, VOC's out_stride 4 and two classes)."""
    from wsss_dist.data.records import encode_cam
    from wsss_dist.data.shards import (
        load_manifest,
        read_shard,
        sha256_bytes,
        split_urls,
        tar_bytes,
    )
    from wsss_dist.data.stream import image_tensor

    urls = split_urls(cfg.shards_dir, cfg.cam.split, load_manifest(cfg.shards_dir, verify=False))
    t0, n, sizes = time.perf_counter(), 0, []
    for url in urls:
        for s in read_shard(url, ("jpg", "cls.npy")):
            sizes.append(tuple(image_tensor(s, torch.device("cpu")).shape[-2:]))
            n += 1
    read = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    records = []
    for i, (H, W) in enumerate(sizes):
        cams = torch.rand(2, math.ceil(H / 4), math.ceil(W / 4))
        records.append(encode_cam(f"k{i}", cams, torch.tensor([3, 15]), (H, W)))
    data, _ = tar_bytes(records)
    sha256_bytes(data)
    return {"input": read, "output": (time.perf_counter() - t0) / n}


def build_chain(cfg, stages: str = "[shards,cls,cam,aff,pseudo,seg]") -> None:
    """Shards and the chain's models (one training step each), CAMs and pseudo labels for the stages to read."""
    from wsss_dist import pipeline

    cfg.stage = stages
    pipeline.run(cfg)


def part_a(fig: common.Figures, cfg, rounds: int, device: torch.device) -> dict[str, tuple[int, float, float, float]]:
    """Stage wall time vs its pure forwards: {stage: (images, stage s, forwards s, walk s)} (medians)."""
    n = {"cam": len(images(cfg, cfg.cam.split, device)), "eval": len(images(cfg, "val", device))}
    n["pseudo"] = n["cam"]
    rows = {}
    for stage in ("cam", "pseudo", "eval"):
        fw = forwards(cfg, stage, device)
        walk = forwards(cfg, "walk", device) if stage == "pseudo" else None
        st, ft, wt = [], [], []
        for _ in range(rounds):
            st.append(run_stage_fresh(cfg, stage)[0])
            ft.append(timed(fw))
            if walk is not None:
                wt.append(timed(walk))
        s, f = statistics.median(st), statistics.median(ft)
        w = statistics.median(wt) if wt else 0.0
        rows[stage] = (n[stage], s, f, w)
        fig.put(f"a_{n[stage]}_{stage}", {"images": n[stage], "stage_s": s, "forwards_s": f, "walk_s": w})
        fig.say(f"  (a) {stage}: {n[stage]} images, stage {s:.1f} s, forwards {f:.1f} s" + (f", walk {w:.1f} s" if wt else ""))
    fig.say("\n| stage | images | stage wall | pure forwards | stage / forwards | stage / (forwards + walk) |\n|---|---|---|---|---|---|")
    for stage, (k, s, f, w) in rows.items():
        fig.say(f"| {stage} | {k} | {s:.1f} s | {f:.1f} s | {s / f:.2f}× | {s / (f + w):.2f}× |" if w else
              f"| {stage} | {k} | {s:.1f} s | {f:.1f} s | {s / f:.2f}× | – |")
    return rows


def marginal(fig: common.Figures, small: dict, large: dict) -> None:
    """Per extra image between two part-(a) runs: what a VOC-length run pays once its fixed costs (model load,
    reader start, shard open, the mIoU sweep) are spread over ~1,500-10,582 images."""
    fig.say("\n| stage | images | fixed cost | stage per extra image | forwards (+ walk) per extra image | ratio |\n"
          "|---|---|---|---|---|---|")
    for stage in large:
        (n0, s0, f0, w0), (n1, s1, f1, w1) = small[stage], large[stage]
        ds, df = (s1 - s0) / (n1 - n0), (f1 + w1 - f0 - w0) / (n1 - n0)
        fixed = s0 - n0 * ds
        fig.put(f"a_marginal_{stage}", {"images": [n0, n1], "fixed_s": fixed, "stage_per_image_s": ds,
                                        "forwards_per_image_s": df})
        fig.say(f"| {stage} | {n0} → {n1} | {fixed:.1f} s | {1000 * ds:.0f} ms | {1000 * df:.0f} ms | {ds / df:.2f}× |")


def part_b(fig: common.Figures, cfg, rounds: int) -> None:
    """The CPU side alone: stages with no-op models, and the training stream."""
    patch_noop()
    rows = []
    for stage in ("cam", "pseudo", "eval"):
        runs_ = [run_stage_fresh(cfg, stage) for _ in range(rounds)]
        n = len(images(cfg, cfg.cam.split if stage != "eval" else "val", torch.device("cpu")))
        wall, cpu = statistics.median(r[0] for r in runs_), statistics.median(r[1] for r in runs_)
        rows.append((f"{stage} stage, no-op model", n, n / wall, n / cpu, "cam" if stage == "cam" else None))
        fig.say(f"  (b) {stage}: {n} images, {wall:.1f} s wall, {cpu:.1f} CPU-s")
    host = [host_work(cfg) for _ in range(rounds)]
    hin, hout = statistics.median(h["input"] for h in host), statistics.median(h["output"] for h in host)
    rows.append(("cam, host work only (read + decode + tensor, encode + tar + sha256)", "", 1 / (hin + hout),
                 1 / (hin + hout), "cam"))
    fig.say(f"  (b) host work per CAM image: input {1000 * hin:.1f} ms, output {1000 * hout:.1f} ms")
    batches = max(20, len(images(cfg, "train", torch.device("cpu"))) // 16)  # the workers' start-up amortised
    for on_device in (False, True):
        rates = [stream_rate(cfg, batches, on_device) for _ in range(rounds)]
        what = ("training stream, data.augment_on=device: host side (read, JPEG header, draws)" if on_device else
                "training stream, crop 448, batch 16 (augmentation on the host)")
        rows.append((what, "", statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates), "train"))
        if on_device:
            dev = statistics.median(r[2] for r in rates)
            fig.say(f"  (b) augment_on_device on this CPU (the device's share, here on 2 threads): {1000 * dev:.1f} ms "
                  "per image")
    fig.say("\n| CPU side | images | images/s | images per CPU-second | cores per GPU, ResNet-38d | cores per GPU, ResNet-50 |\n|---|---|---|---|---|---|")
    for what, n, per_s, per_cpu, kind in rows:
        cores = [f"{GPU_RATES[kind][b] / per_cpu:.2f}" if kind else "–" for b in ("resnet38d", "resnet50")]
        fig.put(f"b {what}", {"images": n, "images_per_s": per_s, "images_per_cpu_s": per_cpu})
        fig.say(f"| {what} | {n} | {per_s:.1f} | {per_cpu:.1f} | {cores[0]} | {cores[1]} |")
    fig.say("(no-op stages on a CPU still do the resizes, CAM upsampling, threshold sweep and walk stand-in on the CPU;"
          " on a GPU those are device work, so the host-work row is what a GPU node's CPU must keep up with."
          " pseudo/eval: issue 13 gives no GPU rate)")


def part_c(fig: common.Figures, work: Path, backbone: str, steps: int, rounds: int, workers: int) -> None:
    """Full training step at crop 448 vs the bare step."""
    from bench.train_step import bare_steps, full_steps

    from wsss_dist import pipeline
    from wsss_dist.config import make_config
    from wsss_dist.data.shards import load_manifest, split_urls
    from wsss_dist.data.stream import train_loader

    def cfg_for(run: str):
        return make_config([f"data.toy.root={work / 'src'}", f"data.shards_dir={work / 'shards'}", "data.toy.size=437",
                            "data.toy.n_train=24", "data.toy.n_val=4", "data.toy.n_sbd=0", "data.shard_size=6",
                            f"data.num_workers={workers}", "method=cam", f"model.backbone={backbone}",
                            f"cls.train.steps={steps}", "cls.train.batch_size=2", "cls.train.crop=448",
                            "cls.train.resize_long=[448,768]", f"cls.train.ckpt_every={100 * steps}",
                            f"cls.train.log_every={steps}", f"run={work / run}", "log_level=WARNING"])

    base = cfg_for("run-c")
    base.stage = "shards"
    pipeline.run(base)
    t = base.cls.train
    urls = split_urls(base.shards_dir, base.cls.split, load_manifest(base.shards_dir, verify=False))
    batch = next(train_loader(urls, batch_size=t.batch_size, crop=t.crop, resize_long=t.resize_long, seed=t.seed))
    warmup = 2
    if steps < warmup + 2:
        raise SystemExit(f"--train_steps must be at least {warmup + 2} (the first {warmup} steps are warm-up)")
    full, bare = [], []
    for r in range(rounds):
        shutil.rmtree(work / f"run-c{r}", ignore_errors=True)
        full += full_steps(cfg_for(f"run-c{r}"), warmup)
        bare += bare_steps(base, batch, warmup)
        fig.say(f"  (c) round {r + 1}: full {statistics.median(full):.2f} s, bare {statistics.median(bare):.2f} s")
    f, b = statistics.median(full), statistics.median(bare)
    fig.put("c_train_step", {"backbone": backbone, "full_s": f, "bare_s": b, "ratio": f / b})
    fig.say(f"\n| training step, {backbone}, batch 2, crop 448 | median | vs bare |\n|---|---|---|")
    fig.say(f"| bare forward/backward/step, preloaded batch | {b:.2f} s | 1.00× |")
    fig.say(f"| full step (engine.fit, method=cam, {workers} workers) | {f:.2f} s | {f / b:.2f}× |")


def as_list(v: Any) -> list:
    """A command-line value that fire gives as one value, a tuple or a comma-separated string, as a list."""
    return list(v) if isinstance(v, (list, tuple)) else [x for x in str(v).split(",") if x]


def main(parts: str = "a,b,c", backbone: str = "resnet18", seg_backbone: str = "resnet18", images_a: Any = 6,
         noop_images: int = 64, workers: int = 2, rounds: int = 2, train_backbone: str = "resnet50",
         train_steps: int = 6, workdir: str | None = None, scales_a: Any = None, json: str | None = None) -> None:
    """Build VOC-size data and the chain's models, run the parts, print tables (``images_a=4,24``: part (a) at
    each count, then the cost per extra image; ``scales_a=1``: CAM scales of part (a) instead of the VOC preset's);
    the figures also go to ``json`` (default bench/out/voc_size.json)."""
    from wsss_dist.engine import dist
    from wsss_dist.pipeline import setup_logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    setup_logging("WARNING")
    parts_ = set(str(parts).split(",")) if isinstance(parts, str) else set(parts)
    fig = common.Figures("voc_size", json, parts=sorted(parts_), backbone=backbone, seg_backbone=seg_backbone,
                         images_a=as_list(images_a), noop_images=noop_images, workers=workers, rounds=rounds,
                         train_backbone=train_backbone, train_steps=train_steps, scales_a=scales_a)
    device = dist().device
    fig.say(f"voc_size bench {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, device {device}, "
            f"{torch.get_num_threads()} threads, CPU flags: {fig.data['machine']['cpu_flags'] or 'no AVX'}; "
            f"load {common.load_text()}")
    with common.work_dir(workdir, "voc-bench") as work:
        if "a" in parts_:
            counts = [int(k) for k in as_list(images_a)]
            extra = [f"cam.scales=[{','.join(str(float(v)) for v in as_list(scales_a))}]"] if scales_a else []
            results = []
            for k in counts:
                cfg = make_cfg(work / f"a{k}", backbone, seg_backbone, k, workers, max(1, k // 2), *extra)
                build_chain(cfg)
                results.append(part_a(fig, cfg, rounds, device))
            if len(results) > 1:
                marginal(fig, results[0], results[-1])
        if "b" in parts_:
            cfg = make_cfg(work / "b", backbone, seg_backbone, noop_images, workers, max(1, noop_images // 8))
            build_chain(cfg, "shards")  # the no-op cam stage writes the CAM shards the no-op pseudo stage reads
            part_b(fig, cfg, rounds)
        if "c" in parts_:
            part_c(fig, work / "c", train_backbone, train_steps, rounds, workers)
    fig.say(f"load average at the end: {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    import fire

    fire.Fire(main)
