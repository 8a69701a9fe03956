"""Random walk of class scores on a pixel-affinity graph (psa, notes §4.8).

psa builds a dense n×n affinity matrix A (n = h·w feature pixels) with
a_ij = exp(-mean_d |f_i - f_j|) for pixel pairs closer than ``radius``
(dy² + dx² < radius²), 1 on the diagonal, raises it to the power beta, normalises the
columns (T = A / Σ_i A_ij) and squares T ``logt`` times: scores · T^(2^logt).

Here the same operator is applied as a sparse stencil. Each column of T has only
K = 2·P + 1 non-zeros (P half-plane offsets, their mirror images and the pixel
itself; K = 69 for radius 5), so one step of v ← v · T is

    v'[c, j] = Σ_k W_k[j] · v[c, j + o_k],    W_k[j] = A(j, j + o_k)^β / Σ_k' A(j, j + o_k')^β

and 2^logt such steps equal the dense matrix power. Memory is O(K·n + C·n) instead of
O(n²), time O(2^logt · K · C · n) instead of O(logt · n³). Pairs that leave the map do
not exist (weight 0), exactly as in the dense matrix. Score channels that are zero
everywhere stay zero under a linear map and are not walked (CAM stacks usually hold
only a few non-zero classes).

The stencil runs on a flat, zero-padded copy of v with padded row width w + 2(r-1), so
every shift is a contiguous slice and a step is K fused multiply-adds (``addcmul_``)
over [C, h·(w + 2(r-1))], all preallocated. Nothing is looped over pixels.

Pair set: every in-bounds pair closer than ``radius``, in both directions. (psa's own
index helper only takes *sources* in rows [0, h-r+1) and columns [r-1, w-r+1), so its
dense matrix also lacks some in-bounds pairs whose source lies in that border band;
this module, its dense reference and the DESIGN contract use the full in-bounds set.)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from wsss_dist.methods.affinity import affinity_offsets

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 2**19  # feature values per pass when computing affinities (cache-sized)


def _check_inputs(scores: torch.Tensor, features: torch.Tensor) -> None:
    """Validate shapes of scores [C, h, w] and features [D, h, w]."""
    if scores.dim() != 3 or features.dim() != 3:
        raise ValueError(
            f"need scores [C, h, w] and features [D, h, w]; got {tuple(scores.shape)}, "
            f"{tuple(features.shape)}"
        )
    if scores.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} and features {tuple(features.shape)} differ in h, w")


def _compute_dtype(scores: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32."""
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _half_plane_affinity(
    features: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """A^β for each half-plane offset o at every source j with j + o in the map → [P, h, w] (0 elsewhere)."""
    offsets = affinity_offsets(radius)
    d, h, w = features.shape
    aff = features.new_zeros(len(offsets), h, w)
    chunk = max(1, _CHUNK_ELEMENTS // (h * w))
    for p, (dy, dx) in enumerate(offsets):
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w + min(0, dx))
        if ys.stop <= 0 or xs.stop <= xs.start:
            continue
        dist = aff[p, ys, xs]
        for c in range(0, d, chunk):  # channel chunks stay in cache: ~2x faster than one pass
            part = features[c : c + chunk]
            dist += (part[:, ys, xs] - part[:, yt, xt]).abs_().sum(0)
        torch.exp(dist.mul_(-beta / d), out=dist)  # exp(-mean_d |Δf|)^β = exp(-β mean_d |Δf|)
    return offsets, aff


def _transition_stencil(
    features: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Offsets o_k (self, half plane, mirrored half plane) and W_k [K, h, w] = column k of T."""
    half, aff = _half_plane_affinity(features, radius, beta)
    _, h, w = features.shape
    mirrored = torch.zeros_like(aff)
    for p, (dy, dx) in enumerate(half):
        # A(j, j - o) = A(j - o, j): the value stored at source j - o, moved to j.
        if dy < h and abs(dx) < w:
            mirrored[p, dy:, max(0, dx) : w + min(0, dx)] = aff[p, : h - dy, max(0, -dx) : w - max(0, dx)]
    offsets = [(0, 0)] + half + [(-dy, -dx) for dy, dx in half]
    stencil = torch.cat([torch.ones_like(aff[:1]), aff, mirrored])
    stencil /= stencil.sum(0, keepdim=True)  # ≥ 1 thanks to the self loop
    return offsets, stencil


def _walk(
    v: torch.Tensor, stencil: torch.Tensor, offsets: list[tuple[int, int]], steps: int, pad: int
) -> torch.Tensor:
    """Apply v ← Σ_k W_k · shift_k(v) ``steps`` times; v [C, h, w], stencil [K, h, w]."""
    c, h, w = v.shape
    wp = w + 2 * pad  # padded row width
    m = h * wp  # interior rows incl. their pad columns
    base = pad * wp + pad  # flat index of (row pad, col 0) after `pad` leading elements
    length = (h + 2 * pad) * wp + 2 * pad
    weights = F.pad(stencil, (pad, pad)).reshape(len(offsets), m)  # 0 on pad columns
    bufs = [v.new_zeros(c, length), v.new_zeros(c, length)]
    bufs[0][:, base : base + m].view(c, h, wp)[:, :, pad : pad + w] = v
    shifts = [dy * wp + dx for dy, dx in offsets]
    plans = []
    for src, dst in ((bufs[0], bufs[1]), (bufs[1], bufs[0])):
        terms = [(src[:, base + s : base + s + m], weights[k]) for k, s in enumerate(shifts)]
        out = dst[:, base : base + m]
        plans.append((out, out.addcmul_, terms[0], terms[1:]))
    for step in range(steps):  # the hot loop: K in-place multiply-adds per step
        out, addcmul_, (src0, w0), rest = plans[step % 2]
        torch.mul(src0, w0, out=out)
        for src, wk in rest:
            addcmul_(src, wk)
    final = bufs[steps % 2][:, base : base + m].view(c, h, wp)[:, :, pad : pad + w]
    return final.contiguous()


def random_walk(
    scores: torch.Tensor, features: torch.Tensor, radius: int = 5, beta: float = 8, logt: int = 8
) -> torch.Tensor:
    """Propagate scores [C, h, w] (bg first) on the affinity graph of features [D, h, w].

    Equal to psa's dense ``scores · T^(2^logt)`` (see :func:`random_walk_dense`), computed
    with a sparse stencil on the device of the inputs, in float32 (float64 if the scores
    are float64). Returns [C, h, w].
    """
    _check_inputs(scores, features)
    dtype = _compute_dtype(scores)
    c, h, w = scores.shape
    out = torch.zeros(c, h, w, dtype=dtype, device=scores.device)
    active = scores.reshape(c, -1).ne(0).any(1)
    if not bool(active.any()):
        return out
    offsets, stencil = _transition_stencil(features.to(dtype), radius, beta)
    out[active] = _walk(scores[active].to(dtype), stencil, offsets, 2**logt, radius - 1)
    return out


def random_walk_dense(
    scores: torch.Tensor, features: torch.Tensor, radius: int = 5, beta: float = 8, logt: int = 8
) -> torch.Tensor:
    """psa's dense formulation (reference for tests and benchmarks only; O(n²) memory, O(n³) time)."""
    _check_inputs(scores, features)
    dtype = _compute_dtype(scores)
    c, h, w = scores.shape
    n = h * w
    feats = features.to(dtype)
    index = torch.arange(n, device=scores.device).view(h, w)
    aff_mat = torch.eye(n, dtype=dtype, device=scores.device)
    for dy, dx in affinity_offsets(radius):
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w + min(0, dx))
        if ys.stop <= 0 or xs.stop <= xs.start:
            continue
        aff = torch.exp(-(feats[:, ys, xs] - feats[:, yt, xt]).abs().mean(0)).reshape(-1)
        i, j = index[ys, xs].reshape(-1), index[yt, xt].reshape(-1)
        aff_mat[i, j] = aff
        aff_mat[j, i] = aff
    trans = aff_mat.pow(beta)
    trans = trans / trans.sum(0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    return (scores.to(dtype).reshape(c, n) @ trans).reshape(c, h, w)


def propagate_labels(
    cams: torch.Tensor,
    classes: torch.Tensor,
    features: torch.Tensor,
    alpha: float = 16,
    beta: float = 8,
    logt: int = 8,
    radius: int = 5,
    stride: int = 8,
) -> torch.Tensor:
    """Pseudo label map [H, W] (values 0..20) from normalised CAMs [K, H, W] of classes [K].

    psa's inference: background (1 - max CAM)^alpha stacked before the CAMs, zero-padded
    to a multiple of ``stride``, average-pooled to the feature grid (features [D, h, w]
    with h = ceil(H / stride), w = ceil(W / stride)), random-walked, bilinearly upsampled
    back, cropped, argmax, channel index → class id (0 = background).
    """
    if cams.dim() != 3 or classes.dim() != 1 or classes.numel() != cams.shape[0]:
        raise ValueError(
            f"need cams [K, H, W] and classes [K]; got {tuple(cams.shape)}, {tuple(classes.shape)}"
        )
    _, big_h, big_w = cams.shape
    h, w = math.ceil(big_h / stride), math.ceil(big_w / stride)
    if tuple(features.shape[-2:]) != (h, w):
        raise ValueError(
            f"features {tuple(features.shape)} do not match the CAM grid {h}x{w} at stride {stride}"
        )
    cams = cams.to(_compute_dtype(cams))
    cam_max = cams.amax(0) if cams.shape[0] else cams.new_zeros(big_h, big_w)
    scores = torch.cat([((1 - cam_max) ** alpha)[None], cams])
    scores = F.pad(scores, (0, w * stride - big_w, 0, h * stride - big_h))
    scores = F.avg_pool2d(scores[None], stride)[0]
    walked = random_walk(scores, features, radius=radius, beta=beta, logt=logt)
    up = F.interpolate(walked[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    channel = up[0, :, :big_h, :big_w].max(0).indices  # first maximum, like argmax; ~10x faster on CPU
    lut = torch.cat([classes.new_zeros(1), classes]).to(device=channel.device, dtype=torch.long)
    return lut[channel]
