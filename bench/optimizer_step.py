"""Optimiser step time on a resnet18's parameters: PyTorch's default (per-tensor loop) vs foreach vs fused.

Prints ms per step for AdamW and SGD (momentum 0.9). The engine builds fused optimisers (wsss_dist.engine.optim).
Usage: python bench/optimizer_step.py [--repeats=20]
"""
from __future__ import annotations

import os
import time

import fire
import timm
import torch


def main(repeats: int = 20) -> None:
    """Time ``repeats`` steps of each variant, interleaved, and print the medians."""
    model = timm.create_model("resnet18")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    variants = {f"{name} {kind}": (cls, kw) for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD))
                for kind, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    opts = {k: cls(params, lr=1e-3, weight_decay=1e-4, **({"momentum": 0.9} if cls is torch.optim.SGD else {}), **kw)
            for k, (cls, kw) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(repeats):
        for k, o in opts.items():
            t = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t)
    print(f"resnet18 ({sum(p.numel() for p in params) / 1e6:.1f} M parameters), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print("| optimiser | ms / step (median) |\n|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {sorted(ts)[len(ts) // 2] * 1000:.1f} |")


if __name__ == "__main__":
    fire.Fire(main)
