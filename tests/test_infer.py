"""Overlapped inference (engine.map_shards): reader workers and the writer thread change no output.

Every inference stage gives the same bytes with ``data.num_workers=0`` (decoding in the main process) and ``=2``
(reader workers): CAM shards (fp32 CAMs stored as float16), affinity-label, pseudo-label and prediction shards,
their per-shard records and the mIoUs. The models are seeded random networks (no training: what the engine sees is
the same). A deleted output shard is the only one redone, to the same bytes; errors of a worker or of the writer
thread are the usual one-line errors. The tests that run the stages are marked slow (about 40 s of CPU together).
"""
import os
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "data.toy.n_train=8", "data.toy.n_val=4", "data.toy.n_sbd=4", "data.toy.size=40", "data.shard_size=3",
    "model.backbone=resnet18", "cam.scales=[1.0,0.5]", "aff.radius=3", "pseudo.radius=3", "pseudo.logt=4",
    "seg.eval_scales=[1.0,0.5]",
]  # train_aug = 12 images in 4 shards, val 4 in 2 (3 + 1)
OUTPUTS = ("cam", "aff/labels", "pseudo", "eval")


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> list[str]:
    """Config words of tiny toy shards (built once)."""
    root = tmp_path_factory.mktemp("infer")
    args = WORDS + [f"data.toy.root={root / 'src'}", f"data.shards_dir={root / 'shards'}"]
    pipeline.run(make_config(args + ["stage=shards", f"run={root / 'runs' / 'shards'}", "data.num_workers=0"]))
    return args


@pytest.fixture(scope="module")
def models(words, tmp_path_factory) -> Path:
    """A run dir whose cls, aff and seg stages are done, with seeded random networks."""
    from wsss_dist.engine import save_model_weights
    from wsss_dist.models.build import affinity_spec, classifier_spec, create_model, deeplab_spec, write_spec

    run = tmp_path_factory.mktemp("models") / "run"
    cfg = make_config(words + [f"run={run}"])
    for i, (stage, spec) in enumerate((("cls", classifier_spec(cfg)), ("aff", affinity_spec(cfg)),
                                       ("seg", deeplab_spec(cfg)))):
        torch.manual_seed(i)
        save_model_weights(create_model(spec), run / stage / "model.safetensors")
        write_spec(run / stage, spec)
        runs.mark_done(run, stage, {"steps": 0})
    return run


def _infer(words: list[str], models: Path, run: Path, workers: int) -> dict:
    """cam, aff labels, pseudo and eval into a copy of ``models``; their metrics."""
    from wsss_dist.stages import aff, cam, eval as eval_, pseudo

    if not run.exists():
        shutil.copytree(models, run)
    cfg = make_config(words + [f"run={run}", f"data.num_workers={workers}"])
    out = {"cam": cam.run(cfg)}
    runs.mark_done(run, "cam", out["cam"])
    out["aff"] = aff.write_labels(cfg)
    out["pseudo"] = pseudo.run(cfg)
    out["eval"] = eval_.run(cfg)
    return out


def _files(run: Path) -> dict[str, bytes]:
    """Every output shard and per-shard record of the inference stages, by path."""
    return {str(p.relative_to(run)): p.read_bytes() for d in OUTPUTS for p in sorted((run / d).glob("*.tar*"))}


def _drop_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


@pytest.fixture(scope="module")
def serial(words, models, tmp_path_factory) -> tuple[Path, dict]:
    """The outputs with data.num_workers=0 (decoding in the main process, as before the reader workers)."""
    run = tmp_path_factory.mktemp("serial") / "run"
    return run, _infer(words, models, run, 0)


@pytest.mark.slow  # the four stages twice: ~25 s of CPU
def test_workers_give_identical_outputs(words, models, serial, tmp_path):
    run0, m0 = serial
    m2 = _infer(words, models, tmp_path / "run", 2)
    a, b = _files(run0), _files(tmp_path / "run")
    assert len([k for k in a if k.startswith("cam/") and k.endswith(".tar")]) == 4
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    assert m0["cam"]["samples"] == 12 and m0["eval"]["samples"] == 4
    for stage in m0:
        assert _drop_seconds(m0[stage]) == _drop_seconds(m2[stage]), stage
    assert m0["cam"]["miou"] == m2["cam"]["miou"] and m0["eval"]["miou"] == m2["eval"]["miou"]


@pytest.mark.slow
def test_deleted_shard_is_the_only_one_redone(words, models, serial, tmp_path, caplog):
    from wsss_dist.stages import cam

    run0, m0 = serial
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    victim = run / "cam" / "train_aug-000002.tar"
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (run / "cam").glob("*.tar*") if not p.name.startswith(victim.name)}
    caplog.set_level("INFO")
    metrics = cam.run(make_config(words + [f"run={run}", "data.num_workers=2"]))
    assert "cam: 3 of 4 shards of this rank already done, resuming" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (run / "cam").glob("*.tar*") if p.name in before} == before
    assert victim.read_bytes() == (run0 / "cam" / victim.name).read_bytes()
    assert _files(run) == _files(run0) and metrics["sweep"] == m0["cam"]["sweep"]


@pytest.mark.slow
def test_batched_cam_forwards(words, models, serial, tmp_path):
    """cam.batch_images=2: the same keys, classes and CAMs (the key's doc allows the last bits to differ) and mIoU;
    multiscale_cams of 3 same-size images equals multiscale_cam of each."""
    from wsss_dist.data.records import CAM_KEYS
    from wsss_dist.data.shards import read_shard
    from wsss_dist.errors import ConfigError
    from wsss_dist.models.build import load_model
    from wsss_dist.stages import cam

    run0, m0 = serial
    run = tmp_path / "run"
    shutil.copytree(models, run)
    metrics = cam.run(make_config(words + [f"run={run}", "data.num_workers=2", "cam.batch_images=2"]))
    for tar in sorted((run0 / "cam").glob("*.tar")):
        want, got = (list(read_shard(str(d / "cam" / tar.name), CAM_KEYS)) for d in (run0, run))
        assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
        assert all(g["cam.json"] == w["cam.json"] for g, w in zip(got, want))
        assert all(np.allclose(g["cam.npy"], w["cam.npy"], atol=2e-3) for g, w in zip(got, want))
    assert metrics["miou"] == pytest.approx(m0["cam"]["miou"], abs=1e-3)
    model = load_model(models / "cls").to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x, labels = torch.randn(3, 3, 40, 52), [torch.eye(20)[i] + torch.eye(20)[5] for i in (0, 5, 9)]
    one = [cam.multiscale_cam(model, x[i], labels[i], (1.0, 0.5)) for i in range(3)]
    for a, b in zip(cam.multiscale_cams(model, x, labels, (1.0, 0.5)), one):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match="cam.batch_images=0"):
        cam.run(make_config(words + [f"run={tmp_path / 'other'}", "cam.batch_images=0"]))


def test_batches_are_same_size_runs_of_one_shard(words, tmp_path):
    """map_shards(batch=2) hands ``process`` runs of ≤ 2 consecutive same-size samples of one shard (3 per shard:
    a run of 2, then 1; one odd size cuts a run); the outputs equal those of per-sample calls."""
    from wsss_dist.data.shards import load_manifest, split_ids
    from wsss_dist.engine import map_shards

    cfg = make_config(words + [f"run={tmp_path / 'run'}", "data.num_workers=2"])
    prepare = partial(crop_image, odd=split_ids(load_manifest(cfg.shards_dir), "train_aug")[3])  # shard 1's first
    groups = []

    def record(sample: dict) -> dict:
        return {"__key__": sample["__key__"], "n.json": {"size": list(sample["image"].shape)}}

    def process(samples: list[dict]) -> list[tuple[dict, None]]:
        groups.append([(s["__shard__"], tuple(s["image"].shape)) for s in samples])
        return [(record(s), None) for s in samples]

    batched = map_shards(cfg, "train_aug", tmp_path / "a", ("jpg",), process, prepare=prepare, batch=2)
    single = map_shards(cfg, "train_aug", tmp_path / "b", ("jpg",), lambda s: (record(s), None), prepare=prepare)
    assert batched == single and sum(map(len, groups)) == 12 and all(len(set(g)) == 1 for g in groups)
    sizes = {name: [len(g) for g in groups if g[0][0] == name] for name in {g[0][0] for g in groups}}
    assert sorted(sizes) == [f"train_aug-{i:06d}.tar" for i in range(4)]
    assert sizes["train_aug-000001.tar"] == [1, 2] and all(v == [2, 1] for k, v in sizes.items() if not k.endswith("1.tar"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b").iterdir())


def test_split_features_same_with_workers(words, models):
    from wsss_dist.engine import split_features
    from wsss_dist.models.build import load_model

    model = load_model(models / "cls")
    got = [split_features(make_config(words + [f"run={models}", f"data.num_workers={w}"]), "val",
                          lambda x: model(x)["pooled"]) for w in (0, 2)]
    assert len(got[0]["keys"]) == 4 and list(got[0]["keys"]) == list(got[1]["keys"])
    assert np.array_equal(got[0]["features"], got[1]["features"]) and np.array_equal(got[0]["labels"], got[1]["labels"])


def test_worker_error_is_one_line(words, models, serial, tmp_path):
    """A CAM shard changed after it was written: the reader worker's DataError arrives as its own one line."""
    from wsss_dist.stages import aff

    run = tmp_path / "run"
    shutil.copytree(serial[0], run)
    shutil.rmtree(run / "aff" / "labels")
    tar = run / "cam" / "train_aug-000001.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        aff.write_labels(make_config(words + [f"run={run}", "data.num_workers=2"]))
    assert str(e.value).startswith(f"{tar}: sha256 differs") and "run stage=cam again" in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_writer_error_reaches_the_caller(words, tmp_path):
    """A record the writer thread refuses (a key that could leave its folder): the same DataError, in the caller."""
    from wsss_dist.engine import map_shards

    cfg = make_config(words + [f"run={tmp_path / 'run'}", "data.num_workers=2"])

    def process(sample: dict) -> tuple[dict, None]:
        return {"__key__": "../evil", "n.json": {"n": 1}}, None

    with pytest.raises(DataError, match="refused"):
        map_shards(cfg, "train_aug", tmp_path / "out", ("cls.npy",), process)
    assert not list((tmp_path / "out").glob("*.tar")) and not list(tmp_path.rglob("evil*"))


def crop_image(sample: dict, odd: str) -> dict:
    """A reader-worker prepare: the image cropped to 28 × 28, but to 26 × 28 for sample ``odd``."""
    from wsss_dist.data.stream import normalize

    h = 26 if sample["__key__"] == odd else 28
    sample["image"] = normalize(sample["jpg"][:h, :28])
    return sample


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_workers_give_the_same_cams(words, models, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), 2 reader workers each: rank r takes shards i % 2 == r, its
    workers split those; the CAM shards equal those of one process reading in its main thread (both runs with one
    torch thread per process: CPU convolutions may round differently with another thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*words, "stage=cam"]
    for name, workers, launch in (("one", 0, []), ("two", 2, [
            "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())])):
        shutil.copytree(models, tmp_path / name)
        cmd = [sys.executable, *launch, "-m", "wsss_dist", "device=cpu", *args, f"run={tmp_path / name}", f"data.num_workers={workers}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = ({k: v for k, v in _files(tmp_path / n).items() if k.startswith("cam/")} for n in ("one", "two"))
    assert len(one) == 12 and one == two  # 4 shards, each with its .json and .cm.npy records
    assert runs.read_done(tmp_path / "two", "cam")["miou"] == runs.read_done(tmp_path / "one", "cam")["miou"]
