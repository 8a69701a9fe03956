"""IRN (Ahn, Cho & Kwak, CVPR 2019; jiwoon-ahn/irn), semantic part: class boundaries → affinities → random walk.

Notes §5.7–5.9 and §13 (../shared/notes/reference-implementations.md). The formulas, in the order they are used:

* **IR labels** (§13.1): confident foreground = argmax over [plane ``conf_fg`` (0.30); CAMs] when a class wins;
  confident background = background even under the permissive plane ``conf_bg`` (0.05); the rest 255.
  That is :func:`~wsss_dist.methods.affinity.affinity_labels` with ``mode="threshold"`` (irn refines both hard maps
  with a label CRF; not done here). Training reads them at the boundary map's stride 4 (nearest).
* **Paths** (§13.3): for a direction (dy, dx) of the half plane within ``radius``, the path is every integer (y, x)
  of the box spanned by (0, 0) and (dy, dx) whose squared distance to the line through them,
  (dy·x − dx·y)² / (dy² + dx²), is < 1 — both end points included.
* **Affinity from boundaries** (§13.3): a_ij = 1 − max_{k ∈ path(i→j)} B_k, B the boundary probability map;
  pixels outside the map count as boundary (B = 1, irn pads with 1), so a pair whose path leaves the map has a = 0.
* **Loss** (§13.4): pairs within radius 10 from psa's source set (:func:`~wsss_dist.methods.affinity.pair_labels`),
  L = (L_bg/2 + L_fg/2 + L_neg)/2 with each term the mean over its own pair count: psa's 1/4, 1/4, 1/2
  (:func:`balanced_pair_loss`; under several processes the counts are the processes' mean: irn #13).
* **Walk** (§13.5): a over radius 5, A^β (β = 10), column-normalised, 2^8 steps
  (:func:`~wsss_dist.methods.random_walk.random_walk_affinity`); seeds v_c = CAM_c · (1 − B) at stride 4 (no
  background row); walked scores upsampled ×4, divided by their single global max, a constant background plane
  (0.25) prepended, argmax.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss_dist.methods.affinity import affinity_offsets
from wsss_dist.methods.random_walk import random_walk_affinity


@functools.cache
def path_offsets(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The pixels (y, x) on irn's path from (0, 0) to (dy, dx): the box's points at squared line distance < 1."""
    if dy == 0 and dx == 0:
        return ((0, 0),)
    norm = dy * dy + dx * dx
    ys = range(min(0, dy), max(0, dy) + 1)
    xs = range(min(0, dx), max(0, dx) + 1)
    return tuple((y, x) for y in ys for x in xs if (dy * x - dx * y) ** 2 < norm)


def path_max(boundary: torch.Tensor, radius: int, crop: bool = True) -> torch.Tensor:
    """max_{k ∈ path} B_k for every pair of the half plane within ``radius``: boundary [..., h, w] → [..., P, h', w'].

    ``crop=True``: psa's/irn's training source set (rows [0, h−r+1), columns [r−1, w−r+1); every path inside the
    map; same layout as :func:`~wsss_dist.methods.affinity.pair_labels`). ``crop=False``: every pixel of the map is
    a source ([..., P, h, w]); path pixels outside the map count as 1 (irn's padding), so pairs leaving it get 1.
    Differentiable: the gradient reaches each path's maximum (torch's max)."""
    r = radius - 1
    h, w = boundary.shape[-2:]
    if crop:
        x, hs, ws, y0, x0 = boundary, h - r, w - 2 * r, 0, r
        if hs < 1 or ws < 1:
            raise ValueError(f"map {h}x{w} is too small for radius {radius} (needs >= {r + 1}x{2 * r + 1})")
    else:
        x = F.pad(boundary, (r, r, 0, r), value=1.0)  # left, right, bottom: paths never go up from a source
        hs, ws, y0, x0 = h, w, 0, r
    out = []
    for dy, dx in affinity_offsets(radius):
        views = [x[..., y0 + py: y0 + py + hs, x0 + px: x0 + px + ws] for py, px in path_offsets(dy, dx)]
        out.append(torch.stack(views, -3).max(-3).values)
    return torch.stack(out, -3)


def boundary_affinity(boundary: torch.Tensor, radius: int, crop: bool = True) -> torch.Tensor:
    """a_ij = 1 − max boundary on the path i→j (:func:`path_max`), same layout."""
    return 1 - path_max(boundary, radius, crop=crop)


def balanced_pair_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
    mean_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """irn's affinity loss (L_bg/2 + L_fg/2 + L_neg)/2, each term Σ cost / (its pair count + 1e-5) with the costs
    −log(a + 1e-5) (positive pairs) and −log(1 + 1e-5 − a) (negative). ``mean_counts``: maps the three counts to their
    mean over the data-parallel processes, so that averaged gradients equal one big batch's (irn #13: per-replica
    counts degrade IRN badly); None: this batch's counts (then equal to psa's
    :func:`~wsss_dist.methods.affinity.affinity_loss`). Returns (total, {"bg", "fg", "neg"})."""
    masks = (bg_pos, fg_pos, neg)
    counts = torch.stack([m.sum() for m in masks]).to(aff.dtype)
    if mean_counts is not None:
        counts = mean_counts(counts.detach())
    pos_cost, neg_cost = -torch.log(aff + 1e-5), -torch.log(1 + 1e-5 - aff)
    terms = {name: (cost * m.to(cost.dtype)).sum() / (n + 1e-5)
             for name, cost, m, n in zip(("bg", "fg", "neg"), (pos_cost, pos_cost, neg_cost), masks, counts)}
    return (terms["bg"] / 2 + terms["fg"] / 2 + terms["neg"]) / 2, terms


def propagate_irn(
    cams: torch.Tensor,
    classes: torch.Tensor,
    boundary: torch.Tensor,
    beta: float = 10,
    logt: int = 8,
    radius: int = 5,
    bg_threshold: float = 0.25,
    stride: int = 4,
    backend: str = "auto",
) -> torch.Tensor:
    """IRN's semantic pseudo label map [H, W] (0 = background, else class ids) from normalised CAMs [K, H, W] of
    classes [K] and the boundary probabilities [h, w] at ``stride`` (h = ⌈H/stride⌉, w = ⌈W/stride⌉).

    CAMs zero-padded to the grid and average-pooled to it; seeds CAM · (1 − B); random walk on
    a = 1 − path max B (radius, β, 2^logt steps); upsampled bilinearly, cropped, divided by the global max;
    background plane ``bg_threshold`` first; argmax → class ids."""
    if cams.dim() != 3 or classes.dim() != 1 or classes.numel() != cams.shape[0]:
        raise ValueError(f"need cams [K, H, W] and classes [K]; got {tuple(cams.shape)}, {tuple(classes.shape)}")
    _, big_h, big_w = cams.shape
    h, w = math.ceil(big_h / stride), math.ceil(big_w / stride)
    if tuple(boundary.shape) != (h, w):
        raise ValueError(f"boundary {tuple(boundary.shape)} does not match the CAM grid {h}x{w} at stride {stride}")
    dtype = torch.float64 if cams.dtype == torch.float64 else torch.float32
    boundary = boundary.to(dtype)
    lut = torch.cat([classes.new_zeros(1), classes]).to(device=cams.device, dtype=torch.long)
    if cams.shape[0] == 0:
        return lut[torch.zeros(big_h, big_w, dtype=torch.long, device=cams.device)]
    seeds = F.pad(cams.to(dtype), (0, w * stride - big_w, 0, h * stride - big_h))
    seeds = F.avg_pool2d(seeds[None], stride)[0] * (1 - boundary)
    aff = boundary_affinity(boundary, radius, crop=False)
    walked = random_walk_affinity(seeds, aff, radius=radius, beta=beta, logt=logt, backend=backend)
    up = F.interpolate(walked[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    up = up[0, :, :big_h, :big_w]
    up = up / up.max().clamp_min(1e-5)
    scores = torch.cat([up.new_full((1, big_h, big_w), bg_threshold), up])
    return lut[scores.max(0).indices]
