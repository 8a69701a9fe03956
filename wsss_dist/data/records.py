"""Record formats of the stages' output shards: one encoder and one decoder per record type.

- CAM record (stage cam): ``cam.npy`` float16 [K, h, w] (the K image classes' normalised CAMs, possibly stored at
  reduced size) and ``cam.json`` ``{"classes": [K class ids 1..C], "size": [H, W]}``.
- Label record (aff labels, pseudo labels, eval predictions): ``png``, a VOC palette PNG of class ids
  (255 = ignore, :data:`wsss_dist.metrics.IGNORE`).
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F

from .voc import write_mask_png

CAM_KEYS = ("cam.npy", "cam.json")
LABEL_KEYS = ("png",)


def encode_cam(key: str, cams: torch.Tensor, classes: torch.Tensor, size: tuple[int, int]) -> dict:
    """A CAM record: ``cams`` [K, h, w] (stored as float16), ``classes`` [K] class ids, ``size`` the image's (H, W)."""
    buf = io.BytesIO()
    np.save(buf, cams.half().cpu().numpy(), allow_pickle=False)
    return {"__key__": key, "cam.npy": buf.getvalue(),
            "cam.json": json.dumps({"classes": classes.tolist(), "size": list(size)}).encode()}


def decode_cam(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded CAM record's CAMs [K, H, W] (float32, upsampled to the image size) and class ids [K]."""
    meta = sample["cam.json"]
    cams = torch.from_numpy(sample["cam.npy"].astype(np.float32))
    H, W = meta["size"]
    if cams.shape[-2:] != (H, W) and len(cams):
        cams = F.interpolate(cams[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return cams, torch.as_tensor(meta["classes"], dtype=torch.long)


def encode_label(key: str, label: np.ndarray) -> dict:
    """A label record: a uint8 [H, W] map of class ids as a palette PNG."""
    return {"__key__": key, "png": write_mask_png(None, label)}


def decode_label(sample: dict) -> np.ndarray:
    """A decoded label record's uint8 [H, W] class ids."""
    return sample["png"]
