"""The stages end to end on a tiny toy dataset, as a user runs them (python -m wsss_dist ...)."""
import copy

import numpy as np
import pytest
import torch

from wsss_dist import pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.registry import METHODS

pytestmark = pytest.mark.slow  # the whole chain and every method trained on the toy data

# `shards` (conftest): the TINY toy dataset's shards, built once per session


def _cfg(shards, tmp_path, *extra):
    return make_config(shards + [f"run={tmp_path / 'run'}", *extra])


@pytest.fixture(scope="module")
def chain(shards, tmp_path_factory):
    """The whole chain, method cam, run once: (config, metrics of every stage)."""
    cfg = _cfg(shards, tmp_path_factory.mktemp("chain"), "stage=[cls,cam,aff,pseudo,seg,eval,report]", "method=cam")
    return cfg, pipeline.run(cfg)


def test_whole_chain_baseline(chain):
    cfg, out = chain
    for stage in ("cls", "cam", "aff", "pseudo", "seg", "eval", "report"):
        assert runs.is_done(cfg.run_dir, stage)
    cam, pseudo, ev = out["cam"], out["pseudo"], out["eval"]
    assert 0 <= cam["miou"] <= 1 and 0 <= pseudo["miou"] <= 1 and 0 <= ev["miou"] <= 1
    assert cam["best_miou"] >= cam["miou"] and len(cam["sweep"]) == len(set(cfg.cam.sweep) | {cfg.cam.bg_threshold})
    assert cam["samples"] == 48 and pseudo["samples"] == 48 and ev["samples"] == 12  # train_aug = 24 + 24, val 12
    assert len(ev["iou"]) == 21 and np.array(ev["confusion"]).shape == (21, 21)
    rep = cfg.run_dir / "report"
    assert (rep / "report.md").read_text().count("|") > 10 and (rep / "cams.png").stat().st_size > 1000
    assert (rep / "predictions.png").exists() and "<table" in (rep / "report.html").read_text()
    # a rerun does nothing: every stage is skipped and returns its stored metrics
    again = pipeline.run(copy.deepcopy(cfg))
    assert again["cam"]["miou"] == cam["miou"] and again["eval"]["seconds"] == ev["seconds"]
    # the toy preset starts AffinityNet (at stride 4) and DeepLab from the trained classifier's backbone
    from wsss_dist.errors import ConfigError
    from wsss_dist.models.build import build_affinity, build_deeplab, load_trained

    assert cfg.aff.init == cfg.seg.init == "cls" and cfg.aff.stride == 4
    trained = load_trained(cfg, "cls", "test").backbone.state_dict()
    for model in (build_affinity(cfg), build_deeplab(cfg)):
        state = model.backbone.state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    assert load_trained(cfg, "aff", "test").stride == 4
    bad = copy.deepcopy(cfg)
    bad.seg.backbone = "resnet34"
    with pytest.raises(ConfigError, match="seg.init=cls"):
        build_deeplab(bad)


@pytest.mark.parametrize("method", [m for m, entry in METHODS.items() if entry.trains_classifier])  # clip_es: tests/test_clip_es.py
def test_each_method_trains_and_gives_cams(shards, chain, tmp_path, method):
    if method == "cam":  # the whole chain's cls and cam stages are exactly this run's (same words, method cam)
        cfg, out = chain
    else:
        cfg = _cfg(shards, tmp_path, "stage=all" if method == "teach" else "stage=[cls,cam]", f"method={method}")
        if method == "teach":
            cfg.stage = "[teacher,cls,cam]"
        out = pipeline.run(cfg)
    assert out["cls"]["steps"] == cfg.cls.train.steps
    assert np.isfinite(out["cls"]["loss"])
    assert 0 <= out["cam"]["miou"] <= 1
    meta = runs.read_json(cfg.run_dir / "cls" / "model.json")
    if method in ("sc", "teach"):
        assert meta["num_sub"] >= 20 - 0  # at least one sub-category per class present in the toy set
        sub = np.load(cfg.run_dir / "cls" / ("round1" if method == "sc" else "") / "subcategories.npz")
        assert sub["sub_labels"].shape[1] == meta["num_sub"]
    else:
        assert meta["num_sub"] == 0
