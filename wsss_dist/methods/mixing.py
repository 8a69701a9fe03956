"""Input / feature mixing for Mixup-CAM, FMix-CAM and Manifold-Mixup-CAM.

All three share :class:`MixResult` (mixed input, permutation ``index``, weight ``lam``): the loss is
``lam · L(y) + (1 − lam) · L(y[index])`` (see :func:`wsss_dist.methods.losses.mixed_loss`).
One λ and one permutation per batch (one FMix mask per batch, broadcast over samples and channels).

Randomness comes from an optional ``torch.Generator`` (else torch's global RNG), so a seeded
generator reproduces every draw. λ ~ Beta(α, α) is drawn with NumPy's Beta sampler seeded from that
generator (torch's Beta distribution takes no generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MixResult:
    """A mixed batch: ``x`` (the model input), ``index`` (partner of each sample), ``lam`` (weight of the original)."""

    x: Tensor
    index: Tensor
    lam: float


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_lam(alpha: float, generator: torch.Generator | None = None) -> float:
    """λ ~ Beta(α, α), reproducible from ``generator``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_device(generator)).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def sample_permutation(n: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """A random permutation of ``range(n)`` (int64) on ``device``."""
    perm = torch.randperm(n, generator=generator, device=_device(generator))
    return perm if device is None else perm.to(device)


def mixup(x: Tensor, alpha: float = 0.2, generator: torch.Generator | None = None) -> MixResult:
    """Mixup: ``lam·x + (1−lam)·x[index]`` with one λ ~ Beta(α, α) per batch."""
    lam = sample_lam(alpha, generator)
    index = sample_permutation(x.shape[0], generator, x.device)
    return MixResult(lam * x + (1.0 - lam) * x[index], index, lam)


def fmix_mask(shape: tuple[int, int], alpha: float = 1.0, decay_power: float = 3.0,
              generator: torch.Generator | None = None) -> tuple[float, Tensor]:
    """FMix mask: (λ, {0,1} float mask of ``shape`` whose mean is λ to within half a pixel).

    Complex Gaussian noise on the rfft grid of ``shape`` is scaled by 1 / max(f, 1/max(H, W))^δ
    (f = radial frequency from ``fftfreq``/``rfftfreq``), brought back with an inverse real FFT; the
    ``round(λ·N)`` largest pixels (ties: lower flat index first) become 1. FMix draws ⌈λN⌉ or ⌊λN⌋
    by a coin flip; rounding to the nearest count keeps |mean − λ| ≤ 1/(2N) and is deterministic.
    The mask lives on the generator's device (CPU without a generator).
    """
    h, w = int(shape[0]), int(shape[1])
    dev = _device(generator)
    fy = torch.fft.fftfreq(h, device=dev)[:, None]
    fx = torch.fft.rfftfreq(w, device=dev)[None, :]
    freq = torch.sqrt(fy**2 + fx**2)
    scale = 1.0 / freq.clamp(min=1.0 / max(h, w)) ** decay_power
    real = torch.randn(freq.shape, generator=generator, device=dev)
    imag = torch.randn(freq.shape, generator=generator, device=dev)
    spectrum = torch.complex(real * scale, imag * scale)
    grey = torch.fft.irfftn(spectrum, s=(h, w))
    lam = sample_lam(alpha, generator)
    n = h * w
    k = min(n, max(0, math.floor(lam * n + 0.5)))
    order = torch.argsort(grey.flatten(), descending=True, stable=True)
    mask = torch.zeros(n, device=dev)
    mask[order[:k]] = 1.0
    return lam, mask.view(h, w)


def fmix(x: Tensor, alpha: float = 1.0, decay_power: float = 3.0,
         generator: torch.Generator | None = None) -> MixResult:
    """FMix: ``mask·x + (1−mask)·x[index]`` with one low-frequency mask per batch (size of ``x``'s H×W)."""
    lam, mask = fmix_mask(tuple(x.shape[-2:]), alpha, decay_power, generator)  # type: ignore[arg-type]
    mask = mask.to(device=x.device, dtype=x.dtype)
    index = sample_permutation(x.shape[0], generator, x.device)
    return MixResult(mask * x + (1.0 - mask) * x[index], index, lam)


def manifold_mix_fn(index: Tensor, lam: float) -> Callable[[Tensor], Tensor]:
    """A function mixing hidden features: ``h ↦ lam·h + (1−lam)·h[index]`` (for ``Backbone.forward(mix_fn=)``)."""

    def mix(h: Tensor) -> Tensor:
        return lam * h + (1.0 - lam) * h[index.to(h.device)]

    return mix


def sample_layer(num_stages: int, generator: torch.Generator | None = None) -> int:
    """Mixing point uniformly in {0 (input), 1, …, num_stages−1 (after stage num_stages−1)}."""
    return int(torch.randint(0, num_stages, (1,), generator=generator, device=_device(generator)).item())


def manifold_mixup(x: Tensor, num_stages: int, alpha: float = 0.2, generator: torch.Generator | None = None
                   ) -> tuple[MixResult, int, Callable[[Tensor], Tensor]]:
    """Draw (layer, λ, permutation) for manifold mixup.

    Returns ``(mix, mix_at, mix_fn)``: ``mix.x`` is the *unmixed* input (mixing happens inside the
    backbone: ``model(mix.x, mix_at=mix_at, mix_fn=mix_fn)``), ``mix.index``/``mix.lam`` weight the loss.
    """
    mix_at = sample_layer(num_stages, generator)
    lam = sample_lam(alpha, generator)
    index = sample_permutation(x.shape[0], generator, x.device)
    return MixResult(x, index, lam), mix_at, manifold_mix_fn(index, lam)


__all__ = ["MixResult", "mixup", "fmix", "fmix_mask", "manifold_mix_fn", "manifold_mixup", "sample_lam",
           "sample_layer", "sample_permutation"]
