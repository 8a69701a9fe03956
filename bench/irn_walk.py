"""Benchmark: IRN's walk vs AffinityNet's at VOC size, and deeplab-pytorch's dense CRF per image (prints figures).

    python -m bench.irn_walk                  # 5 interleaved rounds, torch's thread count
    python -m bench.irn_walk --runs 9 --threads 2

One VOC-size image (500×375), a synthetic scene (regions + CAM-like blobs of 2 classes), seeded:

* psa: :func:`~wsss_dist.methods.random_walk.propagate_labels` on 448-d features at stride 8 (63×47 nodes), radius 5,
  β 8, 2^8 steps — stage pseudo with ``refine=psa`` after the network.
* irn: :func:`~wsss_dist.methods.irn.propagate_irn` on a boundary map at stride 4 (125×94 nodes, 4× psa's), radius 5,
  β 10, 2^8 steps (path maxima, A^β, the same native walk) — stage pseudo with ``refine=irn`` after the network.
* crf: :func:`~wsss_dist.methods.crf.crf_predictions` on 21-class probabilities at 500×375, deeplab-pytorch's
  parameters, one process (stage eval runs ``eval.crf_workers`` of them in parallel); skipped without pydensecrf2.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import common
from wsss_dist.methods.irn import propagate_irn
from wsss_dist.methods.random_walk import native_available, propagate_labels

H, W = 375, 500


def scene(seed: int = 0) -> dict:
    """Regions, 2 classes' CAMs, psa features (stride 8), an IRN boundary map (stride 4), 21-class probabilities."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    region = ((yy - 150) ** 2 + (xx - 160) ** 2 < 90 ** 2).long() + 2 * ((yy - 230) ** 2 + (xx - 360) ** 2 < 100 ** 2).long()
    region = region.clamp(max=2)
    cams = torch.stack([(region == k).float() for k in (1, 2)])
    cams = F.avg_pool2d(cams[None], 31, 1, 15)[0] + 0.05 * torch.rand(2, H, W, generator=g)
    cams = cams / cams.amax((1, 2), keepdim=True)
    small = F.interpolate(region[None, None].float(), size=(-(-H // 8), -(-W // 8)), mode="nearest")[0, 0].long()
    codes = torch.rand(3, 448, generator=g) * 3
    feats = codes[small].permute(2, 0, 1) + 0.1 * torch.rand(448, *small.shape, generator=g)
    r4 = F.interpolate(region[None, None].float(), size=(-(-H // 4), -(-W // 4)), mode="nearest")[0, 0]
    edge = (F.max_pool2d(r4[None, None], 3, 1, 1) != -F.max_pool2d(-r4[None, None], 3, 1, 1))[0, 0].float()
    boundary = (0.9 * edge + 0.05 * torch.rand(edge.shape, generator=g)).clamp(0, 1)
    logits = torch.randn(21, H, W, generator=g) * 0.5
    logits[0] += 2 * (region == 0).float()
    logits[5] += 2 * (region == 1).float()
    logits[12] += 2 * (region == 2).float()
    probs = torch.softmax(F.avg_pool2d(logits[None], 15, 1, 7)[0] * 2, 0).numpy()
    rgb = np.stack([(region.numpy() * 90 + 30) % 256] * 3, -1).astype(np.uint8)
    return {"cams": cams, "classes": torch.tensor([5, 12]), "feats": feats, "boundary": boundary, "probs": probs,
            "rgb": rgb}


def main() -> None:
    """Time the three variants interleaved; print medians and write bench/out/irn_walk.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = scene()
    fig = common.Figures("irn_walk", args.json, runs=args.runs, threads=torch.get_num_threads())
    fig.say(f"VOC size {W}x{H}; native walk: {native_available()}; threads {torch.get_num_threads()}; "
            f"load {common.load_text()}")

    def timed(fn):
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    variants = {
        "psa walk (stride 8, 63x47)": timed(lambda: propagate_labels(s["cams"], s["classes"], s["feats"], alpha=16,
                                                                        beta=8, logt=8, radius=5, stride=8)),
        "irn walk (stride 4, 125x94)": timed(lambda: propagate_irn(s["cams"], s["classes"], s["boundary"], beta=10,
                                                                      logt=8, radius=5, bg_threshold=0.25)),
    }
    if importlib.util.find_spec("pydensecrf") is not None:
        from wsss_dist.methods.crf import crf_predictions

        variants["crf (21 classes, 500x375, 1 process)"] = timed(lambda: crf_predictions(s["rgb"], s["probs"]))
    for fn in variants.values():  # warm-up: kernel load, caches
        fn()
    results, loads = common.interleaved(variants, args.runs)
    label = propagate_irn(s["cams"], s["classes"], s["boundary"])
    fig.put("irn_label_classes", sorted(label.unique().tolist()))
    for name, times in results.items():
        fig.say(f"{name:40s} {common.fmt_times(times)}")
        fig.put(name, {"median_s": common.median(times), "times": times})
    fig.put("load_during", loads)
    fig.say(f"load {common.load_text()}")
    fig.save()


if __name__ == "__main__":
    main()
