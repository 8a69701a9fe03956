"""Rehearsal at VOC size: the whole chain with the voc preset on a handful of 500×375 / 375×500 images.

    python -m bench.rehearsal                              # 4 train, 2 val, 2 SBD-only images; resnet18 chain (~5 min)
    python -m bench.rehearsal --n_train=2 --n_sbd=1 --skip_big   # the chain only
    python -m bench.rehearsal --workdir=/tmp/rehearsal     # keep the data and the runs

Data (:func:`make_dataset`): a VOC2012 + SBD folder in the real layouts: ``JPEGImages`` (VOC sizes, JPEG),
``Annotations/*.xml``, ``SegmentationClass/*.png`` (palette, 255 void bands), ``ImageSets/Segmentation``, SBD's
``dataset/{img,cls,train.txt,val.txt}`` (``GTcls`` .mat); the real VOC image 2007_000063 (voc_mini of the fixtures:
``$WSSS_FIXTURES`` or ../shared/fixtures, when there) is one of the train images, the others are toy renders (``wsss_dist.data.toy``) resized to 500×375 or 375×500.

Config (:func:`chain_words`): ``data=voc`` with the voc preset except the step counts and batches (1 step each,
batch 2), ``model.backbone`` / ``seg.backbone`` (resnet18 by default, from scratch: ``*.weights=none``) and
``data.num_workers=0``. So every stage runs at full size: 4-scale + flip CAMs at full resolution, stride-8
affinities, the random walk on the 63×47 grid, DeepLab crops of 321, 3-scale evaluation.
Then (``--skip_big`` leaves them out) one training step of ResNet-38d at crop 448 (stage cls, batch 1) and of
DeepLab-v2 R101 at crop 321 (stage seg, batch 2 in 2 micro-batches, on the chain's pseudo labels), and one
4-scale + flip CAM of ResNet-38d on one 500×375 image (``multiscale_cam``).

Each stage and each extra runs in a fresh subprocess; printed: its seconds (the stage's own, and the whole process's
with interpreter start and imports), the process's CPU seconds (user + system: on a shared machine, wall seconds
≈ CPU seconds / cores when it is idle), its peak memory (peak RSS from ``resource.getrusage``, the process and its
children; on CUDA also ``torch.cuda.max_memory_allocated``), with the load average; the rows also go to
``bench/out/rehearsal.json`` (or ``--json PATH``).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from bench import common
from wsss_dist.data.rehearsal import SIZES, big_words, chain_words, make_dataset

CHAIN = ("shards", "cls", "cam", "aff", "pseudo", "seg", "eval", "report")


def prepare_big(chain_run: Path, big_run: Path) -> None:
    """Give the big run the chain's pseudo labels (seg trains on them)."""
    if not (big_run / "pseudo").exists():
        big_run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(chain_run / "pseudo", big_run / "pseudo")


def full_size_cam(cfg: Any, image_id: str | None = None) -> tuple[str, Any, tuple[int, int], float]:
    """``multiscale_cam`` of the run's trained classifier (cam.scales, cam.flip) on one 500×375 train image:
    (id, CAMs [K, H, W], (H, W), seconds)."""
    import torch

    from wsss_dist.data.shards import load_manifest, read_shard, split_urls
    from wsss_dist.data.stream import image_tensor
    from wsss_dist.engine import autocast, dist
    from wsss_dist.models.build import load_trained
    from wsss_dist.stages.cam import multiscale_cam

    d = dist()
    model = load_trained(cfg, "cls", "rehearsal").to(d.device).to(memory_format=torch.channels_last)
    for url in split_urls(cfg.shards_dir, "train", load_manifest(cfg.shards_dir, verify=False)):
        for s in read_shard(url, ("jpg", "cls.npy")):
            x = image_tensor(s, d.device)
            if (image_id is None and x.shape[-1] > x.shape[-2]) or s["__key__"] == image_id:
                t0 = time.perf_counter()
                with autocast(d.device, cfg.cam.mixed_precision):
                    cams = multiscale_cam(model, x, torch.as_tensor(s["cls.npy"]), cfg.cam.scales, cfg.cam.flip)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                return s["__key__"], cams, tuple(x.shape[-2:]), time.perf_counter() - t0
    raise RuntimeError(f"no landscape train image in {cfg.shards_dir}")


def peak_memory() -> dict[str, float]:
    """Peak RSS (MiB) of this process and of its waited-for children, their CPU seconds (user + system); CUDA peak
    allocated (MiB) when on CUDA."""
    import resource

    import torch

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"rss_mib": me.ru_maxrss / 1024, "children_rss_mib": kids.ru_maxrss / 1024,
           "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}
    if torch.cuda.is_available():
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker(kind: str, words: str) -> None:
    """(subprocess) Run one stage (``kind`` = a stage name) or the full-size CAM (``fullcam``); print RESULT json."""
    from wsss_dist import pipeline
    from wsss_dist.config import make_config

    cfg = make_config(json.loads(words) + [f"stage={'cls' if kind == 'fullcam' else kind}", "log_level=WARNING"])
    pipeline.setup_logging("WARNING")
    t0 = time.perf_counter()
    if kind == "fullcam":
        key, cams, size, seconds = full_size_cam(cfg)
        result = {"seconds": seconds, "image": key, "size": list(size), "cams": list(cams.shape)}
    else:
        pipeline.save_config(cfg)  # as pipeline.run does (written once per run)
        metrics = pipeline.run_stage(cfg, kind)
        result = {"seconds": time.perf_counter() - t0, "metrics": {k: metrics[k] for k in
                                                                      ("miou", "samples", "steps", "loss") if k in metrics}}
    common.print_result({**result, **peak_memory()})


def launch(kind: str, words: Sequence[str]) -> dict:
    """Run :func:`worker` in a fresh interpreter; its RESULT dict (wall seconds of the whole process added)."""
    return common.run_child("bench.rehearsal", ["worker", kind, json.dumps(list(words))])


def _row(name: str, r: dict) -> str:
    """One markdown row: seconds, process seconds and CPU seconds, peak RSS, CUDA peak, headline metrics."""
    rss = max(r["rss_mib"], r["children_rss_mib"])
    cuda = f"{r['cuda_mib']:.0f}" if "cuda_mib" in r else "-"
    extra = r.get("metrics") or {k: r[k] for k in ("image", "size", "cams") if k in r}
    extra = {k: round(v, 4) if isinstance(v, float) else v for k, v in extra.items()}
    return (f"| {name} | {r['seconds']:.1f} | {r['process_s']:.1f} | {r['cpu_s']:.0f} | {rss:.0f} | {cuda} | "
            f"{json.dumps(extra)} |")


def main(n_train: int = 4, n_val: int = 2, n_sbd: int = 2, backbone: str = "resnet18", seg_backbone: str = "resnet18",
         skip_big: bool = False, workdir: str | None = None, scale: float = 1.0, json: str | None = None) -> None:
    """Build the data, run each stage and each extra in its own process, print a table as it goes (and write it as
    JSON to ``json``, default bench/out/rehearsal.json)."""
    import torch

    fig = common.Figures("rehearsal", json, n_train=n_train, n_val=n_val, n_sbd=n_sbd, backbone=backbone,
                         seg_backbone=seg_backbone, skip_big=skip_big, scale=scale)
    with common.work_dir(workdir, "rehearsal") as work:
        t0 = time.perf_counter()
        voc, sbd = make_dataset(work / "src", n_train, n_val, n_sbd, scale=scale, fixtures=common.fixtures_dir())
        fig.say(f"rehearsal: {n_train} train, {n_val} val, {n_sbd} SBD-only images of {SIZES[0]} / {SIZES[1]} px x{scale} "
                f"in {work} (data {time.perf_counter() - t0:.1f} s); torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d %H:%M %Z')}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
                f"threads {torch.get_num_threads()}, "
                f"cuda {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
                f"load average at start: {common.load_text()}",
                "\n| step | seconds (stage) | seconds (process) | CPU s (process) | peak RSS MiB | CUDA peak MiB | result |"
                "\n|---|---|---|---|---|---|---|")
        rows = fig.put("rows", {})

        def row(name: str, result: dict) -> None:
            rows[name] = result
            fig.say(_row(name, result))

        words = chain_words(work, voc, sbd, backbone=backbone, seg_backbone=seg_backbone)
        total = time.perf_counter()
        for stage in CHAIN:
            net = (backbone if stage in ("cls", "cam", "aff", "pseudo") else seg_backbone if stage in ("seg", "eval")
                   else "-")
            row(f"{stage} ({net})", launch(stage, words))
        if not skip_big:
            big = big_words(work, voc, sbd)
            prepare_big(work / "run", work / "big")
            row("ResNet-38d train step, crop 448, batch 1 (stage cls)", launch("cls", big))
            row("DeepLab-v2 R101 train step, crop 321, batch 2 = 2 x 1 (stage seg)", launch("seg", big))
            row("ResNet-38d CAM, 4 scales + flip, one full-size image", launch("fullcam", big))
        fig.put("total_s", time.perf_counter() - total)
        fig.say(f"\ntotal {time.perf_counter() - total:.0f} s; load average at the end: {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])  # not through fire: it would parse the JSON words
    else:
        fire.Fire(main)
