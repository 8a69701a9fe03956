import subprocess
import sys

import pytest

from wsss_dist.config import load_yaml, make_config, parse_stages, to_yaml
from wsss_dist.errors import ConfigError


def test_overrides_are_typed_and_dotted():
    cfg = make_config(["stage=cls", "method=fmix", "cls.train.steps=7", "cam.scales=[1,0.5]", "cls.entropy_on_labels=true"])
    assert cfg.cls.train.steps == 7 and cfg.cam.scales == (1.0, 0.5) and cfg.cls.entropy_on_labels is True
    assert cfg.stages() == ["cls"] and str(cfg.run_dir) == "runs/fmix-toy"
    assert make_config(["aff.stride=8"]).aff.stride == 8 and isinstance(make_config(["aff.stride=4"]).aff.stride, int)
    with pytest.raises(ConfigError, match="aff.stride"):
        make_config(["aff.stride=5"])


def test_presets_then_user_overrides():
    assert make_config([]).model.backbone == "resnet18"  # toy preset
    assert make_config(["data=voc", "data.voc_root=/v"]).model.backbone == "resnet38d"  # seed default
    assert make_config(["model.backbone=resnet50"]).model.backbone == "resnet50"


@pytest.mark.parametrize("args, words", [
    (["cls.trian.steps=3"], ["cls.trian.steps"]),
    (["method=foo"], ["method", "cam, mixup, fmix, manifold, sc, teach"]),
    (["cls.train.steps=abc"], ["cls.train.steps", "integer"]),
    (["cls.train.steps=2.5"], ["integer"]),
    (["stage=bogus"], ["bogus", "allowed"]),
    (["oops"], ["key=value"]),
    (["data=voc"], ["data.voc_root"]),
    (["cls.train.mixed_precision=fp8"], ["no, fp16, bf16"]),
    (["cam.bg_threshold=high"], ["number"]),
])
def test_bad_keys_and_values_fail_naming_them(args, words):
    with pytest.raises(ConfigError) as e:
        make_config(args)
    for w in words:
        assert w in str(e.value)


def test_round_trip_and_stage_lists(tmp_path):
    cfg = make_config(["method=teach", "seg.eval_scales=[1,0.5]"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert make_config([f"config={tmp_path / 'c.yaml'}"]) == cfg
    assert parse_stages("all", "teach")[:3] == ["shards", "teacher", "cls"]
    assert "teacher" not in parse_stages("all", "cam")
    assert parse_stages("[aff,cam]", "cam") == ["cam", "aff"]


def test_cli_user_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "wsss_dist", "stage=cls", "cls.nope=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown config key 'cls.nope'")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
