"""Dense CRF on class scores (psa ``tool/imutils.py``), via the optional ``pydensecrf2`` package.

psa refines its affinity-label score stacks [(1 − max CAM)^α; CAMs] with a fully connected CRF:
unary −log(scores) (``unary_from_softmax``, the stack is *not* renormalised, as psa), a Gaussian kernel
(sxy 3, compat 3), a bilateral kernel (sxy 80, srgb 13, compat 10) and 10 mean-field iterations; ``scale_factor``
divides both sxy. Install with ``pip install 'wsss-dist[crf]'``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError


def dense_crf(image: np.ndarray, scores: np.ndarray, iters: int = 10, scale_factor: float = 1.0) -> np.ndarray:
    """Mean-field marginals [C, H, W] of a dense CRF on ``scores`` [C, H, W] (> 0) and ``image`` uint8 [H, W, 3]."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ConfigError("aff.crf=true needs the dense CRF package: pip install 'wsss-dist[crf]' (pydensecrf2)") from e
    c, h, w = scores.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and scores {(h, w)} differ in size")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores.astype(np.float32))))
    d.addPairwiseGaussian(sxy=3 / scale_factor, compat=3)
    d.addPairwiseBilateral(sxy=80 / scale_factor, srgb=13, rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=10)
    return np.array(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def crf_for(image: np.ndarray, iters: int = 10) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``crf`` callable for :func:`wsss_dist.methods.affinity.affinity_labels`, bound to ``image``."""

    def refine(scores: torch.Tensor) -> torch.Tensor:
        out = dense_crf(image, scores.detach().float().cpu().numpy(), iters=iters)
        return torch.from_numpy(out).to(scores.device)

    return refine
