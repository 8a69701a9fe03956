"""A full-size rehearsal: stage=all data=voc with the voc preset (but 1 step per trainer, batch 2, resnet18 from scratch)
on a VOC2012 + SBD folder of 500×375 / 375×500 JPEGs, then one training step of ResNet-38d at 448 and of DeepLab-R101
at 321 and one full-size ResNet-38d CAM. The data and the words are the ones ``python -m bench.rehearsal`` times
(both take them from wsss_dist.data.rehearsal: the tests never import bench/).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.data.records import CAM_KEYS, LABEL_KEYS
from wsss_dist.data.rehearsal import big_words, chain_words, make_dataset
from wsss_dist.data.shards import load_manifest, read_shard, split_urls

pytestmark = pytest.mark.slow
SCALES = (1.0, 0.5, 1.5, 2.0)
CHAIN = ("shards", "cls", "cam", "aff", "pseudo", "seg", "eval", "report")


# ------------------------------------------------------------------ the data and the words (as bench/rehearsal.py)

def prepare_big(chain_run: Path, big_run: Path) -> None:
    """Give the big run the chain's pseudo labels (seg trains on them)."""
    if not (big_run / "pseudo").exists():
        big_run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(chain_run / "pseudo", big_run / "pseudo")


def full_size_cam(cfg: Any, image_id: str | None = None,
                  scales: tuple[float, ...] | None = None) -> tuple[str, Any, tuple[int, int], float]:
    """``multiscale_cam`` of the run's trained classifier (``scales``, default cam.scales; cam.flip) on one 500×375
    train image: (id, CAMs [K, H, W], (H, W), seconds)."""
    import torch

    from wsss_dist.data.shards import load_manifest, read_shard, split_urls
    from wsss_dist.data.stream import image_tensor
    from wsss_dist.engine import autocast, dist
    from wsss_dist.models.build import load_trained
    from wsss_dist.stages.cam import multiscale_cam

    d = dist()
    model = load_trained(cfg, "cls", "rehearsal").to(d.device).to(memory_format=torch.channels_last)
    for url in split_urls(cfg.shards_dir, "train", load_manifest(cfg.shards_dir, verify=False)):
        for s in read_shard(url, ("jpg", "cls.npy")):
            x = image_tensor(s, d.device)
            if (image_id is None and x.shape[-1] > x.shape[-2]) or s["__key__"] == image_id:
                t0 = time.perf_counter()
                with autocast(d.device, cfg.cam.mixed_precision):
                    cams = multiscale_cam(model, x, torch.as_tensor(s["cls.npy"]), scales or cfg.cam.scales,
                                          cfg.cam.flip)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                return s["__key__"], cams, tuple(x.shape[-2:]), time.perf_counter() - t0
    raise RuntimeError(f"no landscape train image in {cfg.shards_dir}")


# ------------------------------------------------------------------ the rehearsal


class Recorder:
    """Input shapes seen by the stages' models (wrapped in place for the duration of a run)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from wsss_dist.models.deeplab import DeepLabV2
        from wsss_dist.stages import aff, cam, cls, pseudo, seg

        self.seen: dict[str, list] = {k: [] for k in ("cls", "cam", "aff", "walk", "seg", "eval")}

        def batches(name: str, make_loss):
            def wrapped(*a, **k):
                inner = make_loss(*a, **k)

                def loss_fn(model, batch, step):
                    self.seen[name].append((tuple(batch["image"].shape), tuple(batch.get("mask", batch["image"]).shape)))
                    return inner(model, batch, step)
                return loss_fn
            return wrapped

        mp.setattr(cls, "make_loss", batches("cls", cls.make_loss))
        mp.setattr(aff, "make_loss", batches("aff", aff.make_loss))
        seg_loss = seg.loss_fn
        mp.setattr(seg, "loss_fn", batches("seg", lambda: seg_loss)())
        walk, predict = pseudo.propagate_labels, DeepLabV2.predict
        # the stage's CAM function: multiscale_cams (several same-size images per forward) where there is one
        name = "multiscale_cams" if hasattr(cam, "multiscale_cams") else "multiscale_cam"
        ms_cam = getattr(cam, name)

        def multiscale_cam(model, images, labels, scales=SCALES, flip=True):
            n = len(images) if images.dim() == 4 else 1
            self.seen["cam"] += [((1, *images.shape[-3:]), tuple(scales), flip)] * n
            return ms_cam(model, images, labels, scales, flip)

        def propagate_labels(cams, classes, features, *a, **k):
            self.seen["walk"].append((tuple(cams.shape), tuple(features.shape), k.get("stride")))
            return walk(cams, classes, features, *a, **k)

        def predict_(model, x, scales=(1.0, 0.75, 0.5), flip=False):
            self.seen["eval"].append((tuple(x.shape), tuple(scales), flip))
            return predict(model, x, scales, flip)

        mp.setattr(cam, name, multiscale_cam)
        mp.setattr(pseudo, "propagate_labels", propagate_labels)
        mp.setattr(DeepLabV2, "predict", predict_)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """The data, the words and the chain's results (stage=all, recorded shapes)."""
    root = tmp_path_factory.mktemp("rehearsal")
    voc, sbd = make_dataset(root / "src", n_train=2, n_val=2, n_sbd=1, fixtures=FIXTURES)  # both orientations in train and val
    words = chain_words(root, voc, sbd)
    cfg = make_config(words + ["stage=all"])
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        out = pipeline.run(cfg)
    return {"root": root, "voc": voc, "sbd": sbd, "cfg": cfg, "out": out, "seen": rec.seen}


def _samples(urls: list, keys: tuple) -> dict[str, dict]:
    return {s["__key__"]: s for url in urls for s in read_shard(str(url), keys)}


def _images(cfg, split: str) -> dict[str, tuple[int, int]]:
    """(H, W) of every image of a split, from the shards."""
    urls = split_urls(cfg.shards_dir, split, load_manifest(cfg.shards_dir, verify=False))
    return {k: s["jpg"].shape[:2] for k, s in _samples(urls, ("jpg",)).items()}


def test_the_data_is_voc_sized_and_in_the_real_layouts(work):
    cfg, out = work["cfg"], work["out"]
    assert out["shards"]["train"] == 2 and out["shards"]["val"] == 2 and out["shards"]["train_aug"] == 3
    sizes = set(_images(cfg, "train_aug").values()) | set(_images(cfg, "val").values())
    assert sizes == {(375, 500), (500, 375)}
    assert len(list((work["sbd"] / "dataset" / "cls").glob("*.mat"))) == 3  # 1 SBD-only + 2 overlapping VOC
    assert len(list((work["sbd"] / "dataset" / "img").glob("*.jpg"))) == 1
    # the voc preset, except steps, batches, backbones and weights
    assert (cfg.cam.scales, cfg.cam.flip, cfg.cam.out_stride, cfg.aff.stride) == (SCALES, True, 4, 8)
    assert (cfg.cls.train.crop, cfg.aff.train.crop, cfg.seg.train.crop, cfg.seg.train.grad_accum) == (448, 448, 321, 2)
    assert cfg.seg.eval_scales == (1.0, 0.75, 0.5) and cfg.aff.label_mode == "psa" and cfg.pseudo.logt == 8


def test_every_stage_is_done_with_sane_metrics(work):
    cfg, out = work["cfg"], work["out"]
    for stage in CHAIN:
        assert runs.is_done(cfg.run_dir, stage), stage
    for stage in ("cls", "aff", "seg"):
        assert out[stage]["steps"] == 1 and math.isfinite(out[stage]["loss"]), stage
    cam, pseudo, ev = out["cam"], out["pseudo"], out["eval"]
    assert cam["samples"] == pseudo["samples"] == 3 and ev["samples"] == 2
    assert all(0 <= m <= 1 for m in (cam["miou"], cam["best_miou"], pseudo["miou"], ev["miou"]))
    assert cam["best_miou"] >= cam["miou"] and len(cam["sweep"]) == 12
    assert len(ev["iou"]) == 21 and np.array(ev["confusion"]).shape == (21, 21)
    assert np.array(ev["confusion"]).sum() > 0.9 * 2 * 500 * 375  # every val pixel but the void bands scored
    assert runs.read_done(cfg.run_dir, "eval")["miou"] == ev["miou"]
    assert json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())["miou"] == ev["miou"]
    assert (cfg.run_dir / "report" / "report.md").stat().st_size > 100


def test_every_stage_ran_at_full_size(work):
    seen = work["seen"]
    assert seen["cls"] == [((2, 3, 448, 448), (2, 3, 448, 448))]
    assert seen["aff"] == [((2, 3, 448, 448), (2, 448, 448))]
    assert seen["seg"] == [((1, 3, 321, 321), (1, 321, 321))] * 2  # batch 2 in grad_accum 2 micro-batches
    assert len(seen["cam"]) == 3
    assert {(shape[-2:], scales, flip) for shape, scales, flip in seen["cam"]} == {
        ((375, 500), SCALES, True), ((500, 375), SCALES, True)}
    # the random walk: CAMs at the image size, AffinityNet features on the stride-8 grid (⌈375/8⌉ × ⌈500/8⌉)
    assert {(cams[-2:], feats[-2:], stride) for cams, feats, stride in seen["walk"]} == {
        ((375, 500), (47, 63), 8), ((500, 375), (63, 47), 8)}
    assert len(seen["walk"]) == 3
    assert {(shape[-2:], scales, flip) for shape, scales, flip in seen["eval"]} == {
        ((375, 500), (1.0, 0.75, 0.5), False), ((500, 375), (1.0, 0.75, 0.5), False)}


def test_records_are_at_full_size(work):
    cfg = work["cfg"]
    images = _images(cfg, "train_aug")
    cams = _samples(sorted((cfg.run_dir / "cam").glob("*.tar")), CAM_KEYS)
    assert cams.keys() == images.keys()
    for key, rec in cams.items():
        H, W = images[key]
        meta = rec["cam.json"]
        assert tuple(meta["size"]) == (H, W) and 1 <= len(meta["classes"]) <= 20
        assert rec["cam.npy"].dtype == np.float16
        assert rec["cam.npy"].shape == (len(meta["classes"]), math.ceil(H / 4), math.ceil(W / 4))
        assert np.isfinite(rec["cam.npy"]).all() and rec["cam.npy"].min() >= 0 and rec["cam.npy"].max() <= 1.001
    for stage, split in (("pseudo", "train_aug"), ("eval", "val")):
        sizes = images if split == "train_aug" else _images(cfg, split)
        labels = _samples(sorted((cfg.run_dir / stage).glob("*.tar")), LABEL_KEYS)
        assert labels.keys() == sizes.keys(), stage
        for key, rec in labels.items():
            assert rec["png"].shape == sizes[key], (stage, key)
            assert set(np.unique(rec["png"]).tolist()) <= set(range(21)), (stage, key)
    aff_labels = _samples(sorted((cfg.run_dir / "aff" / "labels").glob("*.tar")), LABEL_KEYS)
    assert {k: v["png"].shape for k, v in aff_labels.items()} == images


@pytest.fixture(scope="module")
def big(work) -> dict:
    """One step of ResNet-38d (stage cls, crop 448, batch 1) and of DeepLab-v2 R101 (stage seg, crop 321, batch 2
    in 2 micro-batches) on the chain's data and pseudo labels."""
    root = work["root"]
    prepare_big(root / "run", root / "big")
    cfg = make_config(big_words(root, work["voc"], work["sbd"]) + ["stage=[cls,seg]"])
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        out = pipeline.run(cfg)
    return {"cfg": cfg, "out": out, "seen": rec.seen}


def test_resnet38d_448_and_deeplab_r101_321_train_one_step(big):
    cfg, out, seen = big["cfg"], big["out"], big["seen"]
    assert seen["cls"] == [((1, 3, 448, 448), (1, 3, 448, 448))]
    assert seen["seg"] == [((1, 3, 321, 321), (1, 321, 321))] * 2
    for stage, backbone in (("cls", "resnet38d"), ("seg", "resnet101")):
        assert out[stage]["steps"] == 1 and math.isfinite(out[stage]["loss"]), stage
        assert runs.read_json(cfg.run_dir / stage / "model.json")["backbone"] == backbone


def test_resnet38d_full_size_cam(big):
    """ResNet-38d's CAMs of a whole 500×375 image, with its mirror, at scales 1 and 0.5. (The voc preset's 4 scales at
    full size run in the chain above, test_every_stage_ran_at_full_size; 4 scales of ResNet-38d, up to 1000×750, took
    8 min of a loaded 2-core machine: ``python -m bench.rehearsal`` times them.)"""
    key, cams, size, seconds = full_size_cam(big["cfg"], scales=(1.0, 0.5))
    assert size == (375, 500) and seconds > 0
    labels = _samples(split_urls(big["cfg"].shards_dir, "train"), ("cls.npy",))[key]["cls.npy"]
    assert cams.shape == (int(labels.sum()), 375, 500) and cams.dtype == torch.float32
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
