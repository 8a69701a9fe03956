"""Backbones, heads and weight loading (CPU, tiny inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss_dist.models import AffinityNet, CAMNet, DeepLabV2, create_model
from wsss_dist.models.backbones import create_backbone
from wsss_dist.models.pretrained import load_weights


def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def r38() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet38d", frozen_bn=True)


@pytest.fixture()
def r18() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet18", output_stride=8, frozen_bn=False).eval()


def test_resnet38d_shapes_levels_and_stride(r38):
    r38.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        conv4, conv5, conv6 = r38.forward_levels(x)
    assert conv6.shape == (1, 4096, 8, 6)  # output stride 8, 4096 channels
    assert conv4.shape == (1, 512, 8, 6) and conv5.shape == (1, 1024, 8, 6)
    assert (r38.out_channels, r38.level_channels, r38.num_stages) == (4096, (512, 1024, 4096), 6)
    assert bool((conv6 >= 0).all())  # bn7 + ReLU


def test_resnet38d_psa_key_names_and_frozen_stem(r38):
    sd = r38.body.state_dict()
    assert sd["conv1a.weight"].shape == (64, 3, 3, 3)
    assert sd["b5.conv_branch2a.weight"].shape == (512, 512, 3, 3)
    assert sd["b6.conv_branch2b1.weight"].shape == (1024, 512, 3, 3)
    assert sd["b7.conv_branch2b2.weight"].shape == (4096, 2048, 1, 1)
    assert sd["bn7.running_var"].shape == (4096,)
    assert 104e6 < sum(v.numel() for k, v in sd.items() if "running" not in k) < 106e6  # ~105M like psa
    frozen = {n.split(".")[0] for n, p in r38.body.named_parameters() if not p.requires_grad and p.ndim == 4}
    assert frozen == {"conv1a", "b2", "b2_1", "b2_2"}
    r38.train()
    assert all(not m.training for m in _bns(r38)) and all(not p.requires_grad for m in _bns(r38)
                                                          for p in m.parameters())
    assert r38.body.b7.dropout_2b1.training  # only BN is frozen, dropout still trains


def test_resnet18_os8_and_levels(r18):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        f = r18(x)
        levels = r18.forward_levels(x)
    assert f.shape == (2, 512, 8, 10)
    assert [lv.shape[1] for lv in levels] == list(r18.level_channels) == [128, 256, 512]
    assert all(lv.shape[-2:] == (8, 10) for lv in levels)
    assert torch.allclose(levels[-1], f)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_bn_timm(frozen):
    torch.manual_seed(0)
    model = CAMNet(create_backbone("resnet18", frozen_bn=frozen))
    model.train()
    bns = _bns(model)
    before = [m.running_mean.clone() for m in bns]
    out = model(torch.randn(2, 3, 32, 32))
    out["logits"].sum().backward()
    assert all(m.training is not frozen for m in bns)
    changed = any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert changed is not frozen  # frozen BN uses and keeps running statistics
    grads = [p.grad for m in bns for p in m.parameters()]
    if frozen:
        assert all(g is None for g in grads)
        assert all(not p.requires_grad for m in bns for p in m.parameters())
    else:
        assert all(g is not None for g in grads)
    assert model.classifier.weight.grad is not None
    assert model.backbone.body.conv1.weight.grad is not None  # timm: only BN is frozen


def test_cam_net_outputs(r18):
    model = CAMNet(r18, num_classes=20, num_sub=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        cams = model.cam(x)
        f = model.backbone(x)
    assert out["logits"].shape == (2, 20) and out["sub_logits"].shape == (2, 7)
    assert out["cams"].shape == (2, 20, 8, 8) and out["pooled"].shape == (2, 512)
    assert bool((out["cams"] >= 0).all()) and torch.allclose(cams, out["cams"])
    # logits = spatial mean of the pre-ReLU CAM (GAP and 1×1 conv commute; no dropout in eval)
    raw = torch.nn.functional.conv2d(f, model.classifier.weight)
    assert torch.allclose(out["logits"], raw.mean((2, 3)), atol=1e-5)
    assert model.classifier.bias is None and model.sub_classifier.bias is None
    assert CAMNet(r18)(x)["sub_logits"] is None


def test_param_groups_lr_mult(r18):
    model = CAMNet(r18, num_sub=3)
    groups = model.param_groups(lr=0.1, weight_decay=5e-4)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.classifier.weight)]["lr_mult"] == 10 and by_id[id(model.classifier.weight)]["lr"] == 1.0
    assert by_id[id(model.sub_classifier.weight)]["lr_mult"] == 10
    conv = model.backbone.body.conv1.weight
    assert by_id[id(conv)]["lr_mult"] == 1 and by_id[id(conv)]["weight_decay"] == 5e-4
    bn = model.backbone.body.bn1.weight
    assert by_id[id(bn)]["weight_decay"] == 0.0
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(by_id) == n_trainable  # every trainable parameter exactly once
    aff = AffinityNet(r18)
    aff_groups = aff.param_groups(0.1, 5e-4)
    assert {g["lr_mult"] for g in aff_groups} == {1.0, 10.0}
    assert any(aff.f9.weight is p for g in aff_groups if g["lr_mult"] == 10 for p in g["params"])


def test_affinity_net_shape(r18):
    aff = AffinityNet(r18).eval()
    assert aff.f9.bias is None and aff.f8_3.in_channels == 128
    with torch.no_grad():
        y = aff(torch.randn(1, 3, 64, 48))
    assert y.shape == (1, 448, 8, 6)


def test_affinity_net_stride4_uses_the_stride4_level(r18, r38):
    """``stride=4``: features on the stride-4 grid, and they depend on the stride-4 level's own head."""
    aff = AffinityNet(r18, stride=4).eval()
    assert aff.f4.in_channels == r18.low_channels == 64 and aff.f9.in_channels == 448 + 64
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        y = aff(x)
        assert y.shape == (1, 448, 16, 12)
        aff.f4.weight.zero_()
        assert not torch.allclose(aff(x), y)
    assert aff.f4 in aff.new_modules()
    with torch.no_grad():
        low, *levels = r38.eval().forward_levels(torch.randn(1, 3, 32, 32), low=True)
    assert low.shape == (1, r38.low_channels, 8, 8) and [l.shape[1] for l in levels] == list(r38.level_channels)
    with pytest.raises(ValueError, match="stride"):
        AffinityNet(r18, stride=2)


def test_deeplab_stride_predict_and_groups(r18):
    model = DeepLabV2(r18, num_classes=21).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
        pred = model.predict(torch.randn(1, 3, 50, 70), scales=(1.0, 0.75, 0.5), flip=True)
        x = torch.randn(1, 3, 40, 40)
        single = model.predict(x, scales=(1.0,))
        up = torch.nn.functional.interpolate(model(x), size=(40, 40), mode="bilinear", align_corners=False)
    assert logits.shape == (1, 21, 8, 8)
    assert pred.shape == (1, 21, 50, 70)
    assert torch.allclose(single, up, atol=1e-6)
    groups = model.param_groups(2.5e-4, 5e-4)
    mults = {g["lr_mult"]: g for g in groups}
    assert set(mults) == {1.0, 10.0, 20.0}
    assert mults[20.0]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in mults[20.0]["params"])
    assert all(p.ndim == 4 for p in mults[10.0]["params"]) and len(mults[10.0]["params"]) == 4


def test_create_model_registry():
    model = create_model("cam", "resnet18", frozen_bn=False, num_classes=5, num_sub=2)
    assert isinstance(model, CAMNet) and model.classifier.out_channels == 5
    assert isinstance(create_model("deeplab", "resnet18", frozen_bn=False), DeepLabV2)
    with pytest.raises(ValueError, match="unknown model kind"):
        create_model("unet", "resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("not_a_model")


def test_load_weights_safetensors_and_pth(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)  # full model: has fc.*
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    st = tmp_path / "r18.safetensors"
    save_file(sd, str(st))
    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": sd, "epoch": 3}, pth)
    for path in (st, pth):
        bb = create_backbone("resnet18", weights=str(path), frozen_bn=True)
        got = bb.body.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in got if not k.endswith("num_batches_tracked"))
    counts = load_weights(create_backbone("resnet18").body, pth)
    assert counts["dropped"] == 2 and counts["loaded"] == len(sd) - 2
    # a full model with a head of another size (e.g. a 20-class teacher): the 1000-class head is dropped
    small = timm.create_model("resnet18", pretrained=False, num_classes=20)
    head = small.fc.weight.detach().clone()
    counts = load_weights(small, st)
    assert counts["dropped"] == 2 and torch.equal(small.fc.weight, head)
    assert torch.equal(small.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    same = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    assert load_weights(same, st) == {"loaded": len(sd), "dropped": 0}  # a head that fits is loaded


def test_load_weights_errors(tmp_path):
    bb = create_backbone("resnet18")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        bb.load_weights(missing)
    sd = {k: v.clone() for k, v in bb.body.state_dict().items()}
    del sd["layer1.0.conv1.weight"]
    sd["layer9.weight"] = torch.zeros(3)
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="bad.pth") as info:
        bb.load_weights(bad)
    msg = str(info.value)
    assert "layer1.0.conv1.weight" in msg and "layer9.weight" in msg and "conv1.weight" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        bb.load_weights(junk)


def test_manifold_mix_at_each_stage(r18):
    x = torch.randn(4, 3, 32, 32)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        plain = r18(x)
        expected_channels = [3, 64, 128, 256]  # input, after layer1, layer2, layer3
        for k in range(r18.num_stages):
            seen = []

            def swap(h, seen=seen):  # lam = 0: the whole batch is replaced by its permutation
                seen.append(h.shape[1])
                return h[perm]

            out = r18(x, mix_at=k, mix_fn=swap)
            assert seen == [expected_channels[k]]
            assert torch.allclose(out, plain[perm], atol=1e-5)  # eval mode: per-sample network
        half = lambda h: 0.5 * h + 0.5 * h[perm]  # noqa: E731
        outs = [r18(x, mix_at=k, mix_fn=half) for k in range(r18.num_stages)]
    assert not torch.allclose(outs[0], outs[2]) and not torch.allclose(outs[1], outs[3])
    with pytest.raises(ValueError, match="mix_at"):
        r18(x, mix_at=r18.num_stages, mix_fn=half)



# ------------------------------------------------------------------------------ normalisation follows the weights
def test_backbone_normalises_to_its_weights_statistics():
    from wsss_dist.data.stream import IMAGENET_MEAN, IMAGENET_STD, renormalize

    torch.manual_seed(0)
    imagenet = create_model({"kind": "cam", "backbone": "resnet18", "frozen_bn": False}).eval()
    half = create_model({"kind": "cam", "backbone": "resnet18", "frozen_bn": False, "mean": [0.5] * 3, "std": [0.5] * 3}).eval()
    half.load_state_dict(imagenet.state_dict())
    assert imagenet.backbone.normalization == (IMAGENET_MEAN, IMAGENET_STD)  # no mean/std in a spec: ImageNet's
    x = torch.randn(1, 3, 32, 32)
    assert imagenet.backbone.renormalize(x) is x  # ImageNet's (toy runs, psa files): the input untouched
    with torch.no_grad():
        assert torch.allclose(half(x)["logits"], imagenet(renormalize(x, (0.5,) * 3, (0.5,) * 3))["logits"], atol=1e-5)
        assert not torch.allclose(half(x)["logits"], imagenet(x)["logits"], atol=1e-3)
    aff = create_model({"kind": "affinity", "backbone": "resnet18", "mean": [0.5] * 3, "std": [0.5] * 3})
    assert aff.backbone.normalization == ((0.5,) * 3, (0.5,) * 3)


def test_spec_records_normalisation_and_trained_models_use_it(tmp_path):
    from wsss_dist.config import make_config
    from wsss_dist.engine import save_model_weights
    from wsss_dist.models.build import classifier_spec, deeplab_spec, load_model, teacher_spec, write_spec

    cfg = make_config(["model.backbone=resnet18", "model.weights=timm:resnet18.a1_in1k", "seg.init=cls",
                       "seg.backbone=resnet18", "teacher.weights=timm", "teacher.arch=vit_tiny_patch16_224"])
    spec = classifier_spec(cfg)
    assert (spec["mean"], spec["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # timm's a1 cfg
    assert deeplab_spec(cfg)["mean"] == spec["mean"]  # seg.init=cls: the classifier's
    assert teacher_spec(cfg)["mean"] == [0.5, 0.5, 0.5]  # augreg ViT
    spec = {**spec, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model_weights(create_model(spec), tmp_path / "model.safetensors")
    write_spec(tmp_path, spec)
    assert load_model(tmp_path).backbone.normalization == ((0.5,) * 3, (0.25,) * 3)


# ------------------------------------------------------------------------------ the trainer stamp
def test_trainer_stamp_writes_model_json_before_the_weights(tmp_path):
    import json

    import engine_script as es

    from wsss_dist.engine import train_model
    from wsss_dist.errors import WeightsError
    from wsss_dist.models.build import load_model

    seen = []

    def loss_fn(model, batch, step):
        seen.append(((tmp_path / "model.json").is_file(), (tmp_path / "model.safetensors").is_file()))
        return es.loss_fn(model, batch, step)

    t, o = es.configs(2, 0, 1)
    spec = {"kind": "tiny", "width": 3}
    kwargs = dict(loss_fn=loss_fn, make_loader=es.make_loader, train=t, optim=o, log_name="tiny")
    metrics, _ = train_model(tmp_path, spec, es.make_model, lambda m: m.param_groups(), **kwargs)
    assert metrics["steps"] == 2 and seen and all(j and not w for j, w in seen)  # model.json first, weights last
    assert json.loads((tmp_path / "model.json").read_text()) == spec
    (tmp_path / "model.json").unlink()  # a run of an older wsss-dist: weights, no model.json
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path)
    assert str(tmp_path / "model.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="model.json: no such file"):  # never rebuilt from today's config
        train_model(tmp_path, spec, es.make_model, lambda m: m.param_groups(), **kwargs)
    assert not (tmp_path / "model.json").exists()
