"""Streams: inference reads split across ranks/workers, the deterministic resumable training stream, augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_dist.data import shards as shards_mod
from wsss_dist.data.shards import SkipCounter, load_manifest, read_shard, split_urls, write_shard
from wsss_dist.data.stream import (AUG_COLUMNS, aug_record, augment, augment_on_device, denormalize, draw_augment,
                                   normalize, split_by_node, split_by_worker, train_loader)
from wsss_dist.data.voc import PALETTE
from wsss_dist.errors import DataError
from conftest import VOC_MINI, needs_fixtures, raw_samples

KW = dict(batch_size=5, crop=40, resize_long=(36, 60), seed=7, shuffle_buffer=20)


def _urls(toy_shards, split="train_aug"):
    return split_urls(toy_shards, split, load_manifest(toy_shards, verify=False))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"])
        and (("mask" not in x and "mask" not in y) or torch.equal(x["mask"], y["mask"])) for x, y in zip(a, b))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_inference_round_trip_over_two_ranks_and_two_workers(toy_shards, toy_source):
    urls = [{"url": u} for u in _urls(toy_shards)]
    seen = []
    for rank in range(2):
        for worker in range(2):
            mine = list(split_by_worker(worker, 2)(split_by_node(rank, 2)(iter(urls))))
            for d in mine:
                for s in read_shard(d["url"], ("jpg", "cls.npy", "seg.png")):
                    seen.append(s["__key__"])
                    assert np.array_equal(s["seg.png"], toy_source.mask(s["__key__"]))
                    assert np.array_equal(s["cls.npy"], toy_source.labels(s["__key__"]))
    assert sorted(seen) == sorted(toy_source.ids("train_aug")) and len(seen) == len(set(seen))


def test_train_loader_batches(toy_shards):
    b = next(train_loader(_urls(toy_shards), **KW))
    assert set(b) == {"key", "image", "labels", "skipped"}  # no ground truth
    assert b["image"].shape == (5, 3, 40, 40) and b["image"].dtype == torch.float32
    assert b["labels"].shape == (5, 20) and b["labels"].dtype == torch.float32 and b["skipped"] == 0
    assert len(b["key"]) == 5 and (b["labels"].sum(1) >= 1).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_is_deterministic(toy_shards, workers):
    urls = _urls(toy_shards)
    a = _take(train_loader(urls, num_workers=workers, **KW), 10)  # 50 samples: past the end of the 40-image epoch
    b = _take(train_loader(urls, num_workers=workers, **KW), 10)
    assert _same(a, b)
    c = _take(train_loader(urls, num_workers=workers, **{**KW, "seed": 8}), 10)
    assert not _same(a, c)
    if workers == 0:  # (with workers, each worker's epochs end at different batches)
        keys = [k for x in a[:8] for k in x["key"]]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 40  # one epoch = every image once


@pytest.mark.parametrize("workers,start", [(0, 3), (0, 9), (2, 3), (2, 9)])
def test_start_batch_equals_dropping_batches(toy_shards, workers, start):
    urls = _urls(toy_shards)
    full = _take(train_loader(urls, num_workers=workers, **KW), start + 4)
    resumed = _take(train_loader(urls, num_workers=workers, start_batch=start, **KW), 4)
    assert _same(full[start:], resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_the_global_batch(toy_shards, workers):
    """With the global batch split over ranks, rank r's batch j is samples r, r+W, ... of the one-process batch j
    (same images, same augmentation): the recipe does not change with the number of processes; resume too."""
    urls = _urls(toy_shards)
    kw = {**KW, "batch_size": 2, "num_workers": workers}
    one = _take(train_loader(urls, **{**kw, "batch_size": 4}), 5)
    two = [_take(train_loader(urls, rank=r, world=2, **kw), 5) for r in range(2)]
    for j in range(5):
        assert two[0][j]["key"] + two[1][j]["key"] != one[j]["key"]  # interleaved, not halves
        assert two[0][j]["key"] == one[j]["key"][0::2] and two[1][j]["key"] == one[j]["key"][1::2]
        assert torch.equal(two[1][j]["image"], one[j]["image"][1::2])
    resumed = _take(train_loader(urls, rank=1, world=2, start_batch=3, **kw), 2)
    assert _same(two[1][3:], resumed)


def test_global_batch_must_divide_over_processes_and_accumulation(monkeypatch):
    from wsss_dist.data.stream import micro_batch
    from wsss_dist.errors import ConfigError

    assert micro_batch(10, 1, 2) == 5 and micro_batch(16, 4, 1) == 4
    with pytest.raises(ConfigError, match=r"batch_size=10 is the global batch and must divide over 4 process\(es\)"):
        micro_batch(10, 4, 1)
    with pytest.raises(ConfigError, match=r"cls.train.batch_size=16 .* over 3 process"):
        from wsss_dist.config import check_batches, make_config

        check_batches(make_config(["stage=cls"]), 3)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch and torchrun set in each process
    with pytest.raises(ConfigError, match=r"^cls.train.batch_size=7 is the global batch and must divide over 2 process\(es\)"):
        make_config(["stage=cls", "cls.train.batch_size=7"])


def test_ground_truth_is_never_decoded(toy_shards, tmp_path, monkeypatch):
    decoded = []
    real = shards_mod.decode_value
    monkeypatch.setattr(shards_mod, "decode_value", lambda name, data: decoded.append(name) or real(name, data))
    # shards whose seg.png is garbage: a reader that touched it would skip samples
    bad = tmp_path / "bad"
    bad.mkdir()
    for u in _urls(toy_shards)[:2]:
        samples = [{**s, "seg.png": b"garbage"} for s in raw_samples(u)]
        write_shard(bad / Path(u).name, samples)
    b = _take(train_loader(sorted(str(p) for p in bad.glob("*.tar")), **KW), 3)
    assert "seg.png" not in decoded and all(x["skipped"] == 0 for x in b) and "mask" not in b[0]


def _mask_shards(toy_shards, toy_source, out: Path, urls: list[str], drop: str | None = None) -> None:
    from wsss_dist.data.voc import write_mask_png

    out.mkdir(exist_ok=True)
    for u in urls:
        keys = [s["__key__"] for s in read_shard(u, ("cls.npy",))]
        write_shard(out / Path(u).name, [{"__key__": k, "png": write_mask_png(None, toy_source.mask(k))}
                                         for k in keys if k != drop])


def test_masks_from_mask_dir(toy_shards, toy_source, tmp_path):
    urls = _urls(toy_shards)
    _mask_shards(toy_shards, toy_source, tmp_path / "masks", urls)
    a = _take(train_loader(urls, mask_dir=tmp_path / "masks", **KW), 9)
    b = _take(train_loader(urls, **KW), 9)
    assert [x["key"] for x in a] == [x["key"] for x in b]  # the mask does not change the order or the images
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    for x in a:
        m = x["mask"]
        assert m.dtype == torch.int64 and m.shape == (5, 40, 40)
        assert set(m.unique().tolist()) <= set(range(21)) | {255}
        for i in range(5):  # classes in the (cropped) mask are image-level labels of that image
            present = set(m[i].unique().tolist()) - {0, 255}
            assert present <= set((torch.nonzero(x["labels"][i]).flatten() + 1).tolist())


def test_mask_mismatch_fails_clearly(toy_shards, toy_source, tmp_path):
    urls = _urls(toy_shards)[:2]
    first = next(read_shard(urls[0], ("cls.npy",)))["__key__"]
    _mask_shards(toy_shards, toy_source, tmp_path / "m", urls, drop=first)
    with pytest.raises(DataError, match=first):
        _take(train_loader(urls, mask_dir=tmp_path / "m", **{**KW, "shuffle_buffer": 1}), 3)
    with pytest.raises(DataError, match="no mask shard"):
        _take(train_loader(urls, mask_dir=tmp_path / "nowhere", **KW), 1)
    with pytest.raises(DataError, match=r"^\S*m/train_aug-00000\d.tar: no 'png' for key") as e:  # from a DataLoader worker
        _take(train_loader(urls, mask_dir=tmp_path / "m", num_workers=2, **{**KW, "shuffle_buffer": 1}), 4)
    assert "\n" not in str(e.value)


def test_augment_is_joint_and_pads_right():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, (30, 50)).astype(np.uint8)
    img = PALETTE[mask]  # the image encodes its own mask
    for seed in range(6):
        x, m = augment(img, mask, np.random.default_rng(seed), crop=40, resize_long=None, jitter=False)
        back = denormalize(x)
        pad = m == 255
        assert pad.any() and (~pad).any()  # 30 px high → padded to 40
        assert np.array_equal(back[~pad.numpy()], PALETTE[m[~pad].numpy()])  # same pixels, same flip, same crop
        assert torch.allclose(x[:, pad], normalize(np.zeros((1, 1, 3), np.uint8)).view(3, 1) * 0)  # pad 0 after norm
    x, m = augment(img, mask, np.random.default_rng(1), crop=24, scale_range=(0.5, 1.5))
    assert x.shape == (3, 24, 24) and m.shape == (24, 24)


def test_normalize_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    x = normalize(img)
    assert x.shape == (3, 7, 9) and x.dtype == torch.float32
    assert np.array_equal(denormalize(x), img) and abs(float(normalize(np.full((2, 2, 3), 124, np.uint8))[0].mean())) < 0.02


@pytest.mark.parametrize("on_device", [False, True])
def test_broken_training_sample_is_counted(toy_shards, tmp_path, on_device):
    urls = _urls(toy_shards)[:2]
    out = tmp_path / "b"
    out.mkdir()
    for j, u in enumerate(urls):
        samples = raw_samples(u)
        if j == 0:
            samples[1]["jpg"] = samples[1]["jpg"][:50]
        write_shard(out / Path(u).name, samples)
    b = _take(train_loader(sorted(str(p) for p in out.glob("*.tar")), max_skip_fraction=0.5, on_device=on_device,
                           **{**KW, "shuffle_buffer": 1}), 4)
    assert b[1]["skipped"] == 1 and b[-1]["skipped"] == 2  # 11 good samples an epoch: counted again in epoch 2
    if on_device:  # the truncated JPEG was dropped before the device could fail on it
        assert all(augment_on_device(x, torch.device("cpu"))["image"].shape == (5, 3, 40, 40) for x in b)
    counter = SkipCounter()
    assert len(list(read_shard(str(out / Path(urls[0]).name), ("jpg", "cls.npy"), counter))) == 5 and counter.skipped == 1


def test_missing_shard_is_a_clear_error(toy_shards, tmp_path):
    with pytest.raises(DataError, match="nope.tar: shard not found"):
        train_loader(_urls(toy_shards) + [str(tmp_path / "nope.tar")], **KW)
    with pytest.raises(DataError, match="shard not found"):
        list(read_shard(str(tmp_path / "nope.tar"), ("jpg",)))


def test_renormalize_gives_another_models_normalisation():
    from wsss_dist.data.stream import IMAGENET_MEAN, IMAGENET_STD, renormalize

    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img)[None]
    want = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(renormalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[0], want, atol=1e-5)
    assert renormalize(x, IMAGENET_MEAN, IMAGENET_STD) is x


# ------------------------------------------------------------------------- data.augment_on=device (encoded batches)
STD255 = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # normalised units → uint8 levels


@pytest.mark.parametrize("workers", [0, 2])
def test_device_augmentation_is_the_host_augmentation(toy_shards, toy_source, tmp_path, workers):
    urls = _urls(toy_shards)
    _mask_shards(toy_shards, toy_source, tmp_path / "masks", urls)
    kw = {**KW, "mask_dir": tmp_path / "masks", "num_workers": workers}
    host = _take(train_loader(urls, **kw), 9)  # past the end of the 40-image epoch
    dev = _take(train_loader(urls, on_device=True, **kw), 9)
    for h, d in zip(host, dev):
        assert "image" not in d and len(d["jpeg"]) == 5 and d["aug"].shape == (5, len(AUG_COLUMNS))
        assert all(t.dtype == torch.uint8 and bytes(t[:2].tolist()) == b"\xff\xd8" for t in d["jpeg"])  # still JPEG
        d = augment_on_device(d, torch.device("cpu"))
        assert set(d) == set(h) and d["key"] == h["key"] and d["skipped"] == h["skipped"]
        assert torch.equal(d["labels"], h["labels"]) and torch.equal(d["mask"], h["mask"])
        assert d["image"].shape == h["image"].shape and d["image"].dtype == torch.float32
        lv = ((d["image"] - h["image"]) * STD255).abs()
        assert lv.mean() < 0.05 and (lv > 1.5).float().mean() < 0.002, (lv.mean(), (lv > 1.5).float().mean())
        assert torch.equal(d["image"] == 0, h["image"] == 0)  # the same padding


@needs_fixtures
def test_device_augmentation_of_a_voc_jpeg_at_a_448_crop():
    from wsss_dist.data.shards import decode_value

    path = sorted((VOC_MINI / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    raw = path.read_bytes()
    img = decode_value("jpg", raw)
    H, W = img.shape[:2]
    for seed in range(3):
        x, _ = augment(img, None, np.random.default_rng(seed), crop=448, resize_long=(448, 768))
        p = draw_augment(np.random.default_rng(seed), H, W, 448, (448, 768))
        batch = {"key": [path.stem], "jpeg": [torch.frombuffer(bytearray(raw), dtype=torch.uint8)],
                 "aug": aug_record(p, True)[None], "labels": torch.zeros(1, 20)}
        y = augment_on_device(batch, torch.device("cpu"))["image"][0]
        lv = ((y - x) * STD255[0]).abs()
        assert lv.mean() < 0.05 and lv.max() <= 12, (path.name, seed, lv.mean(), lv.max())


def test_the_engine_finishes_encoded_batches_on_its_device(toy_shards, tmp_path):
    from wsss_dist.config import OptimCfg, TrainCfg
    from wsss_dist.engine import fit

    urls = _urls(toy_shards)
    seen: list[torch.Tensor] = []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 20))

    def loss_fn(m, batch, step):
        seen.append(batch["image"].detach().clone())
        return torch.nn.functional.multilabel_soft_margin_loss(m(batch["image"]), batch["labels"]), {}

    fit(model=model, param_groups=[{"params": list(model.parameters())}], loss_fn=loss_fn,
        make_loader=lambda rank, world, start: train_loader(urls, on_device=True, **KW),
        out_dir=tmp_path / "fit", train=TrainCfg(steps=3, batch_size=5, crop=40, ckpt_every=100, mixed_precision="no"),
        optim=OptimCfg(name="sgd", lr=0.01))
    host = _take(train_loader(urls, **KW), 3)
    assert len(seen) == 3
    for x, h in zip(seen, host):
        assert x.shape == h["image"].shape and ((x - h["image"]) * STD255).abs().mean() < 0.05


def test_device_stream_drops_a_jpeg_cut_after_its_header(toy_shards, tmp_path):
    url = _urls(toy_shards)[0]
    samples = raw_samples(url)
    samples[2]["jpg"] = samples[2]["jpg"][: len(samples[2]["jpg"]) * 3 // 5]  # header whole, no end-of-image marker
    write_shard(tmp_path / Path(url).name, samples)
    b = next(train_loader([str(tmp_path / Path(url).name)], max_skip_fraction=0.5, on_device=True,
                          **{**KW, "shuffle_buffer": 1}))
    assert b["skipped"] == 1 and samples[2]["__key__"] not in b["key"]
    assert augment_on_device(b, torch.device("cpu"))["image"].shape == (5, 3, 40, 40)
