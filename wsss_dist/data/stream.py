"""WebDataset streams: the deterministic, resumable training stream (joint image+mask augmentation) and inference reads.

Training order is a pure function of (seed, rank, world, num_workers): per epoch e the shard list is shuffled with a
seed from (seed, e), split across ranks (shard i → rank i % world) and then across DataLoader workers, and each
worker's samples pass a shuffle buffer seeded by (seed, e, rank, worker). Augmentation parameters come from a numpy
Generator seeded by (seed, e, sample key), never from global RNG. Batch j of a rank comes from worker j % workers, so
``start_batch=n`` tells each worker how many of its own batches to drop; whole epochs are skipped from tar headers
alone and the rest before decoding. A resumed stream therefore equals the uninterrupted one (exactly so while no
sample in the skipped part was broken: broken samples are dropped after decoding).
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import os
import random
import tarfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from .. import runs
from ..compat import close_loader
from ..errors import DataError
from .shards import (SkipCounter, check_pixels, check_skip_fraction, check_tars, decode_sample, decode_value, read_shard, refuse_pickles,
                     selector, verify_against_manifest)
from ..metrics import IGNORE

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def count_samples(url: str, keys: Sequence[str] = ("jpg", "cls.npy")) -> int | None:
    """Samples with any of ``keys`` in a tar, from its headers only (no data read); None if the tar is unreadable."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    try:
        with tarfile.open(url, "r:") as tf:
            for member in tf:
                key, ext = base_plus_ext(member.name)
                if member.isreg() and key is not None and ext in keys and key != last:
                    n, last = n + 1, key
    except (OSError, tarfile.TarError):
        return None
    return n


# ---------------------------------------------------------------- pipeline stages (plain generator functions)
def shard_shuffle(seed: int, epoch: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: shuffle the shard list with a seed from (seed, epoch); every rank sees the same order."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        items = list(src)
        random.Random(_seed(seed, epoch, "shards")).shuffle(items)
        yield from items

    return stage


def split_by_node(rank: int, world: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: item i → rank i % world (explicit rank/world, unlike webdataset's torch.distributed lookup). The
    training stream splits *samples* this way, after the (rank-independent) shuffles: the global batch of a step is
    the same whatever the number of processes."""
    return lambda src: itertools.islice(src, rank, None, world)


def split_by_worker(worker: int, workers: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: a rank's shard i → DataLoader worker i % workers."""
    return lambda src: itertools.islice(src, worker, None, workers)


def _record_skips(path: Path) -> int:
    """The samples an earlier stage skipped in its output shard ``path`` (its record ``<shard>.json``; 0 without)."""
    from .shards import record_path

    rec = record_path(path)
    skipped = runs.read_json(rec).get("skipped", 0) if rec.is_file() else 0
    return skipped if isinstance(skipped, int) else 0


def merge_masks(mask_dir: Path, mask_key: str, counter: SkipCounter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: attach ``__mask__`` bytes from the same-named tar in ``mask_dir`` (same keys), failing on a mismatch."""
    from .shards import raw_samples

    def load(url: str) -> dict[str, bytes]:
        path = Path(mask_dir) / Path(url).name
        if not path.is_file():
            raise DataError(f"{path}: no mask shard for {url}; run the stage that writes {mask_dir} first")
        verify_against_manifest(str(path))  # a stage's output shard: against the sha256 of its record
        out = {}
        for s in raw_samples([str(path)], (mask_key,), counter):
            refuse_pickles(s)
            if mask_key in s:
                out[s["__key__"]] = s[mask_key]
        return out, _record_skips(path)

    def finish(url: str | None, masks: dict, skipped_before: int) -> None:
        if url is not None and masks and counter.skipped == skipped_before:
            raise DataError(f"{Path(mask_dir) / Path(url).name}: keys {sorted(masks)[:3]} are not in {url}; "
                            "the mask shards do not belong to these image shards (rerun the stage that wrote them)")

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        url, masks, skipped_before, skips = None, {}, 0, 0
        for sample in src:
            if sample["__url__"] != url:
                finish(url, masks, skipped_before)
                url, skipped_before = sample["__url__"], counter.skipped
                masks, skips = load(url)
            sample["__mask__"] = masks.pop(sample["__key__"], None)
            sample["__mask_skips__"] = skips  # the mask stage skipped images of this shard: a missing mask is one
            yield sample
        finish(url, masks, skipped_before)

    return stage


class TrainStream(torch.utils.data.IterableDataset):
    """The infinite training stream of one rank; iterated by a DataLoader worker (or in-process) it yields batches."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, crop: int, resize_long: tuple[int, int] | None,
                 seed: int, rank: int, world: int, start_batch: int, mask_dir: str | Path | None, mask_key: str,
                 jitter: bool, scale_range: tuple[float, float] | None, shuffle_buffer: int,
                 max_skip_fraction: float = 0.01, on_device: bool = False, max_pixels: int = 0) -> None:
        super().__init__()
        self.on_device, self.max_pixels = on_device, max_pixels
        self.max_skip_fraction = max_skip_fraction
        self.urls, self.batch_size, self.crop = [str(u) for u in urls], batch_size, crop
        self.resize_long, self.scale_range, self.jitter = resize_long, scale_range, jitter
        self.seed, self.rank, self.world, self.start_batch = seed, rank, world, start_batch
        self.mask_dir, self.mask_key, self.shuffle_buffer = mask_dir, mask_key, shuffle_buffer

    def worker_urls(self, epoch: int, worker: int, workers: int) -> list[str]:
        """The shards this rank's ``worker`` reads in ``epoch`` (shard shuffle, then node and worker splits)."""
        import webdataset as wds

        shards = wds.DataPipeline(wds.SimpleShardList(self.urls), shard_shuffle(self.seed, epoch),
                                  split_by_worker(worker, workers))
        return [d["url"] for d in shards]

    def prepare(self, sample: dict, epoch: int) -> dict:
        """Decode (only jpg, labels and the merged mask) and augment one sample; with ``on_device`` the JPEG stays
        encoded (its size read from its header) and the sample carries its augmentation record instead."""
        keys = ("cls.npy",) if self.on_device else ("jpg", "cls.npy")
        check_pixels(sample, "jpg", self.max_pixels)  # before any decoding (a decompression bomb: a counted skip)
        d = decode_sample(sample, keys)
        if self.on_device:
            if "jpg" not in sample:
                raise ValueError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} has no 'jpg'")
            with Image.open(io.BytesIO(sample["jpg"])) as im:  # the header only
                W, H = im.size
                fmt = im.format
            end = sample["jpg"].rfind(b"\xff\xd9")  # a truncated file has no end-of-image marker
            if fmt != "JPEG" or end < 0 or end < len(sample["jpg"]) - 4096:
                raise ValueError(f"{sample.get('__url__', '?')}: 'jpg' of {sample['__key__']} is not a whole JPEG")
        else:
            H, W = d["jpg"].shape[:2]
        mask = None
        if self.mask_dir is not None:
            raw = sample.get("__mask__")
            if raw is None and sample.get("__mask_skips__"):  # an image the mask stage skipped (counted there)
                raise ValueError(f"{sample['__url__']}: image {sample['__key__']} has no mask: the stage that wrote "
                                 f"{self.mask_dir} skipped it")
            if raw is None:
                raise DataError(f"{Path(self.mask_dir) / Path(sample['__url__']).name}: no {self.mask_key!r} for key "
                                f"{sample['__key__']} of {sample['__url__']}; rerun the stage that wrote {self.mask_dir}")
            mask = decode_value(self.mask_key, raw)
            if mask.shape != (H, W):
                raise ValueError(f"{sample['__url__']}: mask of {sample['__key__']} is {mask.shape}, image {(H, W)}")
        rng = np.random.default_rng(_seed(self.seed, epoch, sample["__key__"]))
        labels = torch.from_numpy(np.asarray(d["cls.npy"], dtype=np.float32).reshape(-1))
        if self.on_device:
            p = draw_augment(rng, H, W, self.crop, self.resize_long, self.scale_range)
            return {"__key__": sample["__key__"], "jpeg": torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8),
                    "aug": aug_record(p, self.jitter), "labels": labels,
                    "mask": augment_mask(mask, p) if mask is not None else None}
        image, m = augment(d["jpg"], mask, rng, self.crop, self.resize_long, self.scale_range, self.jitter)
        return {"__key__": sample["__key__"], "image": image, "labels": labels, "mask": m}

    def samples(self, worker: int, workers: int, skip: int, counter: SkipCounter) -> Iterator[dict]:
        """Augmented samples of this worker, epoch after epoch, after dropping the first ``skip`` (before decoding)."""
        import webdataset as wds

        sizes: dict[str, int | None] = {}
        left = [skip]

        def drop(src: Iterable[dict]) -> Iterator[dict]:
            for s in src:
                if left[0] > 0:
                    left[0] -= 1
                    continue
                yield s

        for epoch in itertools.count():
            urls = self.worker_urls(epoch, worker, workers)
            counts = [sizes[u] if u in sizes else sizes.setdefault(u, count_samples(u)) for u in urls]
            total = None if None in counts else sum(counts)  # this worker's samples per epoch, from the tar headers
            if total is not None:
                total = len(range(self.rank, total, self.world))  # this rank's share: every world-th sample
            if left[0] > 0 and total is not None and left[0] >= total:  # a whole epoch skipped: nothing read or decoded
                left[0] -= total
                continue
            skipping = left[0] > 0
            stages = [wds.SimpleShardList(urls), check_tars(),
                      wds.tarfile_to_samples(handler=counter.tar_handler, select_files=selector(("jpg", "cls.npy")))]
            if self.mask_dir is not None:
                stages.append(merge_masks(Path(self.mask_dir), self.mask_key, counter))
            buf = self.shuffle_buffer
            if buf > 1:
                stages.append(wds.shuffle(buf, initial=min(100, buf), rng=random.Random(
                    _seed(self.seed, epoch, 0, worker, "buffer"))))  # the same order on every rank
            stages += [split_by_node(self.rank, self.world), drop,
                       wds.map(lambda s, e=epoch: self.prepare(s, e), handler=counter.handler)]
            n, skipped_before = 0, counter.skipped
            for sample in wds.DataPipeline(*stages):
                counter.seen += 1
                n += 1
                if total:  # during the epoch, against the epoch's size from the tar headers
                    check_skip_fraction(counter.skipped - skipped_before, total, self.max_skip_fraction, self._what(urls))
                yield sample
            if not skipping:  # at its end, against what was read (the only count when the headers were unreadable)
                check_skip_fraction(counter.skipped - skipped_before, n + counter.skipped - skipped_before,
                                    self.max_skip_fraction, self._what(urls))
            if n == 0 and not skipping:
                raise DataError(f"no readable samples in {', '.join(urls)} (epoch {epoch}); rebuild the shards")

    @staticmethod
    def _what(urls: list[str]) -> str:
        return f"{', '.join(Path(u).name for u in urls[:4])}{', ...' if len(urls) > 4 else ''}"

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader restarts its round robin at worker 0: on resume, worker w plays the role of the worker
        # that produced batch start_batch + w of the uninterrupted stream
        worker = (worker + self.start_batch) % workers
        counter = SkipCounter()
        skip_batches = len(range(worker, self.start_batch, workers))  # batches j < start_batch with j % workers == worker
        batch: list[dict] = []
        for s in self.samples(worker, workers, skip_batches * self.batch_size, counter):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield collate(batch, counter.skipped)
                batch = []


def collate(samples: list[dict], skipped: int) -> dict:
    """Stack augmented samples into a batch dict (still encoded: ``jpeg`` list + ``aug`` rows, for
    :func:`augment_on_device`)."""
    out = {"key": [s["__key__"] for s in samples], "labels": torch.stack([s["labels"] for s in samples]),
           "skipped": skipped}
    if "jpeg" in samples[0]:
        out["jpeg"], out["aug"] = [s["jpeg"] for s in samples], torch.stack([s["aug"] for s in samples])
    else:
        out["image"] = torch.stack([s["image"] for s in samples])
    if samples[0]["mask"] is not None:
        out["mask"] = torch.stack([s["mask"] for s in samples])
    return out


def train_loader(urls: Sequence[str], *, batch_size: int, crop: int, resize_long: tuple[int, int] | None = (256, 512),
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 0, start_batch: int = 0,
                 mask_dir: str | Path | None = None, mask_key: str = "png", jitter: bool = True,
                 scale_range: tuple[float, float] | None = None, shuffle_buffer: int = 500,
                 max_skip_fraction: float = 0.01, on_device: bool = False, max_pixels: int = 0) -> Iterator[dict]:
    """Infinite deterministic batches of ``batch_size`` for rank ``rank`` of ``world``: {key, image, labels, [mask],
    skipped}. Every rank reads the same shuffled sample sequence and keeps every ``world``-th sample (decoding only
    those), so the union of the ranks' batch j is the batch j of one process with ``world × batch_size``.

    The ground-truth ``seg`` member is never read. ``mask`` (int64, 255 = ignore) comes from the same-named tars in
    ``mask_dir`` (member ``mask_key``). ``start_batch=n`` resumes after the first n batches of this rank. Broken
    samples are skipped and counted (``skipped``); a worker whose epoch skips more than ``max_skip_fraction`` of its
    samples raises DataError. ``on_device``: images stay encoded (``jpeg``, ``aug`` instead of ``image``) for the
    engine to finish with :func:`augment_on_device` on its device (``data.augment_on=device``).
    """
    urls = [str(u) for u in urls]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing); run stage=shards again")
    workers = min(num_workers, len(urls))
    if workers < num_workers:
        logger.info("train stream: %d shards, using %d DataLoader workers instead of %d", len(urls), workers, num_workers)
    ds = TrainStream(urls, batch_size=batch_size, crop=crop, resize_long=tuple(resize_long) if resize_long else None,
                     seed=seed, rank=rank, world=world, start_batch=start_batch, mask_dir=mask_dir, mask_key=mask_key,
                     jitter=jitter, scale_range=tuple(scale_range) if scale_range else None, shuffle_buffer=shuffle_buffer,
                     max_skip_fraction=max_skip_fraction, on_device=on_device, max_pixels=max_pixels)
    if workers == 0:
        return iter(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                         worker_init_fn=functools.partial(reader_worker_init, os.getpid()))
    return _one_line_errors(iter(loader))


def _one_line_errors(it: Iterator[dict]) -> Iterator[dict]:
    """Re-raise a worker's DataError with its own message (the DataLoader wraps it in the worker's traceback)."""
    try:
        yield from it
        return
    except DataError as e:
        msg = str(e)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split("DataError: ", 1)[-1]
    close_loader(it)  # stop the workers now, not whenever the traceback is freed
    raise DataError(msg)


def image_tensor(sample: dict, device: torch.device) -> torch.Tensor:
    """The sample's normalised image as [1, 3, H, W] on ``device``: its ``image`` made by :func:`prepare_image` in a
    reader worker (copied without blocking: pinned memory on CUDA), else from its ``jpg``."""
    x = sample["image"] if "image" in sample else normalize(sample["jpg"])
    return x.unsqueeze(0).to(device, non_blocking=True)


def micro_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Images per process and micro-batch: the global ``batch_size`` over ``world`` processes × ``grad_accum``
    accumulation steps (ConfigError when it does not divide: the recipe never changes with the number of GPUs)."""
    from ..errors import ConfigError

    if batch_size % (world * grad_accum):
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must divide over {world} process(es) × "
                          f"grad_accum={grad_accum}; choose a multiple of {world * grad_accum}")
    return batch_size // (world * grad_accum)


def stream_on_device(augment_on: str) -> bool:
    """Whether the training stream leaves decoding and augmentation to the device (``data.augment_on``; ``auto``:
    where CUDA is, which is where Accelerate trains)."""
    return augment_on == "device" or (augment_on == "auto" and torch.cuda.is_available())


def train_loader_for(cfg: Any, train: Any, split: str, **extra: Any) -> Callable[[int, int, int], Iterator[dict]]:
    """The engine's ``make_loader(rank, world, start_batch)`` over ``split``'s shards with ``train``'s augmentation
    (``cfg``: the run's Config, ``train``: one trainer's TrainCfg; ``extra``: mask_dir, scale_range, ...)."""
    from .shards import load_manifest, split_urls

    urls = split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir))

    def make_loader(rank: int, world: int, start_batch: int) -> Iterator[dict]:
        return train_loader(urls, batch_size=micro_batch(train.batch_size, world, train.grad_accum),
                            crop=train.crop, resize_long=train.resize_long,
                            seed=train.seed, rank=rank, world=world, num_workers=cfg.data.num_workers,
                            start_batch=start_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                            max_skip_fraction=cfg.data.max_skip_fraction,
                            on_device=stream_on_device(cfg.data.augment_on), max_pixels=cfg.data.max_pixels,
                            **extra)

    return make_loader


# ---------------------------------------------------------------- inference reads (engine.map_shards, split_features)
def prepare_image(sample: dict) -> dict:
    """The sample with ``image``: its ``jpg`` as a normalised float32 [3, H, W] (runs in a reader worker)."""
    sample["image"] = normalize(sample["jpg"])
    return sample


class ShardSamples(torch.utils.data.IterableDataset):
    """Decoded samples of whole shards for inference: DataLoader worker w of n reads the shards j with j % n == w,
    each in its order, then yields the shard's end marker ``{"__shard__", "__end__": True, "samples", "skipped"}``.

    Every sample carries ``__shard__`` (its shard's name); the members of the same-named shards in the ``paired``
    folders (earlier stages' outputs) are merged in by key; ``prepare(sample) → sample`` runs last, in the worker
    (a module-level function or a ``functools.partial`` of one: it travels to the worker processes).
    """

    def __init__(self, urls: Sequence[str], keys: Sequence[str], paired: Sequence[tuple[str, Sequence[str]]] = (),
                 prepare: Callable[[dict], dict] | None = None, max_pixels: int = 0, min_side: int = 0) -> None:
        super().__init__()
        self.max_pixels, self.min_side = max_pixels, min_side  # images outside them: counted skips, with a warning
        self.urls = [str(u) for u in urls]
        self.keys = tuple(keys)
        self.paired = [(str(d), tuple(k)) for d, k in paired]
        self.prepare = prepare

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            yield from self.shard(url)

    def shard(self, url: str) -> Iterator[dict]:
        """One shard's samples (paired members merged, prepared), then its end marker."""
        name = Path(url).name
        counter = SkipCounter()
        others = [{s["__key__"]: s for s in read_shard(str(Path(d) / name), k, counter)} for d, k in self.paired]
        skips = [_record_skips(Path(d) / name) for d, _ in self.paired]  # samples the earlier stages skipped
        n = 0
        for sample in read_shard(url, self.keys, counter, self.max_pixels):
            image = sample.get("jpg")
            if image is not None and min(image.shape[:2]) < self.min_side:
                counter.skipped += 1
                logger.warning("skipped image %s of %s: %d×%d px, smaller than the network's stride %d (%d skipped so "
                               "far)", sample["__key__"], name, image.shape[1], image.shape[0], self.min_side,
                               counter.skipped)
                continue
            if any(sample["__key__"] not in other and skipped for other, skipped in zip(others, skips)):
                counter.skipped += 1  # an image an earlier stage skipped (too small or too large): skipped here too
                logger.warning("skipped image %s of %s: an earlier stage skipped it (%d skipped so far)",
                               sample["__key__"], name, counter.skipped)
                continue
            for other in others:
                if sample["__key__"] not in other:
                    raise DataError(f"{name}: sample {sample['__key__']} missing from the paired shard of an earlier "
                                    "stage; rerun that stage")
                sample.update({k: v for k, v in other[sample["__key__"]].items() if k != "__key__"})
            if self.prepare is not None:
                sample = self.prepare(sample)
            sample["__shard__"] = name
            n += 1
            yield sample
        yield {"__shard__": name, "__end__": True, "samples": n, "skipped": counter.skipped}


READER_IGNORES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")  # the stop signals: the main process owns them


def reader_worker_init(parent: int, worker: int) -> None:
    """Set up a DataLoader reader worker (training stream and inference readers): it ignores the stop signals (a
    signal to the whole process group, e.g. ``scancel``, SLURM preemption, a container stop or a terminal's Ctrl-C,
    reaches it too; the main process checkpoints and then shuts the workers down) and ends when its parent process
    does (Linux), so a stage killed by SIGKILL never leaves workers blocked on a full queue."""
    import ctypes
    import os
    import signal
    import sys

    for name in READER_IGNORES:  # after torch's own worker handlers (its SIGTERM one would end the worker)
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _as_is(sample: dict) -> dict:
    """The DataLoader's collate for single samples: none (its default would turn numpy arrays into tensors)."""
    return sample


def shard_samples(urls: Sequence[str], keys: Sequence[str], *, paired: Sequence[tuple[str, Sequence[str]]] = (),
                  prepare: Callable[[dict], dict] | None = None, num_workers: int = 0,
                  pin_memory: bool = False, max_pixels: int = 0, min_side: int = 0) -> _Samples:
    """The samples and end markers of :class:`ShardSamples` over ``urls``, decoded and prepared in ``num_workers``
    DataLoader worker processes (0: in this process), tensors in pinned memory with ``pin_memory`` (CUDA); images
    with more than ``max_pixels`` pixels (0: no cap) or a side under ``min_side`` are counted skips.

    Shards interleave (one sample from each worker in turn); within a shard the order is the tar's. The workers start
    when this is called; ``close()`` stops them. A worker's DataError is re-raised as its one line.
    """
    workers = min(num_workers, len(urls))
    loader = torch.utils.data.DataLoader(ShardSamples(urls, keys, paired, prepare, max_pixels, min_side),
                                         batch_size=None, collate_fn=_as_is,
                                         num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None,
                                         worker_init_fn=functools.partial(reader_worker_init, os.getpid()) if workers else None)
    return _Samples(iter(loader))  # the workers start here, before the caller starts any thread


class _Samples:
    """A reader's iterator with one-line worker errors; :meth:`close` stops its workers now."""

    def __init__(self, it: Iterator[dict]) -> None:
        self.it = it
        self.lines = _one_line_errors(it)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self.lines)

    def close(self) -> None:
        """Stop the workers (a no-op once the samples are exhausted)."""
        close_loader(self.it)
