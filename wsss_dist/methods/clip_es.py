"""CLIP-ES (Lin et al., CVPR 2023): training-free CAMs from a frozen CLIP, from the formulas of
reference-implementations.md §15.

Per image (classes = its image-level labels):

- text set T = [e(c) for the image's classes, in label order] + [e(b) for the background words], e = L2-normalised
  text embedding of ``template.format(name)`` (one prompt per class; synonyms are part of the name string);
- s = softmax(logit_scale · f·Tᵀ) over that set, f = the L2-normalised image embedding (§15.1);
- softmax-Grad-CAM of class c on A = the last block's ln_1 tokens (CLS dropped, laid on the h×w token grid):
  α = mean over tokens of ∂s_c/∂A, CAM = ReLU(Σ_k α_k A_k), min-max normalised (min subtracted, ÷ (max + 1e-7));
- CAA: the head-averaged attention of the last ``attn_layers`` blocks (CLS row/column dropped) averaged → D;
  ``rounds`` × (D ← D / column sums; D ← D / row sums); S = (D + Dᵀ)/2; R = S^(2^steps) (one squaring: R = S·S);
- box mask M_c: CAM → uint8 (×255), binary above int(box_threshold · max), one bounding box per 8-connected region
  (= the union of the reference's contour boxes), M = their union;
- refined CAM_c(i) = Σ_j R_ij · M_c(j) · CAM_c(j), min-max normalised, resized bilinearly to the image size.

One image-tower forward per image and scale, shared by all its classes: the gradients of the classes come from
backward passes through the last block only (``retain_graph``), each pass serving every image of the batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TEMPLATE = "a clean origami {}."  # CLIP-ES's one prompt template (§15.2)

# CLIP-ES's class strings where they differ from the dataset's class names (§15.2)
VOC_PROMPTS: dict[str, str] = {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
                               "tvmonitor": "tvmonitor screen"}
COCO_PROMPTS: dict[str, str] = {
    "person": "person with clothes,people,human", "bird": "bird avian", "backpack": "backpack,bag",
    "umbrella": "umbrella,parasol", "handbag": "handbag,purse", "tie": "necktie", "snowboard": "sknowboard",
    "baseball glove": "glove", "spoon": "dessertspoon", "chair": "chair seat", "tvmonitor": "tvmonitor screen",
    "tv": "tvmonitor screen", "remote": "remote control", "hair drier": "hairdrier,blowdrier",
    "motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "potted plant": "pottedplant",
    "dining table": "diningtable",
}
VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign")
COCO_BACKGROUND: tuple[str, ...] = tuple(b for b in VOC_BACKGROUND if b not in ("keyboard", "sign"))


def class_prompts(dataset: str, names: Sequence[str], template: str = TEMPLATE) -> list[str]:
    """One prompt per class: the template around CLIP-ES's class string (its synonyms for VOC and COCO)."""
    table = COCO_PROMPTS if dataset == "coco" else VOC_PROMPTS
    return [template.format(table.get(n, n)) for n in names]


def background_prompts(dataset: str, words: Sequence[str] = (), template: str = TEMPLATE) -> list[str]:
    """The background prompts: ``words`` when given, else CLIP-ES's list for the dataset (COCO 23, else VOC's 25)."""
    return [template.format(w) for w in (words or (COCO_BACKGROUND if dataset == "coco" else VOC_BACKGROUND))]


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x − min) / (max(x − min) + 1e-7) over the last two dims (pytorch-grad-cam's scaling)."""
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def softmax_scores(features: torch.Tensor, class_emb: torch.Tensor, bg_emb: torch.Tensor,
                   classes: Sequence[torch.Tensor], logit_scale: float) -> list[torch.Tensor]:
    """Per image b: softmax over [its classes' prompts, the background prompts] of logit_scale · cosine (its K_b
    class probabilities first)."""
    out = []
    for f, c in zip(features, classes):
        text = torch.cat([class_emb[c], bg_emb]).to(f.dtype)
        out.append(torch.softmax(logit_scale * f @ text.T, -1)[:len(c)])
    return out


def grad_cams(tokens: torch.Tensor, scores: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Grad-CAM [K_b, h, w] per image of ``scores`` (image b's K_b class scores) on ``tokens`` [B, 1+N, C] (a
    leaf): max K_b backward passes, the k-th giving class k of every image at once (images do not interact)."""
    h, w = grid
    kmax = max((len(s) for s in scores), default=0)
    grads: list[list[torch.Tensor]] = [[] for _ in scores]
    for k in range(kmax):
        target = sum(s[k] for s in scores if len(s) > k)
        g, = torch.autograd.grad(target, tokens, retain_graph=k < kmax - 1)
        for b, s in enumerate(scores):
            if len(s) > k:
                grads[b].append(g[b, 1:])
    out = []
    a = tokens.detach()[:, 1:].float()
    for b, gs in enumerate(grads):
        if not gs:
            out.append(a.new_zeros((0, h, w)))
            continue
        alpha = torch.stack(gs).float().mean(1)  # [K, C]: mean over tokens
        cam = torch.relu(torch.einsum("kc,nc->kn", alpha, a[b])).reshape(-1, h, w)
        out.append(minmax(minmax(cam)))  # per layer, then after the (one-layer) aggregation
    return out


def caa_affinity(attn: torch.Tensor, layers: int = 8, rounds: int = 3, steps: int = 1) -> torch.Tensor:
    """R [.., N, N] from the head-averaged attention [.., blocks, 1+N, 1+N]: the last ``layers`` blocks averaged (CLS
    row/column dropped), ``rounds`` × (÷ column sums, ÷ row sums), symmetrised (D + Dᵀ)/2, squared ``steps`` times."""
    d = attn[..., -layers:, 1:, 1:].float().mean(-3)
    for _ in range(rounds):
        d = d / d.sum(-2, keepdim=True)
        d = d / d.sum(-1, keepdim=True)
    r = (d + d.transpose(-2, -1)) / 2
    for _ in range(steps):
        r = r @ r
    return r


def box_mask(cam: np.ndarray, threshold: float = 0.4, legacy_edge: bool = False) -> np.ndarray:
    """Bool [h, w]: the union of the bounding boxes of the 8-connected regions where uint8(255·cam) > int(threshold ·
    its max); ``legacy_edge``: CLIP-ES's boxes, whose end is clipped to w−1 / h−1 (a box touching the right or bottom
    edge loses that column / row)."""
    from scipy import ndimage

    g = (np.asarray(cam, dtype=np.float32) * 255).astype(np.uint8)
    binary = g > int(threshold * int(g.max()))
    labels, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    h, w = g.shape
    mask = np.zeros((h, w), dtype=bool)
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if legacy_edge:
            y1, x1 = min(y1, h - 1), min(x1, w - 1)
        mask[y0:y1, x0:x1] = True
    return mask


def refine(cams: torch.Tensor, affinity: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Refined CAMs [K, h, w]: cam_ref(i) = Σ_j R_ij M(j) cam(j), min-max normalised (``masks``: [K, h, w] bool)."""
    K, h, w = cams.shape
    src = (cams * masks.to(cams.dtype)).reshape(K, h * w)
    return minmax((src @ affinity.T.to(cams.dtype)).reshape(K, h, w))


def clip_es_cams(model: torch.nn.Module, images: torch.Tensor, classes: Sequence[torch.Tensor],
                 class_emb: torch.Tensor, bg_emb: torch.Tensor, scales: Sequence[float] = (1.0,), *,
                 refine_cams: bool = True, box_threshold: float = 0.4, legacy_edge: bool = False, attn_layers: int = 8,
                 rounds: int = 3, steps: int = 1, size: Optional[tuple[int, int]] = None) -> list[torch.Tensor]:
    """CLIP-ES CAMs [K_b, H, W] of N same-size CLIP-normalised images [N, 3, H, W] (``classes``: each image's class
    indices), averaged over ``scales`` (each image resized bicubically to multiples of the patch size, rounded up)."""
    from ..models.clip import image_pass, patch_size

    H, W = size or images.shape[-2:]
    p = patch_size(model)
    scale = float(model.logit_scale.exp())
    totals = [images.new_zeros((len(c), H, W), dtype=torch.float32) for c in classes]
    for s in scales:
        hs, ws = -(-round(images.shape[-2] * s) // p) * p, -(-round(images.shape[-1] * s) // p) * p
        x = images if (hs, ws) == tuple(images.shape[-2:]) else F.interpolate(
            images, size=(hs, ws), mode="bicubic", align_corners=False)
        out = image_pass(model, x)
        scores = softmax_scores(out.features, class_emb, bg_emb, classes, scale)
        cams = grad_cams(out.tokens, scores, out.grid)
        affinity = caa_affinity(out.attn, attn_layers, rounds, steps) if refine_cams else None
        for b, cam in enumerate(cams):
            if len(cam) and affinity is not None:
                masks = torch.as_tensor(np.stack([box_mask(m, box_threshold, legacy_edge) for m in cam.cpu().numpy()]),
                                        device=cam.device)
                cam = refine(cam, affinity[b], masks)
            if len(cam):
                totals[b] += F.interpolate(cam[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return [t / len(scales) for t in totals]


__all__ = ["COCO_BACKGROUND", "COCO_PROMPTS", "TEMPLATE", "VOC_BACKGROUND", "VOC_PROMPTS", "background_prompts",
           "box_mask", "caa_affinity", "class_prompts", "clip_es_cams", "grad_cams", "minmax",
           "refine", "softmax_scores"]
