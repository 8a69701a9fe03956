"""AffinityNet training side: pair offsets, predicted affinities, affinity labels, loss.

Follows psa (notes §4.5–4.7) with irn's threshold labels (§5.3, §5.7) as an option.

Layout of pair tensors (``pairwise_affinity``, ``pair_labels``): ``[B, P, h', w']`` with
P = ``len(affinity_offsets(radius))`` directed offsets (dy, dx) of the half plane and
one *source* pixel per (h', w') cell: source (y, x') = (y, x + radius - 1) for
y < h' = h - radius + 1 and x < w' = w - 2 (radius - 1), so that every target
(y + dy, x' + dx) is inside the map (psa's cropped source set). Entry [b, p, y, x] is the
pair (source, source + offset_p).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from wsss_dist.metrics import IGNORE

logger = logging.getLogger(__name__)



def affinity_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """Half-plane offsets (dy, dx) with 0 < dy² + dx² < radius² (34 for radius 5, as psa)."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    r = radius - 1
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-r, r + 1)
        if dy * dy + dx * dx < radius * radius
    ]
    return offsets


def _source_crop(h: int, w: int, radius: int) -> tuple[int, int]:
    """Size (h', w') of psa's source grid; raise if the map is too small for any pair."""
    r = radius - 1
    hs, ws = h - r, w - 2 * r
    if hs < 1 or ws < 1:
        raise ValueError(f"map {h}x{w} is too small for radius {radius} (needs >= {r + 1}x{2 * r + 1})")
    return hs, ws


def _pairs(x: torch.Tensor, radius: int):
    """Yield (source, target) views of x [..., h, w] for each half-plane offset."""
    r = radius - 1
    hs, ws = _source_crop(x.shape[-2], x.shape[-1], radius)
    src = x[..., :hs, r : r + ws]
    for dy, dx in affinity_offsets(radius):
        yield src, x[..., dy : dy + hs, r + dx : r + dx + ws]


def pairwise_affinity(features: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """a_ij = exp(-mean_d |f_i - f_j|) for psa's pairs: features [B, D, h, w] → [B, P, h', w']."""
    if features.dim() != 4:
        raise ValueError(f"features must be [B, D, h, w], got {tuple(features.shape)}")
    aff = [torch.exp(-(s - t).abs().mean(1)) for s, t in _pairs(features, radius)]
    return torch.stack(aff, 1)


def _labels_from_scores(
    scores: torch.Tensor, classes: torch.Tensor, crf: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """argmax over a [1 + K, h, w] stack (bg first) → labels, optionally after a CRF."""
    if crf is not None:
        scores = crf(scores)
    lut = torch.cat([classes.new_zeros(1), classes.to(torch.long)])
    return lut[scores.max(0).indices]  # argmax (first maximum), ~4× faster on CPU


def affinity_labels(
    cams: torch.Tensor,
    classes: torch.Tensor,
    mode: str = "threshold",
    conf_fg: float = 0.30,
    conf_bg: float = 0.05,
    alpha_low: float = 4,
    alpha_high: float = 32,
    crf: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Affinity labels from normalised CAMs [K, h, w] of classes [K] → LongTensor [h, w].

    Values: 0 confident background, 1..K confident class, 255 uncertain.

    * ``mode="threshold"`` (irn): argmax over [conf_fg plane; cams] gives the
      foreground (max CAM > conf_fg); argmax over [conf_bg plane; cams] gives the
      background (max CAM <= conf_bg; ties go to the plane as in irn); the rest is 255.
    * ``mode="psa"``: background score (1 - max CAM)^alpha; the argmax over
      [bg(alpha_low); cams] keeps confident foreground (its background → 255), the
      argmax over [bg(alpha_high); cams] marks confident background (→ 0).

    ``crf``, if given, maps each [1 + K, h, w] score stack (background first) to a
    refined stack of the same shape before its argmax; bind the image in a closure.
    psa and irn use a dense CRF there: :func:`wsss_dist.methods.crf.crf_for` (the optional
    ``[crf]`` extra). Without it the labels are the plain argmax.
    """
    if cams.dim() != 3 or classes.dim() != 1 or classes.numel() != cams.shape[0]:
        raise ValueError(
            f"need cams [K, h, w] and classes [K]; got {tuple(cams.shape)}, {tuple(classes.shape)}"
        )
    classes = classes.to(cams.device)
    h, w = cams.shape[-2:]
    cam_max = cams.amax(0) if cams.shape[0] else cams.new_zeros(h, w)

    if mode == "threshold":
        fg_scores = torch.cat([cams.new_full((1, h, w), conf_fg), cams])
        bg_scores = torch.cat([cams.new_full((1, h, w), conf_bg), cams])
    elif mode == "psa":
        fg_scores = torch.cat([((1 - cam_max) ** alpha_low)[None], cams])
        bg_scores = torch.cat([((1 - cam_max) ** alpha_high)[None], cams])
    else:
        raise ValueError(f"mode must be 'threshold' or 'psa', got {mode!r}")

    label = _labels_from_scores(fg_scores, classes, crf)
    bg_conf = _labels_from_scores(bg_scores, classes, crf)
    label[label == 0] = IGNORE
    label[bg_conf == 0] = 0
    return label


def pair_labels(
    labels: torch.Tensor, radius: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair masks (bg_pos, fg_pos, neg) of labels [B, h, w], each bool [B, P, h', w'].

    valid = both ends < 255; bg_pos = same label and source 0; fg_pos = same label and
    source ≠ 0; neg = different labels (both valid).
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, h, w], got {tuple(labels.shape)}")
    bg_pos, fg_pos, neg = [], [], []
    for src, tgt in _pairs(labels, radius):
        valid = (src < IGNORE) & (tgt < IGNORE)
        same = (src == tgt) & valid
        bg_pos.append(same & (src == 0))
        fg_pos.append(same & (src != 0))
        neg.append((src != tgt) & valid)
    return torch.stack(bg_pos, 1), torch.stack(fg_pos, 1), torch.stack(neg, 1)


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """psa's loss: bg/4 + fg/4 + neg/2, each term a mean over its pair mask.

    Positive pairs cost -log(a + 1e-5), negative pairs -log(1 + 1e-5 - a); each sum is
    divided by its mask count + 1e-5. Returns (total, {"bg", "fg", "neg"}).
    """
    pos_cost = -torch.log(aff + 1e-5)
    neg_cost = -torch.log(1 + 1e-5 - aff)

    def masked_mean(cost: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(cost.dtype)
        return (cost * m).sum() / (m.sum() + 1e-5)

    terms = {
        "bg": masked_mean(pos_cost, bg_pos),
        "fg": masked_mean(pos_cost, fg_pos),
        "neg": masked_mean(neg_cost, neg),
    }
    total = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return total, terms
