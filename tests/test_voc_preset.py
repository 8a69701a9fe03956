"""The voc preset: the references' recipes (docs/methods.md, "The voc preset (references' recipes)")."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from wsss_dist.config import PRESETS, TOY_PRESET, VOC_PRESET, ConfigError, get, make_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
NO_WEIGHTS = ["model.weights=none", "seg.weights=none", "teacher.weights=none"]
TRAIN_AUG, TRAIN = 10582, 1464


def voc(*words: str):
    """``data=voc`` with ``words``; with ``*.weights=none`` when the config takes (or needs) them, else without."""
    base = ["data=voc", "data.voc_root=/x", *words]
    try:
        return make_config(base + NO_WEIGHTS)
    except ConfigError:
        return make_config(base)


def steps(n: int, batch: int, epochs: int) -> int:
    """The references' optimiser steps: drop_last batches per epoch times epochs."""
    return n // batch * epochs


def test_voc_preset_is_applied_for_data_voc():
    assert PRESETS["voc"] is VOC_PRESET
    cfg = voc()
    assert (cfg.model.backbone, cfg.model.output_stride, cfg.model.frozen_bn) == ("resnet38d", 8, True)
    # classifier: psa, 15 epochs of train_aug at batch 16, crop 448
    assert cfg.cls.split == "train_aug"
    assert cfg.cls.train.steps == steps(TRAIN_AUG, 16, 15) == 9915
    assert (cfg.cls.train.batch_size, cfg.cls.train.crop, cfg.cls.train.resize_long) == (16, 448, (256, 512))
    assert cfg.cls.optim.name == "sgd" and cfg.cls.optim.momentum == 0.9 and not cfg.cls.optim.legacy_momentum_bug
    assert cfg.cls.optim.lr == pytest.approx(0.1 * 0.1 / 0.9995) and cfg.cls.optim.weight_decay == 5e-4
    # CAMs
    assert cfg.cam.scales == (1.0, 0.5, 1.5, 2.0) and cfg.cam.flip and cfg.cam.bg_threshold == 0.15
    assert (cfg.cam.split, cfg.cam.eval_split, cfg.cam.out_stride) == ("train_aug", "train", 4)
    # affinity labels and AffinityNet: psa, 8 epochs at batch 8, crop 448
    assert (cfg.aff.label_mode, cfg.aff.alpha_low, cfg.aff.alpha_high) == ("psa", 4.0, 32.0)
    assert cfg.aff.crf is False  # optional extra: the table says to type aff.crf=true
    assert (cfg.aff.radius, cfg.aff.stride, cfg.aff.init) == (5, 8, "imagenet")
    assert cfg.aff.train.steps == steps(TRAIN_AUG, 8, 8) == 10576
    assert (cfg.aff.train.batch_size, cfg.aff.train.crop, cfg.aff.train.resize_long) == (8, 448, (0, 0))
    assert cfg.aff.optim.lr == pytest.approx(0.1 * 0.1 / 0.9995) and cfg.aff.optim.momentum == 0.9
    # random walk: psa
    assert (cfg.pseudo.alpha, cfg.pseudo.beta, cfg.pseudo.logt, cfg.pseudo.radius) == (16.0, 8.0, 8, 5)
    # DeepLab-v2: deeplab-pytorch
    s = cfg.seg
    assert (s.backbone, s.init, s.frozen_bn) == ("resnet101", "imagenet", True)
    assert (s.train.steps, s.train.batch_size, s.train.grad_accum, s.train.crop) == (20000, 10, 2, 321)
    assert s.train.batch_size // s.train.grad_accum == 5  # deeplab-pytorch's batch 5 × ITER_SIZE 2, one process
    assert (s.optim.lr, s.optim.momentum, s.optim.weight_decay, s.optim.poly_power) == (2.5e-4, 0.9, 5e-4, 0.9)
    assert s.scale_range == (0.5, 1.5) and s.eval_scales == (1.0, 0.75, 0.5) and s.eval_flip is False


def test_voc_method_keys_are_the_seeds():
    cfg = voc("method=sc")
    c = cfg.cls
    assert (c.mixup_alpha, c.fmix_alpha, c.fmix_decay, c.manifold_alpha) == (0.2, 1.0, 3.0, 0.2)
    assert (c.ent_weight, c.con_weight, c.sub_weight) == (0.02, 2e-4, 2.0)
    assert (c.sc_rounds, c.cluster, c.finch_partition, c.kmeans_k) == (2, "finch", "last", 10)
    assert cfg.cls_rounds() == [0, 1]  # the seed's one clustering round
    t = voc("method=teach").teacher
    assert (t.arch, t.img_size, t.train.batch_size, t.train.crop) == ("vit_base_patch16_224", 224, 8, 224)
    assert (t.optim.weight_decay, t.optim.grad_clip) == (0.0, 1.0)


def test_every_preset_key_is_a_real_key_and_takes_its_value():
    cfg = voc()  # make_config raises on an unknown key or a bad value of the preset
    for key, value in VOC_PRESET.items():
        assert get(cfg, key) == (tuple(value) if isinstance(value, list) else value), key


def _steady_step(lr: float, momentum: float, n: int = 400) -> float:
    """The displacement of one parameter per SGD step under a constant unit gradient after ``n`` steps."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum)
    before = 0.0
    for _ in range(n):
        before = p.item()
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    return before - p.item()


def test_lr_momentum_choice_matches_the_references_effective_step():
    """lr_ours/(1 − 0.9) = lr_ref/(1 − 5e-4): the same steady-state step as psa/irn/the seed's momentum-slot bug."""
    from wsss_dist.engine.optim import build_optimizer

    for stage in ("cls", "aff"):
        ours = getattr(voc(), stage).optim
        ref_lr, ref_momentum = 0.1, ours.weight_decay  # psa: lr 0.1, SGD momentum slot = weight decay 5e-4
        assert ours.lr / (1 - ours.momentum) == pytest.approx(ref_lr / (1 - ref_momentum), rel=1e-12)
        ratio = _steady_step(ours.lr, ours.momentum) / _steady_step(ref_lr, ref_momentum)
        assert ratio == pytest.approx(1.0, rel=1e-5)
        assert ours.lr == pytest.approx(0.1 * ref_lr, rel=1e-3)  # what a naive copy of lr 0.1 would overshoot: 10×

        # the documented words reproduce theirs exactly: momentum = weight decay, the reference lr
        legacy = getattr(voc(f"{stage}.optim.legacy_momentum_bug=true", f"{stage}.optim.lr=0.1"), stage).optim
        opt = build_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}], legacy)
        assert opt.param_groups[0]["momentum"] == 5e-4 and opt.param_groups[0]["lr"] == 0.1
        opt = build_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}], ours)
        assert opt.param_groups[0]["momentum"] == 0.9
        assert dataclasses.replace(ours, lr=0.1, legacy_momentum_bug=True) == legacy


def test_toy_preset_is_unchanged():
    assert PRESETS["toy"] is TOY_PRESET and len(TOY_PRESET) == 59  # 45 + 12 irn.* keys (refine=irn only: 9 + the walk's β, logt, bg) + clip_es's tiny random CLIP (2)
    cfg = make_config([])
    assert (cfg.clip.arch, cfg.clip.weights) == ("tiny", "random")
    assert (cfg.model.backbone, cfg.model.frozen_bn) == ("resnet18", False)
    assert (cfg.cls.train.steps, cfg.cls.train.batch_size, cfg.cls.train.crop) == (300, 16, 56)
    assert (cfg.cls.optim.name, cfg.cls.optim.lr, cfg.cls.sc_rounds) == ("adamw", 2e-3, 2)
    assert (cfg.aff.stride, cfg.aff.init, cfg.aff.train.steps, cfg.aff.train.crop) == (4, "cls", 120, 80)
    assert (cfg.pseudo.alpha, cfg.pseudo.beta, cfg.pseudo.logt) == (32.0, 32.0, 4)
    assert (cfg.seg.backbone, cfg.seg.train.steps, cfg.seg.train.batch_size, cfg.seg.optim.lr) == ("resnet18", 200, 16, 1e-3)
    assert cfg.cam.scales == (1.0, 0.5) and cfg.seg.scale_range == (0.75, 1.25) and cfg.aff.label_mode == "threshold"
    assert cfg.teacher.arch == "vit_tiny_patch16_224" and cfg.slurm.time_min == 30
    assert cfg.refine == "psa" and (cfg.irn.backbone, cfg.irn.init, cfg.irn.train.crop) == ("resnet18", "cls", 80)


def test_voc_irn_recipe_is_irn_s():
    cfg = voc("refine=irn")
    i = cfg.irn
    assert (i.backbone, i.radius, i.walk_radius, i.beta, i.logt, i.bg_threshold) == ("resnet50", 10, 5, 10.0, 8, 0.25)
    assert (cfg.aff.conf_fg, cfg.aff.conf_bg, i.train.steps, i.train.batch_size, i.train.crop) == (0.30, 0.05, 990, 32, 512)
    # irn: lr 0.1 with its momentum slot holding the weight decay 1e-4: the same steady-state step at momentum 0.9
    assert i.optim.lr / (1 - i.optim.momentum) == pytest.approx(0.1 / (1 - i.optim.weight_decay), rel=1e-12)


def _section() -> str:
    text = DOC.read_text()
    start = text.index("## The voc preset (references' recipes)")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_docs_table_names_every_preset_key():
    section = _section()
    header = "| key | ours | psa | irn | SC-CAM | seed (mva-wsss) | deeplab-pytorch | source |"
    assert header in section
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert all(line.count("|") == header.count("|") for line in rows)  # 8 columns in every row
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", "\n".join(rows)))
    assert set(VOC_PRESET) <= named, sorted(set(VOC_PRESET) - named)


def test_documented_words_are_valid_configs():
    """Every `key=value …` span of the section builds a config after data=voc (the words a user types)."""
    word = r"[a-z_]+(?:\.[a-z_]+)*=\S+"
    spans = [s.split() for s in re.findall(rf"`({word}(?:\s+{word})*)`", _section().replace("\n  ", " "))]
    assert len(spans) >= 6
    has_crf = importlib.util.find_spec("pydensecrf") is not None
    for words in spans:
        if words == ["key=value"] or ("aff.crf=true" in words and not has_crf):
            continue
        voc(*words)
    seed_t12 = voc("cls.split=train", "cam.split=train", "cls.train.steps=2745", "cls.train.batch_size=8")
    assert seed_t12.cls.train.steps == steps(TRAIN, 8, 15) and seed_t12.cls.split == "train"
    seed_t3 = voc("method=fmix", "cls.train.steps=26440", "cls.train.batch_size=8", "cls.optim.lr=0.0050025")
    assert seed_t3.cls.train.steps == steps(TRAIN_AUG, 8, 20) and seed_t3.cls.optim.lr == pytest.approx(0.05 * 0.1 / 0.9995, rel=1e-6)
    sc = voc("method=sc", "cls.sub_weight=5", "cls.sc_rounds=4", "cls.cluster=kmeans", "cls.optim.lr=0.0010005")
    assert sc.cls_rounds() == [0, 1, 2, 3] and sc.cls.optim.lr == pytest.approx(0.01 * 0.1 / 0.9995, rel=1e-6)
