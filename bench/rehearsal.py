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

import io
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import common

SIZES = ((500, 375), (375, 500))  # (W, H): VOC's two common image sizes
REAL_ID = "2007_000063"  # a real VOC 2012 train image (500×375) and its SegmentationClass PNG
CHAIN = ("shards", "cls", "cam", "aff", "pseudo", "seg", "eval", "report")


def _objects(lab: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(class index 0..19, 1-based VOC box) of every class present in a label map (void 255 left out)."""
    out = []
    for v in sorted(set(np.unique(lab).tolist()) - {0, 255}):
        ys, xs = np.nonzero(lab == v)
        out.append((v - 1, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return out


def _render(i: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A toy image and its label map (no void band), resized to ``size`` = (W, H)."""
    from wsss_dist.data.toy import render

    img, lab, _ = render(np.random.default_rng([seed, 7, i]), int(0.88 * max(size)))
    img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    lab = np.asarray(Image.fromarray(lab).resize(size, Image.NEAREST))
    return img, lab


def _real(size: tuple[int, int]) -> tuple[bytes, np.ndarray] | None:
    """The real VOC image's JPEG bytes (re-encoded only when resized) and its mask, or None without the fixture."""
    from wsss_dist.data.voc import read_mask_png

    fixtures = common.fixtures_dir()
    for voc in [fixtures / "voc_mini" / "VOCdevkit" / "VOC2012"] if fixtures else []:
        jpg, png = voc / "JPEGImages" / f"{REAL_ID}.jpg", voc / "SegmentationClass" / f"{REAL_ID}.png"
        if jpg.is_file() and png.is_file():
            mask = read_mask_png(png)
            if (mask.shape[1], mask.shape[0]) == size:
                return jpg.read_bytes(), mask
            buf = io.BytesIO()
            Image.open(jpg).convert("RGB").resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
            return buf.getvalue(), np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return None


def make_dataset(root: Path, n_train: int = 4, n_val: int = 2, n_sbd: int = 2, seed: int = 0,
                 scale: float = 1.0) -> tuple[Path, Path]:
    """Write a VOC2012 + SBD folder of VOC-size images under ``root``; return (voc_root, sbd_root).

    VOC train: ``n_train`` ids (the real 2007_000063 first when the fixture is there), VOC val: ``n_val``; SBD:
    ``n_sbd`` SBD-only ids (JPEG in ``dataset/img``) plus one VOC train and one VOC val id (as the real SBD
    overlaps VOC), so train_aug = VOC train ∪ SBD − VOC val. ``scale`` < 1 shrinks the sizes (smoke runs only).
    """
    from wsss_dist.data.toy import _mat_bytes, _xml, void_band
    from wsss_dist.data.voc import write_mask_png

    root = Path(root)
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE"
    for d in (voc / "JPEGImages", voc / "Annotations", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
              sbd / "dataset" / "img", sbd / "dataset" / "cls"):
        d.mkdir(parents=True, exist_ok=True)
    sizes = [(round(w * scale), round(h * scale)) for w, h in SIZES]
    train = [f"2007_{100 + i:06d}" for i in range(n_train)]
    real = _real(sizes[0]) if n_train else None
    if real is not None:
        train[0] = REAL_ID
    val = [f"2007_{200 + i:06d}" for i in range(n_val)]
    extra = [f"2008_{100 + i:06d}" for i in range(n_sbd)]
    for i, image_id in enumerate(train + val + extra):
        size = sizes[i % 2]
        if image_id == REAL_ID and real is not None:
            jpeg, mask = real
            lab = mask.copy()
            lab[lab == 255] = 0  # SBD has no void band
        else:
            img, lab = _render(i, size, seed)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            jpeg, mask = buf.getvalue(), void_band(lab)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size[0], size[1], _objects(lab)))
        if image_id in extra:  # SBD-only: the image and its GTcls .mat in SBD's layout
            (sbd / "dataset" / "img" / f"{image_id}.jpg").write_bytes(jpeg)
        else:
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
            write_mask_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
        if image_id in extra or image_id in (train[-1:] + val[-1:]):
            (sbd / "dataset" / "cls" / f"{image_id}.mat").write_bytes(_mat_bytes(lab))
    sbd_train, sbd_val = extra[: max(1, len(extra) - 1)] + train[-1:], extra[max(1, len(extra) - 1):] + val[-1:]
    for path, ids in ((voc / "ImageSets" / "Segmentation" / "train.txt", train),
                      (voc / "ImageSets" / "Segmentation" / "val.txt", val),
                      (sbd / "dataset" / "train.txt", sbd_train), (sbd / "dataset" / "val.txt", sbd_val)):
        path.write_text("".join(i + "\n" for i in sorted(ids)))
    return voc, sbd


def chain_words(work: Path, voc: Path, sbd: Path, backbone: str = "resnet18", seg_backbone: str = "resnet18",
                steps: int = 1, batch: int = 2, shard_size: int = 4, workers: int = 0, run: str = "run") -> list[str]:
    """The config words of the rehearsal chain: the voc preset except steps, batches, backbones and weights."""
    return ["data=voc", f"data.voc_root={voc}", f"data.sbd_root={sbd}", f"data.shards_dir={work / 'shards'}",
            f"data.shard_size={shard_size}", f"data.num_workers={workers}", f"run={work / run}", "method=cam",
            f"model.backbone={backbone}", "model.weights=none", f"seg.backbone={seg_backbone}", "seg.weights=none",
            *(f"{t}.train.{k}={v}" for t in ("cls", "aff", "seg")
              for k, v in (("steps", steps), ("batch_size", batch), ("ckpt_every", 0), ("log_every", 0)))]


def big_words(work: Path, voc: Path, sbd: Path, run: str = "big") -> list[str]:
    """ResNet-38d (cls, crop 448, batch 1) and DeepLab-v2 R101 (seg, crop 321, batch 2 = 2 × 1) for one step each."""
    return chain_words(work, voc, sbd, backbone="resnet38d", seg_backbone="resnet101", run=run) + [
        "cls.train.batch_size=1"]


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
        voc, sbd = make_dataset(work / "src", n_train, n_val, n_sbd, scale=scale)
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
