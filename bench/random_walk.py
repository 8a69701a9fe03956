"""Benchmark: sparse random walk vs psa's dense matrix powers (prints figures; not a test).

    python -m bench.random_walk                       # all cases, ~2 min on 2 quiet CPU cores
    python -m bench.random_walk --runs 5 --rounds 2   # more timing repeats, variants interleaved twice
    python -m bench.random_walk --threads 1           # 1 thread everywhere (less sensitive to a busy machine)
    python -m bench.random_walk --json /tmp/walk.json # the figures there (default bench/out/random_walk.json)

Each variant runs in a fresh subprocess: once its inputs exist, the kernel's peak-RSS
counter is reset (/proc/self/clear_refs, else ru_maxrss is used) and the figure is the
peak RSS during the runs minus the RSS at that point (tracemalloc cannot see torch).
Time is the median of --runs calls. Inputs are a synthetic scene (a few regions with
their own feature vector plus noise, CAM-like blobs), seeded, identical in every child.

(a) 56×56 feature map (448-px crop), D = 448, 21 score channels: dense (psa: n×n
    matrix, ^β, column-normalised, squared logt = 8 times, float32) vs sparse, with
    both backends of random_walk side by side: "torch" (eager stencil) and "native"
    (compiled C++ kernel; its first call in a process, which loads the cached library,
    is reported separately, and once the cold build into an empty cache directory).
    Two score stacks: "psa-like" (background + the image's 2 classes, the other 18
    channels zero, as psa's infer_aff builds them) and "all-21" (every channel non-zero).
(b) 1024×1024 image → 128×128 map, sparse only: propagate_labels end to end
    (bg, pool, walk, upsample, argmax) and random_walk alone.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import common
from wsss_dist.methods.random_walk import (
    native_available,
    propagate_labels,
    random_walk,
    random_walk_dense,
)

DIM = 448


def scene(h: int, w: int, num_live: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [DIM, h, w], 21-channel scores [21, h, w] (bg first) and region map of a toy scene."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    region = torch.zeros(h, w, dtype=torch.long)
    cams = torch.zeros(20, h, w)
    classes = torch.randperm(20, generator=g)[:2]
    for i, c in enumerate(classes.tolist()):
        u = torch.rand(4, generator=g)
        cy, cx, ry, rx = (u * torch.tensor([0.5, 0.5, 0.25, 0.25]) + torch.tensor([0.25, 0.25, 0.15, 0.15])).tolist()
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        region[inside < 1] = i + 1
        cams[c] = torch.clamp(1.2 - inside, min=0) * (0.7 + 0.3 * torch.rand(h, w, generator=g))
    cams /= cams.amax((1, 2), keepdim=True) + 1e-5
    if num_live > 3:  # every class channel non-zero (worst case for the walk)
        cams = torch.where(cams > 0, cams, 0.02 + 0.1 * torch.rand(20, h, w, generator=g))
    bg = (1 - cams.amax(0)) ** 16
    centres = torch.rand(3, DIM, generator=g)
    features = centres[region].permute(2, 0, 1) + 0.15 * torch.randn(DIM, h, w, generator=g)
    return features.contiguous(), torch.cat([bg[None], cams]), classes + 1


def _status_mib(key: str) -> float:
    """A memory figure (VmRSS, VmHWM) of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_baseline() -> tuple[float, bool]:
    """Reset the peak-RSS counter if the kernel allows it; return (baseline MiB, reset ok)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return _status_mib("VmRSS"), True
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False


def peak_above(base: float, reset_ok: bool) -> float:
    """Peak RSS since memory_baseline() minus the baseline, in MiB."""
    peak = _status_mib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - base


def child(args: argparse.Namespace) -> None:
    """Run one variant, print JSON (times, peak memory delta), save labels to args.out."""
    torch.set_num_threads(args.threads)
    if args.case == "a":
        features, scores, _ = scene(56, 56, args.live, seed=0)
        if args.variant == "dense":

            def run():
                return random_walk_dense(scores, features, radius=5, beta=8, logt=8).argmax(0)
        else:
            backend = args.variant.split("-")[1]  # sparse-torch | sparse-native

            def run():
                return random_walk(scores, features, radius=5, beta=8, logt=8, backend=backend).argmax(0)
    else:
        features, scores, classes = scene(128, 128, args.live, seed=1)
        k = 20 if args.live > 3 else 2
        chans = scores[1:] if k == 20 else scores[classes]
        cams = F.interpolate(chans[None], size=(1024, 1024), mode="bilinear", align_corners=False)[0]
        cls_ids = torch.arange(1, 21) if k == 20 else classes
        if args.variant == "propagate":

            def run():
                return propagate_labels(cams, cls_ids, features)
        else:
            walk_scores = scores if k == 20 else scores[torch.cat([torch.zeros(1, dtype=torch.long), classes])]

            def run():
                return random_walk(walk_scores, features).argmax(0)
    t0 = time.perf_counter()
    if "native" in args.variant or args.case == "b":
        native_available()  # loads (or, in an empty cache, builds) the kernel: timed apart from the calls
    load_s = time.perf_counter() - t0
    base, reset_ok = memory_baseline()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        labels = run()
        times.append(time.perf_counter() - t0)
    np.save(args.out, labels.numpy())
    common.print_result({"median_s": statistics.median(times), "times": times, "peak_mib": peak_above(base, reset_ok),
                         "load_s": load_s})


def launch(variant: str, case: str, live: int, runs: int, out: Path, threads: int, env: dict | None = None) -> dict:
    """Run one variant in a fresh interpreter and parse its RESULT line."""
    return common.run_child("bench.random_walk", [
        "--child", "--variant", variant, "--case", case, "--threads", str(threads), "--live", str(live), "--runs",
        str(runs), "--out", str(out)], env=env)


def main() -> None:
    """Run all variants and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="times to repeat the interleaved variants of (a)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every variant (native kernel: the same)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="sparse", help=argparse.SUPPRESS)
    p.add_argument("--case", default="a", help=argparse.SUPPRESS)
    p.add_argument("--live", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="where to write the figures (default bench/out/random_walk.json)")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    fig = common.Figures("random_walk", args.json, runs=args.runs, rounds=args.rounds, threads=args.threads)
    fig.say(f"torch {torch.__version__}, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"load average {common.load_text()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fig.say("\n(a) 56x56 map, D=448, 21 channels, radius 5, beta 8, logt 8, float32")
        cold = launch("sparse-native", "a", 3, 1, tmp / "cold.npy", args.threads,
                      env=common.child_env(TORCH_EXTENSIONS_DIR=str(tmp / "ext")))
        fig.put("native_cold_build_s", cold["load_s"])
        fig.say(f"  native kernel build into an empty cache (once per source and CPU): {cold['load_s']:.2f} s")
        res: dict[tuple[str, int], list[dict]] = {}
        labels: dict[tuple[str, int], np.ndarray] = {}
        for r in range(args.rounds):  # variants interleaved, each in its own process
            for live in (3, 21):
                for variant in ("dense", "sparse-torch", "sparse-native"):
                    out = tmp / f"{variant}-{live}.npy"
                    runs = 1 if variant == "dense" and live != 3 else args.runs  # dense time does not depend on the scores
                    res.setdefault((variant, live), []).append(launch(variant, "a", live, runs, out, args.threads))
                    labels[variant, live] = np.load(out)
        dense_t = [t for live in (3, 21) for x in res["dense", live] for t in x["times"]]
        dense_mem = max(x["peak_mib"] for live in (3, 21) for x in res["dense", live])
        dense_med = statistics.median(dense_t)
        fig.put("a_dense", {"times_s": dense_t, "peak_mib": dense_mem})
        fig.say(f"  dense (psa)            : {common.fmt_times(dense_t)}, peak +{dense_mem:.0f} MiB")
        for live, name in ((3, "psa-like: bg + 2 classes live"), (21, "worst case: all 21 channels live")):
            fig.say(f"  {name}")
            for variant in ("sparse-torch", "sparse-native"):
                times = [t for x in res[variant, live] for t in x["times"]]
                mem = max(x["peak_mib"] for x in res[variant, live])
                agree = (labels[variant, live] == labels["dense", live]).mean() * 100
                first = ", ".join(f"{x['load_s'] * 1000:.0f}" for x in res[variant, live])
                extra = f", library load {first} ms" if variant == "sparse-native" else ""
                fig.put(f"a_{variant}_live{live}", {"times_s": times, "peak_mib": mem, "labels_equal_pct": agree,
                                                     "speedup": dense_med / statistics.median(times),
                                                     "load_s": [x["load_s"] for x in res[variant, live]]})
                fig.say(f"    {variant:14s}: {common.fmt_times(times)}, peak +{mem:.1f} MiB -> "
                        f"{dense_med / statistics.median(times):.1f}x faster, {dense_mem / max(mem, 0.1):.0f}x less "
                        f"memory, labels {agree:.3f}% equal{extra}")
        fig.say("\n(b) 1024x1024 image -> 128x128 map, sparse only")
        for live, name in ((3, "2 classes"), (21, "20 classes")):
            for variant in ("propagate", "walk"):
                r = launch(variant, "b", live, args.runs, tmp / "b.npy", args.threads)
                what = "propagate_labels" if variant == "propagate" else "random_walk     "
                fig.put(f"b_{variant}_live{live}", {"times_s": r["times"], "peak_mib": r["peak_mib"]})
                fig.say(f"  {what} ({name}, backend auto): {common.fmt_times(r['times'])}, peak +{r['peak_mib']:.0f} MiB")
        fig.say(f"\nload average at the end: {common.load_text()}")
    fig.save()

if __name__ == "__main__":
    main()
