"""How fast this machine is right now, in the units the test suite spends: a fresh interpreter importing torch and
timm (every stage job and CLI call pays it), a pure-Python loop, and one-thread resnet18 forward passes at toy size.

Run it before and after a suite timing (the same box's speed varies between runs: the suite's sum of test times
differed 1.3× between two quiet runs of the same tree) so that two suite times are compared with their machine's
speed beside them. Usage: python -m bench.cpu_speed [--repeats=3] [--json PATH] (default bench/out/cpu_speed.json)
"""
from __future__ import annotations

import subprocess
import sys
import time

import fire

from bench import common


def _import_torch_timm() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, timm"], check=True, capture_output=True)
    return time.perf_counter() - t


def _python_loop() -> float:
    t = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return time.perf_counter() - t


def _resnet18_forward() -> float:
    import timm
    import torch

    torch.set_num_threads(1)
    model = timm.create_model("resnet18", num_classes=20).eval()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        model(x)  # warm-up
        t = time.perf_counter()
        for _ in range(10):
            model(x)
    return time.perf_counter() - t


def main(repeats: int = 3, json: str | None = None) -> None:
    """Time each probe ``repeats`` times, interleaved; print and record the medians in seconds."""
    fig = common.Figures("cpu_speed", json, repeats=repeats)
    probes = {"import torch+timm (fresh process)": _import_torch_timm, "python loop (3 M steps)": _python_loop,
              "resnet18 forward, 1 thread (10 x 8 x 64 px)": _resnet18_forward}
    times, _ = common.interleaved(probes, repeats)
    fig.say(f"load {common.load_average()[0]:.1f}", "| probe | s (median) |\n|---|---|")
    for name, values in times.items():
        fig.put(name, common.median(values))
        fig.say(f"| {name} | {common.median(values):.2f} |")
    fig.save()


if __name__ == "__main__":
    fire.Fire(main)
