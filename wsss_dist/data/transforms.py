"""Image transforms: normalisation, the joint image+mask augmentation drawn from a seeded Generator (PIL on the host),
and the same augmentation finished on the training device from encoded JPEGs (``data.augment_on=device``)."""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..errors import DataError
from .tario import decode_value
from ..metrics import IGNORE
from ..registry import IMAGENET_MEAN, IMAGENET_STD


JITTER = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue


def normalize(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] RGB → float32 [3, H, W] with ImageNet mean/std."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def renormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A batch normalised with ImageNet's mean/std, normalised with ``mean``/``std`` instead (the same tensor when
    they are ImageNet's)."""
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return x
    m0, s0 = (torch.tensor(v, device=x.device, dtype=x.dtype).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    m1, s1 = (torch.tensor(v, device=x.device, dtype=x.dtype).view(3, 1, 1) for v in (mean, std))
    return (x * s0 + m0 - m1) / s1


def denormalize(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] normalised → uint8 [..., H, W, 3] RGB (inverse of :func:`normalize`)."""
    x = x.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.movedim(-3, -1).numpy()


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _hue(img: Image.Image, h: float) -> Image.Image:
    """Rotate the hue by ``h`` turns (−0.5..0.5), as torchvision's adjust_hue, through PIL's HSV."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] += np.uint8(round(h * 255) % 256)  # uint8 wrap-around = rotation on the hue circle
    return Image.frombytes("HSV", img.size, hsv.tobytes()).convert("RGB")


# brightness, contrast, saturation: blends with black, the mean grey and the greyscale image (torchvision's definitions)
_JITTER_OPS = (
    lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    lambda im, f: ImageEnhance.Color(im).enhance(f),
    _hue,
)


# columns of a sample's augmentation record (``aug``), the geometry and jitter that :func:`draw_augment` chose
AUG_COLUMNS = ("nh", "nw", "ch", "cw", "sy", "sx", "dy", "dx", "flip", "jitter", "f0", "f1", "f2", "f3", "o0", "o1",
               "o2", "o3", "crop")


def draw_augment(rng: np.random.Generator, H: int, W: int, crop: int, resize_long: tuple[int, int] | None = None,
                 scale_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """One sample's random resize, h-flip, crop and colour jitter, drawn in a fixed order whatever the options (the
    stream stays comparable): resized size (nh, nw), crop size (ch, cw) taken at (sy, sx) of the resized image and
    pasted at (dy, dx) of the crop × crop canvas, flip, jitter factors and their order."""
    u_scale, flip = rng.random(), rng.random() < 0.5
    u_sy, u_sx, u_dy, u_dx = rng.random(4)
    factors = [rng.uniform(1 - JITTER[0], 1 + JITTER[0]), rng.uniform(1 - JITTER[1], 1 + JITTER[1]),
               rng.uniform(1 - JITTER[2], 1 + JITTER[2]), rng.uniform(-JITTER[3], JITTER[3])]
    order = rng.permutation(4)
    if scale_range is not None:
        s = scale_range[0] + u_scale * (scale_range[1] - scale_range[0])
    elif resize_long is not None and resize_long[1] > 0:
        lo, hi = resize_long
        s = (lo + int(u_scale * (hi - lo + 1))) / max(H, W)
    else:
        s = 1.0
    nh, nw = max(1, round(H * s)), max(1, round(W * s))
    ch, cw = min(crop, nh), min(crop, nw)
    return {"nh": nh, "nw": nw, "ch": ch, "cw": cw,
            "sy": int(u_sy * (nh - ch + 1)), "sx": int(u_sx * (nw - cw + 1)),  # where the crop starts in the image
            "dy": int(u_dy * (crop - ch + 1)), "dx": int(u_dx * (crop - cw + 1)),  # where it lands on the canvas
            "flip": bool(flip), "factors": [float(f) for f in factors], "order": [int(i) for i in order], "crop": crop}


def augment_mask(mask: np.ndarray, p: dict[str, Any]) -> torch.Tensor:
    """The mask int64 [crop, crop] of :func:`draw_augment`'s geometry (nearest resize, pad 255)."""
    mpil = Image.fromarray(mask)
    if (p["nh"], p["nw"]) != mask.shape[:2]:
        mpil = mpil.resize((p["nw"], p["nh"]), Image.NEAREST)
    m = torch.from_numpy(np.array(mpil.crop(_box(p)), dtype=np.uint8)).long()
    if p["flip"]:
        m = m.flip(-1)
    out = torch.full((p["crop"], p["crop"]), IGNORE, dtype=torch.long)
    out[p["dy"]:p["dy"] + p["ch"], p["dx"]:p["dx"] + p["cw"]] = m
    return out


def _box(p: dict[str, Any]) -> tuple[int, int, int, int]:
    return p["sx"], p["sy"], p["sx"] + p["cw"], p["sy"] + p["ch"]


def augment(img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, crop: int,
            resize_long: tuple[int, int] | None = None, scale_range: tuple[float, float] | None = None,
            jitter: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint random resize, h-flip, crop (image pad 0 after normalisation, mask pad 255); colour jitter on the image.

    Returns the normalised image float32 [3, crop, crop] and the mask int64 [crop, crop] (or None).
    """
    H, W = img.shape[:2]
    p = draw_augment(rng, H, W, crop, resize_long, scale_range)
    pil = Image.fromarray(img)
    if (p["nh"], p["nw"]) != (H, W):
        pil = pil.resize((p["nw"], p["nh"]), Image.BICUBIC)
    piece = pil.crop(_box(p))
    if p["flip"]:
        piece = piece.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter:
        for i in p["order"]:
            piece = _JITTER_OPS[i](piece, p["factors"][i])
    x = np.array(piece, dtype=np.uint8)
    canvas = torch.zeros((3, crop, crop), dtype=torch.float32)
    canvas[:, p["dy"]:p["dy"] + p["ch"], p["dx"]:p["dx"] + p["cw"]] = normalize(x)
    return canvas, (augment_mask(mask, p) if mask is not None else None)


def aug_record(p: dict[str, Any], jitter: bool) -> torch.Tensor:
    """:func:`draw_augment`'s choice as one float64 row of :data:`AUG_COLUMNS` (what the batch carries to the device)."""
    v = {**p, "jitter": jitter, **{f"f{i}": f for i, f in enumerate(p["factors"])},
         **{f"o{i}": o for i, o in enumerate(p["order"])}}
    return torch.tensor([float(v[c]) for c in AUG_COLUMNS], dtype=torch.float64)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L" of integral RGB values [3, H, W] (its fixed-point ITU-R 601-2 luma): [1, H, W]."""
    r, g, b = x.to(torch.int32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[None].to(x.dtype)


def _blend(a: torch.Tensor | float, x: torch.Tensor, f: float) -> torch.Tensor:
    """PIL's ``Image.blend(a, x, f)`` on integral values: a + f·(x − a) in float32, clipped and truncated to 0..255."""
    return (a + f * (x - a)).clamp_(0, 255).floor_()


def _hue_t(x: torch.Tensor, h: float) -> torch.Tensor:
    """:func:`_hue` on integral RGB values [3, H, W]: PIL's uint8 HSV (hue circle 0..255), hue + round(h·255) mod 256,
    back to RGB as PIL converts."""
    r, g, b = x
    mx, mn = x.amax(0), x.amin(0)
    cr = mx - mn
    grey = cr == 0
    crs = torch.where(grey, torch.ones_like(cr), cr)
    rc, gc, bc = (mx - r) / crs, (mx - g) / crs, (mx - b) / crs
    hue = torch.where(r == mx, bc - gc, torch.where(g == mx, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    H = torch.where(grey, torch.zeros_like(hue), (hue * 255.0).floor().clamp(0, 255))
    S = torch.where(grey, torch.zeros_like(hue), (cr / torch.where(mx > 0, mx, torch.ones_like(mx)) * 255.0).floor().clamp(0, 255))
    H = (H + round(h * 255) % 256) % 256
    hh = H * 6.0 / 255.0
    i = hh.floor()
    f = hh - i
    fs = S / 255.0
    p, q, t = (mx * (1.0 - fs)).round(), (mx * (1.0 - fs * f)).round(), (mx * (1.0 - fs * (1.0 - f))).round()
    i = i.long() % 6
    out = torch.stack([mx, mx, mx])
    for k, rgb in enumerate(((mx, t, p), (q, mx, p), (p, mx, t), (p, q, mx), (t, p, mx), (mx, p, q))):
        out = torch.where((i == k) & ~grey, torch.stack(rgb), out)
    return out.clamp_(0, 255)


# the tensor twins of _JITTER_OPS (brightness, contrast, saturation, hue) on integral float RGB values [3, H, W]
_JITTER_OPS_T = (
    lambda x, f: _blend(0.0, x, f),
    lambda x, f: _blend(float(int(_grey(x).mean(dtype=torch.float64) + 0.5)), x, f),
    lambda x, f: _blend(_grey(x), x, f),
    _hue_t,
)


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (uint8 CPU tensors) → RGB uint8 [3, H, W] on ``device``: one batched nvJPEG call on CUDA,
    libjpeg-turbo on the CPU (the same pixels as PIL); PIL when this torchvision has no image decoding."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return [torch.from_numpy(decode_value("jpg", t.numpy().tobytes())).permute(2, 0, 1).to(device) for t in datas]
    where = device if device.type == "cuda" else torch.device("cpu")
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        imgs = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=where)
    return [im.to(device) for im in imgs]


def augment_on_device(batch: dict, device: torch.device) -> dict:
    """Finish a batch left encoded by the stream (``data.augment_on=device``): decode its JPEGs on ``device`` and
    resize (bicubic, antialiased), crop, flip, jitter and normalise there, with the draws of :func:`augment`, whose
    host result it equals up to rare ±1-2 levels of resize and hue rounding (on CPU; a GPU's JPEG decoder differs
    slightly more). Adds ``image``; drops ``jpeg``/``aug``."""
    import torch.nn.functional as F

    out = {k: v for k, v in batch.items() if k not in ("jpeg", "aug")}
    try:
        imgs = decode_jpegs(batch["jpeg"], device)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"a JPEG of batch {batch['key'][:4]}... did not decode on {device} ({e}); rebuild the shards") from None
    rows = batch["aug"].tolist()
    crop = int(rows[0][AUG_COLUMNS.index("crop")])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    canvas = torch.zeros((len(imgs), 3, crop, crop), dtype=torch.float32, device=device)
    for n, (img, row) in enumerate(zip(imgs, rows)):
        p = {c: int(v) for c, v in zip(AUG_COLUMNS, row)}
        x = img.float()
        if (p["nh"], p["nw"]) != tuple(x.shape[-2:]):  # as PIL: horizontal pass, rounded to uint8, then vertical
            for size in ((x.shape[-2], p["nw"]), (p["nh"], p["nw"])):
                x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True,
                                  align_corners=False)[0].round_().clamp_(0, 255)
        x = x[:, p["sy"]:p["sy"] + p["ch"], p["sx"]:p["sx"] + p["cw"]]
        if p["flip"]:
            x = x.flip(-1)
        if p["jitter"]:
            for i in (p[f"o{k}"] for k in range(4)):
                x = _JITTER_OPS_T[i](x, row[AUG_COLUMNS.index(f"f{i}")])
        canvas[n, :, p["dy"]:p["dy"] + p["ch"], p["dx"]:p["dx"] + p["cw"]] = x.div_(255).sub_(mean).div_(std)
    out["image"] = canvas
    return out
