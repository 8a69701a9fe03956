"""Dense CRFs via the optional ``pydensecrf2`` package: psa's on affinity-label scores, deeplab-pytorch's on final
predictions (:func:`crf_predictions`, notes §14) and on pseudo labels (:func:`crf_labels`, ``pseudo.crf``).

Pseudo labels (``pseudo.crf=true``): deeplab-pytorch's kernels on the image, unary from the labels as irn's label
CRF has it (``gt_prob`` 0.7 on the label, the rest spread over the image's other labels), labels restricted to
background + the image's classes. All CRFs here run one mean-field body (:func:`_mean_field`).

Final predictions (``eval.crf=true``, deeplab-pytorch ``libs/utils/crf.py``): unary −log(max(p, 1e-5)) of the
softmax of the logits at the image size, a Gaussian kernel (POS_W 3, POS_XY_STD 1), a bilateral kernel (BI_W 4,
BI_XY_STD 67, BI_RGB_STD 3), 10 mean-field iterations, argmax. Its image is the RGB image (``crf_image=rgb``);
deeplab-pytorch (and CLIP-ES) hand it the mean-subtracted BGR image cast to uint8, whose negative values wrap
around (false colour edges where a channel crosses its mean): ``crf_image=deeplab_pytorch_wrap`` reproduces that.

Dense CRF on class scores (psa ``tool/imutils.py``):

psa refines its affinity-label score stacks [(1 − max CAM)^α; CAMs] with a fully connected CRF:
unary −log(scores) (``unary_from_softmax``, the stack is *not* renormalised, as psa), a Gaussian kernel
(sxy 3, compat 3), a bilateral kernel (sxy 80, srgb 13, compat 10) and 10 mean-field iterations; ``scale_factor``
divides both sxy. Install with ``pip install 'wsss-dist[crf]'``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError


def dense_crf(image: np.ndarray, scores: np.ndarray, iters: int = 10, scale_factor: float = 1.0) -> np.ndarray:
    """Mean-field marginals [C, H, W] of a dense CRF on ``scores`` [C, H, W] (> 0) and ``image`` uint8 [H, W, 3]."""
    return _mean_field(np.ascontiguousarray(image, dtype=np.uint8), scores, iters, pos=(3 / scale_factor, 3),
                       bilateral=(80 / scale_factor, 13, 10), key="aff.crf")


def _mean_field(image: np.ndarray, scores: np.ndarray, iters: int, pos: tuple[float, float],
                bilateral: tuple[float, float, float], key: str) -> np.ndarray:
    """pydensecrf's marginals [C, H, W]: unary −log(scores), a Gaussian kernel (sxy, compat) and a bilateral one
    (sxy, srgb, compat) on ``image`` uint8 [H, W, 3]; ``key`` names the setting that asked for it in the error."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ConfigError(f"{key}=true needs the dense CRF package: pip install 'wsss-dist[crf]' (pydensecrf2)") from e
    c, h, w = scores.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and scores {(h, w)} differ in size")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores.astype(np.float32))))  # −log(max(p, 1e-5))
    d.addPairwiseGaussian(sxy=pos[0], compat=pos[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2])
    return np.array(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def crf_for(image: np.ndarray, iters: int = 10) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``crf`` callable for :func:`wsss_dist.methods.affinity.affinity_labels`, bound to ``image``."""

    def refine(scores: torch.Tensor) -> torch.Tensor:
        out = dense_crf(image, scores.detach().float().cpu().numpy(), iters=iters)
        return torch.from_numpy(out).to(scores.device)

    return refine


DEEPLAB_PYTORCH_MEAN_BGR = (104.008, 116.669, 122.675)  # deeplab-pytorch's configs/voc12.yaml MEAN (BGR)


@dataclass(frozen=True)
class CrfParams:
    """deeplab-pytorch's DenseCRF settings (``eval.crf_*``); ``image``: rgb | deeplab_pytorch_wrap."""

    iters: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    image: str = "rgb"


def crf_image(rgb: np.ndarray, mode: str = "rgb") -> np.ndarray:
    """The uint8 [H, W, 3] image the CRF sees: the RGB image, or (``deeplab_pytorch_wrap``) deeplab-pytorch's BGR
    minus its mean cast to uint8 — truncated toward zero and wrapped modulo 256, as the x86 float→uint8 cast does."""
    if mode == "rgb":
        return np.require(rgb, np.uint8, ["C", "W"])  # pydensecrf needs a writable buffer (decoded images may be read-only)
    if mode != "deeplab_pytorch_wrap":
        raise ValueError(f"crf image mode must be rgb or deeplab_pytorch_wrap, got {mode!r}")
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(DEEPLAB_PYTORCH_MEAN_BGR, np.float32)
    return np.ascontiguousarray(np.trunc(bgr).astype(np.int64) & 255, dtype=np.uint8)


def label_probs(index: np.ndarray, n: int, gt_prob: float = 0.7) -> np.ndarray:
    """Probabilities [n, H, W] from a label-index map [H, W] (values < n): ``gt_prob`` on each pixel's label and
    (1 − gt_prob)/(n − 1) on the others — as unaries, irn's label CRF (pydensecrf ``unary_from_labels``, zero_unsure
    False; notes §13.1), so the one mean-field body serves label CRFs too."""
    if n < 2:
        raise ValueError(f"a label CRF needs at least 2 labels, got {n}")
    probs = np.full((n, *index.shape), (1 - gt_prob) / (n - 1), dtype=np.float32)
    np.put_along_axis(probs, index[None].astype(np.int64), np.float32(gt_prob), axis=0)
    return probs


def crf_labels(rgb: np.ndarray, label: np.ndarray, values: np.ndarray, params: CrfParams = CrfParams(),
               gt_prob: float = 0.7) -> np.ndarray:
    """A label map [H, W] refined by the dense CRF over the label set ``values`` (background and the image's
    classes; every label of the map must be one of them): labels → :func:`label_probs` → :func:`crf_predictions`
    → ``values``. The output holds only ``values``; a single-label set is returned unchanged."""
    values = np.asarray(values)
    if len(values) < 2:
        return label.copy()
    lut = np.full(int(max(values.max(), label.max())) + 1, -1, dtype=np.int64)
    lut[values] = np.arange(len(values))
    index = lut[label]
    if (index < 0).any():
        raise ValueError(f"labels {sorted(set(np.unique(label)) - set(values.tolist()))} are not in {values.tolist()}")
    return values[crf_predictions(rgb, label_probs(index, len(values), gt_prob), params)].astype(label.dtype)


def crf_predictions(rgb: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """deeplab-pytorch's CRF on softmax probabilities [C, H, W] and the image uint8 [H, W, 3] → labels uint8 [H, W]
    (channel index of the largest marginal; runs in a CRF worker process)."""
    q = _mean_field(crf_image(rgb, params.image), probs, params.iters, pos=(params.pos_xy_std, params.pos_w),
                    bilateral=(params.bi_xy_std, params.bi_rgb_std, params.bi_w), key="eval.crf")
    return q.argmax(0).astype(np.uint8)
