"""Optimiser step time on a resnet18's parameters: PyTorch's default (per-tensor loop) vs foreach vs fused.

Prints ms per step for AdamW and SGD (momentum 0.9). The engine builds fused optimisers (wsss_dist.engine.optim).
Usage: python -m bench.optimizer_step [--repeats=20] [--json PATH] (default bench/out/optimizer_step.json)
"""
from __future__ import annotations

import time

import fire
import timm
import torch

from bench import common


def main(repeats: int = 20, json: str | None = None) -> None:
    """Time ``repeats`` steps of each variant, interleaved, and print the medians (and write them as JSON to ``json``,
    default bench/out/optimizer_step.json)."""
    fig = common.Figures("optimizer_step", json, repeats=repeats)
    model = timm.create_model("resnet18")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    variants = {f"{name} {kind}": (cls, kw) for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD))
                for kind, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    opts = {k: cls(params, lr=1e-3, weight_decay=1e-4, **({"momentum": 0.9} if cls is torch.optim.SGD else {}), **kw)
            for k, (cls, kw) in variants.items()}

    def timed_step(o: torch.optim.Optimizer):
        def step() -> float:
            t = time.perf_counter()
            o.step()
            return time.perf_counter() - t
        return step

    times, _ = common.interleaved({k: timed_step(o) for k, o in opts.items()}, repeats)
    fig.say(f"resnet18 ({sum(p.numel() for p in params) / 1e6:.1f} M parameters), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load {common.load_average()[0]:.1f}",
            "| optimiser | ms / step (median) |\n|---|---|")
    rows = fig.put("ms_per_step", {})
    for k, ts in times.items():
        rows[k] = 1000 * common.median(ts)
        fig.say(f"| {k} | {rows[k]:.1f} |")
    fig.save()


if __name__ == "__main__":
    fire.Fire(main)
