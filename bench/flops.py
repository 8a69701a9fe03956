"""Model FLOPs per image, counted with torch's FlopCounterMode (forward; training ≈ 3× forward), and the GPU time
they imply: python -m bench.flops [--peak_tflops=989] [--mfu=0.4] [--json PATH] (default bench/out/flops.json)."""
from __future__ import annotations

import fire
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import common


def forward_flops(model: torch.nn.Module, *shape: int) -> float:
    """FLOPs of one forward pass on a zero input of ``shape`` (batch 1)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *shape))
    return float(fc.get_total_flops())


def main(peak_tflops: float = 989.0, mfu: float = 0.4, json: str | None = None) -> None:
    """Print TFLOP per image for each stage's model and the images/s one GPU reaches at ``mfu`` of ``peak_tflops``
    (and write them as JSON to ``json``, default bench/out/flops.json)."""
    from wsss_dist.models import create_model

    fig = common.Figures("flops", json, peak_tflops=peak_tflops, mfu=mfu)

    rate = peak_tflops * mfu
    rows = []
    cam = create_model("cam", "resnet38d", num_classes=20).eval()
    train38 = 3 * forward_flops(cam, 3, 448, 448) / 1e12
    rows.append(("cls / aff train, ResNet-38d, 448 crop", train38))
    ms = sum(2 * forward_flops(cam.backbone, 3, round(375 * s), round(500 * s)) for s in (1.0, 0.5, 1.5, 2.0)) / 1e12
    rows.append(("cam, ResNet-38d, 500x375, 4 scales + flip", ms))
    deeplab = create_model("deeplab", "resnet101", num_classes=21).eval()
    rows.append(("seg train, DeepLab-v2 R101, 321 crop", 3 * forward_flops(deeplab, 3, 321, 321) / 1e12))
    rows.append(("eval, DeepLab-v2 R101, 500x375, 3 scales", sum(
        forward_flops(deeplab, 3, round(375 * s), round(500 * s)) for s in (1.0, 0.75, 0.5)) / 1e12))
    fig.say(f"{'model':<46} {'TFLOP/img':>9} {'img/s @ ' + str(mfu) + ' of ' + str(peak_tflops) + ' TFLOP/s':>26}")
    out = fig.put("models", {})
    for name, tf in rows:
        out[name] = {"tflop_per_image": tf, "images_per_s": rate / tf}
        fig.say(f"{name:<46} {tf:9.2f} {rate / tf:26.1f}")
    fig.save()


if __name__ == "__main__":
    fire.Fire(main)
