"""CLIP-ES's CAM stage at VOC size: its FLOPs per image (torch's FlopCounterMode, forward + the class backwards) and
its wall time against its own minimum (one image-tower forward + one block-12 backward per class, no CAA, no boxes):
python -m bench.clip_es [--classes=2] [--repeats=3] [--device=cpu] [--json PATH] (default bench/out/clip_es.json).
ViT-B-16-quickgelu with random weights: the FLOPs and times of OpenAI's weights."""
from __future__ import annotations

import time

import fire
import torch

from bench import common


def main(classes: int = 2, repeats: int = 3, device: str = "cpu", json: str | None = None,
         arch: str = "ViT-B-16-quickgelu") -> None:
    """Print TFLOP per 500×375 image with ``classes`` classes and the stage's time over its forward/backward's."""
    from wsss_dist.methods.clip_es import clip_es_cams, softmax_scores
    from wsss_dist.models.clip import RANDOM, build_clip, image_pass

    fig = common.Figures("clip_es", json, classes=classes, arch=arch, device=device)
    dev = torch.device(device)
    model = build_clip(arch, RANDOM).to(dev)
    D = model.text_projection.shape[1]
    emb = torch.nn.functional.normalize(torch.randn(20, D, device=dev), dim=-1)
    bg = torch.nn.functional.normalize(torch.randn(25, D, device=dev), dim=-1)
    x = torch.randn(1, 3, 375, 500, device=dev)
    cls = [torch.arange(classes, device=dev)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:  # the minimum: forward at the stage's input size, one block-12 backward per class
        xs = torch.nn.functional.interpolate(x, size=(384, 512), mode="bicubic", align_corners=False)
        out = image_pass(model, xs)
        s = softmax_scores(out.features, emb, bg, cls, 100.0)[0]
        for k in range(classes):
            torch.autograd.grad(s[k], out.tokens, retain_graph=k < classes - 1)
        sync()

    def stage() -> None:
        clip_es_cams(model, x, cls, emb, bg)
        sync()

    # FLOPs, counted from the shapes (torch's FlopCounterMode misses the fused attention kernel of the frozen blocks):
    # per block 24·N·C² (qkv, out, MLP) + 4·N²·C (QKᵀ, AV); the patch embedding; one block-12 backward per class
    # (activation gradients only: nothing else requires grad ≈ one block forward); CAA's R = S·S, 2·(N−1)³
    v = model.visual
    C, L, p = v.conv1.out_channels, len(v.transformer.resblocks), v.conv1.kernel_size[0]
    n = (384 // p) * (512 // p)
    N = n + 1
    block = 24 * N * C * C + 4 * N * N * C
    tflop = (L * block + 2 * n * 3 * p * p * C + classes * block + 2 * n ** 3) / 1e12
    stage(), bare()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "stage": []}
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("stage", stage)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratio = common.median(times["stage"]) / common.median(times["bare"])
    fig.say(f"{arch}, 500x375 → 512x384, {classes} classes: {tflop:.3f} TFLOP/image; stage "
            f"{common.fmt_times(times['stage'])}, its forward+backwards {common.fmt_times(times['bare'])}: "
            f"{ratio:.3f}× ({device}, {common.machine()['threads']} threads)")
    fig.put("tflop_per_image", tflop)
    fig.put("seconds", times)
    fig.put("ratio", ratio)
    fig.save()


if __name__ == "__main__":
    fire.Fire(main)
