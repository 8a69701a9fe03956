import json
import subprocess
import sys

import pytest

from wsss_dist.config import load_yaml, make_config, parse_stages, to_yaml
from wsss_dist.errors import ConfigError


def test_overrides_are_typed_and_dotted():
    cfg = make_config(["stage=cls", "method=fmix", "cls.train.steps=7", "cam.scales=[1,0.5]", "cls.entropy_on_labels=true"])
    assert cfg.cls.train.steps == 7 and cfg.cam.scales == (1.0, 0.5) and cfg.cls.entropy_on_labels is True
    assert cfg.stages() == ["cls"] and str(cfg.run_dir).startswith("runs/fmix-toy-")  # other settings: another run


def test_a_default_run_name_reflects_the_settings_that_change_results():
    """Issue 25 #1: runs named by default never share a directory with other settings (as sweep points)."""
    assert str(make_config(["method=fmix", "stage=all"]).run_dir) == "runs/fmix-toy"
    assert str(make_config(["method=fmix", "cls.train.steps=600", "cam.bg_threshold=0.3"]).run_dir) == \
        "runs/fmix-toy-steps600-bg_threshold0.3"
    operational = ["method=fmix", "data.num_workers=0", "cls.train.ckpt_every=5", "log_level=DEBUG", "stage=cam"]
    assert str(make_config(operational).run_dir) == "runs/fmix-toy"
    long = make_config(["method=fmix", "cam.scales=[1,0.5]"]).run_dir
    assert str(long).startswith("runs/fmix-toy-") and long != make_config(["method=fmix", "cam.scales=[1,0.75]"]).run_dir
    assert str(make_config(["method=fmix", "cls.train.steps=600", "run=runs/mine"]).run_dir) == "runs/mine"
    assert make_config(["aff.stride=8"]).aff.stride == 8 and isinstance(make_config(["aff.stride=4"]).aff.stride, int)
    with pytest.raises(ConfigError, match="aff.stride"):
        make_config(["aff.stride=5"])


def test_presets_then_user_overrides():
    assert make_config([]).model.backbone == "resnet18"  # toy preset
    assert make_config(["data=voc", "data.voc_root=/v", "stage=shards"]).model.backbone == "resnet38d"  # seed default
    # (stage=all on VOC needs model.weights / seg.weights: tests/test_weights.py)
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
    # a sweep over methods names the teacher once: the methods without one leave it out; only it is an error
    assert parse_stages("[teacher,cls,cam]", "mixup") == ["cls", "cam"]
    assert parse_stages("[teacher,cls,cam]", "teach") == ["teacher", "cls", "cam"]
    with pytest.raises(ConfigError, match="method=cam has no stage teacher$"):
        parse_stages("teacher", "cam")


def test_cli_user_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "wsss_dist", "stage=cls", "cls.nope=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown config key 'cls.nope'")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_yaml_files_merge_under_the_words_and_lists_parse(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("method: fmix\ncls:\n  train:\n    steps: 11\n    resize_long: [40, 60]\ncam:\n  scales: [1.0, 0.75]\n")
    b.write_text("cls:\n  train:\n    steps: 12\n")
    cfg = make_config([f"config={a}", f"config={b}", "cls.train.crop=40"])
    assert (cfg.method, cfg.cls.train.steps, cfg.cls.train.crop) == ("fmix", 12, 40)  # b over a, words over both
    assert cfg.cls.train.resize_long == (40, 60) and cfg.cam.scales == (1.0, 0.75)
    assert make_config([f"config={a}", "cls.train.steps=3"]).cls.train.steps == 3
    assert make_config(["cls.train.mixed_precision=no", "stage=[cam,aff]"]).stages() == ["cam", "aff"]
    (tmp_path / "bad.yaml").write_text("cls:\n  trian: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'cls.trian'.*in .*bad.yaml"):
        make_config([f"config={tmp_path / 'bad.yaml'}"])
    with pytest.raises(ConfigError, match="no such file"):
        make_config([f"config={tmp_path / 'missing.yaml'}"])


def test_saved_config_is_yaml_and_reruns_the_run(tmp_path):
    """A YAML file plus overrides runs a stage; its saved config.yaml (real YAML) reruns it to the same result."""
    from wsss_dist import pipeline, runs

    (tmp_path / "x.yaml").write_text(f"data:\n  shards_dir: {tmp_path / 'shards'}\n  toy:\n    root: {tmp_path / 'src'}\n"
                                     "    n_train: 6\n    n_val: 4\n    n_sbd: 4\n    size: 32\n")
    cfg = make_config([f"config={tmp_path / 'x.yaml'}", "stage=shards", f"run={tmp_path / 'run'}", "data.shard_size=3"])
    pipeline.run(cfg)
    saved = tmp_path / "run" / "config.yaml"
    assert "shard_size: 3" in saved.read_text() and not saved.read_text().lstrip().startswith("{")
    assert load_yaml(saved).data.toy.n_train == 6
    again = make_config([f"config={saved}"])
    assert again == cfg
    first = runs.read_done(tmp_path / "run", "shards")
    out = pipeline.run(again)["shards"]
    assert out["train_aug"] == first["train_aug"] == 10 and out["rebuilt"] == 0


def test_keys_lists_every_key_with_type_default_and_doc():
    from wsss_dist.config import keys

    rows = keys()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) > 100
    assert all(doc for *_, doc in rows), [k for k, *_, doc in rows if not doc]
    assert ("pseudo.beta", "float", 32.0) == rows[names.index("pseudo.beta")][:3]  # the toy preset's value
    r = subprocess.run([sys.executable, "-m", "wsss_dist", "keys", "aff.stride"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[:4] == ["aff.stride", "4", "one", "of"], r.stdout + r.stderr


@pytest.mark.parametrize("arg, words", [
    ("model.backbone=resnet999", ["model.backbone=resnet999", "unknown backbone"]),
    ("seg.backbone=resnet1O1", ["seg.backbone", "did you mean"]),
    ("method=teach teacher.arch=nope", ["teacher.arch=nope", "unknown"]),  # checked where a stage builds it
    ("cls.finch_partition=abc", ["cls.finch_partition=abc", "last, first or an integer"]),
    ("data.toy.size=10", ["data.toy.size=10", "≥ 24"]),
    ("cls.sc_rounds=0", ["cls.sc_rounds=0", "≥ 1"]),
    ("cls.train.resize_long=[1,2,3]", ["cls.train.resize_long", "2 values"]),
    ("cls=3", ["cls is a group"]),
])
def test_bad_values_fail_when_the_config_is_built(arg, words):
    from wsss_dist.models.preflight import preflight  # names timm must know: the pre-flight, before any job

    with pytest.raises(ConfigError) as e:
        preflight(make_config(arg.split()))
    for w in words:
        assert w in str(e.value)


def test_crf_without_its_extra_fails_when_the_config_is_built(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydensecrf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"aff.crf=true needs .*\[crf\]"):
        make_config(["aff.crf=true"])


@pytest.mark.parametrize("args", [["stage=cam", "model.backbone=resnet999"], ["submit", "stage=all", "method=teach", "teacher.arch=nope"],
                                  ["run", "stage=cls", "cls.finch_partition=abc"]])
def test_cli_bad_value_is_one_line_before_any_work(tmp_path, args):
    r = subprocess.run([sys.executable, "-m", "wsss_dist", *args, f"run={tmp_path / 'run'}"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


def test_one_precision_switch_and_accelerates_default(monkeypatch):
    from wsss_dist.config import PRECISION_KEYS, get

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert {get(make_config([]), k) for k in PRECISION_KEYS} == {"no"}
    assert {get(make_config(["precision=bf16"]), k) for k in PRECISION_KEYS} == {"bf16"}
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    cfg = make_config(["cam.mixed_precision=no"])
    assert cfg.cls.train.mixed_precision == cfg.seg.train.mixed_precision == "bf16" and cfg.cam.mixed_precision == "no"
    assert make_config(["precision=no"]).cls.train.mixed_precision == "no"


def test_stage_shards_alone_checks_no_network_name_and_imports_no_torch():
    """The pre-flight checks only the networks of the asked stages: ``stage=shards`` builds none, so a bad backbone
    name is not its error, and the check imports neither torch nor timm (a packing job starts in a second)."""
    code = ("import sys; from wsss_dist.config import make_config; from wsss_dist.models.preflight import preflight; "
            "preflight(make_config(['stage=shards', 'model.backbone=resnet999'])); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    from wsss_dist.models.preflight import preflight

    with pytest.raises(ConfigError, match="model.backbone=resnet999"):
        preflight(make_config(["stage=cls", "model.backbone=resnet999"]))


@pytest.mark.parametrize("args, error", [
    (["stage=pseudo", "refine=irn", "irn.backbone=nope"], "irn.backbone=nope"),  # IRN's walk builds IRN's network
    (["stage=pseudo", "refine=irn", "model.backbone=nope"], None),  # ... and not AffinityNet's
    (["stage=pseudo", "model.backbone=nope"], "model.backbone=nope"),  # refine=psa: AffinityNet on model.backbone
    (["stage=eval", "seg.backbone=nope"], "seg.backbone=nope"),
    (["stage=cam", "method=clip_es", "model.backbone=nope"], None),  # CLIP-ES's CAMs come from CLIP
    (["stage=cam", "method=clip_es", "clip.arch=nope"], "clip.arch=nope"),
])
def test_the_preflight_checks_the_network_each_asked_stage_builds(args, error):
    """Which network a stage builds is its ``StageSpec.network`` (one table for the pre-flight and the log line)."""
    from wsss_dist.models.preflight import preflight

    if error is None:
        preflight(make_config(args))
    else:
        with pytest.raises(ConfigError, match=error):
            preflight(make_config(args))


def test_the_first_log_line_names_each_stages_network_and_weights():
    from wsss_dist.pipeline import stage_setup

    cfg = make_config(["refine=irn", "irn.init=imagenet", "irn.weights=none"])
    assert stage_setup(cfg, "aff").endswith("backbone IRN boundaries on resnet18, weights none")
    assert stage_setup(cfg, "pseudo").endswith("backbone IRN boundaries on resnet18, weights this run's trained model")
    assert stage_setup(cfg, "seg").endswith("backbone resnet18, weights the classifier's backbone")
    assert stage_setup(make_config(["method=clip_es"]), "cam").endswith("backbone CLIP tiny, weights random")


@pytest.mark.parametrize("args", [[], ["method=clip_es", "refine=irn"], ["method=teach", "teacher.dir=1.5", "run=yes"],
                                  ["data=folder", "data.root=/x", "data.labels=/x/l.csv", "data.classes=on,off,1,null,é"],
                                  ["data=coco", "data.coco_root=/c", "cls.train.resize_long=[32,48]", "cls.optim.lr=1e-5"]])
def test_the_quick_yaml_and_dict_of_a_config_are_omegaconfs(args):
    """``to_yaml`` / ``to_dict`` walk the dataclasses (a run's stages call them often): the same text and values, of
    the same types, as OmegaConf's YAML round trip."""
    from omegaconf import OmegaConf

    from wsss_dist.config import to_yaml
    from wsss_dist.config.build import to_dict

    cfg = make_config(args)
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert to_yaml(cfg) == text
    slow = OmegaConf.to_container(OmegaConf.create(text))

    def typed(x):
        return {k: typed(v) for k, v in x.items()} if isinstance(x, dict) else \
            [typed(v) for v in x] if isinstance(x, list) else (type(x).__name__, x)

    assert typed(to_dict(cfg)) == typed(slow)


def test_timm_names_come_from_a_cache_per_timm_version_that_a_damaged_file_does_not_fool(tmp_path, monkeypatch):
    """The launcher checks timm names against ``$XDG_CACHE_HOME/wsss_dist/timm-<version>-models.json`` (written on
    first use): the same names as timm's own list; a damaged file is rebuilt, not believed."""
    import timm
    from importlib import metadata

    from wsss_dist.models.preflight import check_backbone, timm_model_names

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "wsss_dist" / f"timm-{metadata.version('timm')}-models.json"
    assert timm_model_names() == frozenset(timm.list_models()) and cache.is_file()
    cache.write_text('{"not": "a list"')
    assert "resnet18" in timm_model_names() and json.loads(cache.read_text()) == timm.list_models()
    check_backbone("model.backbone", "resnet50.a1_in1k")  # a pretrained tag names its architecture
    with pytest.raises(ConfigError, match=r"model.backbone=resnet5O: unknown backbone .*did you mean resnet50"):
        check_backbone("model.backbone", "resnet5O")
