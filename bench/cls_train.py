"""Benchmark: classifier training images/s, our stream + engine vs a JPEG-folder Dataset with a plain fp32 NCHW loop.

    python -m bench.cls_train                         # toy preset (resnet18, batch 16, crop 56), ~3 min on 2 cores
    python -m bench.cls_train --method=fmix --steps=40 --repeats=5 --workdir=/tmp/cls-bench

Data: the toy dataset (``--n_train`` + ``--n_sbd`` images of ~``--size`` px), its JPEG files in the VOC layout
(``JPEGImages/*.jpg``) and the same images packed into WebDataset shards (``--shard_size`` per shard).
Config: the toy preset (resnet18, OS 8, batch 16, random long side 48-88, crop 56, colour jitter, flip;
AdamW lr 2e-3, poly schedule), ``data.num_workers`` DataLoader workers (``--workers``, default 2) on both sides.

Timed, interleaved (ours, reference, ours, reference, ...), ``--repeats`` rounds of ``--steps`` steps each:
  * ours:      ``wsss_dist.stages.cls.train_classifier`` → ``engine.fit`` over ``data.stream.train_loader``
               (tar shards, deterministic per-sample RNG, ``augment``), channels_last, the ``--method`` loss
               (cam: multi-label soft margin; fmix: FMix mask, mixed loss, entropy + concentration terms).
  * reference: psa/irn's way: a ``torch.utils.data.Dataset`` reading ``JPEGImages/<id>.jpg`` with PIL and the
               same ``augment`` (same crop, resize, flip, jitter), ``DataLoader(shuffle=True, drop_last=True)``,
               the same model and optimiser in fp32 NCHW, and a plain loop: poly lr, forward, the same loss,
               ``zero_grad``, ``backward``, ``step``.
Images/s is measured from the start of step ``--warmup`` to the start of the last step (time stamps taken in the
loss function on our side, when the batch arrives in the loop on the reference side), so process start, worker start-up and the end checkpoint are out.
Prints the load average (the machine is shared) with the figures; writes them to ``bench/out/cls_train.json`` (or
``--json PATH``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench import common


def make_cfg(work: Path, method: str, steps: int, workers: int, size: int, n_train: int, n_sbd: int, shard_size: int,
             run: str = "run"):
    """The toy-preset config of the bench (data in ``work``)."""
    from wsss_dist.config import make_config

    return make_config([f"data.toy.root={work / 'src'}", f"data.shards_dir={work / 'shards'}", f"data.toy.size={size}",
                        f"data.toy.n_train={n_train}", f"data.toy.n_val=8", f"data.toy.n_sbd={n_sbd}",
                        f"data.shard_size={shard_size}", f"data.num_workers={workers}", f"method={method}",
                        f"cls.train.steps={steps}", f"cls.train.ckpt_every={10 * steps}", f"cls.train.log_every={steps}",
                        f"run={work / run}", "log_level=WARNING"])


class JpegFolder(torch.utils.data.Dataset):
    """The references' dataset: (image, labels) from ``JPEGImages/<id>.jpg`` with the same augmentation as ours."""

    def __init__(self, source, ids: list[str], crop: int, resize_long: tuple[int, int], seed: int = 0) -> None:
        self.paths = [str(source.jpeg_path(i)) for i in ids]
        self.labels = [torch.from_numpy(source.labels(i).astype(np.float32)) for i in ids]
        self.crop, self.resize_long, self.seed = crop, resize_long, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        from wsss_dist.data.stream import augment

        img = np.asarray(Image.open(self.paths[i]).convert("RGB"))
        rng = np.random.default_rng((self.seed, i, int(torch.randint(0, 2**31, ()))))
        x, _ = augment(img, None, rng, self.crop, self.resize_long)
        return x, self.labels[i]


def stage_step_times(cfg, warmup: int) -> list[float]:
    """Step times (s) of the cls stage's own training (``train_classifier`` → ``engine.fit``) after ``warmup`` steps,
    stamped at each call of the loss function."""
    from wsss_dist.stages import cls as cls_stage

    stamps: list[float] = []
    real = cls_stage.make_loss

    def timed_make_loss(cfg, sub_labels=None):
        fn = real(cfg, sub_labels)

        def loss_fn(model, batch, step):
            stamps.append(time.perf_counter())
            return fn(model, batch, step)

        return loss_fn

    out = cfg.run_dir / "cls"
    shutil.rmtree(out, ignore_errors=True)
    cls_stage.make_loss = timed_make_loss
    try:
        cls_stage.train_classifier(cfg, out)
    finally:
        cls_stage.make_loss = real
    return list(np.diff(stamps[warmup:]))


def run_ours(cfg, warmup: int) -> float:
    """Train ``cfg.cls.train.steps`` steps with the stage's own code; images/s after ``warmup`` steps."""
    steps = stage_step_times(cfg, warmup)
    return cfg.cls.train.batch_size * len(steps) / float(np.sum(steps)) if steps else float("nan")


def run_reference(cfg, source, ids: list[str], warmup: int) -> float:
    """The plain loop (fp32, NCHW) for ``cfg.cls.train.steps`` steps; images/s after ``warmup`` steps."""
    from wsss_dist.engine.optim import poly_lr
    from wsss_dist.methods import losses, mixing
    from wsss_dist.models.build import build_classifier as build_model

    t, o = cfg.cls.train, cfg.cls.optim
    torch.manual_seed(t.seed)
    model = build_model(cfg).train()
    # the references' optimiser: torch's default implementation (no fused kernels), same groups and settings
    groups = [{**g, "lr": o.lr * g.get("lr_mult", 1.0)} for g in model.param_groups(o.lr, o.weight_decay)]
    opt = (torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay) if o.name == "adamw" else
           torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay))
    base = [g["lr"] for g in opt.param_groups]
    ds = JpegFolder(source, ids, t.crop, t.resize_long, t.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    stamps, step = [], 0
    c = cfg.cls
    while step < t.steps:
        for x, y in loader:
            stamps.append(time.perf_counter())
            for g, b in zip(opt.param_groups, base):
                g["lr"] = poly_lr(step, t.steps, b, o.poly_power, o.warmup_steps)
            if cfg.method == "fmix":
                mix = mixing.fmix(x, alpha=c.fmix_alpha, decay_power=c.fmix_decay)
                out = model(mix.x)
                logits = out["logits"]
                loss = (losses.mixed_loss(losses.multilabel_loss, logits, y, mix) + c.ent_weight * losses.entropy_loss(logits)
                        + c.con_weight * losses.mixed_loss(losses.concentration_loss, out["cams"], y, mix))
            else:
                loss = losses.multilabel_loss(model(x)["logits"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == t.steps:
                break
    steps = np.diff(stamps[warmup:])
    return t.batch_size * len(steps) / float(np.sum(steps))


def main(method: str = "cam", steps: int = 30, warmup: int = 5, repeats: int = 3, workers: int = 2, size: int = 80,
         n_train: int = 96, n_sbd: int = 96, shard_size: int = 24, workdir: str | None = None,
         json: str | None = None) -> None:
    """Build the data, time both sides interleaved, print a table (and write it as JSON to ``json``, default
    bench/out/cls_train.json)."""
    from wsss_dist import pipeline
    from wsss_dist.data.shards import load_manifest, split_ids
    from wsss_dist.data.toy import generate
    from wsss_dist.data.voc import VOCSource

    torch.set_num_threads(2)
    pipeline.setup_logging("WARNING")
    fig = common.Figures("cls_train", json, method=method, steps=steps, warmup=warmup, repeats=repeats, workers=workers,
                         size=size, n_train=n_train, n_sbd=n_sbd, shard_size=shard_size)
    with common.work_dir(workdir, "cls-bench") as work:
        cfg = make_cfg(work, method, steps, workers, size, n_train, n_sbd, shard_size)
        cfg.stage = "shards"
        pipeline.run(cfg)
        src = VOCSource(*generate(Path(cfg.data.toy.root), cfg.data.toy))  # the toy files: already there
        ids = split_ids(load_manifest(cfg.shards_dir, verify=False), cfg.cls.split)

        def progress(r: int, results: dict[str, list]) -> None:
            fig.say(f"  round {r + 1}/{repeats}: ours {results['ours'][-1]:.1f} img/s, "
                    f"reference {results['reference'][-1]:.1f} img/s")

        results, loads = common.interleaved({"ours": lambda: run_ours(cfg, warmup),
                                             "reference": lambda: run_reference(cfg, src, ids, warmup)}, repeats, progress)
    ref = common.median(results["reference"])
    t = cfg.cls.train
    fig.say(f"\ncls training, method={method}, {cfg.model.backbone}, batch {t.batch_size}, crop {t.crop}, "
            f"resize_long {t.resize_long}, {workers} DataLoader workers, {len(ids)} images of ~{size} px, steps "
            f"{warmup}..{steps} timed, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
            f"load average during the runs: {min(loads):.2f}-{max(loads):.2f} (1-min), now {common.load_text()}",
            "| variant | median images/s | vs reference | all rounds (img/s) |\n|---|---|---|---|")
    fig.put("load_during", [min(loads), max(loads)])
    rows = fig.put("variants", {})
    for name, label in (("ours", "ours (shards + stream + engine.fit, channels_last)"),
                        ("reference", "reference (JPEG folder Dataset, fp32 NCHW loop)")):
        m = common.median(results[name])
        rows[name] = {"median_images_per_s": m, "vs_reference": m / ref, "rounds": results[name]}
        fig.say(f"| {label} | {m:.1f} | {m / ref:.2f}x | {' '.join(f'{v:.1f}' for v in results[name])} |")
    fig.save()


if __name__ == "__main__":
    import fire

    fire.Fire(main)
