"""Weights, every way users have them: local state dicts, psa's MXNet .params, timm names, the ViT teacher's
pos-embed and normalisation, deeplab-pytorch's COCO init, and the config checks (issue "weights")."""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wsss_dist.config import Config, make_config, to_yaml
from wsss_dist.errors import ConfigError, WeightsError
from wsss_dist.models.backbones import create_backbone
from wsss_dist.models.build import build_deeplab, build_teacher, create_model, deeplab_spec, imagenet_weights
from wsss_dist.models.mxnet_params import MXNetFormatError, read_params
from wsss_dist.models.preflight import preflight
from wsss_dist.models.pretrained import (Weights, create_timm_model, load_weights, normalization, parse_weights,
                                         read_state_dict)

VOC = ["data=voc", "data.voc_root=/nowhere/VOC2012"]


def checked_config(words: list[str]) -> Config:
    """A config as the command line takes it: built, then the pre-flight checks of names and weights."""
    cfg = make_config(words)
    preflight(cfg)
    return cfg


# ------------------------------------------------------------------------------------ MXNet NDArray files, by hand
FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2, np.dtype("int32"): 4}


def _nd_v2(a: np.ndarray) -> bytes:
    """One array as NDArray::Save writes it (V2: magic, storage type, int64 shape, context, dtype flag, data)."""
    head = struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    return head + struct.pack("<iii", 1, 0, FLAGS[a.dtype]) + np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()


def _nd_v1(a: np.ndarray) -> bytes:
    head = struct.pack("<I", 0xF993FAC8) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    return head + struct.pack("<iii", 2, 1, FLAGS[a.dtype]) + np.ascontiguousarray(a).tobytes()  # saved from gpu(1)


def _nd_legacy(a: np.ndarray) -> bytes:
    """The oldest layout (no magic: uint32 ndim, uint32 dims), what 2016 MXNet wrote."""
    head = struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    return head + struct.pack("<iii", 1, 0, FLAGS[a.dtype]) + np.ascontiguousarray(a).tobytes()


def _write_params(path: Path, items: list[tuple[str, np.ndarray]], nd=_nd_v2, names: bool = True) -> None:
    """An NDArray list: uint64 magic 0x112, reserved, count, arrays, count of names, names (uint64 length + bytes)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQ", 0x112, 0, len(items)))
        for _, a in items:
            f.write(nd(a))
        f.write(struct.pack("<Q", len(items) if names else 0))
        for name, _ in items if names else ():
            b = name.encode()
            f.write(struct.pack("<Q", len(b)) + b)


def _mxnet_name(key: str) -> str:
    """Our (psa's PyTorch) ResNet-38d name → psa's MXNet name, written out independently of the converter."""
    bn = {"weight": ("arg", "gamma"), "bias": ("arg", "beta"), "running_mean": ("aux", "moving_mean"),
          "running_var": ("aux", "moving_var")}
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    module, *rest = key.split(".")
    if module == "bn7":
        prefix, last = bn[rest[0]]
        return f"{prefix}:bn7_{last}"
    layer, param = rest
    stage, _, index = module[1:].partition("_")
    block = f"{stage}a" if not index else f"{stage}b{index}"  # b2 → 2a, b4_5 → 4b5
    kind, branch = layer.split("_", 1)  # conv_branch2b1 → conv, branch2b1
    if kind == "conv":
        return f"arg:res{block}_{branch}_weight"
    prefix, last = bn[param]
    return f"{prefix}:bn{block}_{branch}_{last}"


@pytest.fixture(scope="module")
def psa_params(tmp_path_factory):
    """psa's ilsvrc-cls_rna-a1_cls1000_ep-0001.params layout: every ResNet-38d tensor (BN moving mean/var as aux:)
    plus the linear1000 classifier psa drops, random values; and the expected state dict in our names."""
    from wsss_dist.models.resnet38d import ResNet38d

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ResNet38d().state_dict().items() if not k.endswith("num_batches_tracked")}
    g = torch.Generator().manual_seed(0)
    expected = {k: (torch.rand(s, generator=g) + 0.5 if k.endswith("running_var") else torch.randn(s, generator=g))
                for k, s in shapes.items()}
    items = [(_mxnet_name(k), v.numpy()) for k, v in expected.items()]
    items += [("arg:linear1000_weight", np.ones((1000, 4096), np.float32)),
              ("arg:linear1000_bias", np.zeros(1000, np.float32))]
    path = tmp_path_factory.mktemp("psa") / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    _write_params(path, items)
    assert any(n.startswith("aux:") and n.endswith("moving_var") for n, _ in items)
    return path, expected


def test_psa_mxnet_params_load_into_resnet38d_every_tensor(psa_params):
    path, expected = psa_params
    raw = read_params(path)
    assert "arg:linear1000_weight" in raw and "aux:bn7_moving_mean" in raw and "arg:res4b5_branch2b1_weight" in raw
    bb = create_backbone("resnet38d", weights=str(path))
    got = {k: v for k, v in bb.body.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert got.keys() == expected.keys()  # every tensor of the network came from the file
    bad = [k for k in got if not torch.equal(got[k], expected[k])]
    assert bad == [], bad[:5]
    assert load_weights(create_backbone("resnet38d").body, path) == {"loaded": len(expected), "dropped": 0}


def test_convert_weights_command_writes_safetensors(psa_params, tmp_path, capsys):
    from wsss_dist.cli import COMMANDS, main

    path, expected = psa_params
    out = tmp_path / "w" / "resnet38d.safetensors"
    assert "convert-weights" in COMMANDS
    main(["convert-weights", str(path), str(out)])
    assert f"wrote {len(expected)} tensors to {out}" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p != out]  # atomic: no temporary left
    sd = load_file(str(out))
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    cfg = checked_config(VOC + ["stage=cls", f"model.weights={out}"])  # passes the header check at config build
    assert cfg.model.weights == str(out)
    with pytest.raises(SystemExit) as e:  # a backbone it does not fit: one-line user error, exit 2
        main(["convert-weights", str(path), str(tmp_path / "x.safetensors"), "--backbone=resnet18"])
    assert e.value.code == 2 and "do not fit resnet18" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="safetensors"):
        from wsss_dist.models.backbones import convert_weights

        convert_weights(path, tmp_path / "x.pth")


def test_mxnet_format_variants_and_errors(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.5, 2.5], np.float64)
    for nd in (_nd_v2, _nd_v1, _nd_legacy):
        p = tmp_path / f"{nd.__name__}.params"
        _write_params(p, [("arg:a", a), ("aux:b", b)], nd=nd)
        got = read_params(p)
        assert list(got) == ["arg:a", "aux:b"] and torch.equal(got["arg:a"], torch.from_numpy(a))
        assert got["aux:b"].dtype == torch.float64 and got["aux:b"].tolist() == [1.5, 2.5]
    p = tmp_path / "t.params"
    _write_params(p, [("arg:a", a)])
    p.write_bytes(p.read_bytes()[:-20])  # cut into the names
    with pytest.raises(MXNetFormatError, match="truncated"):
        read_params(p)
    _write_params(p, [("arg:a", a)], names=False)
    with pytest.raises(MXNetFormatError, match="names"):
        read_params(p)
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(MXNetFormatError, match="not an MXNet"):
        read_params(p)
    sparse = bytearray(_nd_v2(a))
    sparse[4:8] = struct.pack("<i", 1)  # row_sparse storage
    p.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + bytes(sparse))
    with pytest.raises(MXNetFormatError, match="sparse"):
        read_params(p)
    _write_params(p, [("arg:fc6_weight", a)])  # not a ResNet-38d name: an error naming it, never dropped silently
    with pytest.raises(WeightsError, match="fc6_weight"):
        read_state_dict(p)


# ------------------------------------------------------------------------------------------------ timm names
def _timm_weights_file(folder: Path, arch: str, name: str, seed: int) -> tuple[Path, dict]:
    """A safetensors file of a randomly initialised timm model's state dict (what a downloaded file looks like)."""
    import timm

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False).state_dict().items()}
    save_file(sd, str(folder / name))
    return folder / name, sd


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    return _timm_weights_file(tmp_path_factory.mktemp("timm"), "resnet18", "resnet18_a1_in1k.safetensors", 3)


def test_parse_weights_forms():
    assert parse_weights("") == Weights("unset")
    assert parse_weights(None) == parse_weights("none") == parse_weights("NULL") == Weights("none", text="none")
    assert parse_weights("timm") == Weights("timm", text="timm")
    forms = {"timm:resnet101.a1h_in1k": ("timm", "resnet101.a1h_in1k", None),
             "resnet101.a1h_in1k": ("timm", "resnet101.a1h_in1k", None),
             "hf-hub:timm/resnet50.a1_in1k": ("hf", "hf-hub:timm/resnet50.a1_in1k", None),
             "timm:resnet18.a1_in1k@/w/r18.safetensors": ("timm", "resnet18.a1_in1k", "/w/r18.safetensors"),
             "resnet18.a1_in1k@/w/r18.safetensors": ("timm", "resnet18.a1_in1k", "/w/r18.safetensors"),
             "timm@/w/r18.safetensors": ("timm", None, "/w/r18.safetensors"),
             "hf-hub:timm/resnet18.a1_in1k@main": ("hf", "hf-hub:timm/resnet18.a1_in1k@main", None),
             "/w/resnet38d.safetensors": ("file", None, "/w/resnet38d.safetensors"),
             "r101.pth": ("file", None, "r101.pth")}
    for text, (kind, name, path) in forms.items():
        w = parse_weights(text)
        assert (w.kind, w.name, w.path, w.text) == (kind, name, path, text), text
        assert w.given and parse_weights(w) is w  # parsed once: a parsed value passes through
    assert not parse_weights("").given and not parse_weights("none").given
    with pytest.raises(Exception):  # frozen
        parse_weights("timm").kind = "file"  # type: ignore[misc]


def test_config_imports_no_heavy_library():
    """The config layer is pure: the checks that need timm, torch or safetensors run in the pre-flight."""
    import subprocess
    import sys

    code = ("import sys; from wsss_dist.config import make_config; make_config(['stage=all', 'method=teach']); "
            "print(sorted(m for m in ('timm', 'torch', 'safetensors') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("form", ["timm:resnet18.a1_in1k@{}", "resnet18.a1_in1k@{}", "timm@{}"])
def test_timm_names_load_through_timm_with_a_local_copy(r18_file, form):
    path, sd = r18_file
    value = form.format(path)
    checked_config(VOC + ["stage=cls", "model.backbone=resnet18", f"model.weights={value}"])  # accepted at config build
    bb = create_backbone("resnet18", weights=value, output_stride=8)
    got = bb.body.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in got if not k.endswith("num_batches_tracked"))
    assert bb(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)  # still dilated to output stride 8


def test_timm_names_never_build_random_weights(r18_file, monkeypatch):
    import timm
    import timm.models

    path, _ = r18_file
    with pytest.raises(ConfigError, match=r"model\.weights=timm:resnet50\.a1_in1k: weights of resnet50, but model\.backbone=resnet18"):
        checked_config(VOC + ["stage=cls", "model.backbone=resnet18", "model.weights=timm:resnet50.a1_in1k"])
    with pytest.raises(ConfigError, match=r"model\.weights=timm:resnet18\.bogus: timm has no pretrained weights.*known: resnet18\.a1_in1k"):
        checked_config(VOC + ["stage=cls", "model.backbone=resnet18", "model.weights=timm:resnet18.bogus"])
    with pytest.raises(ConfigError, match=r"model\.weights=timm: timm has no weights of our resnet38d"):
        checked_config(VOC + ["stage=cls", "model.weights=timm"])
    with pytest.raises(ConfigError, match=r"model\.weights=timm:resnet18\.a1_in1k@/nope/r18\.safetensors: weights file not found"):
        checked_config(VOC + ["stage=cls", "model.backbone=resnet18", "model.weights=timm:resnet18.a1_in1k@/nope/r18.safetensors"])
    with pytest.raises(WeightsError, match="Invalid pretrained tag"):
        create_backbone("resnet18", weights="timm:resnet18.bogus")
    with pytest.raises(WeightsError, match="are of resnet50, not resnet18"):
        create_backbone("resnet18", weights="resnet50.a1_in1k")
    with pytest.raises(WeightsError, match="could not load"):  # a local copy that does not fit: timm's strict load
        create_backbone("resnet50", weights=f"timm:resnet50.a1_in1k@{path}")
    real_create = timm.create_model

    def warns_and_keeps_random(*args, **kwargs):  # what older timm does when it finds no weights
        logging.getLogger("timm.models._builder").warning(
            "No pretrained weights exist or were found for this model. Using random initialization.")
        return real_create(args[0], pretrained=False, **{k: v for k, v in kwargs.items()
                                                         if k not in ("pretrained", "pretrained_cfg_overlay")})

    monkeypatch.setattr(timm, "create_model", warns_and_keeps_random)
    with pytest.raises(WeightsError, match="random initialisation"):
        create_backbone("resnet18", weights=f"timm@{path}")
    monkeypatch.setattr(timm, "create_model", real_create)
    no_source = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    no_source = type(no_source)(**{**no_source.to_dict(), "url": "", "hf_hub_id": None, "architecture": "resnet18"})
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: no_source)
    with pytest.raises(WeightsError, match="no download source"):
        create_timm_model("resnet18", "timm:resnet18.a1_in1k", features_only=True)


# ------------------------------------------------------------------------------------------------ the ViT teacher
@pytest.fixture(scope="module")
def vit224(tmp_path_factory):
    return _timm_weights_file(tmp_path_factory.mktemp("vit"), "vit_tiny_patch16_224", "vit_tiny_224.safetensors", 5)


@pytest.mark.parametrize("form", ["{}", "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k@{}"])
def test_teacher_pos_embed_resampled_to_img_size(vit224, form):
    from timm.layers import resample_abs_pos_embed

    path, sd = vit224
    cfg = checked_config(VOC + ["method=teach", "stage=teacher", "teacher.arch=vit_tiny_patch16_224", "teacher.img_size=64",
                             f"teacher.weights={form.format(path)}"])  # the header check allows the resampled pos_embed
    model = build_teacher(cfg)
    assert sd["pos_embed"].shape == (1, 197, 192) and model.pos_embed.shape == (1, 17, 192)
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[4, 4], old_size=[14, 14], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed.detach(), want, atol=1e-6)
    assert torch.equal(model.blocks[3].attn.qkv.weight.detach(), sd["blocks.3.attn.qkv.weight"])
    assert model.head.out_features == 20
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 20)


def test_teacher_normalization_from_timm_data_config(vit224):
    assert normalization("timm", "vit_small_patch16_224") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the default tag: augreg
    mean, std = normalization("timm:vit_small_patch16_224.dino", "vit_small_patch16_224")
    assert np.allclose(mean, (0.485, 0.456, 0.406)) and np.allclose(std, (0.229, 0.224, 0.225))
    path, _ = vit224
    cfg = checked_config(["method=teach", "stage=teacher", "teacher.arch=vit_tiny_patch16_224", f"teacher.weights={path}"])
    assert normalization(cfg.teacher.weights, cfg.teacher.arch) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the arch's tag
    from wsss_dist.models.build import spec_normalization, teacher_spec

    assert spec_normalization(teacher_spec(cfg)) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # recorded in model.json
    scratch = make_config(["teacher.arch=vit_small_patch16_224"])  # from scratch: ImageNet's, as every stage
    assert spec_normalization(teacher_spec(scratch)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------- deeplab-pytorch init
def _deeplab_pytorch_name(k: str) -> str:
    """timm ResNet name → deeplab-pytorch's (libs/models/resnet.py), written out independently of the mapping."""
    if k.startswith("conv1."):
        return "layer1.conv1.conv." + k[len("conv1."):]
    if k.startswith("bn1."):
        return "layer1.conv1.bn." + k[len("bn1."):]
    layer, block, rest = k.split(".", 2)
    branch = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
              "conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv",
              "downsample.1": "shortcut.bn"}
    mod, param = rest.rsplit(".", 1)
    return f"layer{int(layer[5:]) + 1}.block{int(block) + 1}.{branch[mod]}.{param}"


@pytest.fixture(scope="module")
def coco_init():
    """A state dict in deeplabv1_resnet101-coco.pth's names (Caffe ResNet-101 + DeepLab-v1 fc, 91 classes)."""
    import timm

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in timm.create_model("resnet101", num_classes=0).state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    g = torch.Generator().manual_seed(7)
    ours = {k: (torch.rand(s, generator=g) + 0.5 if "running_var" in k else torch.randn(s, generator=g))
            for k, s in shapes.items()}
    sd = {_deeplab_pytorch_name(k): v for k, v in ours.items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(91, 2048, 1, 1), torch.randn(91)
    return sd, ours


@pytest.mark.parametrize("variant", ["coco", "voc-msc"])
def test_deeplab_pytorch_init_maps_onto_deeplab_v2(coco_init, tmp_path, variant):
    sd, ours = coco_init
    assert "layer2.block1.shortcut.conv.weight" in sd and "layer5.block3.increase.bn.running_var" in sd
    if variant == "voc-msc":  # deeplabv2_resnet101_msc-vocaug.pth / a deeplab-pytorch checkpoint: base. + ASPP
        sd = {"base." + k: v for k, v in sd.items() if not k.startswith("fc.")}
        for i in range(4):
            sd[f"base.aspp.c{i}.weight"], sd[f"base.aspp.c{i}.bias"] = torch.randn(21, 2048, 3, 3), torch.randn(21)
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(sd, path)
    cfg = checked_config(VOC + ["stage=seg", f"seg.weights={path}"])
    torch.manual_seed(0)
    model = build_deeplab(cfg)
    got = model.backbone.body.state_dict()
    assert {k for k in got if not k.endswith("num_batches_tracked")} == ours.keys()
    stem = {"conv1.weight", "bn1.running_mean"}  # converted to RGB ImageNet-normalised input (below)
    assert [k for k in ours if k not in stem and not torch.equal(got[k], ours[k])] == []
    for i, conv in enumerate(model.aspp):
        if variant == "voc-msc":
            assert torch.equal(conv.weight, sd[f"base.aspp.c{i}.weight"]) and torch.equal(conv.bias, sd[f"base.aspp.c{i}.bias"])
        else:  # the 91-class COCO head does not fit: DeepLab-v2's ASPP keeps its N(0, 0.01) init
            assert conv.bias.abs().sum() == 0 and 0.005 < conv.weight.std() < 0.02
    # the stem sees the same image: Caffe's BGR 0..255 − mean vs ours RGB (x/255 − mean)/std, away from the border
    x = torch.randint(0, 256, (1, 3, 40, 40)).double()
    caffe_in = x[:, [2, 1, 0]] - torch.tensor([104.008, 116.669, 122.675]).double().view(1, 3, 1, 1)
    ours_in = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).double().view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).double().view(1, 3, 1, 1)

    def stem(inp, w, mean):
        h = F.conv2d(inp, w.double(), stride=2, padding=3)
        return F.batch_norm(h, mean.double(), ours["bn1.running_var"].double(), ours["bn1.weight"].double(),
                            ours["bn1.bias"].double(), training=False, eps=1e-5)

    want = stem(caffe_in, ours["conv1.weight"], ours["bn1.running_mean"])[..., 2:-2, 2:-2]
    have = stem(ours_in, got["conv1.weight"], got["bn1.running_mean"])[..., 2:-2, 2:-2]
    assert torch.allclose(have, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


def test_deeplab_pytorch_via_convert_and_create_model(coco_init, tmp_path):
    from wsss_dist.models.backbones import convert_weights

    sd, _ = coco_init
    pth = tmp_path / "coco.pth"
    torch.save({"state_dict": sd}, pth)
    out = convert_weights(pth, tmp_path / "coco.safetensors")
    assert out["format"] == "deeplab-pytorch" and out["backbone"] == "resnet101"
    spec = deeplab_spec(checked_config(VOC + ["stage=seg", f"seg.weights={tmp_path / 'coco.safetensors'}"]))
    a = create_model(spec, weights=str(tmp_path / "coco.safetensors")).backbone.body.state_dict()
    b = create_model(spec, weights=str(pth)).backbone.body.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # converted once, the same as mapped at load


# ---------------------------------------------------------------------------------------- config: given or none
def test_voc_needs_weights_unless_none(caplog):
    assert checked_config([]).model.weights == ""  # the toy preset trains from scratch without any weights key
    checked_config(["stage=all", "method=teach"])
    with pytest.raises(ConfigError, match=r"^data=voc: stage cls needs model\.weights .*model\.weights=none") as e:
        checked_config(VOC)
    assert "\n" not in str(e.value)
    assert checked_config(VOC + ["stage=shards"]).model.backbone == "resnet38d"
    with pytest.raises(ConfigError, match=r"stage aff needs model\.weights"):
        checked_config(VOC + ["stage=aff"])
    checked_config(VOC + ["stage=aff", "aff.init=cls"])  # the trained classifier's backbone: no ImageNet weights needed
    with pytest.raises(ConfigError, match=r"stage seg needs seg\.weights"):
        checked_config(VOC + ["stage=seg"])
    with pytest.raises(ConfigError, match=r"stage teacher needs teacher\.weights"):
        checked_config(VOC + ["stage=teacher", "method=teach"])
    cfg = checked_config(VOC + ["model.weights=none", "seg.weights=null", "stage=[cls,aff,seg]"])
    assert cfg.model.weights is None and cfg.seg.weights is None
    caplog.set_level(logging.WARNING)
    assert not imagenet_weights(cfg.model.weights, "model.weights").given
    assert "model.weights=none: the network starts from random weights" in caplog.text
    caplog.clear()
    assert not imagenet_weights("", "model.weights").given and not caplog.text  # not given (toy): silent


def test_unset_and_none_survive_the_saved_config(tmp_path):
    cfg = checked_config(VOC + ["model.weights=none", "stage=[cls,aff]"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert checked_config([f"config={tmp_path / 'c.yaml'}"]).model.weights is None
    toy = checked_config([])
    (tmp_path / "t.yaml").write_text(to_yaml(toy))
    assert checked_config([f"config={tmp_path / 't.yaml'}"]).model.weights == ""
    (tmp_path / "n.yaml").write_text("data: {name: voc, voc_root: /v}\nmodel: {weights: none}\nstage: cls\n")
    assert parse_weights(checked_config([f"config={tmp_path / 'n.yaml'}"]).model.weights).kind == "none"


def test_missing_or_misfit_weights_file_is_a_config_error(tmp_path, r18_file, monkeypatch):
    with pytest.raises(ConfigError, match=r"^model\.weights=/nope/r38\.safetensors: weights file not found"):
        checked_config(VOC + ["stage=cls", "model.weights=/nope/r38.safetensors"])
    with pytest.raises(ConfigError, match=r"seg\.weights=.*weights file not found"):
        checked_config(["stage=seg", "seg.init=imagenet", f"seg.weights={tmp_path / 'x.pth'}"])  # toy too: a given path
    path, _ = r18_file
    import safetensors.torch

    def no_full_read(*a, **k):
        raise AssertionError("the config check reads only the safetensors header")

    monkeypatch.setattr(safetensors.torch, "load_file", no_full_read)
    checked_config(["stage=cls", f"model.weights={path}"])  # toy resnet18: fits
    with pytest.raises(ConfigError, match=r"^model\.weights=.*resnet18_a1_in1k\.safetensors: weights do not fit resnet50: "
                                          r".*of another shape \(e\.g\. layer1\.0\.conv1\.weight: file \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"):
        checked_config(["stage=cls", "model.backbone=resnet50", f"model.weights={path}"])
    with pytest.raises(ConfigError, match=r"model\.weights=.*does not look|weights do not fit resnet38d"):
        checked_config(VOC + ["stage=cls", f"model.weights={path}"])  # a resnet18 file for resnet38d
    with pytest.raises(ConfigError, match=r"teacher\.weights=.*weights do not fit vit_tiny_patch16_224"):
        checked_config(["method=teach", "stage=teacher", f"teacher.weights={path}"])
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConfigError, match=r"model\.weights=.*junk\.safetensors: not a readable safetensors file"):
        checked_config(["stage=cls", f"model.weights={bad}"])
    params = tmp_path / "r.params"
    params.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model\.weights=.*r\.params: an MXNet \.params file is psa's ResNet-38d"):
        checked_config(["stage=cls", f"model.weights={params}"])
    monkeypatch.undo()
    unused = checked_config(["stage=cls", "seg.weights=/nope/r101.pth"])  # a stage that does not load it: not checked
    assert unused.seg.weights == "/nope/r101.pth"


def test_a_timm_tag_must_be_cached_or_downloadable_before_any_job(tmp_path, monkeypatch):
    """Issue 25 #2: a timm tag whose weights are not in the local Hugging Face cache on an offline machine is one line
    at the pre-flight (not ~40 s of retries in the job); once the cache holds them it passes."""
    from wsss_dist.models.preflight import check_cached_or_reachable

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.weights=timm: timm/resnet18.a1_in1k is not in the Hugging Face cache "
                                          r"\(.*hub\) and HF_HUB_OFFLINE is set; fill the cache"):
        check_cached_or_reachable("model.weights", "timm", "timm/resnet18.a1_in1k")
    snap = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    check_cached_or_reachable("model.weights", "timm", "timm/resnet18.a1_in1k")  # cached: no error
