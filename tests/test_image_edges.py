"""Images at the edges: a 1×1 image (smaller than the network's stride) and one above ``data.max_pixels`` are counted
skips with a warning naming the image in the CAM stage (and the stages after it), never a traceback; an image above
the cap is refused from its header, before decoding (a decompression bomb is never decoded)."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.data.shards import decode_sample
from wsss_dist.data.toy import generate
from wsss_dist.data.voc import write_mask_png


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _claims(data: bytes, w: int, h: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims ``w``×``h`` px: what a decompression bomb looks like to a reader."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]


def test_an_image_above_the_cap_is_refused_from_its_header():
    sample = {"__key__": "bomb", "__url__": "x.tar", "jpg": _claims(_jpeg(16, 16), 20000, 20000), "cls.npy": b""}
    with pytest.raises(ValueError, match=r"image bomb refused undecoded"):  # PIL's own cap: 2 × MAX_IMAGE_PIXELS
        decode_sample(sample, ("jpg",), max_pixels=25_000_000)
    sample["jpg"] = _claims(_jpeg(16, 16), 6000, 6000)  # under PIL's cap, above ours; its data would not decode
    with pytest.raises(ValueError, match=r"image bomb of 6000×6000 px is above data.max_pixels=25000000; skipped "
                                         r"undecoded"):
        decode_sample(sample, ("jpg",), max_pixels=25_000_000)
    sample["jpg"] = _jpeg(40, 30)
    assert decode_sample(sample, ("jpg",), max_pixels=1200)["jpg"].shape == (30, 40, 3)
    with pytest.raises(ValueError, match="above data.max_pixels=1199"):
        decode_sample(sample, ("jpg",), max_pixels=1199)


@pytest.mark.slow
def test_tiny_and_huge_images_are_counted_skips_in_the_cam_stage(tmp_path, caplog):
    """A toy source with one 1×1 image and one 200×200 image (above data.max_pixels=10000): stage=[shards,cls,cam]
    finishes; CAM skips both (counted, warnings naming them), the pseudo-label stage after it skips them too."""
    words = TINY + [f"data.toy.root={tmp_path / 'src'}", f"data.shards_dir={tmp_path / 'shards'}", "method=cam",
                    "data.max_pixels=10000", "data.max_skip_fraction=0.1", "aff.train.steps=2", f"run={tmp_path / 'run'}"]
    cfg = make_config(words)
    generate(tmp_path / "src", cfg.data.toy)
    voc = tmp_path / "src" / "VOCdevkit" / "VOC2012"
    ids = {p.stem for p in (voc / "SegmentationClass").glob("*.png")}
    tiny, huge = sorted(ids)[:2]
    for image_id, side in ((tiny, 1), (huge, 200)):
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(side, side))
        mask = voc / "SegmentationClass" / f"{image_id}.png"
        write_mask_png(mask, np.full((side, side), int(np.array(Image.open(mask)).max() % 255 or 1), np.uint8))
    caplog.set_level(logging.WARNING)
    out = pipeline.run(make_config(words + ["stage=[shards,cls,cam,aff,pseudo]"]))
    total = 48  # TINY's train_aug
    assert out["cam"]["skipped"] == 2 and out["cam"]["samples"] == total - 2
    assert out["pseudo"]["skipped"] == 2 and out["pseudo"]["samples"] == total - 2
    text = caplog.text
    assert f"skipped image {tiny} of " in text and "1×1 px, smaller than the network's stride 8" in text
    assert f"image {huge} of 200×200 px is above data.max_pixels=10000; skipped undecoded" in text
    assert runs.is_done(tmp_path / "run", "pseudo")
