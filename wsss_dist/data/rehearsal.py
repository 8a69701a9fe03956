"""A VOC-size rehearsal data set in the real VOC2012 + SBD layouts (toy scenes at 500×375 / 375×500, plus the real
VOC image 2007_000063 when the fixtures are given) and the words of the rehearsal chain: the voc preset with one step
per trainer. Used by ``python -m bench.rehearsal`` and tests/test_rehearsal.py."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500))  # (W, H): VOC's two common image sizes
REAL_ID = "2007_000063"  # a real VOC 2012 train image (500×375) and its SegmentationClass PNG (the fixtures' voc_mini)


def _objects(lab: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(class index 0..19, 1-based VOC box) of every class present in a label map (void 255 left out)."""
    out = []
    for v in sorted(set(np.unique(lab).tolist()) - {0, 255}):
        ys, xs = np.nonzero(lab == v)
        out.append((v - 1, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return out


def _render(i: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A toy image and its label map (no void band), resized to ``size`` = (W, H)."""
    from wsss_dist.data.toy import render

    img, lab, _ = render(np.random.default_rng([seed, 7, i]), int(0.88 * max(size)))
    img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    lab = np.asarray(Image.fromarray(lab).resize(size, Image.NEAREST))
    return img, lab


def _real(size: tuple[int, int], fixtures: Path | None) -> tuple[bytes, np.ndarray] | None:
    """The real VOC image's JPEG bytes (re-encoded only when resized) and its mask, or None without the fixture."""
    from wsss_dist.data.voc import read_mask_png

    for voc in [Path(fixtures) / "voc_mini" / "VOCdevkit" / "VOC2012"] if fixtures else []:
        jpg, png = voc / "JPEGImages" / f"{REAL_ID}.jpg", voc / "SegmentationClass" / f"{REAL_ID}.png"
        if jpg.is_file() and png.is_file():
            mask = read_mask_png(png)
            if (mask.shape[1], mask.shape[0]) == size:
                return jpg.read_bytes(), mask
            buf = io.BytesIO()
            Image.open(jpg).convert("RGB").resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
            return buf.getvalue(), np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return None


def make_dataset(root: Path, n_train: int = 4, n_val: int = 2, n_sbd: int = 2, seed: int = 0,
                 scale: float = 1.0, fixtures: Path | None = None) -> tuple[Path, Path]:
    """Write a VOC2012 + SBD folder of VOC-size images under ``root``; return (voc_root, sbd_root).

    VOC train: ``n_train`` ids (the real 2007_000063 first when ``fixtures`` holds voc_mini), VOC val: ``n_val``; SBD:
    ``n_sbd`` SBD-only ids (JPEG in ``dataset/img``) plus one VOC train and one VOC val id (as the real SBD
    overlaps VOC), so train_aug = VOC train ∪ SBD − VOC val. ``scale`` < 1 shrinks the sizes (smoke runs only).
    """
    from wsss_dist.data.toy import _mat_bytes, _xml, void_band
    from wsss_dist.data.voc import write_mask_png

    root = Path(root)
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE"
    for d in (voc / "JPEGImages", voc / "Annotations", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
              sbd / "dataset" / "img", sbd / "dataset" / "cls"):
        d.mkdir(parents=True, exist_ok=True)
    sizes = [(round(w * scale), round(h * scale)) for w, h in SIZES]
    train = [f"2007_{100 + i:06d}" for i in range(n_train)]
    real = _real(sizes[0], fixtures) if n_train else None
    if real is not None:
        train[0] = REAL_ID
    val = [f"2007_{200 + i:06d}" for i in range(n_val)]
    extra = [f"2008_{100 + i:06d}" for i in range(n_sbd)]
    for i, image_id in enumerate(train + val + extra):
        size = sizes[i % 2]
        if image_id == REAL_ID and real is not None:
            jpeg, mask = real
            lab = mask.copy()
            lab[lab == 255] = 0  # SBD has no void band
        else:
            img, lab = _render(i, size, seed)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            jpeg, mask = buf.getvalue(), void_band(lab)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size[0], size[1], _objects(lab)))
        if image_id in extra:  # SBD-only: the image and its GTcls .mat in SBD's layout
            (sbd / "dataset" / "img" / f"{image_id}.jpg").write_bytes(jpeg)
        else:
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
            write_mask_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
        if image_id in extra or image_id in (train[-1:] + val[-1:]):
            (sbd / "dataset" / "cls" / f"{image_id}.mat").write_bytes(_mat_bytes(lab))
    sbd_train, sbd_val = extra[: max(1, len(extra) - 1)] + train[-1:], extra[max(1, len(extra) - 1):] + val[-1:]
    for path, ids in ((voc / "ImageSets" / "Segmentation" / "train.txt", train),
                      (voc / "ImageSets" / "Segmentation" / "val.txt", val),
                      (sbd / "dataset" / "train.txt", sbd_train), (sbd / "dataset" / "val.txt", sbd_val)):
        path.write_text("".join(i + "\n" for i in sorted(ids)))
    return voc, sbd


def chain_words(work: Path, voc: Path, sbd: Path, backbone: str = "resnet18", seg_backbone: str = "resnet18",
                steps: int = 1, batch: int = 2, shard_size: int = 4, workers: int = 0, run: str = "run") -> list[str]:
    """The config words of the rehearsal chain: the voc preset except steps, batches, backbones and weights."""
    return ["data=voc", f"data.voc_root={voc}", f"data.sbd_root={sbd}", f"data.shards_dir={work / 'shards'}",
            f"data.shard_size={shard_size}", f"data.num_workers={workers}", f"run={work / run}", "method=cam",
            f"model.backbone={backbone}", "model.weights=none", f"seg.backbone={seg_backbone}", "seg.weights=none",
            *(f"{t}.train.{k}={v}" for t in ("cls", "aff", "seg")
              for k, v in (("steps", steps), ("batch_size", batch), ("ckpt_every", 0), ("log_every", 0)))]


def big_words(work: Path, voc: Path, sbd: Path, run: str = "big") -> list[str]:
    """ResNet-38d (cls, crop 448, batch 1) and DeepLab-v2 R101 (seg, crop 321, batch 2 = 2 × 1) for one step each."""
    return chain_words(work, voc, sbd, backbone="resnet38d", seg_backbone="resnet101", run=run) + [
        "cls.train.batch_size=1"]
