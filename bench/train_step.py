"""Benchmark: one full training step of the engine vs the bare forward/backward/step of the same model and batch.

    python -m bench.train_step                       # toy preset (resnet18, batch 16, crop 56), ~3 min on 2 cores
    python -m bench.train_step --methods=cam,fmix --steps=40 --repeats=5

Full step (ours): ``wsss_dist.stages.cls.train_classifier`` → ``engine.fit``: next batch of the WebDataset stream
(``data.num_workers`` DataLoader workers decoding and augmenting in the background), to device + channels_last,
per-step RNG seeding, poly lr, autocast context, the method's loss (cam: multi-label soft margin; fmix: FMix mask +
mixed loss + entropy + concentration terms), backward, optimiser step + zero_grad, loss bookkeeping, progress bar.
Its step time is the interval between consecutive calls of the loss function (stamped by a wrapper).

Bare step: the same model (``build_model``, channels_last, train mode), the same optimiser (AdamW, same groups) and
one batch of the same stream preloaded as a tensor: ``model(x)`` → multi-label soft margin → ``backward`` →
``step`` → ``zero_grad(set_to_none=True)``, in a plain loop.

Both sides run ``--steps`` steps per round, rounds interleaved (ours, bare, ours, bare, ...); the figure is the
median step time over steps ``--warmup``.. of all rounds. Prints the load average (the machine is shared); writes the
figures to ``bench/out/train_step.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import common
from bench.cls_train import make_cfg, stage_step_times  # the same toy-preset config


def full_steps(cfg, warmup: int) -> list[float]:
    """Step times (s) of ``engine.fit`` through the cls stage's own code, after ``warmup`` steps."""
    return stage_step_times(cfg, warmup)


def bare_steps(cfg, batch: dict, warmup: int) -> list[float]:
    """Step times (s) of forward / loss / backward / step / zero_grad on a preloaded batch, after ``warmup`` steps."""
    from wsss_dist.engine.optim import build_optimizer
    from wsss_dist.methods.losses import multilabel_loss
    from wsss_dist.models.build import build_classifier as build_model

    t, o = cfg.cls.train, cfg.cls.optim
    torch.manual_seed(t.seed)
    model = build_model(cfg)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model.param_groups(o.lr, o.weight_decay), o)
    x, y = batch["image"], batch["labels"]
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stamps = []
    for _ in range(t.steps):
        stamps.append(time.perf_counter())
        loss = multilabel_loss(model(x)["logits"], y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return list(np.diff(stamps[warmup:]))


def main(methods: tuple = ("cam", "fmix"), steps: int = 30, warmup: int = 5, repeats: int = 3, workers: int = 2,
         size: int = 80, n_train: int = 96, n_sbd: int = 96, shard_size: int = 24, workdir: str | None = None,
         json: str | None = None) -> None:
    """Build the data, time full and bare steps interleaved, print a table (and write it as JSON to ``json``,
    default bench/out/train_step.json)."""
    from wsss_dist import pipeline
    from wsss_dist.data.shards import load_manifest, split_urls
    from wsss_dist.data.stream import train_loader

    torch.set_num_threads(2)
    pipeline.setup_logging("WARNING")
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    fig = common.Figures("train_step", json, methods=methods, steps=steps, warmup=warmup, repeats=repeats,
                         workers=workers, size=size, n_train=n_train, n_sbd=n_sbd, shard_size=shard_size)
    with common.work_dir(workdir, "step-bench") as work:
        base = make_cfg(work, methods[0], steps, workers, size, n_train, n_sbd, shard_size)
        base.stage = "shards"
        pipeline.run(base)
        t = base.cls.train
        urls = split_urls(base.shards_dir, base.cls.split, load_manifest(base.shards_dir, verify=False))
        batch = next(train_loader(urls, batch_size=t.batch_size, crop=t.crop, resize_long=t.resize_long, seed=t.seed))
        variants = {}
        for m in methods:
            variants[m] = lambda m=m: full_steps(make_cfg(work, m, steps, workers, size, n_train, n_sbd, shard_size,
                                                          run=f"run-{m}"), warmup)
            variants[f"bare after {m}"] = lambda: bare_steps(base, batch, warmup)

        def progress(r: int, results: dict[str, list]) -> None:
            fig.say(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {1000 * common.median([x for run in v for x in run]):.0f} ms" for k, v in results.items()))

        results, loads = common.interleaved(variants, repeats, progress)
    times = {m: [x for run in results[m] for x in run] for m in methods}
    times = {"bare": [x for m in methods for run in results[f"bare after {m}"] for x in run], **times}
    bare = common.median(times["bare"])
    fig.say(f"\ntraining step, {base.model.backbone}, batch {t.batch_size}, crop {t.crop}, "
            f"channels_last={t.channels_last}, {workers} DataLoader workers, steps {warmup}..{steps} of {repeats} rounds, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
            f"load average during the runs: {min(loads):.2f}-{max(loads):.2f} (1-min), now {common.load_text()}",
            "| step | median time | vs bare | quartiles |\n|---|---|---|---|")
    fig.put("load_during", [min(loads), max(loads)])
    rows = fig.put("steps", {})
    for name, ts in times.items():
        m = common.median(ts)
        q = [1000 * x for x in common.quartiles(ts)]
        label = "bare forward/backward/step, preloaded batch" if name == "bare" else f"full step, method={name} (engine.fit)"
        rows[name] = {"median_ms": 1000 * m, "vs_bare": m / bare, "quartiles_ms": q, "steps": len(ts)}
        fig.say(f"| {label} | {1000 * m:.1f} ms | {m / bare:.2f}x | {q[0]:.1f}-{q[1]:.1f} ms |")
    fig.save()


if __name__ == "__main__":
    import fire

    fire.Fire(main)
